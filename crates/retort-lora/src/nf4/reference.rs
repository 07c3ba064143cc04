//! The slow, obviously-correct quantizer the fast path is checked against: one value at a time, a
//! linear search for the code, no tables, no parallelism. Test-only.

use super::double_quant::{ABSMAX_BLOCKSIZE, torch_mean};
use super::kernel::ABSMAX_FLOOR;
use super::tables::{DYNAMIC_MAP, NF4_THRESHOLDS};

/// First threshold at or above `x` (values on a threshold take the lower code).
fn nf4_code(x: f32) -> u8 {
    let i = NF4_THRESHOLDS.iter().position(|&t| x <= t).unwrap_or(NF4_THRESHOLDS.len());
    i as u8
}

/// bitsandbytes' CPU rule for the 8-bit code: round to one of 65536 bins, then the code whose
/// midpoint interval holds the bin's value (computed here without the table).
fn dynamic_code(x: f32) -> u8 {
    let x = x.clamp(-1.0, 1.0);
    let bin = ((x + 1.0) * 0.5 * 65535.0 + 0.5) as u16;
    let value = -1.0 + (2.0 * f32::from(bin)) / 65535.0;
    let below = DYNAMIC_MAP.windows(2).filter(|p| 0.5 * (p[0] + p[1]) < value).count();
    below as u8
}

/// (packed codes, absmax, double-quantized absmax as (codes, scales, offset)).
pub(crate) type Reference = (Vec<u8>, Vec<f32>, (Vec<u8>, Vec<f32>, f32));

pub(crate) fn quantize(values: &[f32], blocksize: usize) -> Reference {
    let mut nibbles = Vec::new();
    let mut absmax = Vec::new();
    for block in values.chunks(blocksize) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let clamped = amax.max(ABSMAX_FLOOR);
        if block.len() == blocksize {
            absmax.push(amax);
            nibbles.extend(block.iter().map(|&v| nf4_code(v * (1.0 / clamped))));
        } else {
            absmax.push(clamped);
            nibbles.extend(block.iter().map(|&v| nf4_code(v / clamped)));
        }
    }
    if nibbles.len() % 2 == 1 {
        nibbles.push(nf4_code(0.0));
    }
    let codes = nibbles.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();

    let offset = torch_mean(&absmax);
    let mut dq_codes = Vec::new();
    let mut scales = Vec::new();
    for block in absmax.chunks(ABSMAX_BLOCKSIZE) {
        let centred: Vec<f32> = block.iter().map(|a| a - offset).collect();
        let scale = centred.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        scales.push(scale);
        if scale == 0.0 {
            dq_codes.extend(std::iter::repeat_n(0u8, block.len()));
        } else {
            dq_codes.extend(centred.iter().map(|&c| dynamic_code(c * (1.0 / scale))));
        }
    }
    (codes, absmax, (dq_codes, scales, offset))
}
