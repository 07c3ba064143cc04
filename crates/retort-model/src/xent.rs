//! Token cross-entropy on the CPU (f32) as one operation, forward and backward: the sum over rows of
//! `logsumexp(logits) - logits[target]`.
//!
//! burn's log-softmax is a maximum, a subtraction, an exponential (the C library's `expf`, one element
//! at a time), a sum, a logarithm and a second subtraction, each a pass over the chunk of logits
//! (32 MiB on the CPU), then a gather; autodiff keeps the log-probabilities and runs as many passes
//! back. Here the forward reads each row twice (its maximum, then the exponentials summed with
//! [`crate::cpu_attention`]'s vectorized `exp`) and keeps only each row's log-sum-exp; the backward
//! writes `g (softmax - onehot)` in one more pass. A NaN anywhere in a row makes its loss NaN.

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::cpu_attention::exp_shifted;
use crate::host::Host;
use crate::recorded::unary;

/// Each row's `logsumexp` and negative log-likelihood of its target.
fn forward(logits: &[f32], vocab: usize, targets: &[usize]) -> Vec<(f32, f32)> {
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map_init(Vec::new, |scratch, (row, &t)| {
            // The maximum, with NaN kept: `f32::max` would drop it.
            let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m || x.is_nan() { x } else { m });
            scratch.clear();
            scratch.extend_from_slice(row);
            let lse = m + exp_shifted(scratch, m).ln();
            (lse, lse - row[t])
        })
        .collect()
}

/// `g (softmax(row) - onehot(target))` for every row.
fn backward(logits: &[f32], vocab: usize, targets: &[usize], lse: &[f32], g: f32) -> Vec<f32> {
    let mut d = logits.to_vec();
    d.par_chunks_mut(vocab).zip(targets.par_iter().zip(lse.par_iter())).for_each(|(row, (&t, &l))| {
        exp_shifted(row, l);
        for v in row.iter_mut() {
            *v *= g;
        }
        row[t] -= g;
    });
    d
}

#[derive(Debug)]
struct XentBackward;

impl Backward<Flex, 1> for XentBackward {
    /// Logits, targets and each row's log-sum-exp.
    type State = (FlexTensor, Vec<usize>, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let upstream = grads.consume::<Flex>(&ops.node);
        let Some(node) = node else { return };
        let (logits, targets, lse) = ops.state;
        let dims = logits.layout().shape().dims::<2>();
        let g = Host::of::<1>(upstream).values().first().copied().unwrap_or(f32::NAN);
        let x = Host::of::<2>(logits);
        let d = backward(x.values(), dims[1], &targets, &lse, g);
        grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(d, dims)));
    }
}

/// `sum_r logsumexp(logits[r]) - logits[r, targets[r]]` for `logits` `[rows, vocab]`, as a `[1]`
/// tensor, recorded as one operation under autodiff. `None` unless the logits are f32 on the CPU and
/// every target is a valid index; the caller then uses burn's log-softmax.
pub fn nll_sum(logits: &Tensor<2>, targets: &[i64]) -> Option<Tensor<1>> {
    if logits.dtype() != DType::F32 || !crate::device::is_cpu(&logits.device()) {
        return None;
    }
    let [rows, vocab] = logits.dims();
    if rows != targets.len() || vocab == 0 {
        return None;
    }
    let targets: Vec<usize> =
        targets.iter().map(|&t| usize::try_from(t).ok().filter(|&t| t < vocab)).collect::<Option<_>>()?;
    unary(logits, XentBackward, |xp| {
        let per_row = forward(Host::of::<2>(xp.clone()).values(), vocab, &targets);
        let total = per_row.iter().map(|&(_, nll)| f64::from(nll)).sum::<f64>() as f32;
        let lse = per_row.into_iter().map(|(l, _)| l).collect();
        Some((FlexTensor::from_data(TensorData::new(vec![total], [1])), (xp.clone(), targets.clone(), lse)))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Device, Distribution, Int};

    use super::*;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// burn's log-softmax, gather and sum, differentiated by autodiff.
    fn decomposed(logits: Tensor<2>, targets: &[i64]) -> Tensor<1> {
        let n = targets.len();
        let t = Tensor::<2, Int>::from_data(TensorData::new(targets.to_vec(), [n, 1]), &logits.device());
        log_softmax(logits, 1).gather(1, t).sum().neg()
    }

    /// Loss and logit gradients against the decomposed form, scaled by an upstream factor (as the
    /// trainer divides by the step's label tokens): a vocabulary with a lane tail, logits spread wide
    /// enough that most probabilities underflow, more rows than threads. Both sides round in f32: the
    /// loss to 1e-6 relative; a probability `exp(x - lse)` inherits the rounding of `lse` (about 30
    /// here, so 2e-6 absolute in the exponent), hence gradients to 5e-6 of the largest.
    #[test]
    fn matches_log_softmax_and_its_gradient() {
        let device = Device::flex().autodiff();
        let (rows, vocab) = (37, 1003);
        let x0 = Tensor::<2>::random([rows, vocab], Distribution::Normal(0.0, 8.0), &device);
        let targets: Vec<i64> = (0..rows as i64).map(|r| (r * 97) % vocab as i64).collect();
        let run = |fused: bool| {
            let x = x0.clone().require_grad();
            let l = if fused { nll_sum(&x, &targets).unwrap() } else { decomposed(x.clone(), &targets) };
            let grads = l.clone().div_scalar(250.0).backward();
            (values(l.inner()), values(x.grad(&grads).unwrap()))
        };
        let (ours, theirs) = (run(true), run(false));
        assert!(
            (ours.0[0] - theirs.0[0]).abs() <= 1e-6 * theirs.0[0].abs(),
            "{} vs {}",
            ours.0[0],
            theirs.0[0]
        );
        let largest = theirs.1.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (a, e)) in ours.1.iter().zip(&theirs.1).enumerate() {
            assert!((a - e).abs() <= 5e-6 * largest, "d logits[{i}]: {a} vs {e}");
        }
        // Without autodiff: the same loss.
        assert_eq!(values(nll_sum(&x0.clone().inner(), &targets).unwrap()), ours.0);
    }

    #[test]
    fn a_nan_logit_makes_the_loss_nan_and_bad_targets_decline() {
        let device = Device::flex();
        let mut v = vec![0.5f32; 2 * 5];
        v[7] = f32::NAN;
        let x = Tensor::<1>::from_floats(v.as_slice(), &device).reshape([2, 5]);
        assert!(values(nll_sum(&x, &[1, 2]).unwrap())[0].is_nan());
        assert!(nll_sum(&x, &[1, 5]).is_none(), "a target past the vocabulary");
        assert!(nll_sum(&x, &[1, -100]).is_none(), "an ignored label");
        assert!(nll_sum(&x, &[1]).is_none(), "one target for two rows");
        assert!(nll_sum(&x.clone().cast(DType::F16), &[1, 2]).is_none());
    }
}
