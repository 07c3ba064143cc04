//! The 256-element "k-quant" super-blocks: Q4_K, Q5_K, Q6_K and Q8_K, bit-exact with ggml's reference
//! quantizers (`quantize_row_q{4,5,6,8}_K_ref` in `ggml-quants.c`, used by `llama-quantize` when no
//! importance matrix is given).
//!
//! Bit-exactness depends on doing the same f32 operations in the same order as the C code: each
//! expression below keeps the C evaluation order and int-to-float conversion points. Rust never fuses
//! a multiply and an add, and neither does ggml's reference build (it is compiled without FMA).
//!
//! These are the straightforward ports, kept as the reference; [`super::kfast`] computes the same
//! bytes several times faster and is what [`super::quantize`] uses.

use crate::quant::float::{f16_bits, f16_value};

/// Elements per super-block.
pub const QK_K: usize = 256;

const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round half to even through the float mantissa (valid for |x| < 2^22).
#[inline]
pub(crate) fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0;
    (v.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// `make_qkx2_quants`: a scale and min for `x` with levels `0..=nmax`, searching `nstep + 1` scales
/// around the range for the lowest weighted squared error. Returns `(scale, -min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out[..n].fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `make_qx_quants` with `rmse_type = 1` and no importance weights: a signed scale for levels
/// `-nmax..nmax` (stored offset by `nmax`), refined over 18 candidate scales.
fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [u8]) -> f32 {
    let n = x.len();
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let mut iscale = (-nmax) as f32 / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l_out[i] = (l + nmax) as u8;
        let w = x[i] * x[i];
        let lf = l as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &xi in x {
            let l = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
            let w = xi * xi;
            let lf = l as f32;
            sumlx += w * xi * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
                l_out[i] = (l + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Packs 8 six-bit scales and mins into Q4_K/Q5_K's 12 bytes.
pub(crate) fn pack_scales(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// ggml's `get_scale_min_k4`.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The shared first half of Q4_K and Q5_K: per-32 scales and mins, their 6-bit codes, and the levels.
fn scales_mins_levels(x: &[f32], nmax: i32, rmin: f32, nstep: i32, out_head: &mut [u8], l: &mut [u8; QK_K]) {
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) =
            make_qkx2_quants(nmax, xs, &weights, &mut l[32 * j..32 * j + 32], &mut laux, rmin, 0.1, nstep);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // C assigns the int to a uint8_t (wrapping) before taking MIN(63, .).
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_scales(&ls, &lm);
    let d = f16_bits(max_scale / 63.0);
    let dmin = f16_bits(max_min / 63.0);
    out_head[0..2].copy_from_slice(&d.to_le_bytes());
    out_head[2..4].copy_from_slice(&dmin.to_le_bytes());
    out_head[4..16].copy_from_slice(&packed);
    let (df, dminf) = (f16_value(d), f16_value(dmin));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = df * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dminf * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
}

/// One Q4_K super-block (144 bytes): `d`, `dmin` f16, 12 bytes of 6-bit scales and mins, 128 bytes of
/// 4-bit levels.
pub fn q4_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    scales_mins_levels(x, 15, -1.0, 20, &mut out[..16], &mut l);
    let q = &mut out[16..144];
    for (c, j) in (0..QK_K).step_by(64).enumerate() {
        for i in 0..32 {
            q[32 * c + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

/// One Q5_K super-block (176 bytes): like Q4_K plus 32 bytes of fifth bits.
pub fn q5_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    scales_mins_levels(x, 31, -0.5, 15, &mut out[..16], &mut l);
    pack_q5(&l, &mut out[16..176]);
}

/// Q5_K's 32 bytes of fifth bits and 128 bytes of low nibbles.
pub(crate) fn pack_q5(l: &[u8; QK_K], out: &mut [u8]) {
    let (qh, ql) = out.split_at_mut(32);
    qh.fill(0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (c, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * c + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

/// One Q6_K super-block (210 bytes): 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 signed 8-bit
/// scales, `d` f16.
pub fn q6_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 16];
    for ib in 0..16 {
        scales[ib] = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
    }
    q6_k_finish(x, &scales, &mut l, out);
}

/// Q6_K after the per-16 scales: the 8-bit scale codes, `d`, the final levels and the packing.
pub(crate) fn q6_k_finish(x: &[f32], scales: &[f32; 16], l: &mut [u8; QK_K], out: &mut [u8]) {
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for &s in scales {
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out[..210].fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16_bits(1.0 / iscale);
    out[208..210].copy_from_slice(&d.to_le_bytes());
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        out[192 + ib] = sc[ib] as u8;
    }
    let df = f16_value(d);
    for j in 0..16 {
        let dj = df * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / dj).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as u8;
        }
    }
    let (ql, rest) = out.split_at_mut(128);
    let qh = &mut rest[..64];
    for (c, j) in (0..QK_K).step_by(128).enumerate() {
        for i in 0..32 {
            let q1 = l[j + i] & 0xF;
            let q2 = l[j + i + 32] & 0xF;
            let q3 = l[j + i + 64] & 0xF;
            let q4 = l[j + i + 96] & 0xF;
            ql[64 * c + i] = q1 | (q3 << 4);
            ql[64 * c + i + 32] = q2 | (q4 << 4);
            qh[32 * c + i] = (l[j + i] >> 4)
                | ((l[j + i + 32] >> 4) << 2)
                | ((l[j + i + 64] >> 4) << 4)
                | ((l[j + i + 96] >> 4) << 6);
        }
    }
}

/// One Q8_K super-block (292 bytes): `d` f32, 256 signed bytes, 16 i16 sums of 16 values. ggml uses it
/// for dot products, never as a file type; it is here for completeness and tests.
pub fn q8_k(x: &[f32], out: &mut [u8]) {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in &x[..QK_K] {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        out[..292].fill(0);
        return;
    }
    let iscale = -127.0 / max;
    let mut qs = [0i8; QK_K];
    for j in 0..QK_K {
        qs[j] = nearest_int(iscale * x[j]).min(127) as i8;
        out[4 + j] = qs[j] as u8;
    }
    for j in 0..16 {
        let sum: i32 = qs[16 * j..16 * j + 16].iter().map(|&q| i32::from(q)).sum();
        out[260 + 2 * j..262 + 2 * j].copy_from_slice(&(sum as i16).to_le_bytes());
    }
    out[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

fn head(b: &[u8]) -> (f32, f32) {
    (f16_value(u16::from_le_bytes([b[0], b[1]])), f16_value(u16::from_le_bytes([b[2], b[3]])))
}

/// Dequantizes one Q4_K super-block.
pub fn dq4_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = head(b);
    let scales = &b[4..16];
    let q = &b[16..144];
    for c in 0..4 {
        let (sc, m) = scale_min_k4(2 * c, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * c + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        for l in 0..32 {
            y[64 * c + l] = d1 * (q[32 * c + l] & 0xF) as f32 - m1;
            y[64 * c + 32 + l] = d2 * (q[32 * c + l] >> 4) as f32 - m2;
        }
    }
}

/// Dequantizes one Q5_K super-block.
pub fn dq5_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = head(b);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let ql = &b[48..176];
    let (mut u1, mut u2) = (1u8, 2u8);
    for c in 0..4 {
        let (sc, m) = scale_min_k4(2 * c, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * c + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[64 * c + l] = d1 * ((ql[32 * c + l] & 0xF) + h1) as f32 - m1;
            y[64 * c + 32 + l] = d2 * ((ql[32 * c + l] >> 4) + h2) as f32 - m2;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

/// Dequantizes one Q6_K super-block.
pub fn dq6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_value(u16::from_le_bytes([b[208], b[209]]));
    for c in 0..2 {
        let ql = &b[64 * c..64 * c + 64];
        let qh = &b[128 + 32 * c..128 + 32 * c + 32];
        let sc = &b[192 + 8 * c..192 + 8 * c + 8];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            let y0 = &mut y[128 * c..128 * c + 128];
            y0[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y0[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y0[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y0[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// Dequantizes one Q8_K super-block.
pub fn dq8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for j in 0..QK_K {
        y[j] = d * (b[4 + j] as i8) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-2.6), -3);
        assert_eq!(nearest_int(63.4), 63);
    }

    #[test]
    fn scale_packing_round_trips() {
        let ls = [1, 2, 3, 63, 17, 40, 0, 63];
        let lm = [63, 0, 5, 9, 33, 62, 1, 20];
        let p = pack_scales(&ls, &lm);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &p), (ls[j], lm[j]));
        }
    }
}
