//! Double quantization of the absmax: subtract their mean, then 8-bit blockwise quantization with the
//! dynamic map in blocks of 256, the way bitsandbytes does it on the CPU.
//!
//! Two details decide the last bit and are reproduced exactly:
//! - The offset is PyTorch's `absmax.mean()`: an f32 sum in PyTorch's cascade order (8 lanes, 4-way
//!   interleaved, partial sums flushed in levels), divided by the count in f32. [`torch_mean`] is that
//!   sum as PyTorch runs it single-threaded with 8-wide vectors (AVX2 and the portable build). With
//!   AVX-512 PyTorch uses 16 lanes, and from 32768 values up it splits the sum across threads, so
//!   bitsandbytes' own offset can differ in the last bit between machines; the fixtures pin it.
//! - The codes come from bitsandbytes' native CPU kernel, which does not search the map: it rounds
//!   `(x + 1) / 2 * 65535` to one of 65536 bins and reads the code of each bin from a table built from
//!   the map's midpoints. Near zero, where map values are closer together than a bin, this can pick a
//!   neighbour of the nearest code (bitsandbytes' CUDA kernel searches; the difference is below 2e-5 of
//!   the block's scale).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::tables::DYNAMIC_MAP;

/// Absmax values per block of the second quantization.
pub const ABSMAX_BLOCKSIZE: usize = 256;

const LUT_SIZE: usize = 65536;

/// Bin index -> code, built once from the midpoints of [`DYNAMIC_MAP`] like bitsandbytes does.
fn lut() -> &'static [u8; LUT_SIZE] {
    static LUT: OnceLock<Box<[u8; LUT_SIZE]>> = OnceLock::new();
    LUT.get_or_init(|| {
        let mut mid = [0.0f32; 255];
        for (m, pair) in mid.iter_mut().zip(DYNAMIC_MAP.windows(2)) {
            *m = 0.5 * (pair[0] + pair[1]);
        }
        let mut lut = Box::new([0u8; LUT_SIZE]);
        let mut code = 0usize;
        for (i, slot) in lut.iter_mut().enumerate() {
            // i < 2^16, exact in f32; division before the addition, as in the C++ source.
            let bin = -1.0 + (2.0 * i as f32) / (LUT_SIZE - 1) as f32;
            while code < mid.len() && mid[code] < bin {
                code += 1;
            }
            // `code` counts midpoints (at most 255), so it fits.
            *slot = u8::try_from(code).unwrap_or(u8::MAX);
        }
        lut
    })
}

/// The bin of a scaled value. Whether the multiply-add is fused or not gives the same code for every
/// f32 in [-1, 1] (an ignored test checks all of them), so the plain form is used.
#[inline]
fn bin(x: f32) -> usize {
    let x = x.clamp(-1.0, 1.0);
    // In [0.5, 65535.5]; the cast truncates like C++'s conversion to uint16_t.
    usize::from(((x + 1.0) * 0.5 * (LUT_SIZE - 1) as f32 + 0.5) as u16)
}

/// The 8-bit code bitsandbytes' CPU kernel gives a value already scaled into [-1, 1].
#[inline]
pub(crate) fn dynamic_code(x: f32) -> u8 {
    lut()[bin(x)]
}

/// Adds `b` to `a`, lane by lane.
trait Accumulate: Copy {
    const ZERO: Self;
    fn add(self, other: Self) -> Self;
}

impl Accumulate for f32 {
    const ZERO: f32 = 0.0;
    fn add(self, other: f32) -> f32 {
        self + other
    }
}

/// Width of PyTorch's `Vectorized<float>` with AVX2 and in its portable build.
const TORCH_LANES: usize = 8;

impl Accumulate for [f32; TORCH_LANES] {
    const ZERO: Self = [0.0; TORCH_LANES];
    fn add(mut self, other: Self) -> Self {
        for (a, b) in self.iter_mut().zip(other) {
            *a += b;
        }
        self
    }
}

/// ceil(log2(x)), and 1 for x <= 2 (PyTorch's `CeilLog2`).
fn ceil_log2(x: usize) -> u32 {
    if x <= 2 { 1 } else { usize::BITS - (x - 1).leading_zeros() }
}

/// PyTorch's `multi_row_sum`: four interleaved accumulators, whose running sums are flushed into up
/// to three higher levels every `2^level_power` rows so that only similar magnitudes meet.
fn multi_row_sum<T: Accumulate>(rows: usize, load: impl Fn(usize, usize) -> T) -> [T; 4] {
    const LEVELS: usize = 4;
    let level_power = (ceil_log2(rows) / LEVELS as u32).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[T::ZERO; 4]; LEVELS];
    let mut i = 0;
    while i + level_step <= rows {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                *a = a.add(load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (high, low) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                *high = high.add(*low);
                *low = T::ZERO;
            }
            if i & (level_mask << (j as u32 * level_power)) != 0 {
                break;
            }
        }
    }
    for row in i..rows {
        for (k, a) in acc[0].iter_mut().enumerate() {
            *a = a.add(load(row, k));
        }
    }
    let mut out = acc[0];
    for level in &acc[1..] {
        for (o, &a) in out.iter_mut().zip(level) {
            *o = o.add(a);
        }
    }
    out
}

/// PyTorch's `row_sum`: `multi_row_sum` over the values as rows of 4, then the leftovers, then the
/// four partial sums in order.
fn row_sum<T: Accumulate>(len: usize, load: impl Fn(usize) -> T) -> T {
    let rows = len / 4;
    let mut partial = multi_row_sum(rows, |i, k| load(4 * i + k));
    for i in 4 * rows..len {
        partial[0] = partial[0].add(load(i));
    }
    let [mut sum, rest @ ..] = partial;
    for p in rest {
        sum = sum.add(p);
    }
    sum
}

/// `torch.Tensor.mean()` of a contiguous f32 tensor, bit for bit as PyTorch computes it on one thread
/// with 8-wide vectors: the double-quantization offset bitsandbytes stores.
///
/// PyTorch sums f32 in a cascade (8 lanes, 4 interleaved accumulators, partial sums flushed in levels)
/// and divides by the count in f32. Its AVX-512 build uses 16 lanes, and from 32768 values up it splits
/// the sum across threads, so bitsandbytes' own offset can differ in the last bit between machines;
/// this is the order of its AVX2 and portable builds, which the fixtures pin.
pub fn torch_mean(values: &[f32]) -> f32 {
    let n = values.len();
    let sum = if n < TORCH_LANES {
        row_sum(n, |i| values[i])
    } else {
        let vectors = n / TORCH_LANES;
        let lanes = row_sum(vectors, |v| {
            let mut lane = [0.0; TORCH_LANES];
            lane.copy_from_slice(&values[v * TORCH_LANES..(v + 1) * TORCH_LANES]);
            lane
        });
        let mut sum = 0.0f32;
        for &v in &values[vectors * TORCH_LANES..] {
            sum += v;
        }
        for l in lanes {
            sum += l;
        }
        sum
    };
    // The sum is accumulated into a zero-filled output, then divided by the count converted to f32.
    (0.0 + sum) / n as f32
}

/// The double-quantized absmax: codes, one scale per [`ABSMAX_BLOCKSIZE`] codes, and the offset.
pub(crate) struct Quantized {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub offset: f32,
}

/// Double-quantizes `absmax` (non-empty, finite, non-negative).
pub(crate) fn quantize(absmax: &[f32]) -> Quantized {
    let offset = torch_mean(absmax);
    let mut codes = vec![0u8; absmax.len()];
    let mut scales = vec![0.0f32; absmax.len().div_ceil(ABSMAX_BLOCKSIZE)];
    codes
        .par_chunks_mut(ABSMAX_BLOCKSIZE)
        .zip(absmax.par_chunks(ABSMAX_BLOCKSIZE))
        .zip(&mut scales)
        .for_each(|((codes, absmax), scale)| {
            let mut centred = [0.0f32; ABSMAX_BLOCKSIZE];
            let centred = &mut centred[..absmax.len()];
            let mut amax = 0.0f32;
            for (c, &a) in centred.iter_mut().zip(absmax) {
                *c = a - offset;
                amax = amax.max(c.abs());
            }
            *scale = amax;
            // An all-equal block stores code 0 (the map's most negative value) times a zero scale.
            if amax == 0.0 {
                return;
            }
            let reciprocal = 1.0 / amax;
            for (code, &c) in codes.iter_mut().zip(centred.iter()) {
                *code = dynamic_code(c * reciprocal);
            }
        });
    Quantized { codes, scales, offset }
}

/// One absmax back: `DYNAMIC_MAP[code] * scale + offset`, rounded after the product and after the sum
/// (bitsandbytes dequantizes the codes, then adds the offset as a separate step).
#[inline]
pub(crate) fn dequantize(code: u8, scale: f32, offset: f32) -> f32 {
    DYNAMIC_MAP[usize::from(code)] * scale + offset
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nearest map entry, ties to the lower one: what a search of the map gives.
    fn nearest(x: f32) -> u8 {
        let x = x.clamp(-1.0, 1.0);
        let above = DYNAMIC_MAP.partition_point(|&m| m < x);
        if above == 0 {
            return 0;
        }
        if above == DYNAMIC_MAP.len() {
            return 255;
        }
        let (lo, hi) = (DYNAMIC_MAP[above - 1], DYNAMIC_MAP[above]);
        let code = if hi - x < x - lo { above } else { above - 1 };
        code as u8
    }

    #[test]
    fn lut_codes_are_within_a_bin_of_the_nearest_code() {
        let mut differ = 0;
        for i in -10_000..=10_000 {
            let x = i as f32 / 10_000.0;
            let (got, want) = (dynamic_code(x), nearest(x));
            let err = (DYNAMIC_MAP[usize::from(got)] - x).abs();
            let best = (DYNAMIC_MAP[usize::from(want)] - x).abs();
            assert!(err <= best + 2.0 / 65535.0, "x {x}: code {got} ({err}) vs nearest {want} ({best})");
            differ += usize::from(got != want);
        }
        // Only near zero (map finer than a bin) and at exact midpoints do they part.
        assert!(differ < 400, "{differ} of 20001 differ");
        assert_eq!(dynamic_code(1.0), 255);
        assert_eq!(dynamic_code(-1.0), 0);
        // The bins are symmetric about zero but 65536 is even: no bin is centred on 0, and 0 itself falls
        // in the bin just above it, coded as the map's 2.125e-5 (bitsandbytes' CPU kernel does the same).
        assert_eq!(DYNAMIC_MAP[usize::from(dynamic_code(0.0))], 2.1249998e-5);
    }

    #[test]
    fn small_means_are_plain_sums_in_torch_order() {
        assert_eq!(torch_mean(&[2.0]), 2.0);
        assert_eq!(torch_mean(&[1.0, 2.0, 3.0, 4.0]), 2.5);
        // Below 8 values: the first four are separate partial sums, the rest join the first.
        let v = [1.0e8f32, 1.0, 1.0, 1.0, 1.0, -1.0e8];
        let p0 = ((1.0e8f32 + 1.0) + -1.0e8) + 1.0 + 1.0 + 1.0;
        assert_eq!(torch_mean(&v), p0 / 6.0);
    }

    /// Every f32 in [-1, 1] gets the same bin with the fused and the unfused multiply-add (the C++ is
    /// compiled with contraction on; Rust never contracts). Slow: run with `--release --ignored`.
    #[test]
    #[ignore = "exhaustive over 2^31 floats; run with --release -- --ignored"]
    fn fused_and_unfused_bins_agree() {
        let table = lut();
        for bits in 0..=1.0f32.to_bits() {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                let y = (x + 1.0) * 0.5;
                let fused = usize::from(y.mul_add((LUT_SIZE - 1) as f32, 0.5) as u16);
                assert_eq!(table[fused], table[bin(x)], "x {x}");
            }
        }
    }
}
