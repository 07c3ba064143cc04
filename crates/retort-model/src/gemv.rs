//! `x W^T` for a few rows of `x` on the CPU: the shape of every projection while decoding.
//!
//! burn's CPU backend hands every matmul to `gemm`, whose matrix-vector path runs on one thread and
//! whose small-`m` path packs the whole weight on every call. Decoding is bound by how fast weights
//! stream from memory, which one core cannot saturate; packing adds a second pass over them. This
//! kernel reads each weight row once, in place (`[out, in]`, row-major, as checkpoints store it),
//! takes its dot products with every input row while the row is in L1, and splits the output
//! features across threads.
//!
//! Each output element is one dot product summed in SIMD lanes, then across lanes; the order differs
//! from `gemm`'s, so results agree with a matmul to f32 rounding (tests: relative 1e-5).

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// Input rows up to which the kernel is used; beyond, the problem is compute-bound and `gemm`'s
/// packed kernels win.
pub const MAX_ROWS: usize = 16;

/// Weight rows per block (each input chunk loaded is used this many times); threads get whole blocks.
const COLS: usize = 4;
/// Weight bytes below which one thread does it all (the weight sits in cache; waking threads costs
/// more than it saves).
const PARALLEL_MIN_BYTES: usize = 1 << 18;

/// `x W^T` for `x` `[m, in]` and `w` `[out, in]`, both f32 on the CPU backend without autodiff, with
/// `m <= MAX_ROWS`. `None` when the tensors do not qualify; the caller then uses a matmul.
pub fn project(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    let [m, k] = x.dims();
    let [n, wk] = w.dims();
    if m == 0 || m > MAX_ROWS || k != wk || k == 0 || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return None;
    }
    // Tensors recorded by autodiff are not plain Flex tensors: the conversion fails for them.
    let xf = x.clone().try_into_primitive::<Flex>().ok()?;
    let wf = w.clone().try_into_primitive::<Flex>().ok()?;
    let xs = contiguous(&xf)?;
    let ws = contiguous(&wf)?;
    let y = project_slices(xs, ws, m, k, n);
    Some(Tensor::from_primitive::<Flex>(FlexTensor::from_data(TensorData::new(y, [m, n]))))
}

/// The elements of a row-major contiguous f32 tensor.
pub(crate) fn contiguous(t: &FlexTensor) -> Option<&[f32]> {
    if !t.is_contiguous() {
        return None;
    }
    let start = t.layout().start_offset();
    let len = t.layout().num_elements();
    t.storage::<f32>().get(start..start + len)
}

/// `y = x W^T` on slices: `x` `[m, k]`, `w` `[n, k]`, `y` `[m, n]`, all row-major.
pub fn project_slices(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
    assert_eq!(w.len(), n * k, "w is not [{n}, {k}]");
    // Output features by rows of the weight: `yt` is `[n, m]`, so each thread owns a contiguous part.
    let mut yt = vec![0.0f32; n * m];
    let threads = rayon::current_num_threads();
    if threads < 2 || n * k * 4 < PARALLEL_MIN_BYTES {
        rows_of(x, w, m, k, 0, &mut yt);
    } else {
        // A few parts per thread to even out the load; whole COLS blocks each.
        let per = n.div_ceil(threads * 4).div_ceil(COLS).max(16) * COLS;
        yt.par_chunks_mut(per * m).enumerate().for_each(|(p, part)| rows_of(x, w, m, k, p * per, part));
    }
    if m == 1 {
        return yt;
    }
    let mut y = vec![0.0f32; m * n];
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            y[i * n + j] = *v;
        }
    }
    y
}

/// Fills `out` (`[rows, m]`) with the dot products of weight rows `first..first + rows` and every input
/// row, choosing the instruction set at run time.
fn rows_of(x: &[f32], w: &[f32], m: usize, k: usize, first: usize, out: &mut [f32]) {
    let rows = out.len() / m;
    assert!(x.len() >= m * k && w.len() >= (first + rows) * k, "kernel operands out of bounds");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            #[allow(
                unsafe_code,
                reason = "a target_feature function, called after checking the CPU has it"
            )]
            // SAFETY: the CPU has AVX-512F; the operands' bounds were checked above.
            return unsafe { x86::rows_avx512(x, w, m, k, first, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            #[allow(
                unsafe_code,
                reason = "a target_feature function, called after checking the CPU has it"
            )]
            // SAFETY: the CPU has AVX2 and FMA; the operands' bounds were checked above.
            return unsafe { x86::rows_avx2(x, w, m, k, first, out) };
        }
    }
    rows_portable(x, w, m, k, first, out);
}

/// Any CPU: one dot product at a time in 8 independent lanes (which compilers vectorise).
fn rows_portable(x: &[f32], w: &[f32], m: usize, k: usize, first: usize, out: &mut [f32]) {
    for (j, col) in out.chunks_exact_mut(m).enumerate() {
        let wr = &w[(first + j) * k..(first + j + 1) * k];
        for (i, o) in col.iter_mut().enumerate() {
            let xr = &x[i * k..(i + 1) * k];
            let mut acc = [0.0f32; 8];
            let (wc, xc) = (wr.chunks_exact(8), xr.chunks_exact(8));
            let tail: f32 = wc.remainder().iter().zip(xc.remainder()).map(|(a, b)| a * b).sum();
            for (a, b) in wc.zip(xc) {
                for l in 0..8 {
                    acc[l] += a[l] * b[l];
                }
            }
            *o = acc.iter().sum::<f32>() + tail;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code, reason = "SIMD loads through raw pointers; bounds are checked by the callers")]
mod x86 {
    use std::arch::x86_64::*;

    /// One SIMD width: its register type and the few operations the kernel needs.
    trait Lanes {
        type V: Copy;
        const N: usize;
        unsafe fn zero() -> Self::V;
        unsafe fn load(p: *const f32) -> Self::V;
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        unsafe fn sum(v: Self::V) -> f32;
    }

    struct Avx512;
    impl Lanes for Avx512 {
        type V = __m512;
        const N: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            // SAFETY: only reached from functions compiled with (and run on CPUs with) the feature.
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            // SAFETY: the caller guarantees 16 readable floats at `p`.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: only reached from functions compiled with (and run on CPUs with) the feature.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn sum(v: __m512) -> f32 {
            // SAFETY: only reached from functions compiled with (and run on CPUs with) the feature.
            unsafe { _mm512_reduce_add_ps(v) }
        }
    }

    struct Avx2;
    impl Lanes for Avx2 {
        type V = __m256;
        const N: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            // SAFETY: only reached from functions compiled with (and run on CPUs with) the feature.
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            // SAFETY: the caller guarantees 8 readable floats at `p`.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: only reached from functions compiled with (and run on CPUs with) the feature.
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn sum(v: __m256) -> f32 {
            // SAFETY: only reached from functions compiled with (and run on CPUs with) AVX2.
            unsafe {
                let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
                _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)))
            }
        }
    }

    /// Dot products of input rows `x + r * k` (`R` of them) with weight rows `w + c * k` (`C`), into
    /// `out[c * m + r]`.
    ///
    /// # Safety
    /// `R` rows of `k` floats at `x` and `C` rows at `w`, and `out` with `(C - 1) * m + R` elements.
    #[inline(always)]
    unsafe fn block<L: Lanes, const R: usize, const C: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        m: usize,
        out: &mut [f32],
    ) {
        // SAFETY (whole body): loads stay within `R` (`C`) rows of `k` floats, as the caller promised.
        unsafe {
            let mut acc = [[L::zero(); C]; R];
            let body = k - k % L::N;
            let mut t = 0;
            while t < body {
                let mut wv = [L::zero(); C];
                for (c, v) in wv.iter_mut().enumerate() {
                    *v = L::load(w.add(c * k + t));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let xv = L::load(x.add(r * k + t));
                    for (a, wc) in row.iter_mut().zip(&wv) {
                        *a = L::fma(xv, *wc, *a);
                    }
                }
                t += L::N;
            }
            for (r, row) in acc.iter().enumerate() {
                for (c, a) in row.iter().enumerate() {
                    let mut s = L::sum(*a);
                    for u in body..k {
                        s += *x.add(r * k + u) * *w.add(c * k + u);
                    }
                    out[c * m + r] = s;
                }
            }
        }
    }

    /// Weight rows in blocks of 4 (the last ones singly), input rows in blocks of up to 4.
    #[inline(always)]
    unsafe fn rows<L: Lanes>(x: &[f32], w: &[f32], m: usize, k: usize, first: usize, out: &mut [f32]) {
        let rows = out.len() / m;
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut j = 0;
        while j < rows {
            let c = if rows - j >= 4 { 4 } else { 1 };
            let mut i = 0;
            while i < m {
                let r = (m - i).min(4);
                // SAFETY: rows `i..i + r` of x and `first + j..first + j + c` of w exist (checked by
                // `rows_of`); the output slice starts at this block's first element.
                unsafe {
                    let xi = xp.add(i * k);
                    let wj = wp.add((first + j) * k);
                    let o = &mut out[j * m + i..];
                    match (r, c) {
                        (4, 4) => block::<L, 4, 4>(xi, wj, k, m, o),
                        (3, 4) => block::<L, 3, 4>(xi, wj, k, m, o),
                        (2, 4) => block::<L, 2, 4>(xi, wj, k, m, o),
                        (1, 4) => block::<L, 1, 4>(xi, wj, k, m, o),
                        (4, _) => block::<L, 4, 1>(xi, wj, k, m, o),
                        (3, _) => block::<L, 3, 1>(xi, wj, k, m, o),
                        (2, _) => block::<L, 2, 1>(xi, wj, k, m, o),
                        _ => block::<L, 1, 1>(xi, wj, k, m, o),
                    }
                }
                i += r;
            }
            j += c;
        }
    }

    /// # Safety
    /// The CPU has AVX-512F; operands as `rows_of` checked them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows_avx512(
        x: &[f32],
        w: &[f32],
        m: usize,
        k: usize,
        first: usize,
        out: &mut [f32],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { rows::<Avx512>(x, w, m, k, first, out) }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; operands as `rows_of` checked them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_avx2(x: &[f32], w: &[f32], m: usize, k: usize, first: usize, out: &mut [f32]) {
        // SAFETY: forwarded from the caller.
        unsafe { rows::<Avx2>(x, w, m, k, first, out) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|t| f64::from(x[i * k + t]) * f64::from(w[j * k + t])).sum();
            }
        }
        y
    }

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_a_float64_reference_on_ragged_shapes() {
        // Rows not multiples of the row block, features not multiples of the column block, inner sizes
        // with and without a lane tail; some large enough to take the threaded path.
        for &(m, k, n) in
            &[(1, 1, 1), (1, 17, 5), (3, 33, 7), (5, 64, 9), (8, 100, 130), (16, 768, 96), (2, 300, 700)]
        {
            let x = random(m * k, (m * 31 + k) as u64);
            let w = random(n * k, (n * 17 + k) as u64);
            let r = reference(&x, &w, m, k, n);
            let check = |what: &str, y: &[f32]| {
                for (idx, (a, b)) in y.iter().zip(&r).enumerate() {
                    // f32 accumulation of k products of magnitude <= 1: error grows like sqrt(k) eps.
                    let tol = 1e-6 * (k as f64).sqrt() * (1.0 + b.abs());
                    assert!(
                        (f64::from(*a) - b).abs() <= tol,
                        "{what} m={m} k={k} n={n} at {idx}: {a} vs {b}"
                    );
                }
            };
            check("dispatched", &project_slices(&x, &w, m, k, n));
            // Every kernel this CPU can run, not only the one dispatch picks (`[n, m]` layout).
            let transposed = |rows: &dyn Fn(&mut [f32])| -> Vec<f32> {
                let mut yt = vec![0.0f32; n * m];
                rows(&mut yt);
                (0..m * n).map(|e| yt[(e % n) * m + e / n]).collect()
            };
            check("portable", &transposed(&|out| rows_portable(&x, &w, m, k, 0, out)));
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                #[allow(
                    unsafe_code,
                    reason = "a target_feature function, called after checking the CPU has it"
                )]
                // SAFETY: the CPU has AVX2 and FMA; the buffers have the kernel's shapes.
                check("avx2", &transposed(&|out| unsafe { x86::rows_avx2(&x, &w, m, k, 0, out) }));
            }
        }
    }

    #[test]
    fn agrees_with_burns_matmul_and_declines_what_it_does_not_handle() {
        let device = Device::flex();
        let x = Tensor::<2>::random([6, 200], Distribution::Default, &device);
        let w = Tensor::<2>::random([1000, 200], Distribution::Default, &device);
        let ours = project(&x, &w).expect("f32 CPU tensors with 6 rows qualify");
        let theirs = x.clone().matmul(w.clone().transpose());
        let (a, b) =
            (ours.into_data().try_to_vec::<f32>().unwrap(), theirs.into_data().try_to_vec::<f32>().unwrap());
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{p} vs {q}");
        }
        // Too many rows, a non-contiguous weight view, another dtype, autodiff: all left to matmul.
        assert!(project(&Tensor::<2>::zeros([MAX_ROWS + 1, 200], &device), &w).is_none());
        assert!(
            project(&x, &w.clone().transpose().transpose().slice([0..200, 0..100]).transpose()).is_none()
        );
        assert!(project(&x.clone().cast(DType::F16), &w.clone().cast(DType::F16)).is_none());
        let ad = device.clone().autodiff();
        let xa = Tensor::<2>::random([2, 200], Distribution::Default, &ad).require_grad();
        assert!(project(&xa, &w.clone().to_device(&ad)).is_none());
    }
}
