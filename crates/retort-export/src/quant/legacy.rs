//! The 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, bit-exact with ggml's reference
//! quantizers (`quantize_row_*_ref` in `ggml-quants.c`), which gguf-py's `quants.py` also reproduces.
//!
//! Float-to-int casts mirror C: `(int8_t)(x + 8.5f)` truncates toward zero, as Rust's `as` does for
//! values in range (and both give 0 for NaN).

use crate::quant::float::{f16_bits, f16_value};

/// Elements per block.
pub const QK: usize = 32;

fn put_f16(out: &mut [u8], at: usize, v: f32) {
    out[at..at + 2].copy_from_slice(&f16_bits(v).to_le_bytes());
}

fn get_f16(b: &[u8], at: usize) -> f32 {
    f16_value(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// The value with the largest magnitude (first one on ties), as ggml picks it.
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// One Q4_0 block (18 bytes): `d` f16, 16 bytes of 4-bit values, `x = (q - 8) * d`.
pub fn q4_0(x: &[f32], out: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    for j in 0..QK / 2 {
        let x0 = x[j] * id;
        let x1 = x[QK / 2 + j] * id;
        let q0 = ((x0 + 8.5) as i8).min(15) as u8;
        let q1 = ((x1 + 8.5) as i8).min(15) as u8;
        out[2 + j] = q0 | (q1 << 4);
    }
}

/// One Q4_1 block (20 bytes): `d`, `m` f16, 16 bytes of 4-bit values, `x = q * d + m`.
pub fn q4_1(x: &[f32], out: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    put_f16(out, 2, min);
    for j in 0..QK / 2 {
        let x0 = (x[j] - min) * id;
        let x1 = (x[QK / 2 + j] - min) * id;
        let q0 = ((x0 + 0.5) as i8).min(15) as u8;
        let q1 = ((x1 + 0.5) as i8).min(15) as u8;
        out[4 + j] = q0 | (q1 << 4);
    }
}

/// One Q5_0 block (22 bytes): `d` f16, 4 bytes of high bits, 16 bytes of low nibbles,
/// `x = (q - 16) * d`.
pub fn q5_0(x: &[f32], out: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let x0 = x[j] * id;
        let x1 = x[QK / 2 + j] * id;
        let q0 = ((x0 + 16.5) as i8).min(31) as u8;
        let q1 = ((x1 + 16.5) as i8).min(31) as u8;
        out[6 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= u32::from((q0 & 0x10) >> 4) << j;
        qh |= u32::from((q1 & 0x10) >> 4) << (j + QK / 2);
    }
    out[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// One Q5_1 block (24 bytes): `d`, `m` f16, 4 bytes of high bits, 16 bytes of low nibbles,
/// `x = q * d + m`.
pub fn q5_1(x: &[f32], out: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    put_f16(out, 2, min);
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let x0 = (x[j] - min) * id;
        let x1 = (x[QK / 2 + j] - min) * id;
        let q0 = (x0 + 0.5) as u8;
        let q1 = (x1 + 0.5) as u8;
        out[8 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= u32::from((q0 & 0x10) >> 4) << j;
        qh |= u32::from((q1 & 0x10) >> 4) << (j + QK / 2);
    }
    out[4..8].copy_from_slice(&qh.to_le_bytes());
}

/// C's `(int)roundf(v)` (half away from zero) for |v| < 2^22, in float and integer arithmetic only so
/// that it vectorises (baseline x86-64 has no rounding instruction, and Rust's `as i32` is a
/// saturating scalar conversion): `v + 1.5 * 2^23` rounds to an integer (ties to even) whose value is
/// in the low mantissa bits; ties the wrong way are then stepped away from zero. Larger values and NaN
/// give 0, as x86's conversion of them gives a zero low byte in ggml's C.
#[inline(always)]
fn round_half_away_i32(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    const MAGIC_BITS: i32 = 0x4B40_0000;
    let s = v + MAGIC;
    let d = v - (s - MAGIC);
    let q =
        s.to_bits() as i32 - MAGIC_BITS + i32::from(d == 0.5 && v > 0.0) - i32::from(d == -0.5 && v < 0.0);
    if v.abs() < 4_194_304.0 { q } else { 0 }
}

/// One Q8_0 block (34 bytes): `d` f16, 32 signed bytes, `x = q * d`.
pub fn q8_0(x: &[f32], out: &mut [u8]) {
    // The max of absolute values does not depend on the order of comparisons (no rounding, and all
    // values are >= +0), so eight running maxima give ggml's result and vectorise.
    let mut m = [0.0f32; 8];
    for c in x[..QK].chunks_exact(8) {
        for k in 0..8 {
            let a = c[k].abs();
            m[k] = if m[k] > a { m[k] } else { a };
        }
    }
    let mut amax = 0.0f32;
    for v in m {
        amax = if amax > v { amax } else { v };
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    // Zipped slices (one bounds check up front) so the loop vectorises.
    for (o, &v) in out[2..2 + QK].iter_mut().zip(&x[..QK]) {
        *o = round_half_away_i32(v * id) as i8 as u8;
    }
}

/// Dequantizes one Q4_0 block.
pub fn dq4_0(b: &[u8], y: &mut [f32]) {
    let d = get_f16(b, 0);
    for j in 0..QK / 2 {
        y[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + QK / 2] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Dequantizes one Q4_1 block.
pub fn dq4_1(b: &[u8], y: &mut [f32]) {
    let d = get_f16(b, 0);
    let m = get_f16(b, 2);
    for j in 0..QK / 2 {
        y[j] = (b[4 + j] & 0x0F) as f32 * d + m;
        y[j + QK / 2] = (b[4 + j] >> 4) as f32 * d + m;
    }
}

fn high_bits(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Dequantizes one Q5_0 block.
pub fn dq5_0(b: &[u8], y: &mut [f32]) {
    let d = get_f16(b, 0);
    let qh = high_bits(b, 2);
    for j in 0..QK / 2 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = (((b[6 + j] & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + QK / 2] = (((b[6 + j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// Dequantizes one Q5_1 block.
pub fn dq5_1(b: &[u8], y: &mut [f32]) {
    let d = get_f16(b, 0);
    let m = get_f16(b, 2);
    let qh = high_bits(b, 4);
    for j in 0..QK / 2 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = ((b[8 + j] & 0x0F) | h0) as f32 * d + m;
        y[j + QK / 2] = ((b[8 + j] >> 4) | h1) as f32 * d + m;
    }
}

/// Dequantizes one Q8_0 block.
pub fn dq8_0(b: &[u8], y: &mut [f32]) {
    let d = get_f16(b, 0);
    for j in 0..QK {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_half_away_is_roundf() {
        let mut v = -130.0f32;
        while v <= 130.0 {
            for x in [
                v,
                v + 0.5,
                v - 0.5,
                f32::from_bits(v.to_bits() + 1),
                f32::from_bits(v.to_bits().saturating_sub(1)),
            ] {
                assert_eq!(round_half_away_i32(x) as f32, x.round(), "{x}");
            }
            v += 0.25;
        }
        for x in [
            0.49999997f32,
            -0.49999997,
            0.5,
            -0.5,
            1.4999999,
            126.5,
            -126.5,
            0.0,
            -0.0,
            4_194_303.5,
            -4_194_302.5,
        ] {
            assert_eq!(round_half_away_i32(x) as f32, x.round(), "{x}");
        }
    }
}
