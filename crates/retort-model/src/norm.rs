//! RMSNorm as transformers computes it: statistics in f32; Llama-style `w * x` in the input dtype, Gemma
//! `x * (1 + w)` in f32 (see `LlamaRMSNorm` and `Gemma2RMSNorm`).

use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor};

/// Root-mean-square normalisation over the last dimension.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Scale, `[dim]`.
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square.
    pub eps: f64,
    /// Gemma: multiply by `1 + weight`.
    pub plus_one: bool,
}

impl RmsNorm {
    /// Normalises `x` over its last dimension: one operation on the CPU in f32
    /// ([`crate::norm_cpu`]), else [`decomposed`].
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match crate::norm_cpu::rms_norm(&x, &self.weight.val(), self.eps, self.plus_one) {
            Some(y) => y,
            None => decomposed(self, x),
        }
    }
}

/// [`RmsNorm::forward`] as burn's tensor operations: what other backends and dtypes run.
pub fn decomposed<const D: usize>(norm: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    let (eps, plus_one) = (norm.eps, norm.plus_one);
    let dtype = x.dtype();
    let xf = if dtype == DType::F32 { x } else { x.cast(DType::F32) };
    let var = xf.clone().square().mean_dim(D - 1);
    let normed = xf * var.add_scalar(eps).sqrt().recip();
    let w = norm.weight.val();
    let dims = w.dims()[0];
    let mut shape = [1usize; D];
    shape[D - 1] = dims;
    if plus_one {
        let scale = w.cast(DType::F32).add_scalar(1.0).reshape(shape);
        let out = normed * scale;
        if dtype == DType::F32 { out } else { out.cast(dtype) }
    } else {
        let normed = if dtype == DType::F32 { normed } else { normed.cast(dtype) };
        normed * w.reshape(shape)
    }
}
