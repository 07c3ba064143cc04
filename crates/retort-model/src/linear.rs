//! The one linear layer every family builds its projections with, so that LoRA (and QLoRA) attach to
//! any projection without family code changing. The weight keeps PyTorch's `[out, in]` layout (the
//! matmul reads it transposed without a copy), so adapters and exports see the checkpoint's own
//! orientation. Base weights are frozen: retort never trains them.

use burn::module::{Module, Param};
use burn::tensor::Tensor;

use crate::lora::Lora;

/// `y = x W^T + b`, plus an optional low-rank adapter.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Param<Tensor<2>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// A trainable adapter, when this projection is a LoRA target.
    pub lora: Option<Lora>,
}

impl Linear {
    /// A frozen linear layer from its weight and optional bias.
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Linear {
        Linear {
            weight: Param::from_tensor(weight).set_require_grad(false),
            bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)),
            lora: None,
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.val().dims()[0]
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.val().dims()[1]
    }

    /// Applies the layer to `[batch, seq, in]`; `train` turns adapter dropout on.
    pub fn forward(&self, x: Tensor<3>, train: bool) -> Tensor<3> {
        let [b, s, i] = x.dims();
        let w = self.weight.val();
        let out = w.dims()[0];
        let x2 = x.reshape([b * s, i]);
        let y = x2.clone().matmul(w.clone().transpose());
        let bias = self.bias.as_ref().map(|b| b.val());
        let y = match &bias {
            Some(bias) => y + bias.clone().reshape([1, out]),
            None => y,
        };
        let y = match &self.lora {
            Some(l) => l.apply(x2, y, &w, bias.as_ref(), train),
            None => y,
        };
        y.reshape([b, s, out])
    }
}
