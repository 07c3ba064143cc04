//! The gated MLP: `down(act(gate(x)) * up(x))`, SwiGLU or GeGLU, with Phi-3's fused `gate_up_proj`
//! (gate rows first).

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::activation::{gelu, gelu_approximate, silu};
use retort_hf::Activation;

use crate::linear::Linear;

/// `gate_proj` and `up_proj`.
#[derive(Module, Debug)]
pub struct SeparateGateUp {
    /// Gate projection.
    pub gate: Linear,
    /// Up projection.
    pub up: Linear,
}

/// Gate and up projections, separate or fused.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant, reason = "built once per layer; boxing would only add an indirection")]
pub enum GateUp {
    /// `gate_proj` and `up_proj`.
    Separate(SeparateGateUp),
    /// Phi-3's `gate_up_proj`: gate rows, then up rows.
    Fused(Linear),
}

/// A gated MLP block.
#[derive(Module, Debug)]
pub struct Mlp {
    /// Gate and up.
    pub gate_up: GateUp,
    /// Down projection.
    pub down: Linear,
    /// Activation applied to the gate.
    #[module(skip)]
    pub activation: Activation,
}

/// `act(gate) * up`: one recorded operation for SiLU on the CPU in f32 ([`crate::swiglu`]).
fn gated(gate: Tensor<3>, up: Tensor<3>, a: Activation) -> Tensor<3> {
    if a == Activation::Silu
        && let Some(h) = crate::swiglu::swiglu(&gate, &up)
    {
        return h;
    }
    activate(gate, a) * up
}

fn activate(x: Tensor<3>, a: Activation) -> Tensor<3> {
    match a {
        Activation::Silu => silu(x),
        Activation::GeluTanh => gelu_approximate(x),
        Activation::Gelu => gelu(x),
    }
}

impl Mlp {
    /// Applies the block to `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<3>, train: bool) -> Tensor<3> {
        let h = match &self.gate_up {
            GateUp::Separate(p) => {
                gated(p.gate.forward(x.clone(), train), p.up.forward(x, train), self.activation)
            }
            GateUp::Fused(gate_up) => {
                let gu = gate_up.forward(x, train);
                let ff = gu.dims()[2] / 2;
                let gate = gu.clone().narrow(2, 0, ff);
                let up = gu.narrow(2, ff, ff);
                gated(gate, up, self.activation)
            }
        };
        self.down.forward(h, train)
    }
}
