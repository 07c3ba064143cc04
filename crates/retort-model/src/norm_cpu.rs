//! [`crate::norm::RmsNorm`] on the CPU (f32) as one operation, forward and backward.
//!
//! burn computes it as a square, a mean, an addition, a square root, a reciprocal and two products:
//! seven passes that each allocate their result, and under autodiff the normalised values (a tensor
//! the size of the input) are kept for the backward besides the input. Here one pass per row computes
//! `y = x r g` with `r = 1 / sqrt(mean(x^2) + eps)` and `g` the weight (Gemma: `1 + weight`); the
//! backward keeps only `x` and recomputes `r`: `dx = r (dy g - n mean(dy g n))` with `n = x r`. The
//! weight is frozen (retort never trains norms): no gradient is computed for it, and a weight that
//! requires one is left to burn's operations.
//!
//! The mean is summed in 8 lanes, then across them, where burn sums in its own order: results agree
//! to f32 rounding (tests: 2e-6 relative, plus 2e-8 of the largest value for the gradient's
//! cancellation).

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::host::Host;
use crate::recorded::unary;

/// Elements per parallel task (whole rows).
const CHUNK: usize = 1 << 14;

/// `sum(a * b)` in 8 lanes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `1 / sqrt(mean(x^2) + eps)` of one row, as transformers computes it in f32.
#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt()
}

/// Rows of `dim` values of `x` normalised and scaled by `g`.
fn forward(x: &[f32], g: &[f32], eps: f32) -> Vec<f32> {
    let dim = g.len();
    let mut y = vec![0f32; x.len()];
    let rows = (CHUNK / dim).max(1) * dim;
    y.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(y, x)| {
        for (y, x) in y.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
            let r = inv_rms(x, eps);
            for ((y, x), g) in y.iter_mut().zip(x).zip(g) {
                *y = x * r * g;
            }
        }
    });
    y
}

/// The gradient of [`forward`]'s input given its output's, `dy`.
fn backward(x: &[f32], g: &[f32], dy: &[f32], eps: f32) -> Vec<f32> {
    let dim = g.len();
    let mut dx = vec![0f32; x.len()];
    let rows = (CHUNK / dim).max(1) * dim;
    dx.par_chunks_mut(rows).zip(x.par_chunks(rows)).zip(dy.par_chunks(rows)).for_each_init(
        Vec::new,
        |dn: &mut Vec<f32>, ((dx, x), dy)| {
            dn.resize(dim, 0.0);
            for ((dx, x), dy) in dx.chunks_exact_mut(dim).zip(x.chunks_exact(dim)).zip(dy.chunks_exact(dim)) {
                let r = inv_rms(x, eps);
                for ((d, dy), g) in dn.iter_mut().zip(dy).zip(g) {
                    *d = dy * g;
                }
                // mean(dn * n) with n = x r.
                let c = dot(dn, x) * r / dim as f32;
                for ((dx, d), x) in dx.iter_mut().zip(dn.iter()).zip(x) {
                    *dx = r * (d - x * r * c);
                }
            }
        },
    );
    dx
}

#[derive(Debug)]
struct NormBackward {
    eps: f32,
}

impl Backward<Flex, 1> for NormBackward {
    /// The input and the scale `g`.
    type State = (FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let Some(node) = node else { return };
        let (x, g) = ops.state;
        let shape = x.layout().shape().clone();
        let (x, dy) = (Host::of_any(x), Host::of_any(dy));
        let dx = backward(x.values(), &g, dy.values(), self.eps);
        grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, shape)));
    }
}

/// `x r g` over the last dimension of `x`, where `r = 1 / sqrt(mean(x^2) + eps)` and `g` is `weight`
/// (`1 + weight` when `plus_one`): recorded as one operation under autodiff. `None` unless `x` and
/// `weight` are f32 on the CPU, the weight needs no gradient and the shapes fit; the caller then uses
/// burn's operations.
pub fn rms_norm<const D: usize>(
    x: &Tensor<D>,
    weight: &Tensor<1>,
    eps: f64,
    plus_one: bool,
) -> Option<Tensor<D>> {
    if x.dtype() != DType::F32 || weight.dtype() != DType::F32 || !crate::device::is_cpu(&x.device()) {
        return None;
    }
    let dim = weight.dims()[0];
    if x.dims()[D - 1] != dim || dim == 0 || weight.is_require_grad() {
        return None;
    }
    let w = weight.clone().inner().into_data().convert::<f32>().try_into_vec::<f32>().ok()?;
    let g: Vec<f32> = if plus_one { w.iter().map(|v| 1.0 + v).collect() } else { w };
    let eps = eps as f32;
    unary(x, NormBackward { eps }, |xp| {
        let shape = xp.layout().shape().clone();
        let y = forward(Host::of_any(xp.clone()).values(), &g, eps);
        Some((FlexTensor::from_data(TensorData::new(y, shape)), (xp.clone(), g.clone())))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use burn::module::Param;
    use burn::tensor::{Device, Distribution};

    use super::*;
    use crate::norm::RmsNorm;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// Against burn's operations (the decomposed form `RmsNorm` runs elsewhere), forward and input
    /// gradient: Llama and Gemma scaling, rows of a width with and without a lane tail, more rows than
    /// one parallel task, a 4-D input (Qwen3's per-head q/k norms), a non-contiguous view.
    #[test]
    fn matches_the_decomposed_form_and_its_gradient() {
        let device = Device::flex().autodiff();
        for (dim, plus_one) in [(64, false), (37, true), (3, false)] {
            let weight = Tensor::<1>::random([dim], Distribution::Normal(0.0, 0.5), &device);
            let norm = RmsNorm {
                weight: Param::from_tensor(weight.clone()).set_require_grad(false),
                eps: 1e-6,
                plus_one,
            };
            let rows = CHUNK / dim + 5;
            let x0 = Tensor::<3>::random([2, rows, dim], Distribution::Normal(0.0, 3.0), &device);
            let w = Tensor::<3>::random([2, rows, dim], Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let x = x0.clone().require_grad();
                let y = if fused {
                    rms_norm(&x, &norm.weight.val(), norm.eps, plus_one).unwrap()
                } else {
                    crate::norm::decomposed(&norm, x.clone())
                };
                let grads = (y.clone() * w.clone()).sum().backward();
                (values(y.inner()), values(x.grad(&grads).unwrap()))
            };
            let (ours, theirs) = (run(true), run(false));
            for (what, a, e) in [("y", &ours.0, &theirs.0), ("dx", &ours.1, &theirs.1)] {
                let scale = e.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (i, (x, y)) in a.iter().zip(e.iter()).enumerate() {
                    // The gradient is a difference of terms of the size of the largest values: f32
                    // rounding of those terms, not of the result, bounds it.
                    assert!(
                        (x - y).abs() <= 2e-6 * y.abs() + 2e-7 * scale,
                        "dim {dim} {what}[{i}]: {x} vs {y}, largest {scale}"
                    );
                }
            }
            // Without autodiff, and on a 4-D transposed view: the same values as burn's.
            let x4 = x0.clone().inner().reshape([2, rows, 1, dim]).swap_dims(1, 2);
            let plain = rms_norm(&x4, &norm.weight.val().inner(), norm.eps, plus_one).unwrap();
            let reference = crate::norm::decomposed(
                &RmsNorm { weight: Param::from_tensor(norm.weight.val().inner()), eps: 1e-6, plus_one },
                x4,
            );
            for (a, e) in values(plain).iter().zip(values(reference)) {
                assert!((a - e).abs() <= 2e-6 * (e.abs() + 1e-3));
            }
        }
    }

    #[test]
    fn declines_other_dtypes_shapes_and_a_trained_weight() {
        let device = Device::flex();
        let x = Tensor::<2>::ones([2, 4], &device);
        let w = Tensor::<1>::ones([4], &device);
        assert!(rms_norm(&x, &w, 1e-6, false).is_some());
        assert!(rms_norm(&x.clone().cast(DType::F16), &w, 1e-6, false).is_none());
        assert!(rms_norm(&x, &Tensor::<1>::ones([3], &device), 1e-6, false).is_none());
        let ad = Device::flex().autodiff();
        let trained = Tensor::<1>::ones([4], &ad).require_grad();
        assert!(rms_norm(&Tensor::<2>::ones([2, 4], &ad), &trained, 1e-6, false).is_none());
    }
}
