//! Attention on the CPU in f32, a block of query rows at a time, forward and backward.
//!
//! For each batch row, head and block of [`BLOCK`] query rows it computes the block's scores against
//! only the keys some row of the block can see (the mask decides: under a causal mask the keys past
//! the block's last row, under a sliding window the keys before its reach, are skipped, about half
//! the work of a causal prefill), applies soft-capping, the additive mask and the softmax in place,
//! and multiplies by the values. The two products are `gemm` calls on a block that stays in cache;
//! the exponentials are a polynomial evaluated 16 (AVX-512) or 8 (AVX2) at a time.
//!
//! The backward recomputes each block's probabilities `P` the same way and applies the softmax
//! gradient in closed form: `dP = dO V^T`, `dS = P (dP - rowsum(dP P))`, soft-capping's
//! `1 - tanh^2`, `dQ = scale dS K`, `dK += scale dS^T Q`, `dV += P^T dO`, each head's key and value
//! gradients summed onto its key/value head (grouped-query attention).
//!
//! Skipping is exact: a key left out is one the mask gives `f32::MIN` or `-inf`, whose probability
//! underflows to zero in every row that sees some key. A row that sees no key at all (padding)
//! gets transformers' answer for an all-`f32::MIN` mask, the mean of every value, so its block
//! keeps every key.

use rayon::prelude::*;

/// Query rows per block.
pub const BLOCK: usize = 64;

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Batch rows.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Query positions.
    pub queries: usize,
    /// Key positions.
    pub keys: usize,
    /// Head width.
    pub head_dim: usize,
}

impl Shape {
    /// The key/value head (batch-major, `[b, kv_heads]`) of query head `bh` (`[b, heads]`).
    fn kv_head(&self, bh: usize) -> usize {
        let (h, kvh) = (self.heads, self.kv_heads);
        (bh / h) * kvh + (bh % h) / (h / kvh)
    }

    fn check(&self, q: &[f32], k: &[f32], v: &[f32], mask: &[f32]) {
        let Shape { batch: b, heads: h, kv_heads: kvh, queries: s, keys: t, head_dim: d } = *self;
        assert!(kvh > 0 && h % kvh == 0, "{h} heads do not group onto {kvh} key/value heads");
        assert_eq!(q.len(), b * h * s * d, "q is not [{b}, {h}, {s}, {d}]");
        assert_eq!(k.len(), b * kvh * t * d, "k is not [{b}, {kvh}, {t}, {d}]");
        assert_eq!(v.len(), k.len(), "v is not shaped like k");
        assert_eq!(mask.len(), b * s * t, "mask is not [{b}, 1, {s}, {t}]");
    }
}

/// Options of the score computation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// Multiplier of `q k^T`.
    pub scale: f32,
    /// Gemma 2's soft-cap: scores become `cap tanh(scores / cap)`.
    pub softcap: Option<f32>,
}

/// True when the additive mask value hides its key.
#[inline(always)]
fn hidden(m: f32) -> bool {
    // f32::MIN and -inf; NaN compares false, so it counts as hidden too.
    m.is_nan() || m <= f32::MIN
}

/// For each batch row and block of `block` query rows, the range of keys some row of the block sees;
/// every key when one of the rows sees none.
fn key_ranges(mask: &[f32], sh: &Shape, block: usize) -> Vec<(usize, usize)> {
    let (s, t) = (sh.queries, sh.keys);
    let blocks = s.div_ceil(block);
    let mut out = Vec::with_capacity(sh.batch * blocks);
    for b in 0..sh.batch {
        for qb in 0..blocks {
            let (r0, r1) = (qb * block, ((qb + 1) * block).min(s));
            let (mut lo, mut hi, mut blind) = (t, 0, false);
            for r in r0..r1 {
                let row = &mask[(b * s + r) * t..(b * s + r + 1) * t];
                match row.iter().position(|&m| !hidden(m)) {
                    None => blind = true,
                    Some(first) => {
                        lo = lo.min(first);
                        let last = row.iter().rposition(|&m| !hidden(m)).unwrap_or(first);
                        hi = hi.max(last + 1);
                    }
                }
            }
            out.push(if blind || lo >= hi { (0, t) } else { (lo, hi) });
        }
    }
    out
}

/// `softmax(scale q k^T (soft-capped) + mask) v` for `q` `[b, heads, s, d]`, `k` and `v`
/// `[b, kv_heads, t, d]` and the additive `mask` `[b, 1, s, t]`, all row-major: `[b, heads, s, d]`.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], mask: &[f32], sh: Shape, sc: Scores) -> Vec<f32> {
    forward_blocks(q, k, v, mask, sh, sc, BLOCK)
}

/// What the forward and the backward share: the inputs and the key range of every block of query rows.
struct Blocks<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    mask: &'a [f32],
    sh: Shape,
    sc: Scores,
    block: usize,
    /// [`key_ranges`].
    ranges: Vec<(usize, usize)>,
}

/// One block of a head: query rows `r0..r0 + nq` against keys `lo..hi`.
#[derive(Debug, Clone, Copy)]
struct Rows {
    r0: usize,
    nq: usize,
    lo: usize,
    hi: usize,
}

impl<'a> Blocks<'a> {
    fn new(
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
        mask: &'a [f32],
        sh: Shape,
        sc: Scores,
        block: usize,
    ) -> Self {
        sh.check(q, k, v, mask);
        Blocks { q, k, v, mask, sh, sc, block, ranges: key_ranges(mask, &sh, block) }
    }

    /// Query head `bh`'s (batch-major) queries `[s, d]`, and the keys and values `[t, d]` of its
    /// key/value head.
    fn head(&self, bh: usize) -> (&'a [f32], &'a [f32], &'a [f32]) {
        let Shape { queries: s, keys: t, head_dim: d, .. } = self.sh;
        let g = self.sh.kv_head(bh);
        let kv = g * t * d..(g + 1) * t * d;
        (&self.q[bh * s * d..(bh + 1) * s * d], &self.k[kv.clone()], &self.v[kv])
    }

    /// Calls `f` for each block of query head `bh` with the block's rows, its probabilities `p`
    /// (`[nq, hi - lo]`) and, when soft-capped, the `tanh` of its scores.
    fn each(&self, bh: usize, mut f: impl FnMut(Rows, &[f32], &[f32])) {
        let Shape { heads: h, queries: s, keys: t, head_dim: d, .. } = self.sh;
        let (b, blocks) = (bh / h, s.div_ceil(self.block));
        let (q_h, k_g, _) = self.head(bh);
        let (mut p, mut th) = (Vec::new(), Vec::new());
        for (qb, &(lo, hi)) in self.ranges[b * blocks..(b + 1) * blocks].iter().enumerate() {
            let (r0, nq) = (qb * self.block, self.block.min(s - qb * self.block));
            let mask_rows = &self.mask[(b * s + r0) * t..(b * s + r0 + nq) * t];
            probabilities(
                &mut p,
                &mut th,
                &q_h[r0 * d..],
                &k_g[lo * d..],
                mask_rows,
                (nq, hi - lo, d, lo, t),
                self.sc,
            );
            f(Rows { r0, nq, lo, hi }, &p, &th);
        }
    }
}

fn forward_blocks(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    sh: Shape,
    sc: Scores,
    block: usize,
) -> Vec<f32> {
    let blocks = Blocks::new(q, k, v, mask, sh, sc, block);
    let (s, d) = (sh.queries, sh.head_dim);
    let mut out = vec![0f32; q.len()];
    if out.is_empty() || sh.keys == 0 {
        return out;
    }
    out.par_chunks_mut(s * d).enumerate().for_each(|(bh, out_h)| {
        let (_, _, v_g) = blocks.head(bh);
        blocks.each(bh, |Rows { r0, nq, lo, hi }, p, _| {
            // out = P V
            let out_b = &mut out_h[r0 * d..(r0 + nq) * d];
            mm(nq, d, hi - lo, out_b, d, false, (p, hi - lo, 1), (&v_g[lo * d..], d, 1), 1.0);
        });
    });
    out
}

/// Gradients of `q`, `k` and `v` of [`forward`] given the gradient of its output `d_out`
/// (`[b, heads, s, d]`).
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    d_out: &[f32],
    sh: Shape,
    sc: Scores,
) -> [Vec<f32>; 3] {
    backward_blocks(q, k, v, mask, d_out, sh, sc, BLOCK)
}

#[allow(clippy::too_many_arguments, reason = "the forward's arguments plus the output gradient and block")]
fn backward_blocks(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    d_out: &[f32],
    sh: Shape,
    sc: Scores,
    block: usize,
) -> [Vec<f32>; 3] {
    let blocks = Blocks::new(q, k, v, mask, sh, sc, block);
    assert_eq!(d_out.len(), q.len(), "the output gradient is not shaped like q");
    let Shape { queries: s, keys: t, head_dim: d, .. } = sh;
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    if dq.is_empty() || t == 0 {
        return [dq, dk, dv];
    }
    // Each head's key and value gradients on their own, summed onto the key/value heads afterwards.
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = dq
        .par_chunks_mut(s * d)
        .enumerate()
        .map(|(bh, dq_h)| {
            let (q_h, k_g, v_g) = blocks.head(bh);
            let do_h = &d_out[bh * s * d..(bh + 1) * s * d];
            let mut dk_h = vec![0f32; t * d];
            let mut dv_h = vec![0f32; t * d];
            let mut dp = Vec::new();
            blocks.each(bh, |Rows { r0, nq, lo, hi }, p, th| {
                let n = hi - lo;
                let do_b = &do_h[r0 * d..(r0 + nq) * d];
                // dP = dO V^T
                dp.clear();
                dp.resize(nq * n, 0.0);
                mm(nq, n, d, &mut dp, n, false, (do_b, d, 1), (&v_g[lo * d..], 1, d), 1.0);
                // dS = P (dP - rowsum(dP P)), then through the soft-cap: the gradient of the raw scores.
                for i in 0..nq {
                    let (pr, dr) = (&p[i * n..(i + 1) * n], &mut dp[i * n..(i + 1) * n]);
                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    for (g, &pv) in dr.iter_mut().zip(pr) {
                        *g = pv * (*g - dot);
                    }
                    if sc.softcap.is_some() {
                        for (g, &tv) in dr.iter_mut().zip(&th[i * n..(i + 1) * n]) {
                            *g *= 1.0 - tv * tv;
                        }
                    }
                }
                // dQ = scale dS K; dK += scale dS^T Q; dV += P^T dO.
                let q_b = &q_h[r0 * d..(r0 + nq) * d];
                let dq_b = &mut dq_h[r0 * d..(r0 + nq) * d];
                mm(nq, d, n, dq_b, d, false, (&dp, n, 1), (&k_g[lo * d..], d, 1), sc.scale);
                mm(n, d, nq, &mut dk_h[lo * d..hi * d], d, true, (&dp, 1, n), (q_b, d, 1), sc.scale);
                mm(n, d, nq, &mut dv_h[lo * d..hi * d], d, true, (p, 1, n), (do_b, d, 1), 1.0);
            });
            (dk_h, dv_h)
        })
        .collect();
    // Onto the key/value heads.
    for (bh, (dk_h, dv_h)) in per_head.iter().enumerate() {
        let g = sh.kv_head(bh);
        for (acc, part) in [(&mut dk, dk_h), (&mut dv, dv_h)] {
            for (a, x) in acc[g * t * d..(g + 1) * t * d].iter_mut().zip(part) {
                *a += x;
            }
        }
    }
    [dq, dk, dv]
}

/// The probabilities of a block into `p` (`[nq, n]`): `nq` query rows at `q` against the `n` keys at
/// `k` (key `lo` of `t`), soft-capped (the `tanh` kept in `th`), masked by the block's `mask` rows
/// (`[nq, t]`), softmaxed by row.
fn probabilities(
    p: &mut Vec<f32>,
    th: &mut Vec<f32>,
    q: &[f32],
    k: &[f32],
    mask: &[f32],
    (nq, n, d, lo, t): (usize, usize, usize, usize, usize),
    sc: Scores,
) {
    p.clear();
    p.resize(nq * n, 0.0);
    // S = scale Q K^T
    mm(nq, n, d, p, n, false, (q, d, 1), (k, 1, d), sc.scale);
    if let Some(cap) = sc.softcap {
        th.clear();
        th.extend(p.iter().map(|&x| (x / cap).tanh()));
        for (x, &tv) in p.iter_mut().zip(th.iter()) {
            *x = cap * tv;
        }
    }
    for i in 0..nq {
        let row = &mut p[i * n..(i + 1) * n];
        for (x, &m) in row.iter_mut().zip(&mask[i * t + lo..i * t + lo + n]) {
            *x += m;
        }
        softmax_row(row);
    }
}

/// `row` becomes its softmax.
fn softmax_row(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let sum = exp_shifted(row, max);
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// `x = exp(x - max)` for every element; returns their sum.
pub(crate) fn exp_shifted(row: &mut [f32], max: f32) -> f32 {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code, reason = "the CPU was checked for the feature by isa()")]
        // SAFETY: AVX-512F is available.
        Isa::Avx512 => unsafe { exp_shifted_avx512(row, max) },
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code, reason = "the CPU was checked for the features by isa()")]
        // SAFETY: AVX2 and FMA are available.
        Isa::Avx2 => unsafe { exp_shifted_avx2(row, max) },
        _ => exp_shifted_generic(row, max),
    }
}

/// The widest vector instructions this CPU has that the element-wise kernels here are compiled for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Isa {
    /// AVX-512F: 16 f32 lanes.
    Avx512,
    /// AVX2 with FMA: 8 lanes.
    Avx2,
    /// Whatever the build targets.
    Plain,
}

/// [`Isa`] of this CPU (the standard library caches the detection).
pub(crate) fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Plain
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_shifted_avx512(row: &mut [f32], max: f32) -> f32 {
    exp_shifted_generic(row, max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_shifted_avx2(row: &mut [f32], max: f32) -> f32 {
    exp_shifted_generic(row, max)
}

/// Lanes summed side by side (so the compiler keeps them in vector registers).
const LANES: usize = 16;

#[inline(always)]
fn exp_shifted_generic(row: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (x, a) in c.iter_mut().zip(acc.iter_mut()) {
            *x = exp(*x - max);
            *a += *x;
        }
    }
    let mut tail = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

/// `e^x` for `x <= 0` (scores minus their row's maximum) to about 2 ulp, without branches, so it
/// vectorizes: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by a degree-6 polynomial, `2^n` put in
/// the exponent bits. Below -87.3 (where `e^x` leaves the normal range) it is 0, which is also what
/// a masked score (`-inf`, or a large negative number) gives.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.max(-87.0);
    let n = (xc * LOG2E + 0.5).floor();
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Taylor coefficients of e^r to degree 6; |r| <= 0.35 keeps the truncation under 1e-7 relative.
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    let e = p * scale;
    if x < -87.0 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        e
    }
}

/// `dst = (acc ? dst : 0) + beta A B` for `A` `[m, k]` and `B` `[k, n]` given as (slice, row stride,
/// column stride), `dst` `[m, n]` row-major with row stride `ld`; one thread (the callers already
/// run a head per thread).
#[allow(clippy::too_many_arguments, reason = "the shape of a gemm call")]
fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ld: usize,
    acc: bool,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for r in 0..m {
                dst[r * ld..r * ld + n].fill(0.0);
            }
        }
        return;
    }
    if m <= SMALL_ROWS {
        return mm_rows(m, n, k, dst, ld, acc, (a, a_rs, a_cs), (b, b_rs, b_cs), beta);
    }
    // The highest element each operand is read or written at, checked before the unchecked call.
    assert!((m - 1) * ld + n <= dst.len(), "gemm destination out of bounds");
    assert!((m - 1) * a_rs + (k - 1) * a_cs < a.len(), "gemm left operand out of bounds");
    assert!((k - 1) * b_rs + (n - 1) * b_cs < b.len(), "gemm right operand out of bounds");
    #[allow(unsafe_code, reason = "gemm takes raw pointers; the bounds are asserted above")]
    // SAFETY: every index gemm touches is within the slices (asserted above); `dst` does not alias
    // `a` or `b` (a `&mut` and two `&` borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            acc,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Left-operand rows up to which [`mm`] loops over rows itself: a decoding step's one query row per
/// head, where `gemm`'s packing and dispatch cost more than the product.
const SMALL_ROWS: usize = 4;

/// [`mm`] for a few rows: each row of the product as dot products (right operand stored by columns,
/// as `K^T`) or as a sum of scaled right-operand rows (stored by rows, as `V`).
#[allow(clippy::too_many_arguments, reason = "the shape of a gemm call")]
fn mm_rows(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ld: usize,
    acc: bool,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    beta: f32,
) {
    let mut sum = vec![0f32; n];
    for i in 0..m {
        sum.fill(0.0);
        let a_at = |l: usize| a[i * a_rs + l * a_cs];
        if b_cs == 1 {
            for l in 0..k {
                let x = a_at(l);
                for (o, &y) in sum.iter_mut().zip(&b[l * b_rs..l * b_rs + n]) {
                    *o += x * y;
                }
            }
        } else if a_cs == 1 && b_rs == 1 {
            let row = &a[i * a_rs..i * a_rs + k];
            for (j, o) in sum.iter_mut().enumerate() {
                *o = dot(row, &b[j * b_cs..j * b_cs + k]);
            }
        } else {
            for (j, o) in sum.iter_mut().enumerate() {
                *o = (0..k).map(|l| a_at(l) * b[l * b_rs + j * b_cs]).sum();
            }
        }
        for (o, &x) in dst[i * ld..i * ld + n].iter_mut().zip(&sum) {
            *o = if acc { *o + beta * x } else { beta * x };
        }
    }
}

/// Dot product in [`LANES`] partial sums (so it vectorizes).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain definition, one query row at a time over every key, in f64.
    fn reference(q: &[f32], k: &[f32], v: &[f32], mask: &[f32], sh: Shape, sc: Scores) -> Vec<f32> {
        let Shape { batch, heads: h, kv_heads: kvh, queries: s, keys: t, head_dim: d } = sh;
        let mut out = vec![0f32; q.len()];
        for b in 0..batch {
            for head in 0..h {
                let g = b * kvh + head / (h / kvh);
                for i in 0..s {
                    let qi = &q[((b * h + head) * s + i) * d..][..d];
                    let scores: Vec<f64> = (0..t)
                        .map(|j| {
                            let kj = &k[(g * t + j) * d..][..d];
                            let mut x =
                                qi.iter().zip(kj).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>()
                                    * f64::from(sc.scale);
                            if let Some(c) = sc.softcap {
                                x = f64::from(c) * (x / f64::from(c)).tanh();
                            }
                            // f32 addition, as the kernel and transformers add the mask.
                            f64::from(x as f32 + mask[(b * s + i) * t + j])
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        let o: f64 = (0..t).map(|j| e[j] / sum * f64::from(v[(g * t + j) * d + c])).sum();
                        out[((b * h + head) * s + i) * d + c] = o as f32;
                    }
                }
            }
        }
        out
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        // A small LCG: values in [-1, 1), reproducible without a dependency.
        let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Causal over the last `s` of `t` keys, with `-inf` for hidden keys, `pad` leading keys hidden
    /// in batch row 1, whose first query row sees nothing when `blind` (`f32::MIN` throughout, as
    /// `mask.rs` builds a padding query's row); a sliding window of `window` keys when given.
    fn mask(b: usize, s: usize, t: usize, pad: usize, window: Option<usize>, blind: bool) -> Vec<f32> {
        let mut m = vec![0f32; b * s * t];
        for r in 0..b {
            for i in 0..s {
                let pos = i + (t - s);
                let blind = blind && r == 1 && i == 0;
                for j in 0..t {
                    let hide = j > pos || (r == 1 && j < pad) || window.is_some_and(|w| pos - j >= w);
                    m[(r * s + i) * t + j] = if blind {
                        f32::MIN
                    } else if hide {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    };
                }
            }
        }
        m
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
    }

    #[test]
    fn exp_matches_libm_to_a_few_ulp() {
        for i in 0..=200_000 {
            let x = -90.0 + 90.0 * i as f32 / 200_000.0;
            let (ours, libm) = (exp(x), x.exp());
            if x < -87.0 {
                assert_eq!(ours, 0.0);
            } else {
                assert!((ours - libm).abs() <= 4.0 * f32::EPSILON * libm, "exp({x}): {ours} vs {libm}");
            }
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn blocks_match_the_definition_with_gqa_padding_windows_and_softcap() {
        // s = 11 and blocks of 4: three blocks, the last one short; t > s as with a KV cache.
        // Blocks of up to SMALL_ROWS rows take the few-rows products, larger ones gemm's.
        let cases = [
            (None, None, 5),
            (Some(5), None, 5),
            (None, Some(2.0), 6),
            (None, None, BLOCK),
            (Some(5), Some(2.0), 1),
            (None, None, 2),
        ];
        for (window, softcap, block) in cases {
            let sh = Shape { batch: 2, heads: 6, kv_heads: 2, queries: 11, keys: 14, head_dim: 8 };
            let q = random(2 * 6 * 11 * 8, 1);
            let k = random(2 * 2 * 14 * 8, 2);
            let v = random(2 * 2 * 14 * 8, 3);
            let m = mask(2, 11, 14, 3, window, true);
            let sc = Scores { scale: 0.35, softcap };
            let ours = forward_blocks(&q, &k, &v, &m, sh, sc, block);
            close(&ours, &reference(&q, &k, &v, &m, sh, sc), 1e-5);
        }
    }

    #[test]
    fn gradients_match_finite_differences_of_the_definition() {
        let sh = Shape { batch: 2, heads: 4, kv_heads: 2, queries: 5, keys: 7, head_dim: 4 };
        let q = random(2 * 4 * 5 * 4, 4);
        let k = random(2 * 2 * 7 * 4, 5);
        let v = random(2 * 2 * 7 * 4, 6);
        let w = random(2 * 4 * 5 * 4, 7); // loss = sum(out * w)
        // No blind row: its scores are f32::MIN whatever q and k are, so a finite difference sees no
        // gradient there while the analytic one (and transformers') differentiates through the sum.
        let m = mask(2, 5, 7, 2, Some(4), false);
        for (softcap, block) in [(None, 2), (Some(1.5), 2), (None, 5), (Some(1.5), 5)] {
            let sc = Scores { scale: 0.5, softcap };
            let [dq, dk, dv] = backward_blocks(&q, &k, &v, &m, &w, sh, sc, block);
            let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
                reference(q, k, v, &m, sh, sc)
                    .iter()
                    .zip(&w)
                    .map(|(o, w)| f64::from(*o) * f64::from(*w))
                    .sum()
            };
            let h = 1e-2f32;
            for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
                for i in (0..grad.len()).step_by(3) {
                    let mut args = [q.clone(), k.clone(), v.clone()];
                    args[which][i] += h;
                    let up = loss(&args[0], &args[1], &args[2]);
                    args[which][i] -= 2.0 * h;
                    let down = loss(&args[0], &args[1], &args[2]);
                    let numeric = ((up - down) / (2.0 * f64::from(h))) as f32;
                    assert!(
                        (grad[i] - numeric).abs() <= 2e-3 * (1.0 + numeric.abs()),
                        "d{}[{i}] {softcap:?}: {} vs {numeric}",
                        ["q", "k", "v"][which],
                        grad[i]
                    );
                }
            }
        }
    }
}
