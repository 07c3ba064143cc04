//! [`crate::rope::apply`] on the CPU (f32) as one operation, forward and backward.
//!
//! burn evaluates `x cos + rotate_half(x) sin` as two narrows, a negation, a concatenation, two
//! products and a sum, each a full pass that allocates its result, and first copies the strided
//! `[b, s, heads, d] -> [b, heads, s, d]` view of the projection. On the 125M benchmark model that was
//! 118 ms of a 2.5 s prefill. Here one pass reads the view in place and writes the rotated heads
//! contiguously, which is also the layout the attention kernel reads. Under autodiff the backward is
//! the transposed rotation, `dx = dy cos + rotate_half^T(dy sin)`, with nothing kept but `cos` and
//! `sin`.
//!
//! Each element is computed with the operations of the decomposed form in the same order (`x c` plus
//! `(±x') s`, no fused multiply-add), so results are bitwise those of burn's version (tested).

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::gemv::contiguous;
use crate::host::Host;
use crate::recorded::{unary, untracked};

/// Elements below which one thread rotates them all.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 14;

/// A rank-4 f32 tensor read in place through its (non-negative) strides.
struct Strided<'a> {
    data: &'a [f32],
    start: usize,
    dims: [usize; 4],
    strides: [usize; 4],
}

impl<'a> Strided<'a> {
    /// `None` for negative strides and layouts that do not fit their storage.
    fn of(t: &'a FlexTensor) -> Option<Strided<'a>> {
        let layout = t.layout();
        let dims = layout.shape().dims::<4>();
        let mut strides = [0usize; 4];
        for (s, &v) in strides.iter_mut().zip(layout.strides()) {
            *s = usize::try_from(v).ok()?;
        }
        let data = t.storage::<f32>();
        let start = layout.start_offset();
        if dims.contains(&0) {
            return None;
        }
        let last = start + dims.iter().zip(&strides).map(|(d, s)| (d - 1) * s).sum::<usize>();
        (last < data.len()).then_some(Strided { data, start, dims, strides })
    }

    /// Row-major values of shape `dims`.
    fn contiguous(data: &'a [f32], dims: [usize; 4]) -> Strided<'a> {
        let strides = [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1];
        Strided { data, start: 0, dims, strides }
    }

    /// Row `[b, h, s, ..]` into `row`.
    fn row(&self, b: usize, h: usize, s: usize, row: &mut [f32]) {
        let [sb, sh, ss, sd] = self.strides;
        let base = self.start + b * sb + h * sh + s * ss;
        if sd == 1 {
            row.copy_from_slice(&self.data[base..base + row.len()]);
        } else {
            for (i, r) in row.iter_mut().enumerate() {
                *r = self.data[base + i * sd];
            }
        }
    }
}

/// Which way to rotate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// `y = x c + rotate_half(x) s`.
    Forward,
    /// `dx = dy c + rotate_half^T(dy s)`.
    Backward,
}

/// One head row: the first `rd = cos.len()` dimensions rotated, the rest copied.
#[inline]
fn rotate_row(x: &[f32], cos: &[f32], sin: &[f32], dir: Direction, out: &mut [f32]) {
    let rd = cos.len();
    let half = rd / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        match dir {
            Direction::Forward => {
                out[i] = a * cos[i] + (-b) * sin[i];
                out[i + half] = b * cos[i + half] + a * sin[i + half];
            }
            Direction::Backward => {
                out[i] = a * cos[i] + b * sin[i + half];
                out[i + half] = b * cos[i + half] + -(a * sin[i]);
            }
        }
    }
    out[rd..].copy_from_slice(&x[rd..]);
}

/// `x` `[b, h, s, d]` (any layout) rotated by `cos`/`sin` (`[b, 1, s, rd]`, contiguous), contiguous.
fn rotate(x: &Strided<'_>, cos: &[f32], sin: &[f32], rd: usize, dir: Direction) -> Vec<f32> {
    let [b, h, s, d] = x.dims;
    let mut out = vec![0f32; b * h * s * d];
    let plane = |(plane, out): (usize, &mut [f32])| {
        let (bi, hi) = (plane / h, plane % h);
        let mut row = vec![0f32; d];
        for (si, out) in out.chunks_exact_mut(d).enumerate() {
            x.row(bi, hi, si, &mut row);
            let at = (bi * s + si) * rd;
            rotate_row(&row, &cos[at..at + rd], &sin[at..at + rd], dir, out);
        }
    };
    // Decoding rotates a few rows: waking threads would cost more than the rotation.
    if out.len() < PARALLEL_MIN_ELEMENTS {
        out.chunks_mut(s * d).enumerate().for_each(plane);
    } else {
        out.par_chunks_mut(s * d).enumerate().for_each(plane);
    }
    out
}

#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    /// cos and sin.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let Some(node) = node else { return };
        let (cos, sin) = ops.state;
        let rd = cos.layout().shape().dims::<4>()[3];
        let dims = dy.layout().shape().dims::<4>();
        let (c, s) = (contiguous(&cos).unwrap_or(&[]), contiguous(&sin).unwrap_or(&[]));
        let dx = match Strided::of(&dy) {
            Some(dy) => rotate(&dy, c, s, rd, Direction::Backward),
            // A layout read through strides cannot reach (a flipped view): its values, copied.
            None => {
                let copy = Host::of::<4>(dy);
                rotate(&Strided::contiguous(copy.values(), dims), c, s, rd, Direction::Backward)
            }
        };
        grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, dims)));
    }
}

/// `x cos + rotate_half(x) sin` on the first `rotary_dim` dimensions of each head of `x` (`[b, heads,
/// s, d]`, any layout), the rest passed through, for `cos`/`sin` `[b, 1, s, rotary_dim]`; contiguous,
/// recorded as one operation under autodiff. `None` unless all are f32 on the CPU and the shapes fit;
/// the caller then uses burn's operations.
pub fn apply(x: &Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Option<Tensor<4>> {
    if [x, cos, sin].iter().any(|t| t.dtype() != DType::F32) || !crate::device::is_cpu(&x.device()) {
        return None;
    }
    let [b, _, s, d] = x.dims();
    let rd = cos.dims()[3];
    if cos.dims() != [b, 1, s, rd] || sin.dims() != cos.dims() || !rd.is_multiple_of(2) || rd > d || rd == 0 {
        return None;
    }
    let (cp, sp) = (untracked(cos)?, untracked(sin)?);
    let (c, s_) = (contiguous(&cp)?, contiguous(&sp)?);
    unary(x, RopeBackward, |xp| {
        let out = rotate(&Strided::of(xp)?, c, s_, rd, Direction::Forward);
        Some((FlexTensor::from_data(TensorData::new(out, x.dims())), (cp.clone(), sp.clone())))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use burn::tensor::{Device, Distribution};
    use retort_hf::RopeScaling;

    use super::*;
    use crate::rope::Rope;

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// Bitwise burn's decomposed form, forward and backward: full and partial rotary dimensions
    /// (Phi-3), a strided `[b, s, h, d] -> [b, h, s, d]` view as the attention passes it, position ids
    /// that differ per row, and YaRN's attention scaling folded into cos and sin.
    #[test]
    fn equals_the_decomposed_form_and_its_gradient() {
        let device = Device::flex().autodiff();
        let (b, s, h) = (2, 5, 3);
        for (d, rd, scaling) in [
            (8, 8, RopeScaling::None),
            (12, 8, RopeScaling::None),
            (
                16,
                16,
                RopeScaling::Yarn {
                    factor: 4.0,
                    original_max_position_embeddings: 4,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    attention_factor: None,
                },
            ),
        ] {
            let rope = Rope { theta: 10_000.0, scaling, rotary_dim: rd, max_position_embeddings: 16 };
            let positions: Vec<usize> = (0..b).flat_map(|r| (0..s).map(move |i| 3 * r + 2 * i)).collect();
            let (cos, sin) = rope.cos_sin(&positions, b, s, &device, DType::F32);
            let x0 = Tensor::<4>::random([b, s, h, d], Distribution::Normal(0.0, 2.0), &device);
            let w = Tensor::<4>::random([b, h, s, d], Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let x = x0.clone().require_grad();
                let view = x.clone().swap_dims(1, 2);
                let y = if fused {
                    apply(&view, &cos, &sin).unwrap()
                } else {
                    crate::rope::decomposed(view, &cos, &sin)
                };
                let grads = (y.clone() * w.clone()).sum().backward();
                (values(y.inner()), values(x.grad(&grads).unwrap()))
            };
            let (ours, theirs) = (run(true), run(false));
            assert_eq!(ours.0, theirs.0, "d {d}, rotary {rd}: outputs");
            assert_eq!(ours.1, theirs.1, "d {d}, rotary {rd}: gradients");
            // Without autodiff: the same values.
            let plain =
                apply(&x0.clone().inner().swap_dims(1, 2), &cos.clone().inner(), &sin.clone().inner());
            assert_eq!(values(plain.unwrap()), ours.0);
        }
    }

    #[test]
    fn declines_other_dtypes_and_shapes() {
        let device = Device::flex();
        let x = Tensor::<4>::zeros([1, 2, 3, 4], &device);
        let c = Tensor::<4>::zeros([1, 1, 3, 4], &device);
        assert!(apply(&x, &c, &c).is_some());
        assert!(apply(&x.clone().cast(DType::F16), &c, &c).is_none());
        assert!(apply(&x, &Tensor::<4>::zeros([1, 1, 3, 6], &device), &c).is_none());
        assert!(
            apply(&x, &Tensor::<4>::zeros([1, 1, 2, 4], &device), &Tensor::<4>::zeros([1, 1, 2, 4], &device))
                .is_none()
        );
    }
}
