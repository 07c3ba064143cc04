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
//!
//! A weight held as `[in, out]` and seen as `[out, in]` (how the CPU keeps them in f32, see
//! [`crate::dense::cpu_layout`]) takes a second kernel: each thread streams its own block of the
//! weight's rows once, accumulating tiles of outputs for up to 4 input rows in registers, and the
//! threads' partial outputs are summed. On one decoding step of the 125M benchmark model (84 weights
//! and the head, 500 MB) both kernels take the same time: 15 ms at 1 input row, 24 ms at 8.

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
    let y = match contiguous(&wf) {
        Some(ws) => project_slices(xs, ws, m, k, n),
        None => project_slices_t(xs, transposed(&wf)?, m, k, n),
    };
    Some(Tensor::from_primitive::<Flex>(FlexTensor::from_data(TensorData::new(y, [m, n]))))
}

/// The elements of a rank-2 f32 tensor `[n, k]` that is the transposed view of a row-major `[k, n]`
/// one, in that row-major order.
pub(crate) fn transposed(t: &FlexTensor) -> Option<&[f32]> {
    let layout = t.layout();
    let [n, k] = layout.shape().dims::<2>();
    if layout.strides() != [1, n as isize] {
        return None;
    }
    let start = layout.start_offset();
    t.storage::<f32>().get(start..start + n * k)
}

/// `y = x Wt` on slices: `x` `[m, k]`, `wt` `[k, n]` (the weight transposed), `y` `[m, n]`, all
/// row-major.
///
/// Threads split the weight's rows (`k`), so each reads one contiguous block of memory, and sum their
/// partial outputs at the end; splitting the columns instead had each thread read short runs of every
/// row, which on the 2-core VM halved the rate at which weights stream from memory at one input row.
pub fn project_slices_t(x: &[f32], wt: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
    assert_eq!(wt.len(), k * n, "wt is not [{k}, {n}]");
    let threads = rayon::current_num_threads();
    if threads < 2 || n * k * 4 < PARALLEL_MIN_BYTES {
        let mut y = vec![0.0f32; m * n];
        cols_of(x, wt, m, k, n, 0..k, &mut y);
        return y;
    }
    let per = k.div_ceil(threads);
    let mut parts: Vec<Vec<f32>> = (0..k.div_ceil(per))
        .into_par_iter()
        .map(|p| {
            let mut y = vec![0.0f32; m * n];
            cols_of(x, wt, m, k, n, p * per..((p + 1) * per).min(k), &mut y);
            y
        })
        .collect();
    let mut y = parts.swap_remove(0);
    // The partial outputs summed a range of columns per thread (`m x n` each: with many threads and
    // rows, a serial sum would rival the product).
    const SUM_CHUNK: usize = 1 << 12;
    y.par_chunks_mut(SUM_CHUNK).enumerate().for_each(|(c, out)| {
        for part in &parts {
            for (a, b) in out.iter_mut().zip(&part[c * SUM_CHUNK..]) {
                *a += b;
            }
        }
    });
    y
}

/// `y += x[.., ks] Wt[ks, ..]`, choosing the instruction set at run time.
fn cols_of(x: &[f32], wt: &[f32], m: usize, k: usize, n: usize, ks: std::ops::Range<usize>, y: &mut [f32]) {
    assert!(
        x.len() >= m * k && wt.len() >= k * n && ks.end <= k && y.len() >= m * n,
        "kernel operands out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            #[allow(
                unsafe_code,
                reason = "a target_feature function, called after checking the CPU has it"
            )]
            // SAFETY: the CPU has AVX-512F; the operands' bounds were checked above.
            return unsafe { x86::cols_avx512(x, wt, m, k, n, ks, y) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            #[allow(
                unsafe_code,
                reason = "a target_feature function, called after checking the CPU has it"
            )]
            // SAFETY: the CPU has AVX2 and FMA; the operands' bounds were checked above.
            return unsafe { x86::cols_avx2(x, wt, m, k, n, ks, y) };
        }
    }
    cols_portable(x, wt, m, k, n, ks, y);
}

/// Any CPU: each weight row scaled into every output row (compilers vectorise the inner loop).
fn cols_portable(
    x: &[f32],
    wt: &[f32],
    m: usize,
    k: usize,
    n: usize,
    ks: std::ops::Range<usize>,
    y: &mut [f32],
) {
    for t in ks {
        let w = &wt[t * n..(t + 1) * n];
        for (i, row) in y.chunks_exact_mut(n).take(m).enumerate() {
            let xv = x[i * k + t];
            for (a, b) in row.iter_mut().zip(w) {
                *a += xv * b;
            }
        }
    }
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
        unsafe fn splat(v: f32) -> Self::V;
        unsafe fn store(p: *mut f32, v: Self::V);
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
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m512 {
            // SAFETY: only reached from functions compiled with (and run on CPUs with) the feature.
            unsafe { _mm512_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            // SAFETY: the caller guarantees 16 writable floats at `p`.
            unsafe { _mm512_storeu_ps(p, v) }
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
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m256 {
            // SAFETY: only reached from functions compiled with (and run on CPUs with) AVX.
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            // SAFETY: the caller guarantees 8 writable floats at `p`.
            unsafe { _mm256_storeu_ps(p, v) }
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

    /// `y[r, ..C * N] += sum_t x[r, t] wt[t, ..C * N]` over `kc` weight rows, for `R` input rows: `C`
    /// vectors of outputs per row held in registers while the weight's rows pass once.
    ///
    /// # Safety
    /// `R` rows (stride `xs`) of `kc` floats at `x`; `kc` rows (stride `n`) of `C * N` readable floats
    /// at `wt`; `R` rows (stride `n`) of `C * N` floats at `y`, used by no one else meanwhile.
    #[inline(always)]
    unsafe fn tile<L: Lanes, const R: usize, const C: usize>(
        x: *const f32,
        xs: usize,
        wt: *const f32,
        kc: usize,
        n: usize,
        y: *mut f32,
    ) {
        // SAFETY (whole body): accesses stay within the rows and widths the caller promised.
        unsafe {
            let mut acc = [[L::zero(); C]; R];
            for (r, row) in acc.iter_mut().enumerate() {
                for (c, a) in row.iter_mut().enumerate() {
                    *a = L::load(y.add(r * n + c * L::N));
                }
            }
            for t in 0..kc {
                let mut wv = [L::zero(); C];
                for (c, v) in wv.iter_mut().enumerate() {
                    *v = L::load(wt.add(t * n + c * L::N));
                    // Several input rows: narrow tiles, short runs `4n` bytes apart that the hardware
                    // prefetcher does not follow. Fetch the same columns of the next block's row, in
                    // cache by the time this tile gets there (past the weight's end it reads
                    // nothing). One input row has wide tiles, which it streams well on its own.
                    if R > 1 {
                        _mm_prefetch::<_MM_HINT_T0>(wt.wrapping_add((t + kc) * n + c * L::N).cast::<i8>());
                    }
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let xv = L::splat(*x.add(r * xs + t));
                    for (a, wc) in row.iter_mut().zip(&wv) {
                        *a = L::fma(xv, *wc, *a);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (c, a) in row.iter().enumerate() {
                    L::store(y.add(r * n + c * L::N), *a);
                }
            }
        }
    }

    /// Input rows per tile at most. 8 rows 3 vectors wide also fit AVX-512's registers, but measured
    /// 5% slower at 8 input rows than two passes of 4 rows 5 vectors wide (the block is in cache).
    const ROWS: usize = 4;
    /// Tile widths, in vectors, by input rows (1 to 4): as wide as the registers allow. AVX-512 has
    /// 32 registers: `R * C` accumulators, `C` weight vectors and a broadcast.
    const WIDE: [usize; ROWS] = [12, 8, 6, 5];
    /// AVX2 has 16 registers.
    const NARROW: [usize; ROWS] = [7, 4, 3, 2];

    /// [`tile`] for `r` rows at the width `widths[r - 1]` vectors, or `C = 4` (`four`), or 1 (`one`).
    ///
    /// # Safety
    /// As [`tile`] with `R = r` and that width.
    #[inline(always)]
    #[allow(clippy::too_many_arguments, reason = "a tile's operands and its shape")]
    unsafe fn tile_rows<L: Lanes, const AVX512: bool>(
        r: usize,
        width: Width,
        x: *const f32,
        xs: usize,
        wt: *const f32,
        kc: usize,
        n: usize,
        y: *mut f32,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match (r, width, AVX512) {
                (1, Width::One, _) => tile::<L, 1, 1>(x, xs, wt, kc, n, y),
                (2, Width::One, _) => tile::<L, 2, 1>(x, xs, wt, kc, n, y),
                (3, Width::One, _) => tile::<L, 3, 1>(x, xs, wt, kc, n, y),
                (_, Width::One, _) => tile::<L, 4, 1>(x, xs, wt, kc, n, y),
                (1, Width::Four, _) => tile::<L, 1, 4>(x, xs, wt, kc, n, y),
                (2, Width::Four, _) => tile::<L, 2, 4>(x, xs, wt, kc, n, y),
                (3, Width::Four, _) => tile::<L, 3, 4>(x, xs, wt, kc, n, y),
                (_, Width::Four, _) => tile::<L, 4, 4>(x, xs, wt, kc, n, y),
                (1, Width::Wide, true) => tile::<L, 1, { WIDE[0] }>(x, xs, wt, kc, n, y),
                (2, Width::Wide, true) => tile::<L, 2, { WIDE[1] }>(x, xs, wt, kc, n, y),
                (3, Width::Wide, true) => tile::<L, 3, { WIDE[2] }>(x, xs, wt, kc, n, y),
                (_, Width::Wide, true) => tile::<L, 4, { WIDE[3] }>(x, xs, wt, kc, n, y),
                (1, Width::Wide, false) => tile::<L, 1, { NARROW[0] }>(x, xs, wt, kc, n, y),
                (2, Width::Wide, false) => tile::<L, 2, { NARROW[1] }>(x, xs, wt, kc, n, y),
                (3, Width::Wide, false) => tile::<L, 3, { NARROW[2] }>(x, xs, wt, kc, n, y),
                (_, Width::Wide, false) => tile::<L, 4, { NARROW[3] }>(x, xs, wt, kc, n, y),
            }
        }
    }

    /// Which tile width.
    #[derive(Clone, Copy)]
    enum Width {
        Wide,
        Four,
        One,
    }

    /// Weight bytes per block of rows: a block is read once from memory, in order, then each tile of
    /// columns walks it from the core's L2.
    const BLOCK_BYTES: usize = 256 << 10;

    /// `y += x[.., ks] Wt[ks, ..]`: blocks of weight rows; in each, input rows in groups of up to 4
    /// and columns in the widest tiles, then 4 vectors (where narrower), then 1, then singly.
    ///
    /// # Safety
    /// `x` `[m, k]`, `wt` `[k, n]`, `y` `[m, n]`, `ks` inside `0..k`.
    #[inline(always)]
    unsafe fn cols<L: Lanes, const AVX512: bool>(
        x: &[f32],
        wt: &[f32],
        m: usize,
        k: usize,
        n: usize,
        ks: std::ops::Range<usize>,
        y: &mut [f32],
    ) {
        let (xp, wp, yp) = (x.as_ptr(), wt.as_ptr(), y.as_mut_ptr());
        let widths = if AVX512 { WIDE } else { NARROW };
        let block = (BLOCK_BYTES / (4 * n)).max(16);
        let mut t0 = ks.start;
        while t0 < ks.end {
            let kc = block.min(ks.end - t0);
            let mut i = 0;
            while i < m {
                let r = (m - i).min(ROWS);
                let wide = widths[r - 1] * L::N;
                let mut j = 0;
                // SAFETY: rows `i..i + r` of x and y, weight rows `t0..t0 + kc` and columns `j..j +
                // width` (width checked against `n`) are inside the operands.
                unsafe {
                    let (xi, wb, yi) = (xp.add(i * k + t0), wp.add(t0 * n), yp.add(i * n));
                    while j + wide <= n {
                        tile_rows::<L, AVX512>(r, Width::Wide, xi, k, wb.add(j), kc, n, yi.add(j));
                        j += wide;
                    }
                    while j + 4 * L::N <= n && wide > 4 * L::N {
                        tile_rows::<L, AVX512>(r, Width::Four, xi, k, wb.add(j), kc, n, yi.add(j));
                        j += 4 * L::N;
                    }
                    while j + L::N <= n {
                        tile_rows::<L, AVX512>(r, Width::One, xi, k, wb.add(j), kc, n, yi.add(j));
                        j += L::N;
                    }
                    for jj in j..n {
                        for ii in 0..r {
                            let mut s = *yi.add(ii * n + jj);
                            for t in 0..kc {
                                s += *xi.add(ii * k + t) * *wb.add(t * n + jj);
                            }
                            *yi.add(ii * n + jj) = s;
                        }
                    }
                }
                i += r;
            }
            t0 += kc;
        }
    }

    /// # Safety
    /// The CPU has AVX-512F; operands as `cols_of` checked them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn cols_avx512(
        x: &[f32],
        wt: &[f32],
        m: usize,
        k: usize,
        n: usize,
        ks: std::ops::Range<usize>,
        y: &mut [f32],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { cols::<Avx512, true>(x, wt, m, k, n, ks, y) }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; operands as `cols_of` checked them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn cols_avx2(
        x: &[f32],
        wt: &[f32],
        m: usize,
        k: usize,
        n: usize,
        ks: std::ops::Range<usize>,
        y: &mut [f32],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { cols::<Avx2, false>(x, wt, m, k, n, ks, y) }
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
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 17, 5),
            (3, 33, 7),
            (5, 64, 9),
            (8, 100, 130),
            (16, 768, 96),
            (2, 300, 700),
            (11, 40, 100),
            (9, 200, 1000),
        ] {
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
            // The weight held as [k, n]: the column kernel, dispatched and each variant this CPU runs,
            // over the whole width and over a range that starts and ends off the vector width.
            let mut wt = vec![0.0f32; k * n];
            for j in 0..n {
                for t in 0..k {
                    wt[t * n + j] = w[j * k + t];
                }
            }
            check("[in, out] dispatched", &project_slices_t(&x, &wt, m, k, n));
            type Kernel = fn(&[f32], &[f32], usize, usize, usize, std::ops::Range<usize>, &mut [f32]);
            let mut kernels: Vec<(&str, Kernel)> = vec![("[in, out] portable", cols_portable)];
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                kernels.push(("[in, out] avx2", |x, wt, m, k, n, ks, y| {
                    #[allow(unsafe_code, reason = "a target_feature function, after checking the CPU")]
                    // SAFETY: the CPU has AVX2 and FMA; the operands have the kernel's shapes.
                    unsafe {
                        x86::cols_avx2(x, wt, m, k, n, ks, y)
                    }
                }));
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(("[in, out] avx512", |x, wt, m, k, n, ks, y| {
                    #[allow(unsafe_code, reason = "a target_feature function, after checking the CPU")]
                    // SAFETY: the CPU has AVX-512F; the operands have the kernel's shapes.
                    unsafe {
                        x86::cols_avx512(x, wt, m, k, n, ks, y)
                    }
                }));
            }
            for (what, kernel) in kernels {
                let mut y = vec![0.0f32; m * n];
                kernel(&x, &wt, m, k, n, 0..k, &mut y);
                check(what, &y);
                // Accumulated in two parts of the inner dimension onto outputs that start at 1.
                let mut y = vec![1.0f32; m * n];
                kernel(&x, &wt, m, k, n, 0..k / 2, &mut y);
                kernel(&x, &wt, m, k, n, k / 2..k, &mut y);
                let less_one: Vec<f32> = y.iter().map(|v| v - 1.0).collect();
                check(&format!("{what}, accumulated"), &less_one);
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
        // The same weight held as [in, out] and seen as [out, in]: the column kernel.
        let wt = Tensor::<2>::from_data(w.clone().transpose().into_data(), &device).transpose();
        let cols = project(&x, &wt).expect("a transposed view of a contiguous weight qualifies");
        for (p, q) in cols.into_data().try_to_vec::<f32>().unwrap().iter().zip(&b) {
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
