//! One block at a time: absmax, scaling, code selection, nibble packing, and the inverse.

use super::tables::{NF4, NF4_THRESHOLDS, NF4_ZERO_CODE};

/// bitsandbytes clamps the absmax to this before scaling (`absmax.clamp(min=1e-38)`), so an all-zero
/// block scales by a finite number; it is below f32's smallest normal, the rounding matches PyTorch's.
pub(crate) const ABSMAX_FLOOR: f32 = 1e-38;

/// Values scaled and coded per inner step: a fixed width the compiler turns into vector code.
const LANES: usize = 16;

/// The largest |x| of a block, or the offset of its first non-finite value.
pub(crate) fn block_absmax(values: &[f32]) -> Result<f32, usize> {
    // Lane-wise maxima and finiteness flags, so the loop compiles to vector code.
    let mut amax = [0.0f32; LANES];
    let mut finite = [true; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for ((m, f), &v) in amax.iter_mut().zip(&mut finite).zip(chunk) {
            let a = v.abs();
            // NaN and inf both fail `<= MAX`.
            *f &= a <= f32::MAX;
            *m = if a > *m { a } else { *m };
        }
    }
    for ((m, f), &v) in amax.iter_mut().zip(&mut finite).zip(chunks.remainder()) {
        let a = v.abs();
        *f &= a <= f32::MAX;
        *m = if a > *m { a } else { *m };
    }
    if finite.iter().all(|&f| f) {
        Ok(amax.iter().fold(0.0f32, |m, &a| if a > m { a } else { m }))
    } else {
        Err(values.iter().position(|v| !v.is_finite()).unwrap_or(0))
    }
}

/// The NF4 code of a scaled value: how many thresholds lie strictly below it ([`quantize_block`] does
/// the same sixteen values at a time).
#[cfg(test)]
pub(crate) fn nf4_code(x: f32) -> u8 {
    NF4_THRESHOLDS.iter().map(|&t| u8::from(t < x)).sum()
}

/// Quantizes one block into `out` (`values.len().div_ceil(2)` bytes) and returns the absmax to store.
///
/// `full` says whether this is a whole block. bitsandbytes' CPU kernel multiplies whole blocks by the
/// reciprocal of the absmax but divides the last, partial block by it (which rounds differently in
/// the last bit), and stores the partial block's absmax after the 1e-38 clamp but whole blocks' before
/// it. Both quirks are kept. Values are not clamped to [-1, 1] first: the thresholds lie inside it, so
/// the clamp bitsandbytes applies cannot change a code.
pub(crate) fn quantize_block(values: &[f32], full: bool, out: &mut [u8]) -> Result<f32, usize> {
    let amax = block_absmax(values)?;
    let floor = amax.max(ABSMAX_FLOOR);
    let reciprocal = 1.0 / floor;
    let mut scaled = [0.0f32; LANES];
    let mut codes = [0u32; LANES];
    for (chunk, bytes) in values.chunks(LANES).zip(out.chunks_mut(LANES / 2)) {
        // A short last chunk is padded with zeros, whose code is the pad nibble bitsandbytes writes.
        scaled.fill(0.0);
        if full {
            for (s, &v) in scaled.iter_mut().zip(chunk) {
                *s = v * reciprocal;
            }
        } else {
            for (s, &v) in scaled.iter_mut().zip(chunk) {
                *s = v / floor;
            }
        }
        // Counted in 32-bit lanes, the width of the comparison masks, and narrowed once.
        codes.fill(0);
        for &t in &NF4_THRESHOLDS {
            for (c, &s) in codes.iter_mut().zip(&scaled) {
                *c += u32::from(t < s);
            }
        }
        for (b, pair) in bytes.iter_mut().zip(codes.chunks_exact(2)) {
            // Counts are at most 15.
            *b = ((pair[0] << 4) | pair[1]) as u8;
        }
    }
    debug_assert!(values.len().is_multiple_of(2) || out.last().is_some_and(|b| b & 0x0f == NF4_ZERO_CODE));
    Ok(if full { amax } else { floor })
}

/// Dequantizes one block: `out.len()` values from the packed `codes` (at least `out.len().div_ceil(2)`
/// bytes, first value in the high nibble), each `NF4[code] * absmax` in f32.
pub(crate) fn dequantize_block(codes: &[u8], absmax: f32, out: &mut [f32]) {
    let last_byte = out.len() / 2;
    let mut pairs = out.chunks_exact_mut(2);
    for (pair, &b) in (&mut pairs).zip(codes) {
        pair[0] = NF4[usize::from(b >> 4)] * absmax;
        pair[1] = NF4[usize::from(b & 0x0f)] * absmax;
    }
    if let [last] = pairs.into_remainder()
        && let Some(&b) = codes.get(last_byte)
    {
        *last = NF4[usize::from(b >> 4)] * absmax;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_split_ties_to_the_lower_code() {
        for (i, &t) in NF4_THRESHOLDS.iter().enumerate() {
            assert_eq!(usize::from(nf4_code(t)), i);
            assert_eq!(usize::from(nf4_code(t.next_up())), i + 1);
        }
        assert_eq!(nf4_code(0.0), NF4_ZERO_CODE);
        assert_eq!(nf4_code(-0.0), NF4_ZERO_CODE);
        assert_eq!(nf4_code(-2.0), 0);
        assert_eq!(nf4_code(2.0), 15);
    }

    #[test]
    fn every_code_value_maps_to_itself() {
        for (i, &v) in NF4.iter().enumerate() {
            assert_eq!(usize::from(nf4_code(v)), i);
        }
    }

    #[test]
    fn odd_blocks_pad_with_the_zero_code() {
        let mut out = [0u8; 2];
        let amax = quantize_block(&[1.0, -1.0, 0.5], false, &mut out).unwrap();
        assert_eq!(amax, 1.0);
        assert_eq!(out, [0xf0, (nf4_code(0.5) << 4) | NF4_ZERO_CODE]);
        let mut back = [0.0; 3];
        dequantize_block(&out, amax, &mut back);
        assert_eq!(back, [1.0, -1.0, NF4[usize::from(nf4_code(0.5))]]);
    }

    #[test]
    fn first_non_finite_value_is_located() {
        assert_eq!(block_absmax(&[1.0, f32::NAN, f32::INFINITY]), Err(1));
        assert_eq!(block_absmax(&[1.0, -3.0]), Ok(3.0));
        assert_eq!(block_absmax(&[f32::MAX, -f32::MAX]), Ok(f32::MAX));
    }
}
