//! `x W^T` for many rows of `x` on the CPU: the projections of a prefill, of evaluation and of the
//! recomputed forward of checkpointed training.
//!
//! burn's CPU matmul hands the product to `gemm` too, but first allocates the result zero-filled (a
//! `vec![0u8; ..]`, then a second pass when the buffer has to be realigned). For the LM head of a 4 x 512
//! prefill that is 250 MiB written before `gemm` overwrites it; measured on the 125M benchmark model,
//! the head's product ran at 165 GFLOP/s through burn and 205 GFLOP/s called directly. Here `gemm` writes
//! into a fresh buffer it fills completely, reading both operands through their strides, so a weight
//! stored either way round (`[out, in]`, or a transposed view of `[in, out]`) needs no copy. Training
//! records the product as one operation with the input gradient `dy W` computed the same way
//! (bench_train, five alternating runs: +2% mean tokens/s, the same losses to the last digit).

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::FlexTensor;

/// The weight `w` (`[out, in]`) as the CPU keeps it in f32: its values stored `[in, out]`, the
/// tensor a transposed view of them, so it is still `[out, in]` to every reader. gemm reads such a
/// weight without packing it on every call; measured on this benchmark's VM (2 threads), `x W^T` for
/// 2048 x 2048 x 768 (a down projection) ran at 165 GFLOP/s on `[out, in]` and 214 on `[in, out]`,
/// 128 x 2048 x 768 at 57 and 195. Decoding reads it with [`crate::gemv`]'s column kernel. Other
/// devices and dtypes, and tensors under autodiff (training, where the input gradient's product
/// reads the weight the other way round), keep the checkpoint's layout.
pub fn cpu_layout(w: Tensor<2>) -> Tensor<2> {
    if std::env::var("NOFLIP").is_ok()
        || w.dtype() != DType::F32
        || w.is_autodiff()
        || !crate::device::is_cpu(&w.device())
    {
        return w;
    }
    let device = w.device();
    Tensor::<2>::from_data(w.transpose().into_data(), &device).transpose()
}

/// Multiply-adds below which one thread does the product (waking threads costs more); burn's threshold.
const PARALLEL_MIN_MACS: usize = 192 * 192 * 192;

/// A rank-2 f32 operand read in place: its storage, the offset of element `[0, 0]` and its strides.
struct Operand<'a> {
    data: &'a [f32],
    start: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// `None` for negative strides (flipped views) and layouts that do not fit their storage.
    fn of(t: &'a FlexTensor) -> Option<Operand<'a>> {
        let layout = t.layout();
        let dims = layout.shape().dims::<2>();
        let strides = layout.strides();
        let (rs, cs) = (usize::try_from(strides[0]).ok()?, usize::try_from(strides[1]).ok()?);
        let data = t.storage::<f32>();
        let start = layout.start_offset();
        let last = start + (dims[0] - 1) * rs + (dims[1] - 1) * cs;
        if last >= data.len() {
            return None;
        }
        Some(Operand { data, start, rows: dims[0], cols: dims[1], row_stride: rs, col_stride: cs })
    }

    /// The same values seen transposed.
    fn transposed(&self) -> Operand<'a> {
        Operand {
            data: self.data,
            start: self.start,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// Under autodiff: `dx = dy W` for the frozen weight `W` kept as state (the weight gets no gradient).
#[derive(Debug)]
struct ProjectBackward;

impl Backward<Flex, 1> for ProjectBackward {
    /// The weight, `[n, k]`.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let Some(node) = node else { return };
        let w = ops.state;
        // Layouts the product cannot read in place (flipped views) are copied row-major first.
        let readable = |t: FlexTensor| match Operand::of(&t) {
            Some(_) => t,
            None => FlexTensor::from_data(Tensor::<2>::from_primitive::<Flex>(t).into_data()),
        };
        let (dy, w) = (readable(dy), readable(w));
        let (Some(d), Some(wo)) = (Operand::of(&dy), Operand::of(&w)) else { return };
        // dy W = dy (W^T)^T.
        let [m, k] = [d.rows, wo.cols];
        let dx = FlexTensor::from_data(TensorData::new(product(&d, &wo.transposed()), [m, k]));
        grads.register::<Flex>(node.id, dx);
    }
}

/// `x W^T` for `x` `[m, k]` and `w` `[n, k]`, both f32 on the CPU backend; any non-negative strides.
/// Under autodiff (training) it is recorded as one operation whose backward is `dx = dy W`, by gemm
/// the same way; the weight must then need no gradient (base weights are frozen). `None` when the
/// tensors do not qualify; the caller then uses a matmul.
pub fn project(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    let [m, k] = x.dims();
    let [n, wk] = w.dims();
    if m == 0 || n == 0 || k == 0 || k != wk || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return None;
    }
    // Under autodiff the weight must be a constant: base weights are frozen.
    if w.is_require_grad() || !crate::device::is_cpu(&x.device()) {
        return None;
    }
    let wf = crate::recorded::untracked(w)?;
    crate::recorded::unary(x, ProjectBackward, |xf| {
        let y = product(&Operand::of(xf)?, &Operand::of(&wf)?);
        Some((FlexTensor::from_data(TensorData::new(y, [m, n])), wf.clone()))
    })
}

/// `x w^T`, row-major `[x.rows, w.rows]`.
fn product(x: &Operand<'_>, w: &Operand<'_>) -> Vec<f32> {
    let (m, k, n) = (x.rows, x.cols, w.rows);
    assert!(m > 0 && k > 0 && n > 0 && w.cols == k, "shapes [{m}, {k}] and [{n}, {}]", w.cols);
    let parallelism =
        if m * k * n < PARALLEL_MIN_MACS { gemm::Parallelism::None } else { gemm::Parallelism::Rayon(0) };
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let signed = |s: usize| s as isize;
    #[allow(unsafe_code, reason = "gemm reads and writes through raw pointers and strides")]
    // SAFETY: `Operand::of` checked that every element `[i, j]` of x and w (i < rows, j < cols, at
    // `start + i * row_stride + j * col_stride`) lies inside its storage; `out` has capacity for the
    // `m x n` row-major result, which gemm writes completely when `read_dst` is false (k > 0), so
    // every element is initialised before `set_len`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            signed(n),
            false,
            x.data.as_ptr().add(x.start),
            signed(x.col_stride),
            signed(x.row_stride),
            // rhs[kk, j] = w[j, kk]: its columns step along w's rows.
            w.data.as_ptr().add(w.start),
            signed(w.row_stride),
            signed(w.col_stride),
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        out.set_len(m * n);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use burn::tensor::{Device, Distribution};

    use super::*;

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// Against burn's matmul: weights stored `[out, in]` and as a transposed view of `[in, out]`, an
    /// input that is a narrowed view, sizes on both sides of the threading threshold and of gemm's
    /// register blocks. Both sides are gemm with its own summation order per thread count, so they
    /// agree to f32 rounding of sums of k products of unit normals: 1e-5 relative to sqrt(k).
    #[test]
    fn matches_burns_matmul_for_any_weight_layout() {
        let device = Device::flex();
        for (m, k, n) in [(1, 1, 1), (17, 5, 3), (33, 64, 70), (300, 200, 257)] {
            let x = Tensor::<2>::random([m, k + 3], Distribution::Normal(0.0, 1.0), &device).narrow(1, 2, k);
            let w = Tensor::<2>::random([n, k], Distribution::Normal(0.0, 1.0), &device);
            let expected = values(x.clone().matmul(w.clone().transpose()));
            // The same weight held as [in, out], seen as [out, in].
            let wt = Tensor::<2>::from_data(w.clone().transpose().into_data(), &device).transpose();
            for (layout, w) in [("[out, in]", &w), ("view of [in, out]", &wt)] {
                let got = values(project(&x, w).unwrap());
                let tol = 1e-5 * (k as f32).sqrt();
                for (i, (a, e)) in got.iter().zip(&expected).enumerate() {
                    assert!((a - e).abs() <= tol * (1.0 + e.abs()), "{m}x{k}x{n} {layout} [{i}]: {a} vs {e}");
                }
            }
        }
    }

    /// Under autodiff: the output and the input's gradient equal burn's matmul and its backward to f32
    /// rounding, for both weight layouts and a strided input; the weight gets no gradient.
    #[test]
    fn records_its_backward_under_autodiff() {
        let device = Device::flex().autodiff();
        let (m, k, n) = (300, 200, 257);
        let x0 = Tensor::<2>::random([m, k + 3], Distribution::Normal(0.0, 1.0), &device).narrow(1, 1, k);
        let w = Tensor::<2>::random([n, k], Distribution::Normal(0.0, 1.0), &device);
        let wt = Tensor::<2>::from_data(w.clone().transpose().into_data(), &device).transpose();
        let g = Tensor::<2>::random([m, n], Distribution::Normal(0.0, 1.0), &device);
        let run = |w: &Tensor<2>, ours: bool| {
            let x = x0.clone().require_grad();
            let y = if ours { project(&x, w).unwrap() } else { x.clone().matmul(w.clone().transpose()) };
            let grads = (y.clone() * g.clone()).sum().backward();
            (values(y.inner()), values(x.grad(&grads).unwrap()))
        };
        let reference = run(&w, false);
        let tol = 1e-5 * (k.max(n) as f32).sqrt();
        for (layout, w) in [("[out, in]", &w), ("view of [in, out]", &wt)] {
            let ours = run(w, true);
            for (what, a, e) in [("y", &ours.0, &reference.0), ("dx", &ours.1, &reference.1)] {
                for (i, (a, e)) in a.iter().zip(e.iter()).enumerate() {
                    assert!((a - e).abs() <= tol * (1.0 + e.abs()), "{layout} {what}[{i}]: {a} vs {e}");
                }
            }
        }
        // A weight that needs a gradient is left to burn.
        assert!(project(&x0.clone().require_grad(), &w.clone().require_grad()).is_none());
    }

    #[test]
    fn declines_trained_weights_other_dtypes_and_flipped_views() {
        let device = Device::flex();
        let x = Tensor::<2>::ones([4, 3], &device);
        let w = Tensor::<2>::ones([2, 3], &device);
        assert!(project(&x, &w).is_some());
        assert!(project(&x.clone().cast(DType::F16), &w).is_none());
        assert!(project(&x, &Tensor::<2>::ones([2, 4], &device)).is_none());
        assert!(project(&x.clone().flip([1]), &w).is_none());
        let ad = Device::flex().autodiff();
        let xa = Tensor::<2>::ones([4, 3], &ad).require_grad();
        assert!(project(&xa, &Tensor::<2>::ones([2, 3], &ad).require_grad()).is_none());
    }
}
