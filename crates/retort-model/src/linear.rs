//! The one linear layer every family builds its projections with. The weight keeps PyTorch's `[out, in]`
//! layout (the matmul reads it transposed without a copy), so adapters and exports see the checkpoint's
//! own orientation. Base weights are frozen: retort never trains them.

use burn::module::{Module, Param};
use burn::tensor::Tensor;

/// `y = x W^T + b`.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Param<Tensor<2>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    /// A frozen linear layer from its weight and optional bias.
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Linear {
        Linear {
            weight: Param::from_tensor(weight).set_require_grad(false),
            bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)),
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.val().dims()[0]
    }

    /// Applies the layer to `[batch, seq, in]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, s, i] = x.dims();
        let w = self.weight.val();
        let out = w.dims()[0];
        let y = x.reshape([b * s, i]).matmul(w.transpose());
        let y = match &self.bias {
            Some(bias) => y + bias.val().reshape([1, out]),
            None => y,
        };
        y.reshape([b, s, out])
    }
}
