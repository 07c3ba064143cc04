//! A low-rank adapter on a frozen linear layer, computed as PEFT computes it (`peft/tuners/lora/layer.py`
//! and `dora.py`): the unmerged form `y = x W^T + s (dropout(x) A^T) B^T`, never materialising
//! `W + s B A` (except DoRA's detached weight norm, which needs it). Adapter weights are f32 whatever the
//! base dtype. By default the adapter path runs in f32 and the result is cast back to the base output's
//! dtype, as PEFT does without autocast. With [`Lora::autocast`] the adapter's products run in the base's
//! 16-bit dtype instead, as under `torch.autocast` (HF Trainer's `bf16=True`): the adapter weights are
//! cast down on use, their gradients come back in f32, and the backward keeps the base's own 16-bit input
//! rather than an f32 copy of it per adapter.
//!
//! DoRA: `y = base(x) + (m / n - 1) (x W^T) + (m / n) s (x A^T) B^T` with `n = ||W + s B A||` per output
//! row, detached, and `m` the learned magnitude.

use burn::module::{Module, Param};
use burn::tensor::{DType, Distribution, Tensor};

/// LoRA weights of one linear layer.
#[derive(Module, Debug)]
pub struct Lora {
    /// `lora_A.weight`, `[r, in]`, f32.
    pub a: Param<Tensor<2>>,
    /// `lora_B.weight`, `[out, r]`, f32.
    pub b: Param<Tensor<2>>,
    /// DoRA's magnitude per output feature (`lora_magnitude_vector`), `[out]`, f32.
    pub magnitude: Option<Param<Tensor<1>>>,
    /// `alpha / r` (or `alpha / sqrt(r)` for rsLoRA).
    pub scale: f64,
    /// Dropout on the adapter input during training.
    pub dropout: f64,
    /// Run plain LoRA's products in the base's dtype (bf16/f16), as `torch.autocast` does; off: in f32.
    /// No effect with an f32 base or on DoRA, which stays in f32.
    pub autocast: bool,
}

impl Lora {
    /// Rank.
    pub fn rank(&self) -> usize {
        self.a.val().dims()[0]
    }

    /// The dropout mask for the adapter input `x` (`[n, in]`) when training with dropout: 0 for a
    /// dropped value, `1 / (1 - dropout)` for a kept one, f32.
    pub fn dropout_mask(&self, x: &Tensor<2>, train: bool) -> Option<Tensor<2>> {
        if !train || self.dropout <= 0.0 {
            return None;
        }
        let keep = 1.0 - self.dropout;
        Some(Tensor::<2>::random(x.shape(), Distribution::Bernoulli(keep), &x.device()).div_scalar(keep))
    }

    fn dropped(x: Tensor<2>, mask: Option<Tensor<2>>) -> Tensor<2> {
        match mask {
            Some(m) => {
                let m = if m.dtype() == x.dtype() { m } else { m.cast(x.dtype()) };
                x * m
            }
            None => x,
        }
    }

    /// `x W^T + s ((x * mask) A^T) B^T` as one operation ([`crate::dense::project_lora`]) for plain
    /// LoRA on the CPU in f32; in training with dropout the operation draws its own mask
    /// ([`crate::dense::Dropout`]) from a seed taken from the device's generator. `None` otherwise:
    /// [`Lora::apply`] then adds the adapter.
    pub fn fused(&self, x: &Tensor<2>, w: &crate::linear::Weight, train: bool) -> Option<Tensor<2>> {
        if self.magnitude.is_some() || x.dtype() != DType::F32 || !crate::device::is_cpu(&x.device()) {
            return None;
        }
        let dropout = (train && self.dropout > 0.0)
            .then(|| crate::dense::Dropout { seed: draw_seed(&x.device()), keep: 1.0 - self.dropout });
        let frozen = match w {
            crate::linear::Weight::Dense(w) => &crate::dense::Frozen::Dense(&w.val()),
            crate::linear::Weight::Nf4(q) => &crate::dense::Frozen::Nf4(q),
        };
        crate::dense::project_lora(x, *frozen, &self.a.val(), &self.b.val(), self.scale, dropout)
    }

    /// The adapter's contribution added to `base` (`x W^T + b`, `[n, out]`), for flattened inputs
    /// `x` (`[n, in]`), given the frozen weight `w` (`[out, in]`, computed on demand: DoRA only) and the
    /// [`Lora::dropout_mask`] drawn for `x` when training with dropout.
    pub fn apply(
        &self,
        x: Tensor<2>,
        base: Tensor<2>,
        w: &dyn Fn() -> Tensor<2>,
        bias: Option<&Tensor<1>>,
        mask: Option<Tensor<2>>,
    ) -> Tensor<2> {
        let out_dtype = base.dtype();
        if self.autocast && self.magnitude.is_none() && out_dtype != DType::F32 {
            return self.apply_autocast(x, base, mask);
        }
        let dropout = mask.is_some();
        let x32 = if x.dtype() == DType::F32 { x } else { x.cast(DType::F32) };
        let base32 = if out_dtype == DType::F32 { base } else { base.cast(DType::F32) };
        let a = self.a.val();
        let b = self.b.val();
        let xd = Self::dropped(x32.clone(), mask);
        // The scale multiplies the rank-wide intermediate, not the output: `out / r` times less work
        // (and autodiff keeps a smaller tensor for the backward).
        let lora =
            xd.clone().matmul(a.clone().transpose()).mul_scalar(self.scale).matmul(b.clone().transpose());
        let y = match &self.magnitude {
            None => base32 + lora,
            Some(m) => {
                let w = w();
                let w32 = if w.dtype() == DType::F32 { w } else { w.cast(DType::F32) };
                let delta = b.detach().matmul(a.detach()).mul_scalar(self.scale);
                let norm = (w32.clone() + delta).square().sum_dim(1).sqrt().detach().reshape([1, -1]);
                let mag_scale = m.val().reshape([1, -1]) / norm;
                // The base term without its bias; from the dropped-out input when dropout is active (as
                // PEFT recomputes it then).
                let base_term = if dropout {
                    xd.matmul(w32.transpose())
                } else {
                    match bias {
                        Some(bias) => {
                            let b32 = if bias.dtype() == DType::F32 {
                                bias.clone()
                            } else {
                                bias.clone().cast(DType::F32)
                            };
                            base32.clone() - b32.reshape([1, -1])
                        }
                        None => base32.clone(),
                    }
                };
                base32 + (mag_scale.clone().sub_scalar(1.0)) * base_term + mag_scale * lora
            }
        };
        if out_dtype == DType::F32 { y } else { y.cast(out_dtype) }
    }

    /// Plain LoRA with both products in the base output's 16-bit dtype (`torch.autocast`): the rank-wide
    /// intermediate and the sum are rounded to that dtype, the f32 weights are cast on use.
    fn apply_autocast(&self, x: Tensor<2>, base: Tensor<2>, mask: Option<Tensor<2>>) -> Tensor<2> {
        let dtype = base.dtype();
        let x = if x.dtype() == dtype { x } else { x.cast(dtype) };
        let a = self.a.val().cast(dtype);
        let b = self.b.val().cast(dtype);
        let xd = Self::dropped(x, mask);
        base + xd.matmul(a.transpose()).mul_scalar(self.scale).matmul(b.transpose())
    }
}

/// 48 random bits from the device's seeded generator (two f32 uniforms' 24-bit mantissas), so a
/// dropout mask drawn from them repeats wherever the generator does.
fn draw_seed(device: &burn::tensor::Device) -> u64 {
    let u = Tensor::<1>::random([2], Distribution::Uniform(0.0, 1.0), device);
    let values = u.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
    values.iter().fold(0u64, |acc, v| (acc << 24) | (f64::from(*v) * f64::from(1u32 << 24)) as u64)
}
