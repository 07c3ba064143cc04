//! Attention on the CPU (f32): [`crate::cpu_attention`]'s blockwise kernel, recorded under autodiff as
//! one operation whose backward is that kernel's.
//!
//! Recorded by autodiff, the decomposed attention (matmul, scale, soft-cap, mask, the five operations
//! of a softmax, matmul) keeps several `[b, heads, s, t]` tensors per layer and runs each operation's
//! backward as further full passes; on the benchmark model that was a third of a training step. Here
//! nothing of size `s x t` is kept: the backward recomputes the probabilities a block of query rows
//! at a time and skips the keys the mask hides, as the forward does.
//!
//! The mask is an additive constant (no gradient). Tests compare every gradient with the decomposed
//! form differentiated by autodiff.

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::FlexTensor;

use crate::cpu_attention::{self, Scores, Shape};
use crate::host::Host;
use crate::recorded::Ad;

#[derive(Debug)]
struct AttentionBackward {
    scores: Scores,
}

impl Backward<Flex, 3> for AttentionBackward {
    /// Query, key, value, additive mask.
    type State = (FlexTensor, FlexTensor, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let d_out = grads.consume::<Flex>(&ops.node);
        let (q, k, v, mask) = ops.state;
        let shape = shape_of(&q, &k);
        let (qd, kd, vd) = (dims(&q), dims(&k), dims(&v));
        let (q, k, v, mask, d_out) =
            (Host::of::<4>(q), Host::of::<4>(k), Host::of::<4>(v), Host::of::<4>(mask), Host::of::<4>(d_out));
        let [dq, dk, dv] = cpu_attention::backward(
            q.values(),
            k.values(),
            v.values(),
            mask.values(),
            d_out.values(),
            shape,
            self.scores,
        );
        for (node, grad, dims) in [(node_q, dq, qd), (node_k, dk, kd), (node_v, dv, vd)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(grad, dims)));
            }
        }
    }
}

fn dims(t: &FlexTensor) -> [usize; 4] {
    t.layout().shape().dims::<4>()
}

fn shape_of(q: &FlexTensor, k: &FlexTensor) -> Shape {
    let [batch, heads, queries, head_dim] = dims(q);
    let [_, kv_heads, keys, _] = dims(k);
    Shape { batch, heads, kv_heads, queries, keys, head_dim }
}

/// The kernel's output as a tensor.
fn run(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, mask: &FlexTensor, scores: Scores) -> FlexTensor {
    let shape = shape_of(q, k);
    let (q, k, v, mask) = (
        Host::of::<4>(q.clone()),
        Host::of::<4>(k.clone()),
        Host::of::<4>(v.clone()),
        Host::of::<4>(mask.clone()),
    );
    let out = cpu_attention::forward(q.values(), k.values(), v.values(), mask.values(), shape, scores);
    FlexTensor::from_data(TensorData::new(out, [shape.batch, shape.heads, shape.queries, shape.head_dim]))
}

/// `softmax(scale q k^T (soft-capped) + mask) v` for `q` `[b, h, s, d]`, `k`/`v` `[b, kv_heads, t, d]`
/// and `mask` `[b, 1, s, t]` (asked for only once the other tensors qualify) by [`cpu_attention`]: as
/// it is without autodiff, recorded as one operation with its backward under autodiff. `None` unless
/// the tensors are f32 on the CPU; the caller then takes the blockwise form ([`crate::attention_mem`]).
pub fn fused(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: impl FnOnce() -> Tensor<4>,
    scale: f64,
    softcap: Option<f64>,
) -> Option<Tensor<4>> {
    let f32s = [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    if !f32s || !crate::device::is_cpu(&q.device()) {
        return None;
    }
    let mask = mask();
    if mask.dtype() != DType::F32 {
        return None;
    }
    let scores = Scores { scale: scale as f32, softcap: softcap.map(|c| c as f32) };
    let mp = crate::recorded::untracked(&mask)?;
    if !q.is_autodiff() {
        let (qp, kp, vp) = (
            q.clone().try_into_primitive::<Flex>().ok()?,
            k.clone().try_into_primitive::<Flex>().ok()?,
            v.clone().try_into_primitive::<Flex>().ok()?,
        );
        return Some(Tensor::from_primitive::<Flex>(run(&qp, &kp, &vp, &mp, scores)));
    }
    let (qp, qg) = q.clone().try_into_primitive::<Ad>().ok()?.into_parts();
    let (kp, kg) = k.clone().try_into_primitive::<Ad>().ok()?.into_parts();
    let (vp, vg) = v.clone().try_into_primitive::<Ad>().ok()?.into_parts();
    let out = run(&qp, &kp, &vp, &mp, scores);
    let op = AttentionBackward { scores };
    let recorded = match op.prepare::<NoCheckpointing>([qg, kg, vg]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((qp, kp, vp, mp), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Some(Tensor::from_primitive::<Ad>(recorded))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;
    use burn::tensor::Device;
    use burn::tensor::Distribution;
    use burn::tensor::activation::softmax;

    /// The decomposed form autodiff differentiates (what `Attention::forward` computes otherwise).
    fn decomposed(
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        mask: Tensor<4>,
        scale: f64,
        cap: Option<f64>,
    ) -> Tensor<4> {
        let [b, h, s, d] = q.dims();
        let [_, kvh, t, _] = k.dims();
        let q5 = q.reshape([b, kvh, h / kvh, s, d]);
        let mut u = q5.matmul(k.reshape([b, kvh, 1, t, d]).swap_dims(3, 4)).mul_scalar(scale);
        if let Some(c) = cap {
            u = u.div_scalar(c).tanh().mul_scalar(c);
        }
        let p = softmax(u + mask.reshape([b, 1, 1, s, t]), 4);
        p.matmul(v.reshape([b, kvh, 1, t, d])).reshape([b, h, s, d])
    }

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn gradients_match_autodiff_of_the_decomposed_form() {
        let device = Device::flex().autodiff();
        let (b, h, kvh, s, t, d) = (2, 6, 2, 5, 7, 8);
        // Causal over the last `s` of `t` keys, one padding key in row 1, and a fully masked query row
        // (a padding query), which must average as transformers' f32::MIN mask does.
        let mut m = vec![0f32; b * s * t];
        for r in 0..b {
            for qi in 0..s {
                for ki in 0..t {
                    let masked = ki > qi + (t - s) || (r == 1 && ki == 0) || (r == 1 && qi == 0);
                    if masked {
                        m[(r * s + qi) * t + ki] = f32::MIN;
                    }
                }
            }
        }
        let mask = Tensor::<4>::from_data(TensorData::new(m, [b, 1, s, t]), &device);
        for cap in [None, Some(3.0)] {
            let q0 = Tensor::<4>::random([b, h, s, d], Distribution::Normal(0.0, 1.0), &device);
            let k0 = Tensor::<4>::random([b, kvh, t, d], Distribution::Normal(0.0, 1.0), &device);
            let v0 = Tensor::<4>::random([b, kvh, t, d], Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<4>::random([b, h, s, d], Distribution::Normal(0.0, 1.0), &device);
            let run = |ours: bool| {
                let (q, k, v) =
                    (q0.clone().require_grad(), k0.clone().require_grad(), v0.clone().require_grad());
                let out = if ours {
                    fused(&q, &k, &v, || mask.clone(), 0.35, cap).expect("f32 autodiff CPU tensors qualify")
                } else {
                    decomposed(q.clone(), k.clone(), v.clone(), mask.clone(), 0.35, cap)
                };
                let g = (out.clone() * w.clone()).sum().backward();
                let grad = |x: &Tensor<4>| values(x.grad(&g).unwrap());
                (values(out.inner()), grad(&q), grad(&k), grad(&v))
            };
            let (ours, theirs) = (run(true), run(false));
            for (what, a, e) in [
                ("out", &ours.0, &theirs.0),
                ("dq", &ours.1, &theirs.1),
                ("dk", &ours.2, &theirs.2),
                ("dv", &ours.3, &theirs.3),
            ] {
                for (i, (x, y)) in a.iter().zip(e.iter()).enumerate() {
                    assert!((x - y).abs() <= 1e-5 + 1e-5 * y.abs(), "cap {cap:?} {what}[{i}]: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn declines_other_dtypes() {
        let device = Device::flex();
        let x = Tensor::<4>::zeros([1, 2, 3, 4], &device).cast(DType::F16);
        let kv = x.clone().narrow(1, 0, 1);
        let mask = Tensor::<4>::zeros([1, 1, 3, 3], &device);
        assert!(fused(&x, &kv, &kv, || mask.clone(), 1.0, None).is_none());
    }
}
