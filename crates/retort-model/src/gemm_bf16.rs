//! `x w^T` for bf16 operands on the CPU, accumulated in f32: the products of a base held in bf16.
//!
//! burn's CPU matmul converts both bf16 operands to f32 on one thread on every call (the weight too),
//! multiplies in f32, and converts the result back on one thread. Here, on CPUs with AVX512-BF16 (AMD
//! Zen 4 and later, Intel Cooper Lake and Sapphire Rapids and later), `vdpbf16ps` multiplies pairs of
//! bf16 values and adds both products to an f32 lane: twice the multiply-adds of an f32 FMA per
//! instruction, from operands half the size. Elsewhere both operands are converted to f32 in parallel
//! and gemm multiplies them.
//!
//! Packing follows the usual blocked GEMM: both operands are copied once per call into panels whose
//! elements are consecutive pairs along `k` (one 32-bit lane each), `MR` rows of `x` or `NR` rows of
//! `w` to a panel, zero-padded at the edges; threads take `MC x NC` tiles of the output and walk `k`
//! in blocks of `KC` pairs, so a `KC x NR` panel of `w` stays in L1 while `MC / MR` panels of `x` pass
//! over it. The products are exact in f32 (8-bit significands); the sums round as an f32 GEMM's do,
//! in a different order, and `vdpbf16ps` flushes subnormal inputs and outputs to zero.

use half::bf16;
use rayon::prelude::*;

use crate::dense::{Operand, PARALLEL_MIN_MACS};

/// Rows of `x` in a micro tile.
const MR: usize = 12;
/// Rows of `w` (output columns) in a micro tile: two vectors of 16 f32 lanes.
const NR: usize = 32;
/// Pairs along `k` per block.
const KC: usize = 128;
/// Output rows per task.
const MC: usize = MR * 8;
/// Output columns per task.
const NC: usize = NR * 8;

/// Whether this CPU multiplies bf16 pairs natively (`vdpbf16ps`); checked once.
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static NATIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *NATIVE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x w^T` for `x` `[m, k]` and `w` `[n, k]`: f32, row-major `[m, n]`.
#[cfg(test)]
fn product(x: &Operand<'_, bf16>, w: &Operand<'_, bf16>) -> Vec<f32> {
    if native() { product_native(x, w) } else { product_converted(x, w) }
}

/// [`product`] rounded to bf16 (to nearest, ties to even), as a bf16 matmul returns it.
pub(crate) fn product_bf16(x: &Operand<'_, bf16>, w: &Operand<'_, bf16>) -> Vec<bf16> {
    if native() { product_native(x, w) } else { round(&product_converted(x, w)) }
}

/// f32 values rounded to bf16, in parallel.
pub(crate) fn round(v: &[f32]) -> Vec<bf16> {
    use half::slice::HalfFloatSliceExt;
    let mut out = vec![bf16::ZERO; v.len()];
    out.par_chunks_mut(1 << 14).zip(v.par_chunks(1 << 14)).for_each(|(o, s)| o.convert_from_f32_slice(s));
    out
}

/// Both operands converted to f32 (row-major, in parallel), then gemm.
pub(crate) fn product_converted(x: &Operand<'_, bf16>, w: &Operand<'_, bf16>) -> Vec<f32> {
    let (xf, wf) = (widen(x), widen(w));
    crate::dense::product(&Operand::row_major(&xf, x.rows, x.cols), &Operand::row_major(&wf, w.rows, w.cols))
}

fn widen(t: &Operand<'_, bf16>) -> Vec<f32> {
    let mut out = vec![0.0f32; t.rows * t.cols];
    out.par_chunks_mut(t.cols.max(1)).enumerate().for_each(|(i, row)| {
        let at = t.start + i * t.row_stride;
        row.iter_mut().enumerate().for_each(|(j, v)| *v = t.data[at + j * t.col_stride].to_f32());
    });
    out
}

/// Panels of `R` rows of `t` (`[rows, k]`): panel `p` holds, for each pair `q` along `k` and each of
/// its rows `r`, the bits of `t[p * R + r, 2q]` in the low half of one `u32` and of `t[.., 2q + 1]` in
/// the high half; rows and the odd `k` past the edge are zero.
fn pack<const R: usize>(t: &Operand<'_, bf16>) -> Vec<u32> {
    let pairs = t.cols.div_ceil(2);
    let mut out = vec![0u32; t.rows.div_ceil(R) * pairs * R];
    let even = t.cols / 2;
    out.par_chunks_mut(pairs * R).enumerate().for_each(|(p, panel)| {
        let live = R.min(t.rows - p * R);
        let base: [usize; R] = std::array::from_fn(|r| t.start + (p * R + r.min(live - 1)) * t.row_stride);
        let bits = |at: usize| u32::from(t.data[at].to_bits());
        let (cs, data) = (t.col_stride, t.data);
        for (q, lanes) in panel.chunks_exact_mut(R).enumerate().take(even) {
            let off = 2 * q * cs;
            for (r, lane) in lanes.iter_mut().enumerate().take(live) {
                *lane = bits(base[r] + off) | (bits(base[r] + off + cs) << 16);
            }
        }
        if even < pairs {
            let lanes = &mut panel[even * R..];
            for (r, lane) in lanes.iter_mut().enumerate().take(live) {
                *lane = u32::from(data[base[r] + 2 * even * cs].to_bits());
            }
        }
    });
    out
}

/// An output element: f32, or bf16 rounded to nearest-even from the f32 sum.
trait Element: Copy + Send + Sync {
    fn from_f32(v: &[f32], out: &mut [Self]);
}

impl Element for f32 {
    fn from_f32(v: &[f32], out: &mut [f32]) {
        out.copy_from_slice(v);
    }
}

impl Element for bf16 {
    fn from_f32(v: &[f32], out: &mut [bf16]) {
        use half::slice::HalfFloatSliceExt;
        out.convert_from_f32_slice(v);
    }
}

/// The output's storage, written by several threads at disjoint tiles.
#[derive(Clone, Copy)]
struct Out<T>(*mut T);

#[allow(unsafe_code, reason = "tasks write disjoint tiles of one buffer")]
// SAFETY: every task writes only the rows and columns of its own output tile.
unsafe impl<T> Send for Out<T> {}
#[allow(unsafe_code, reason = "tasks write disjoint tiles of one buffer")]
// SAFETY: as for `Send`.
unsafe impl<T> Sync for Out<T> {}

impl<T> Out<T> {
    /// Element `i` (a method, so closures capture the whole `Out`, which is `Sync`, not its pointer).
    fn at(self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

fn product_native<T: Element>(x: &Operand<'_, bf16>, w: &Operand<'_, bf16>) -> Vec<T> {
    let (m, k, n) = (x.rows, x.cols, w.rows);
    assert!(m > 0 && k > 0 && n > 0 && w.cols == k, "shapes [{m}, {k}] and [{n}, {}]", w.cols);
    let pairs = k.div_ceil(2);
    let (ap, bp) = (pack::<MR>(x), pack::<NR>(w));
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    let dst = Out(out.as_mut_ptr());
    let tiles: Vec<(usize, usize)> =
        (0..m.div_ceil(MC)).flat_map(|i| (0..n.div_ceil(NC)).map(move |j| (i * MC, j * NC))).collect();
    let tile = |&(i0, j0): &(usize, usize)| {
        let (rows, cols) = (MC.min(m - i0), NC.min(n - j0));
        // The tile's f32 sums, `cols` apart, rounded into the output once `k` is done.
        let mut acc = vec![0.0f32; rows * cols];
        for kb in (0..pairs).step_by(KC) {
            let kc = KC.min(pairs - kb);
            for j in (0..cols).step_by(NR) {
                let b = &bp[((j0 + j) / NR) * pairs * NR + kb * NR..][..kc * NR];
                for i in (0..rows).step_by(MR) {
                    let a = &ap[((i0 + i) / MR) * pairs * MR + kb * MR..][..kc * MR];
                    let c = &mut acc[i * cols + j..];
                    #[allow(unsafe_code, reason = "SIMD intrinsics")]
                    // SAFETY: `native()` checked the CPU's features; `a` and `b` hold `kc` pairs of
                    // `MR` and `NR` lanes; `c` holds `MR.min(rows - i)` rows `cols` apart from column
                    // `j`, of which the kernel touches `NR.min(cols - j)`.
                    unsafe {
                        kernel(a, b, kc, c, cols, MR.min(rows - i), NR.min(cols - j), kb > 0);
                    }
                }
            }
        }
        for (r, sums) in acc.chunks_exact(cols).enumerate() {
            #[allow(unsafe_code, reason = "the tile's rows of the shared output")]
            // SAFETY: row `i0 + r`, columns `j0..j0 + cols` lie inside the `m x n` capacity and belong
            // to this tile alone; `from_f32` writes each of them.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.at((i0 + r) * n + j0), cols) };
            T::from_f32(sums, row);
        }
    };
    if m * k * n < PARALLEL_MIN_MACS {
        tiles.iter().for_each(tile);
    } else {
        tiles.par_iter().for_each(tile);
    }
    #[allow(unsafe_code, reason = "the tiles wrote every element")]
    // SAFETY: the tiles partition the `m x n` output and each wrote all of its elements.
    unsafe {
        out.set_len(m * n);
    }
    out
}

/// One `MR x NR` micro tile: `c[i, j] (+)= sum over the kc pairs of a . b`, storing `rows x cols`.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code, clippy::too_many_arguments, reason = "SIMD intrinsics on raw pointers")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(
    a: &[u32],
    b: &[u32],
    kc: usize,
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    cols: usize,
    load: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for q in 0..kc {
        // SAFETY (all loads): `b` holds kc x NR lanes and `a` kc x MR.
        let (b0, b1) = unsafe {
            let p = b.as_ptr().add(q * NR).cast::<__m512i>();
            (_mm512_loadu_si512(p), _mm512_loadu_si512(p.add(1)))
        };
        // SAFETY: both are 512 bits of plain data.
        let (b0, b1): (__m512bh, __m512bh) = unsafe {
            (std::mem::transmute::<__m512i, __m512bh>(b0), std::mem::transmute::<__m512i, __m512bh>(b1))
        };
        let lanes = &a[q * MR..q * MR + MR];
        for (row, &pair) in acc.iter_mut().zip(lanes) {
            // SAFETY: as above.
            let av: __m512bh =
                unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair as i32)) };
            row[0] = _mm512_dpbf16_ps(row[0], av, b0);
            row[1] = _mm512_dpbf16_ps(row[1], av, b1);
        }
    }
    let masks = [lanes_mask(cols), lanes_mask(cols.saturating_sub(16))];
    for (i, row) in acc.iter().enumerate().take(rows) {
        for (h, (&v, &mask)) in row.iter().zip(&masks).enumerate() {
            // SAFETY: the caller gives `rows x cols` of `c`, `ldc` apart; the masks keep to the first
            // `cols` columns.
            unsafe {
                let p = c.as_mut_ptr().add(i * ldc + 16 * h);
                let v = if load { _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p)) } else { v };
                _mm512_mask_storeu_ps(p, mask, v);
            }
        }
    }
}

/// The first `n` of 16 lanes.
#[cfg(target_arch = "x86_64")]
fn lanes_mask(n: usize) -> u16 {
    if n >= 16 { u16::MAX } else { (1u16 << n) - 1 }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(unsafe_code, clippy::too_many_arguments, reason = "the same signature as on x86_64")]
unsafe fn kernel(_: &[u32], _: &[u32], _: usize, _: &mut [f32], _: usize, _: usize, _: usize, _: bool) {
    unreachable!("native() is false off x86_64")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;

    /// Values spread over several binades, signs mixed, bf16-exact.
    fn values(len: usize, seed: u64) -> Vec<bf16> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 11) as f64 / (1u64 << 53) as f64;
                bf16::from_f64((u - 0.5) * 4.0 * 2f64.powi((s % 5) as i32 - 2))
            })
            .collect()
    }

    /// `x w^T` in f64 from the bf16 values, and the sum of the products' magnitudes per element.
    fn reference(x: &Operand<'_, bf16>, w: &Operand<'_, bf16>) -> (Vec<f64>, Vec<f64>) {
        let get = |t: &Operand<'_, bf16>, i: usize, j: usize| {
            t.data[t.start + i * t.row_stride + j * t.col_stride].to_f64()
        };
        let (mut out, mut mag) = (vec![], vec![]);
        for i in 0..x.rows {
            for j in 0..w.rows {
                let p = (0..x.cols).map(|kk| get(x, i, kk) * get(w, j, kk));
                let (s, a) = p.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                out.push(s);
                mag.push(a);
            }
        }
        (out, mag)
    }

    /// Every element within k x 2^-24 of the sum of its products' magnitudes: the products of bf16
    /// values are exact in f32, and summing `k` of them in f32, in any order, errs by at most that
    /// (to first order). A misplaced or dropped element errs by a whole product.
    fn check(got: &[f32], x: &Operand<'_, bf16>, w: &Operand<'_, bf16>, what: &str) {
        let (want, mag) = reference(x, w);
        assert_eq!(got.len(), want.len(), "{what}: length");
        let k = x.cols as f64;
        for (e, ((&g, &r), &a)) in got.iter().zip(&want).zip(&mag).enumerate() {
            let err = (f64::from(g) - r).abs();
            let bound = k * a * 2f64.powi(-24) + 1e-30;
            assert!(err <= bound, "{what}: element {e}: {g} against {r} (|err| {err:e} > {bound:e})");
        }
    }

    /// Shapes that are and are not multiples of the micro tile, the task tile and the k block, odd k
    /// among them, both operands row-major and transposed views.
    #[test]
    fn matches_an_f64_reference_on_ragged_shapes_and_strides() {
        let shapes = [(1, 1, 1), (3, 5, 7), (12, 32, 2), (13, 33, 257), (97, 300, 70), (200, 129, 520)];
        for (t, &(m, k, n)) in shapes.iter().enumerate() {
            let (xs, ws) = (values(m * k, 2 * t as u64 + 1), values(n * k, 2 * t as u64 + 2));
            let x = Operand::row_major(&xs, m, k);
            let w = Operand::row_major(&ws, n, k);
            // The same values stored the other way round, read through transposed views.
            let xt: Vec<bf16> = (0..k * m).map(|e| xs[(e % m) * k + e / m]).collect();
            let wt: Vec<bf16> = (0..k * n).map(|e| ws[(e % n) * k + e / n]).collect();
            let (xv, wv) =
                (Operand::row_major(&xt, k, m).transposed(), Operand::row_major(&wt, k, n).transposed());
            let what = format!("[{m}, {k}] x [{n}, {k}]^T");
            check(&product(&x, &w), &x, &w, &format!("{what}, row-major"));
            check(&product(&xv, &wv), &xv, &wv, &format!("{what}, transposed views"));
            check(&product_converted(&x, &w), &x, &w, &format!("{what}, converted"));
            if native() {
                check(&product_native::<f32>(&xv, &w), &xv, &w, &format!("{what}, native"));
                let rounded = product_native::<bf16>(&x, &wv);
                let want = round(&product_native::<f32>(&x, &wv));
                assert!(rounded == want, "{what}: bf16 output is not the f32 sums rounded");
            }
        }
        eprintln!("native bf16 products on this CPU: {}", native());
    }

    /// The rounded result is the f32 result rounded to nearest-even bf16.
    #[test]
    fn rounds_to_nearest_even() {
        let v = [1.0f32 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -2.5e-3, 65504.0, 1e-40];
        let r = round(&v);
        let want = [
            1.0f32,
            1.0 + 2f32.powi(-6),
            bf16::from_f32(-2.5e-3).to_f32(),
            65536.0,
            bf16::from_f32(1e-40).to_f32(),
        ];
        assert_eq!(r.iter().map(|b| b.to_f32()).collect::<Vec<_>>(), want);
    }
}
