//! The one linear layer every family builds its projections with, so that LoRA (and QLoRA) attach to
//! any projection without family code changing. The weight keeps PyTorch's `[out, in]` layout (the
//! matmul reads it transposed without a copy), so adapters and exports see the checkpoint's own
//! orientation. Base weights are frozen: retort never trains them. A QLoRA base keeps its projections
//! in NF4 ([`Weight::Nf4`]) and dequantizes them in each forward; nothing else changes.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

use crate::lora::Lora;
use crate::nf4::Nf4Weight;

/// A frozen weight `[out, in]`: dense, or NF4 dequantized on use.
#[derive(Module, Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per projection (a few hundred per model); tensor handles, not data, make up the size"
)]
pub enum Weight {
    /// In the model's dtype.
    Dense(Param<Tensor<2>>),
    /// Packed NF4 (QLoRA); no dense copy is kept.
    Nf4(Nf4Weight),
}

impl Weight {
    /// The weight as a dense tensor in the compute dtype (dequantized for NF4, each call).
    pub fn val(&self) -> Tensor<2> {
        match self {
            Weight::Dense(w) => w.val(),
            Weight::Nf4(q) => q.dequantize(),
        }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Weight::Dense(w) => w.val().dims(),
            Weight::Nf4(q) => q.shape,
        }
    }

    /// The device it lives on.
    pub fn device(&self) -> Device {
        match self {
            Weight::Dense(w) => w.val().device(),
            Weight::Nf4(q) => q.device(),
        }
    }

    /// The NF4 parts, when quantized.
    pub fn nf4(&self) -> Option<&Nf4Weight> {
        match self {
            Weight::Dense(_) => None,
            Weight::Nf4(q) => Some(q),
        }
    }
}

/// `x W^T` for `x` `[m, in]` and `w` `[out, in]`: on the CPU in f32 without autodiff the decode kernel
/// (a few rows) or `gemm` called directly (more rows), else a matmul reading `w` transposed in place.
pub(crate) fn project(x: &Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
    if let Some(y) = crate::gemv::project(x, w) {
        return y;
    }
    match crate::dense::project(x, w) {
        Some(y) => y,
        None => x.clone().matmul(w.clone().transpose()),
    }
}

/// `y = x W^T + b`, plus an optional low-rank adapter.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Weight,
    /// `[out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// A trainable adapter, when this projection is a LoRA target.
    pub lora: Option<Lora>,
}

impl Linear {
    /// A frozen linear layer from its weight and optional bias. On the CPU in f32 the weight's values
    /// are stored transposed ([`crate::dense::cpu_layout`]); the tensor is `[out, in]` all the same.
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Linear {
        let weight = crate::dense::cpu_layout(weight);
        Linear::with_weight(Weight::Dense(Param::from_tensor(weight).set_require_grad(false)), bias)
    }

    /// A frozen linear layer over an NF4 weight (QLoRA).
    pub fn nf4(weight: Nf4Weight, bias: Option<Tensor<1>>) -> Linear {
        Linear::with_weight(Weight::Nf4(weight), bias)
    }

    fn with_weight(weight: Weight, bias: Option<Tensor<1>>) -> Linear {
        Linear { weight, bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)), lora: None }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Applies the layer to `[batch, seq, in]`; `train` turns adapter dropout on.
    pub fn forward(&self, x: Tensor<3>, train: bool) -> Tensor<3> {
        let [b, s, i] = x.dims();
        let out = self.out_features();
        let x2 = x.reshape([b * s, i]);
        let bias = self.bias.as_ref().map(|b| b.val());
        let add_bias = |y: Tensor<2>| match &bias {
            Some(bias) => y + bias.clone().reshape([1, out]),
            None => y,
        };
        // On the CPU in f32, the projection and a plain adapter as one operation (an NF4 weight is
        // dequantized inside it, and again in its backward).
        if let Some(y) = self.lora.as_ref().and_then(|l| l.fused(&x2, &self.weight, train)) {
            return add_bias(y).reshape([b, s, out]);
        }
        // On a GPU under autodiff an NF4 weight is dequantized inside one recorded operation, and again
        // in its backward, so the graph keeps it packed.
        let base = |x2: &Tensor<2>| match self.weight.nf4().and_then(|q| q.project_recorded(x2)) {
            Some(y) => y,
            None => project(x2, &self.weight.val()),
        };
        let Some(lora) = &self.lora else {
            return add_bias(base(&x2)).reshape([b, s, out]);
        };
        let mask = lora.dropout_mask(&x2, train);
        let y = add_bias(base(&x2));
        let y = lora.apply(x2, y, &|| self.weight.val(), bias.as_ref(), mask);
        y.reshape([b, s, out])
    }
}
