//! Attention on the CPU through burn's fused kernel; for training, with a backward written here.
//!
//! Recorded by autodiff, the decomposed attention (matmul, scale, soft-cap, mask, the five operations
//! of a softmax, matmul) keeps several `[b, heads, s, t]` tensors per layer and runs each operation's
//! backward as further full passes; on the benchmark model that was a third of a training step. Here
//! the forward is burn's fused CPU kernel (nothing of size `s x t` kept), and the backward recomputes
//! the probabilities `P` once and applies the softmax gradient in closed form:
//!
//! `dV = P^T dO`, `dP = dO V^T`, `dS = P (dP - rowsum(dP P))`, soft-capping's `1 - tanh^2`, then
//! `dQ = scale dS K`, `dK = scale dS^T Q`, with grouped-query heads summed onto their key/value head.
//!
//! The mask is an additive constant (no gradient). Tests compare every gradient with the decomposed
//! form differentiated by autodiff.

use burn::backend::Flex;
use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Tensor};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::FlexTensor;

type Ad = Autodiff<Flex>;

#[derive(Debug)]
struct AttentionBackward {
    scale: f64,
    softcap: Option<f64>,
}

impl Backward<Flex, 3> for AttentionBackward {
    /// Query, key, value, additive mask.
    type State = (FlexTensor, FlexTensor, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let d_out = grads.consume::<Flex>(&ops.node);
        let (q, k, v, mask) = ops.state;
        let [dq, dk, dv] =
            gradients(plain(q), plain(k), plain(v), plain(mask), plain(d_out), self.scale, self.softcap);
        for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node
                && let Ok(g) = grad.try_into_primitive::<Flex>()
            {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

fn plain(t: FlexTensor) -> Tensor<4> {
    Tensor::from_primitive::<Flex>(t)
}

/// `softmax(scale q k^T (soft-capped) + mask) v` for `q` `[b, h, s, d]`, `k`/`v` `[b, kv_heads, t, d]`
/// and `mask` `[b, 1, s, t]` by burn's fused CPU kernel: as it is without autodiff, recorded as one
/// operation with the backward above under autodiff. `None` unless the tensors are f32 on the CPU; the
/// caller then computes the decomposed form (other backends keep it until their fused kernels are
/// measured on a GPU).
pub fn fused(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: &Tensor<4>,
    scale: f64,
    softcap: Option<f64>,
) -> Option<Tensor<4>> {
    if q.dtype() != DType::F32 || q.device() != Device::flex() {
        return None;
    }
    let opts = AttentionModuleOptions { scale: Some(scale), softcap, is_causal: false };
    if !q.is_autodiff() {
        return Some(attention(q.clone(), k.clone(), v.clone(), None, Some(mask.clone()), opts));
    }
    let (qp, qg) = q.clone().try_into_primitive::<Ad>().ok()?.into_parts();
    let (kp, kg) = k.clone().try_into_primitive::<Ad>().ok()?.into_parts();
    let (vp, vg) = v.clone().try_into_primitive::<Ad>().ok()?.into_parts();
    let mp = match mask.clone().try_into_primitive::<Ad>() {
        Ok(m) => m.into_primitive(),
        Err(_) => mask.clone().try_into_primitive::<Flex>().ok()?,
    };
    let out = attention(
        plain(qp.clone()),
        plain(kp.clone()),
        plain(vp.clone()),
        None,
        Some(plain(mp.clone())),
        opts,
    )
    .try_into_primitive::<Flex>()
    .ok()?;
    let op = AttentionBackward { scale, softcap };
    let recorded = match op.prepare::<NoCheckpointing>([qg, kg, vg]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((qp, kp, vp, mp), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Some(Tensor::from_primitive::<Ad>(recorded))
}

/// The gradients of query, key and value (see the module docs), on plain tensors.
fn gradients(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Tensor<4>,
    d_out: Tensor<4>,
    scale: f64,
    softcap: Option<f64>,
) -> [Tensor<4>; 3] {
    let [b, h, s, d] = q.dims();
    let [_, kvh, t, _] = k.dims();
    let rep = h / kvh;
    // Query heads of one group as rows of their key/value head, as the forward's grouping.
    let q5 = q.reshape([b, kvh, rep, s, d]);
    let k5 = k.reshape([b, kvh, 1, t, d]);
    let v5 = v.reshape([b, kvh, 1, t, d]);
    let do5 = d_out.reshape([b, kvh, rep, s, d]);
    let u = q5.clone().matmul(k5.clone().swap_dims(3, 4)).mul_scalar(scale);
    let (scores, tanh) = match softcap {
        Some(cap) => {
            let th = u.div_scalar(cap).tanh();
            (th.clone().mul_scalar(cap), Some(th))
        }
        None => (u, None),
    };
    let p = softmax(scores + mask.reshape([b, 1, 1, s, t]), 4);
    let dv = p.clone().swap_dims(3, 4).matmul(do5.clone()).sum_dim(2).reshape([b, kvh, t, d]);
    let dp = do5.matmul(v5.swap_dims(3, 4));
    let row = (dp.clone() * p.clone()).sum_dim(4);
    let ds = p * (dp - row);
    let du = match tanh {
        Some(th) => ds * th.square().neg().add_scalar(1.0),
        None => ds,
    };
    let dq = du.clone().matmul(k5).mul_scalar(scale).reshape([b, h, s, d]);
    let dk = du.swap_dims(3, 4).matmul(q5).mul_scalar(scale).sum_dim(2).reshape([b, kvh, t, d]);
    [dq, dk, dv]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;
    use burn::tensor::{Distribution, TensorData};

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
                    fused(&q, &k, &v, &mask, 0.35, cap).expect("f32 autodiff CPU tensors qualify")
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
        assert!(fused(&x, &kv, &kv, &mask, 1.0, None).is_none());
    }
}
