//! Fast Q4_K, Q5_K and Q6_K: the same arithmetic as [`super::kquants`], with the sub-blocks of a
//! super-block as SIMD lanes.
//!
//! ggml's search for the best scale of a sub-block is a chain of dependent f32 additions; reordering
//! them would change the result, so one sub-block cannot be vectorised. But the 8 sub-blocks of a
//! Q4_K/Q5_K super-block (16 for Q6_K) are independent: here each step runs on all of them at once
//! (`[f32; 8]` per quantity, loops over lanes that the compiler vectorises), every lane doing exactly
//! the scalar operation sequence of the reference. Branches become per-lane selections. The output is
//! byte-identical to the reference, which stays beside it ([`super::kquants`]) and is compared with it
//! on random inputs by the tests.

use super::float::{f16_bits, f16_value};
use super::kquants::{QK_K, nearest_int, pack_scales, scale_min_k4};

const GROUP_MAX_EPS: f32 = 1e-15;

/// `nearest_int(v).clamp(lo, hi) as f32`, mostly in the float domain (it vectorises well): for
/// |v| < 2^22, `(v + 1.5 * 2^23) - 1.5 * 2^23` is exactly v rounded half to even, as `nearest_int`.
/// Larger values (and NaN), where ggml's trick returns whatever the bits say, take the integer path so
/// even degenerate blocks give the reference's bytes.
#[inline(always)]
fn round_clamp(v: f32, lo: f32, hi: f32) -> f32 {
    let fast = ((v + 12_582_912.0) - 12_582_912.0).max(lo).min(hi);
    let exact = nearest_int(v).clamp(lo as i32, hi as i32) as f32;
    if v.abs() < 4_194_304.0 { fast } else { exact }
}

/// `make_qkx2_quants` for the 8 sub-blocks of 32 of a super-block; returns per-lane `(scale, -min)`
/// and the levels in `l` (`l[32 * lane + i]`).
fn qkx2_lanes(x: &[f32], nmax: i32, rmin: f32, nstep: i32, l: &mut [u8; QK_K]) -> ([f32; 8], [f32; 8]) {
    const N: usize = 8;
    let mut xt = [[0f32; N]; 32];
    let mut wt = [[0f32; N]; 32];
    for j in 0..N {
        for i in 0..32 {
            xt[i][j] = x[32 * j + i];
        }
    }
    let mut sum_x2 = [0f32; N];
    for row in &xt {
        for j in 0..N {
            sum_x2[j] += row[j] * row[j];
        }
    }
    let mut av_x = [0f32; N];
    for j in 0..N {
        av_x[j] = (sum_x2[j] / 32.0).sqrt();
    }
    for i in 0..32 {
        for j in 0..N {
            wt[i][j] = av_x[j] + xt[i][j].abs();
        }
    }
    let mut min = xt[0];
    let mut max = xt[0];
    let mut sum_w = wt[0];
    let mut sum_x = [0f32; N];
    for j in 0..N {
        sum_x[j] = sum_w[j] * xt[0][j];
    }
    for i in 1..32 {
        for j in 0..N {
            let v = xt[i][j];
            if v < min[j] {
                min[j] = v;
            }
            if v > max[j] {
                max[j] = v;
            }
            let w = wt[i][j];
            sum_w[j] += w;
            sum_x[j] += w * v;
        }
    }
    for m in &mut min {
        if *m > 0.0 {
            *m = 0.0;
        }
    }
    // The reference returns early for these lanes; here they are computed and masked.
    let mut flat = [false; N];
    for j in 0..N {
        flat[j] = max[j] == min[j];
    }
    let nmaxf = nmax as f32;
    let mut scale = [0f32; N];
    let mut best = [0f32; N];
    let mut lt = [[0f32; N]; 32];
    let mut iscale = [0f32; N];
    for j in 0..N {
        iscale[j] = nmaxf / (max[j] - min[j]);
        scale[j] = 1.0 / iscale[j];
    }
    for i in 0..32 {
        for j in 0..N {
            let q = round_clamp(iscale[j] * (xt[i][j] - min[j]), 0.0, nmaxf);
            lt[i][j] = q;
            let diff = scale[j] * q + min[j] - xt[i][j];
            best[j] += wt[i][j] * (diff * diff);
        }
    }
    let mut laux = [[0f32; N]; 32];
    for is in 0..=nstep {
        for j in 0..N {
            // `min` moves when a candidate wins, as in the reference.
            iscale[j] = (rmin + 0.1 * is as f32 + nmaxf) / (max[j] - min[j]);
        }
        let (mut sl, mut sl2, mut sxl) = ([0f32; N], [0f32; N], [0f32; N]);
        for i in 0..32 {
            for j in 0..N {
                let q = round_clamp(iscale[j] * (xt[i][j] - min[j]), 0.0, nmaxf);
                laux[i][j] = q;
                let w = wt[i][j];
                sl[j] += w * q;
                sl2[j] += w * q * q;
                sxl[j] += w * q * xt[i][j];
            }
        }
        let mut ok = [false; N];
        let (mut ts, mut tm) = ([0f32; N], [0f32; N]);
        for j in 0..N {
            let d = sum_w[j] * sl2[j] - sl[j] * sl[j];
            ok[j] = d > 0.0;
            ts[j] = (sum_w[j] * sxl[j] - sum_x[j] * sl[j]) / d;
            tm[j] = (sl2[j] * sum_x[j] - sl[j] * sxl[j]) / d;
            if tm[j] > 0.0 {
                tm[j] = 0.0;
                ts[j] = sxl[j] / sl2[j];
            }
        }
        let mut cur = [0f32; N];
        for i in 0..32 {
            for j in 0..N {
                let diff = ts[j] * laux[i][j] + tm[j] - xt[i][j];
                cur[j] += wt[i][j] * (diff * diff);
            }
        }
        let mut take = [false; N];
        for j in 0..N {
            take[j] = !flat[j] && ok[j] && cur[j] < best[j];
            if take[j] {
                best[j] = cur[j];
                scale[j] = ts[j];
                min[j] = tm[j];
            }
        }
        if take.iter().any(|&t| t) {
            for i in 0..32 {
                for j in 0..N {
                    if take[j] {
                        lt[i][j] = laux[i][j];
                    }
                }
            }
        }
    }
    let mut mins = [0f32; N];
    for j in 0..N {
        for i in 0..32 {
            l[32 * j + i] = if flat[j] { 0 } else { lt[i][j] as u8 };
        }
        if flat[j] {
            scale[j] = 0.0;
        }
        mins[j] = -min[j];
    }
    (scale, mins)
}

/// The second half of Q4_K/Q5_K: 6-bit scale codes, the header, and the final levels.
fn finish(x: &[f32], scales: [f32; 8], mins: [f32; 8], nmax: i32, head: &mut [u8], l: &mut [u8; QK_K]) {
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..8 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_scales(&ls, &lm);
    let d = f16_bits(max_scale / 63.0);
    let dmin = f16_bits(max_min / 63.0);
    head[0..2].copy_from_slice(&d.to_le_bytes());
    head[2..4].copy_from_slice(&dmin.to_le_bytes());
    head[4..16].copy_from_slice(&packed);
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

/// One Q4_K super-block (byte-identical to [`super::kquants::q4_k`]).
pub fn q4_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let (s, m) = qkx2_lanes(x, 15, -1.0, 20, &mut l);
    finish(x, s, m, 15, &mut out[..16], &mut l);
    let q = &mut out[16..144];
    for (c, j) in (0..QK_K).step_by(64).enumerate() {
        for i in 0..32 {
            q[32 * c + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

/// One Q5_K super-block (byte-identical to [`super::kquants::q5_k`]).
pub fn q5_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let (s, m) = qkx2_lanes(x, 31, -0.5, 15, &mut l);
    finish(x, s, m, 31, &mut out[..16], &mut l);
    super::kquants::pack_q5(&l, &mut out[16..176]);
}

/// `make_qx_quants(16, 32, .., rmse_type = 1)` for the 16 sub-blocks of 16 of a Q6_K super-block.
fn qx_lanes(x: &[f32], l: &mut [u8; QK_K]) -> [f32; 16] {
    const N: usize = 16;
    const NMAX: i32 = 32;
    let mut xt = [[0f32; N]; 16];
    for j in 0..N {
        for i in 0..16 {
            xt[i][j] = x[16 * j + i];
        }
    }
    let mut max = [0f32; N];
    let mut amax = [0f32; N];
    for row in &xt {
        for j in 0..N {
            let ax = row[j].abs();
            if ax > amax[j] {
                amax[j] = ax;
                max[j] = row[j];
            }
        }
    }
    let mut lt = [[0f32; N]; 16];
    let mut iscale = [0f32; N];
    for j in 0..N {
        iscale[j] = (-NMAX) as f32 / max[j];
    }
    let (mut sumlx, mut suml2) = ([0f32; N], [0f32; N]);
    for i in 0..16 {
        for j in 0..N {
            let q = round_clamp(iscale[j] * xt[i][j], -(NMAX as f32), (NMAX - 1) as f32);
            lt[i][j] = q;
            let w = xt[i][j] * xt[i][j];
            sumlx[j] += w * xt[i][j] * q;
            suml2[j] += w * q * q;
        }
    }
    let mut scale = [0f32; N];
    let mut best = [0f32; N];
    for j in 0..N {
        scale[j] = if suml2[j] != 0.0 { sumlx[j] / suml2[j] } else { 0.0 };
        best[j] = scale[j] * sumlx[j];
    }
    let mut laux = [[0f32; N]; 16];
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        for j in 0..N {
            iscale[j] = -(NMAX as f32 + 0.1 * is as f32) / max[j];
        }
        sumlx = [0f32; N];
        suml2 = [0f32; N];
        for i in 0..16 {
            for j in 0..N {
                let q = round_clamp(iscale[j] * xt[i][j], -(NMAX as f32), (NMAX - 1) as f32);
                laux[i][j] = q;
                let w = xt[i][j] * xt[i][j];
                sumlx[j] += w * xt[i][j] * q;
                suml2[j] += w * q * q;
            }
        }
        let mut take = [false; N];
        for j in 0..N {
            take[j] = suml2[j] > 0.0 && sumlx[j] * sumlx[j] > best[j] * suml2[j];
            if take[j] {
                scale[j] = sumlx[j] / suml2[j];
                best[j] = scale[j] * sumlx[j];
            }
        }
        if take.iter().any(|&t| t) {
            for i in 0..16 {
                for j in 0..N {
                    if take[j] {
                        lt[i][j] = laux[i][j];
                    }
                }
            }
        }
    }
    for j in 0..N {
        let zero = amax[j] < GROUP_MAX_EPS;
        for i in 0..16 {
            l[16 * j + i] = if zero { 0 } else { (lt[i][j] as i32 + NMAX) as u8 };
        }
        if zero {
            scale[j] = 0.0;
        }
    }
    scale
}

/// One Q6_K super-block (byte-identical to [`super::kquants::q6_k`]).
pub fn q6_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let scales = qx_lanes(x, &mut l);
    super::kquants::q6_k_finish(x, &scales, &mut l, out);
}
