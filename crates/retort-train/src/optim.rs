//! AdamW on adapter weights, computed as `torch.optim.AdamW` computes it (decoupled weight decay applied
//! first, then `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`), with gradients clipped
//! by their global L2 norm as `torch.nn.utils.clip_grad_norm_` does. State is kept per parameter name
//! (the PEFT key without its prefix), flattened, in f32, so it saves and restores exactly.

use std::collections::BTreeMap;

use retort_model::burn::tensor::{DType, Tensor};

/// AdamW hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// Moments of one parameter.
#[derive(Debug, Clone)]
pub struct Moments {
    /// First moment, flattened.
    pub m: Tensor<1>,
    /// Second moment, flattened.
    pub v: Tensor<1>,
}

/// The optimizer and its state.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Hyperparameters.
    pub config: AdamWConfig,
    /// Completed steps.
    pub step: u64,
    /// Moments by parameter name.
    pub state: BTreeMap<String, Moments>,
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(config: AdamWConfig) -> AdamW {
        AdamW { config, step: 0, state: BTreeMap::new() }
    }

    /// Updates one parameter (flattened, on the inner device) from its gradient. Call once per
    /// parameter per step, after [`AdamW::begin_step`].
    pub fn update(&mut self, name: &str, param: Tensor<1>, grad: Tensor<1>, lr: f64) -> Tensor<1> {
        let c = self.config;
        let t = self.step as i32;
        let grad = if grad.dtype() == DType::F32 { grad } else { grad.cast(DType::F32) };
        let param = param.mul_scalar(1.0 - lr * c.weight_decay);
        let entry = self
            .state
            .entry(name.to_string())
            .or_insert_with(|| Moments { m: grad.zeros_like(), v: grad.zeros_like() });
        let m = entry.m.clone().mul_scalar(c.beta1) + grad.clone().mul_scalar(1.0 - c.beta1);
        let v = entry.v.clone().mul_scalar(c.beta2) + grad.clone().square().mul_scalar(1.0 - c.beta2);
        entry.m = m.clone();
        entry.v = v.clone();
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let denom = v.sqrt().div_scalar(bc2.sqrt()).add_scalar(c.eps);
        param - m.div(denom).mul_scalar(lr / bc1)
    }

    /// Starts a step: bias corrections use the new step number.
    pub fn begin_step(&mut self) {
        self.step += 1;
    }
}

/// The global L2 norm of a set of gradients, as torch's `clip_grad_norm_` computes it: the norm of the
/// per-tensor norms, in f32, on the device, read back once (one read per tensor would wait on a GPU
/// hundreds of times a step).
pub fn global_norm(grads: &BTreeMap<String, Tensor<1>>) -> f64 {
    let norms: Vec<Tensor<1>> = grads.values().map(|g| g.clone().square().sum().sqrt()).collect();
    if norms.is_empty() {
        return 0.0;
    }
    let total: f32 = Tensor::cat(norms, 0).square().sum().sqrt().into_scalar();
    f64::from(total)
}

/// Scales gradients so their global norm is at most `max_norm` (torch's `clip_grad_norm_`: the factor
/// `max_norm / (norm + 1e-6)`, clamped to 1). Returns the norm before clipping.
pub fn clip(grads: &mut BTreeMap<String, Tensor<1>>, max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            for g in grads.values_mut() {
                *g = g.clone().mul_scalar(coef);
            }
        }
    }
    norm
}
