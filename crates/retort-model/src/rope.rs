//! Rotary position embeddings exactly as transformers' `modeling_rope_utils.py` computes them: the
//! `rotate_half` layout (not burn's interleaved one), partial rotary dimensions, and the scaling types
//! found in published configs (linear, dynamic NTK, Llama 3, YaRN, LongRoPE), with their attention
//! factors.

use burn::tensor::{DType, Device, Tensor, TensorData};
use retort_hf::RopeScaling;

/// Inverse frequencies for one forward pass.
#[derive(Debug, Clone)]
pub struct RopeTable {
    /// `rotary_dim / 2` inverse frequencies.
    pub inv_freq: Vec<f32>,
    /// cos and sin are multiplied by this (YaRN and LongRoPE temperature).
    pub attention_scaling: f32,
}

fn default_inv_freq(theta: f64, dim: usize) -> Vec<f32> {
    // transformers: 1 / (base ** (arange(0, dim, 2).float() / dim)), in float32.
    (0..dim / 2).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / dim as f32)).collect()
}

/// The RoPE parameters of one kind of layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// Base frequency.
    pub theta: f64,
    /// Scaling.
    pub scaling: RopeScaling,
    /// Rotated dimensions per head.
    pub rotary_dim: usize,
    /// The model's trained context (dynamic NTK and LongRoPE depend on it).
    pub max_position_embeddings: usize,
}

impl Rope {
    /// The table for a batch whose largest position id is `max_position`.
    pub fn table(&self, max_position: usize) -> RopeTable {
        let dim = self.rotary_dim;
        let seq_len = max_position + 1;
        match &self.scaling {
            RopeScaling::None => {
                RopeTable { inv_freq: default_inv_freq(self.theta, dim), attention_scaling: 1.0 }
            }
            RopeScaling::Linear { factor } => RopeTable {
                inv_freq: default_inv_freq(self.theta, dim).into_iter().map(|f| f / *factor as f32).collect(),
                attention_scaling: 1.0,
            },
            RopeScaling::Dynamic { factor } => {
                // Frequencies change only once the sequence outgrows the trained context.
                let max = self.max_position_embeddings;
                let base = if seq_len > max {
                    let s = seq_len as f64;
                    self.theta
                        * ((factor * s / max as f64) - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0))
                } else {
                    self.theta
                };
                RopeTable { inv_freq: default_inv_freq(base, dim), attention_scaling: 1.0 }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f32;
                let (factor, low, high) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                let inv_freq = default_inv_freq(self.theta, dim)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let smooth = (old / wavelen - low) / (high - low);
                        let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                        // Wavelengths are finite here, so this is transformers' `~(w < high) * ~(w > low)`.
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium { smoothed } else { scaled }
                    })
                    .collect();
                RopeTable { inv_freq, attention_scaling: 1.0 }
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
            } => {
                let get_mscale = |scale: f64| if scale <= 1.0 { 1.0 } else { 0.1 * scale.ln() + 1.0 };
                let attention = attention_factor.unwrap_or_else(|| get_mscale(*factor));
                let base = self.theta;
                let d = dim as f64;
                let orig = *original_max_position_embeddings as f64;
                let correction_dim =
                    |rot: f64| (d * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
                let low = correction_dim(*beta_fast).floor().max(0.0);
                let high = correction_dim(*beta_slow).ceil().min(d - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let inv_freq = (0..dim / 2)
                    .map(|i| {
                        let pos_freq = (base as f32).powf((2 * i) as f32 / dim as f32);
                        let extrapolation = 1.0 / pos_freq;
                        let interpolation = 1.0 / (*factor as f32 * pos_freq);
                        let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
                    })
                    .collect();
                RopeTable { inv_freq, attention_scaling: attention as f32 }
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let orig = *original_max_position_embeddings;
                let factor = self.max_position_embeddings as f64 / orig as f64;
                let attention = attention_factor.unwrap_or_else(|| {
                    if factor <= 1.0 { 1.0 } else { (1.0 + factor.ln() / (orig as f64).ln()).sqrt() }
                });
                // The whole batch uses the long factors once any position passes the trained context.
                let ext = if seq_len > orig { long_factor } else { short_factor };
                let inv_freq = (0..dim / 2)
                    .map(|i| {
                        let shape = (2 * i) as f32 / dim as f32;
                        1.0 / (ext[i] as f32 * (self.theta as f32).powf(shape))
                    })
                    .collect();
                RopeTable { inv_freq, attention_scaling: attention as f32 }
            }
        }
    }

    /// cos and sin for every position of a `[batch, seq]` grid of position ids, shaped `[batch, 1, seq,
    /// rotary_dim]` and cast to `dtype` (transformers computes in f32 and casts to the activations'
    /// dtype).
    pub fn cos_sin(
        &self,
        positions: &[usize],
        batch: usize,
        seq: usize,
        device: &Device,
        dtype: DType,
    ) -> (Tensor<4>, Tensor<4>) {
        let max = positions.iter().copied().max().unwrap_or(0);
        let table = self.table(max);
        let half = self.rotary_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * self.rotary_dim);
        let mut sin = Vec::with_capacity(positions.len() * self.rotary_dim);
        let mut row_c = vec![0f32; half];
        let mut row_s = vec![0f32; half];
        for &p in positions {
            for (i, f) in table.inv_freq.iter().enumerate() {
                let angle = p as f32 * f;
                row_c[i] = angle.cos() * table.attention_scaling;
                row_s[i] = angle.sin() * table.attention_scaling;
            }
            // emb = cat(freqs, freqs)
            cos.extend_from_slice(&row_c);
            cos.extend_from_slice(&row_c);
            sin.extend_from_slice(&row_s);
            sin.extend_from_slice(&row_s);
        }
        let shape = [batch, 1, seq, self.rotary_dim];
        let c = Tensor::<4>::from_data(TensorData::new(cos, shape), (device, DType::F32));
        let s = Tensor::<4>::from_data(TensorData::new(sin, shape), (device, DType::F32));
        if dtype == DType::F32 { (c, s) } else { (c.cast(dtype), s.cast(dtype)) }
    }
}

/// `x * cos + rotate_half(x) * sin` on the first `rotary_dim` dimensions of each head; the rest pass
/// through (partial rotary, Phi-3/4). `x` is `[batch, heads, seq, head_dim]`. One operation on the CPU
/// in f32 ([`crate::rope_cpu`]), else [`decomposed`].
pub fn apply(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    match crate::rope_cpu::apply(&x, cos, sin) {
        Some(y) => y,
        None => decomposed(x, cos, sin),
    }
}

/// [`apply`] as burn's tensor operations: what other backends and dtypes run.
pub fn decomposed(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, h, s, hd] = x.dims();
    let rd = cos.dims()[3];
    let (rot, pass) =
        if rd == hd { (x, None) } else { (x.clone().narrow(3, 0, rd), Some(x.narrow(3, rd, hd - rd))) };
    let half = rd / 2;
    let x1 = rot.clone().narrow(3, 0, half);
    let x2 = rot.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let out = rot * cos.clone() + rotated * sin.clone();
    let _ = (b, h, s);
    match pass {
        Some(p) => Tensor::cat(vec![out, p], 3),
        None => out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_keeps_high_frequencies_and_scales_low_ones() {
        let r = Rope {
            theta: 500_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
            rotary_dim: 64,
            max_position_embeddings: 131_072,
        };
        let base = default_inv_freq(500_000.0, 64);
        let t = r.table(10);
        assert_eq!(t.inv_freq[0], base[0], "the fastest rotation is kept");
        assert!((t.inv_freq[31] - base[31] / 32.0).abs() < 1e-12, "the slowest is divided by the factor");
    }

    #[test]
    fn longrope_switches_to_long_factors_past_the_original_context() {
        let r = Rope {
            theta: 10_000.0,
            scaling: RopeScaling::LongRope {
                short_factor: vec![1.0, 2.0],
                long_factor: vec![3.0, 4.0],
                original_max_position_embeddings: 64,
                attention_factor: None,
            },
            rotary_dim: 4,
            max_position_embeddings: 256,
        };
        let short = r.table(63);
        let long = r.table(64);
        assert_eq!(short.inv_freq[1] * 2.0, default_inv_freq(10_000.0, 4)[1]);
        assert_eq!(long.inv_freq[1] * 4.0, default_inv_freq(10_000.0, 4)[1]);
        let expected = (1.0 + (4f64).ln() / (64f64).ln()).sqrt() as f32;
        assert_eq!(short.attention_scaling, expected);
    }
}
