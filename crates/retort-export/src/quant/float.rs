//! f16 and bf16 conversions as ggml does them: round to nearest, ties to even.

/// f32 to IEEE half bits (round to nearest even; overflow to infinity), as `GGML_FP32_TO_FP16`.
pub fn f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// IEEE half bits to f32 (exact).
pub fn f16_value(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// f32 to bfloat16 bits, as `ggml_compute_fp32_to_bf16` and gguf-py: round to nearest even, NaN kept
/// quiet.
pub fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// bfloat16 bits to f32 (exact).
pub fn bf16_value(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Rounds through f16 and back.
pub fn round_f16(x: f32) -> f32 {
    f16_value(f16_bits(x))
}

/// Rounds through bf16 and back.
pub fn round_bf16(x: f32) -> f32 {
    bf16_value(bf16_bits(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is exactly between 1 and the next bf16 (1 + 2^-7): ties go to the even one (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_value(bf16_bits(-2.5)), -2.5);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
    }

    #[test]
    fn f16_matches_ieee() {
        assert_eq!(f16_bits(1.0), 0x3c00);
        assert_eq!(f16_bits(65520.0), 0x7c00, "rounds to infinity");
        assert_eq!(f16_value(0x0001), 5.960_464_5e-8);
        assert_eq!(round_f16(0.1), 0.099_975_586);
    }
}
