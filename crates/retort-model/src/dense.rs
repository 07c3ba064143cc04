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
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::FlexTensor;
use rayon::prelude::*;
use std::sync::Arc;

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
pub(crate) const PARALLEL_MIN_MACS: usize = 192 * 192 * 192;

/// A rank-2 operand (f32 unless said) read in place: its storage, the offset of element `[0, 0]` and
/// its strides.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a, E = f32> {
    pub(crate) data: &'a [E],
    pub(crate) start: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) row_stride: usize,
    pub(crate) col_stride: usize,
}

impl<'a, E: burn::tensor::Element + bytemuck::Pod> Operand<'a, E> {
    /// `None` for negative strides (flipped views) and layouts that do not fit their storage; the
    /// tensor must hold `E`.
    pub(crate) fn of(t: &'a FlexTensor) -> Option<Operand<'a, E>> {
        let layout = t.layout();
        let dims = layout.shape().dims::<2>();
        let strides = layout.strides();
        let (rs, cs) = (usize::try_from(strides[0]).ok()?, usize::try_from(strides[1]).ok()?);
        let data = t.storage::<E>();
        let start = layout.start_offset();
        let last = start + (dims[0] - 1) * rs + (dims[1] - 1) * cs;
        if last >= data.len() {
            return None;
        }
        Some(Operand { data, start, rows: dims[0], cols: dims[1], row_stride: rs, col_stride: cs })
    }

    /// A row-major `[rows, cols]` slice.
    pub(crate) fn row_major(data: &'a [E], rows: usize, cols: usize) -> Operand<'a, E> {
        Operand { data, start: 0, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The same values seen transposed.
    pub(crate) fn transposed(&self) -> Operand<'a, E> {
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
        let (dy, w) = (readable(dy), readable(w));
        // dy W = dy (W^T)^T.
        let Some(dx) = product_of(&dy, &w, true) else { return };
        grads.register::<Flex>(node.id, dx);
    }
}

/// `x W^T` for `x` `[m, k]` and `w` `[n, k]`, both f32 or both bf16 on the CPU backend; any
/// non-negative strides. bf16 products accumulate in f32 and round once ([`crate::gemm_bf16`]), as a
/// bf16 matmul does. Under autodiff (training) it is recorded as one operation whose backward is
/// `dx = dy W`, computed the same way; the weight must then need no gradient (base weights are
/// frozen). `None` when the tensors do not qualify; the caller then uses a matmul.
pub fn project(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    let [m, k] = x.dims();
    let [n, wk] = w.dims();
    let dtype = x.dtype();
    if m == 0
        || n == 0
        || k == 0
        || k != wk
        || w.dtype() != dtype
        || !matches!(dtype, DType::F32 | DType::BF16)
    {
        return None;
    }
    // Under autodiff the weight must be a constant: base weights are frozen.
    if w.is_require_grad() || !crate::device::is_cpu(&x.device()) {
        return None;
    }
    let wf = crate::recorded::untracked(w)?;
    crate::recorded::unary(x, ProjectBackward, |xf| Some((product_of(xf, &wf, false)?, wf.clone())))
}

/// `x w^T` (`w^T^T = w` when `transpose_w`: `x w`) for two f32 or two bf16 CPU tensors, in their dtype.
/// `None` for other dtypes, mismatched shapes and layouts the products cannot read.
fn product_of(x: &FlexTensor, w: &FlexTensor, transpose_w: bool) -> Option<FlexTensor> {
    fn view<'a, E: burn::tensor::Element + bytemuck::Pod>(
        t: &'a FlexTensor,
        transpose: bool,
    ) -> Option<Operand<'a, E>> {
        let o = Operand::of(t)?;
        Some(if transpose { o.transposed() } else { o })
    }
    let data = match (x.dtype(), w.dtype()) {
        (DType::F32, DType::F32) => {
            let (xo, wo) = (view::<f32>(x, false)?, view::<f32>(w, transpose_w)?);
            if xo.cols != wo.cols {
                return None;
            }
            TensorData::new(product(&xo, &wo), [xo.rows, wo.rows])
        }
        (DType::BF16, DType::BF16) => {
            let (xo, wo) = (view::<half::bf16>(x, false)?, view::<half::bf16>(w, transpose_w)?);
            if xo.cols != wo.cols {
                return None;
            }
            TensorData::new(crate::gemm_bf16::product_bf16(&xo, &wo), [xo.rows, wo.rows])
        }
        _ => return None,
    };
    Some(FlexTensor::from_data(data))
}

/// LoRA dropout drawn inside [`project_lora`]: element `e` of its `[m, k]` input (row-major) is kept,
/// and scaled by `1 / keep`, when its 16 bits of a hash of `(seed, e / 4)` fall below `keep` x 2^16
/// (keep is rounded to a multiple of 2^-16, off by 7.6e-6 at most; torch draws from 24-bit uniforms).
/// Counter-based, so threads draw their rows independently, and the backward keeps the mask as one bit
/// per value instead of an f32 mask and an f32 dropped-out copy of the input.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    /// Drawn from the device's seeded generator for each mask, so runs and resumes repeat it.
    pub seed: u64,
    /// The probability of keeping a value, in (0, 1].
    pub keep: f64,
}

impl Dropout {
    /// Whether element `e` is kept.
    pub fn kept(&self, e: u64) -> bool {
        (self.hash(e / 4) >> (16 * (e % 4))) & 0xffff < self.threshold()
    }

    /// SplitMix64's output for the `e`-th step from `seed`.
    fn hash(&self, e: u64) -> u64 {
        let mut z = self.seed.wrapping_add(e.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// 16-bit draws below this are kept: keep x 2^16, rounded.
    fn threshold(&self) -> u64 {
        (self.keep * 65536.0).round() as u64
    }
}

/// A drawn [`Dropout`] mask over `[rows, cols]`: one bit per value, each row in whole words.
#[derive(Debug)]
struct Bits {
    words: Vec<u64>,
    per_row: usize,
    cols: usize,
    /// `1 / keep`: what a kept value is multiplied by.
    scale: f32,
}

impl Bits {
    fn draw(d: Dropout, rows: usize, cols: usize) -> Bits {
        let per_row = cols.div_ceil(64);
        let mut words = vec![0u64; rows * per_row];
        words.par_chunks_mut(per_row).enumerate().for_each(|(i, row)| {
            for (w, word) in row.iter_mut().enumerate() {
                let first = (i * cols + w * 64) as u64;
                let lanes = (cols - w * 64).min(64) as u64;
                // Four values per hash where `first` is a multiple of four (always, when cols is).
                *word = if first.is_multiple_of(4) {
                    let threshold = d.threshold();
                    (0..lanes.div_ceil(4)).fold(0u64, |acc, q| {
                        let h = d.hash(first / 4 + q);
                        let four = (0..4)
                            .fold(0u64, |f, l| f | (u64::from((h >> (16 * l)) & 0xffff < threshold) << l));
                        acc | (four << (4 * q))
                    })
                } else {
                    (0..lanes).fold(0u64, |acc, b| acc | (u64::from(d.kept(first + b)) << b))
                };
                if lanes < 64 {
                    *word &= (1u64 << lanes) - 1;
                }
            }
        });
        Bits { words, per_row, cols, scale: (1.0 / d.keep) as f32 }
    }

    /// `f(j, &mut row[j], mask[i, j])` along row `i`, a word of mask bits at a time.
    fn each_in_row(&self, i: usize, row: &mut [f32], mut f: impl FnMut(usize, &mut f32, f32)) {
        let words = &self.words[i * self.per_row..(i + 1) * self.per_row];
        for (w, (chunk, &word)) in row.chunks_mut(64).zip(words).enumerate() {
            for (b, v) in chunk.iter_mut().enumerate() {
                f(w * 64 + b, v, ((word >> b) & 1) as f32 * self.scale);
            }
        }
    }

    /// The mask's value at `[i, j]`: `1 / keep` or 0.
    #[cfg(test)]
    fn at(&self, i: usize, j: usize) -> f32 {
        if self.words[i * self.per_row + j / 64] >> (j % 64) & 1 == 1 { self.scale } else { 0.0 }
    }
}

/// The frozen weight `[n, k]` of [`project_lora`].
#[derive(Debug, Clone, Copy)]
pub enum Frozen<'a> {
    /// Dense, in the compute dtype.
    Dense(&'a Tensor<2>),
    /// NF4 (QLoRA): dequantized for the forward and again for the backward's input gradient, so that
    /// between the two only the packed weight is kept, as bitsandbytes' `MatMul4Bit` does.
    Nf4(&'a crate::nf4::Nf4Weight),
}

/// What the backward keeps of the frozen weight: the dense values, or the packed NF4 weight (on the
/// plain device) to dequantize again.
#[derive(Debug, Clone)]
enum KeptWeight {
    Dense(FlexTensor),
    Nf4(Box<crate::nf4::Nf4Weight>),
}

impl KeptWeight {
    fn dense(&self) -> Option<FlexTensor> {
        match self {
            KeptWeight::Dense(t) => Some(t.clone()),
            KeptWeight::Nf4(q) => crate::recorded::untracked(&q.dequantize()),
        }
    }
}

/// What the backward of [`project_lora`] keeps: the input (for A's gradient, through the dropout mask
/// when there is one), the mask, the frozen weight, A, B, the scale and the scaled `xd A^T` (for B's
/// gradient).
#[derive(Debug, Clone)]
struct LoraState {
    x: FlexTensor,
    mask: Option<Arc<Bits>>,
    w: KeptWeight,
    a: FlexTensor,
    b: FlexTensor,
    scale: f32,
    xs: FlexTensor,
}

/// Under autodiff: the gradients of `y = x W^T + s (xd A^T) B^T`, `xd = x * mask`, for the parents
/// `[x, A, B]`: `dB = dy^T xs`, `dxs = s dy B`, `dA = dxs^T xd` and `dx = dy W + (dxs A) * mask`,
/// without dropout the last two products summed by gemm in one buffer.
#[derive(Debug)]
struct LoraProjectBackward;

impl Backward<Flex, 3> for LoraProjectBackward {
    type State = LoraState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_a, node_b] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let LoraState { x, mask, w, a, b, scale, xs } = ops.state;
        let dy = readable(dy);
        let (Some(d), Some(xo), Some(ao), Some(bo), Some(xs)) =
            (Operand::of(&dy), Operand::of(&x), Operand::of(&a), Operand::of(&b), Operand::of(&xs))
        else {
            return;
        };
        let (m, r) = (d.rows, ao.rows);
        if let Some(node) = node_b {
            // dB = dy^T xs = dy^T (xs^T)^T.
            let db = product(&d.transposed(), &xs.transposed());
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(db, [bo.rows, r])));
        }
        if node_x.is_none() && node_a.is_none() {
            return;
        }
        // dxs = s dy B = s dy (B^T)^T.
        let mut dxs = product(&d, &bo.transposed());
        dxs.iter_mut().for_each(|v| *v *= scale);
        let dxs_o = Operand::row_major(&dxs, m, r);
        if let Some(node) = node_a {
            // dA = dxs^T xd = dxs^T (xd^T)^T, with xd redrawn from x and the mask's bits.
            let xd = mask.as_ref().map(|bits| masked(&xo, bits));
            let xd_o = match &xd {
                Some(xd) => Operand::row_major(xd, m, xo.cols),
                None => xo,
            };
            let da = product(&dxs_o.transposed(), &xd_o.transposed());
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(da, [r, xo.cols])));
        }
        if let Some(node) = node_x {
            // dx = dy W + dxs A: dy (W^T)^T, then dxs (A^T)^T added in place (through the mask).
            let Some(w) = w.dense() else { return };
            let Some(wo) = Operand::of(&w) else { return };
            let mut dx = product(&d, &wo.transposed());
            match &mask {
                Some(bits) => add_masked(&mut dx, &product(&dxs_o, &ao.transposed()), bits),
                None => gemm_into(&dxs_o, &ao.transposed(), &mut dx, true),
            }
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, [m, xo.cols])));
        }
    }
}

/// `x * mask`, row-major.
fn masked(x: &Operand<'_>, mask: &Bits) -> Vec<f32> {
    let k = x.cols;
    let mut out = vec![0.0f32; x.rows * k];
    out.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
        let at = x.start + i * x.row_stride;
        if x.col_stride == 1 {
            mask.each_in_row(i, row, |j, v, m| *v = x.data[at + j] * m);
        } else {
            mask.each_in_row(i, row, |j, v, m| *v = x.data[at + j * x.col_stride] * m);
        }
    });
    out
}

/// `acc += t * mask` for row-major `acc` and `t`.
fn add_masked(acc: &mut [f32], t: &[f32], mask: &Bits) {
    let k = mask.cols;
    acc.par_chunks_mut(k).zip(t.par_chunks(k)).enumerate().for_each(|(i, (row, t))| {
        mask.each_in_row(i, row, |j, v, m| *v += t[j] * m);
    });
}

/// A layout the products cannot read in place (a flipped view) copied row-major.
fn readable(t: FlexTensor) -> FlexTensor {
    let fits = match t.dtype() {
        DType::BF16 => Operand::<half::bf16>::of(&t).is_some(),
        DType::F32 => Operand::<f32>::of(&t).is_some(),
        _ => true,
    };
    if fits { t } else { FlexTensor::from_data(Tensor::<2>::from_primitive::<Flex>(t).into_data()) }
}

/// A projection with a plain LoRA adapter as one operation: `x W^T + s ((x * mask) A^T) B^T` for `x`
/// `[m, k]`, the frozen `w` `[n, k]`, `a` `[r, k]` and `b` `[n, r]`, all f32 on the CPU, and the
/// mask of an optional [`Dropout`]. gemm adds the adapter's
/// product straight onto the base's, and in the backward the adapter's input gradient onto the base's:
/// burn's matmuls would zero-fill an `[m, n]` and an `[m, k]` buffer on one thread, and add them to
/// the base's in two more passes. Under autodiff A and B get gradients when they need them; `w` must
/// need none. `None` when the tensors do not qualify (and for a few rows without autodiff, which
/// [`crate::gemv`] decodes faster); the caller then computes the parts.
pub fn project_lora(
    x: &Tensor<2>,
    w: Frozen<'_>,
    a: &Tensor<2>,
    b: &Tensor<2>,
    scale: f64,
    dropout: Option<Dropout>,
) -> Option<Tensor<2>> {
    let [m, k] = x.dims();
    let ([n, wk], w_dtype, w_trained) = match w {
        Frozen::Dense(t) => (t.dims(), t.dtype(), t.is_require_grad()),
        Frozen::Nf4(q) => (q.shape, q.dtype, false),
    };
    let ([r, ak], [bn, br]) = (a.dims(), b.dims());
    if m == 0 || n == 0 || k == 0 || r == 0 || wk != k || ak != k || bn != n || br != r {
        return None;
    }
    if [x, a, b].iter().any(|t| t.dtype() != DType::F32) || w_dtype != DType::F32 {
        return None;
    }
    // A few rows without autodiff is decoding, which the decode kernel does faster; not with dropout
    // (training: checkpointing's first, untracked pass must draw the masks its recomputation will).
    let decoding = !x.is_autodiff() && m <= crate::gemv::MAX_ROWS && dropout.is_none();
    if !crate::device::is_cpu(&x.device()) || w_trained || decoding {
        return None;
    }
    let kept = match w {
        Frozen::Dense(t) => KeptWeight::Dense(crate::recorded::untracked(t)?),
        Frozen::Nf4(q) => KeptWeight::Nf4(Box::new(burn::module::Module::valid(q))),
    };
    // Dropped after the forward when NF4: the backward dequantizes again.
    let wf = kept.dense()?;
    let scale = scale as f32;
    // The output and the scaled `xd A^T`, the input dropped out through the mask when there is one.
    let run = |xf: &FlexTensor, af: &FlexTensor, bf: &FlexTensor, mask: Option<&Bits>| {
        let (xo, wo, ao, bo) = (Operand::of(xf)?, Operand::of(&wf)?, Operand::of(af)?, Operand::of(bf)?);
        let mut xs = match mask {
            Some(bits) => product(&Operand::row_major(&masked(&xo, bits), m, k), &ao),
            None => product(&xo, &ao),
        };
        xs.iter_mut().for_each(|v| *v *= scale);
        let mut y = product(&xo, &wo);
        gemm_into(&Operand::row_major(&xs, m, r), &bo, &mut y, true);
        let y = FlexTensor::from_data(TensorData::new(y, [m, n]));
        Some((y, FlexTensor::from_data(TensorData::new(xs, [m, r]))))
    };
    if !x.is_autodiff() {
        let plain = |t: &Tensor<2>| t.clone().try_into_primitive::<Flex>().ok();
        let (xf, af, bf) = (plain(x)?, plain(a)?, plain(b)?);
        let mask = dropout.map(|d| Bits::draw(d, m, k));
        return Some(Tensor::from_primitive::<Flex>(run(&xf, &af, &bf, mask.as_ref())?.0));
    }
    let parts =
        |t: &Tensor<2>| t.clone().try_into_primitive::<crate::recorded::Ad>().ok().map(|p| p.into_parts());
    let ((xf, xn), (af, an), (bf, bn)) = (parts(x)?, parts(a)?, parts(b)?);
    let mask = dropout.map(|d| Arc::new(Bits::draw(d, m, k)));
    let (y, xs) = run(&xf, &af, &bf, mask.as_deref())?;
    let recorded =
        match LoraProjectBackward.prepare::<NoCheckpointing>([xn, an, bn]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                prep.finish(LoraState { x: xf, mask, w: kept, a: af, b: bf, scale, xs }, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
    Some(Tensor::from_primitive::<crate::recorded::Ad>(recorded))
}

/// `x w^T`, row-major `[x.rows, w.rows]`.
pub(crate) fn product(x: &Operand<'_>, w: &Operand<'_>) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(x.rows * w.rows);
    gemm_into(x, w, &mut out, false);
    out
}

/// `out = x w^T` (row-major `[x.rows, w.rows]`) into the spare capacity of an empty `out`, or, with
/// `accumulate`, `out += x w^T` onto the values `out` holds.
fn gemm_into(x: &Operand<'_>, w: &Operand<'_>, out: &mut Vec<f32>, accumulate: bool) {
    let (m, k, n) = (x.rows, x.cols, w.rows);
    assert!(m > 0 && k > 0 && n > 0 && w.cols == k, "shapes [{m}, {k}] and [{n}, {}]", w.cols);
    if accumulate {
        assert_eq!(out.len(), m * n, "the accumulated output is not [{m}, {n}]");
    } else {
        assert!(out.is_empty() && out.capacity() >= m * n, "no room for the [{m}, {n}] output");
    }
    let parallelism =
        if m * k * n < PARALLEL_MIN_MACS { gemm::Parallelism::None } else { gemm::Parallelism::Rayon(0) };
    let signed = |s: usize| s as isize;
    #[allow(unsafe_code, reason = "gemm reads and writes through raw pointers and strides")]
    // SAFETY: `Operand::of` checked that every element `[i, j]` of x and w (i < rows, j < cols, at
    // `start + i * row_stride + j * col_stride`) lies inside its storage; `out` holds (accumulate) or
    // has capacity for (otherwise) the `m x n` row-major result, which gemm writes completely when
    // `read_dst` is false (k > 0), so every element is initialised before `set_len`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            signed(n),
            accumulate,
            x.data.as_ptr().add(x.start),
            signed(x.col_stride),
            signed(x.row_stride),
            // rhs[kk, j] = w[j, kk]: its columns step along w's rows.
            w.data.as_ptr().add(w.start),
            signed(w.row_stride),
            signed(w.col_stride),
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        out.set_len(m * n);
    }
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

    /// A bf16 base: output and input gradient against burn's bf16 matmul and its backward (f32 gemm,
    /// rounded once), for both a row-major weight and a transposed view, and a strided input. Both
    /// round f32 sums of the same exact products to bf16, so they differ only where the two summation
    /// orders straddle a rounding boundary: by one bf16 step (at most 2^-7 of the value), and rarely.
    #[test]
    fn bf16_records_its_backward_like_burns_bf16_matmul() {
        let device = Device::flex().autodiff();
        let (m, k, n) = (150, 203, 97);
        let bf = |t: Tensor<2>| t.cast(DType::BF16);
        let x0 = bf(Tensor::<2>::random([m, k + 3], Distribution::Normal(0.0, 1.0), &device)).narrow(1, 1, k);
        let w = bf(Tensor::<2>::random([n, k], Distribution::Normal(0.0, 1.0), &device));
        let wt =
            Tensor::<2>::from_data(w.clone().transpose().into_data(), (&device, DType::BF16)).transpose();
        assert_eq!(wt.dtype(), DType::BF16);
        let g = bf(Tensor::<2>::random([m, n], Distribution::Normal(0.0, 1.0), &device));
        let run = |w: &Tensor<2>, ours: bool| {
            let x = x0.clone().require_grad();
            let y = if ours { project(&x, w).unwrap() } else { x.clone().matmul(w.clone().transpose()) };
            assert_eq!(y.dtype(), DType::BF16);
            let grads = (y.clone() * g.clone()).sum().backward();
            let dx = x.grad(&grads).unwrap();
            assert_eq!(dx.dtype(), DType::BF16);
            (values(y.inner()), values(dx))
        };
        let reference = run(&w, false);
        for (layout, w) in [("[out, in]", &w), ("view of [in, out]", &wt)] {
            let ours = run(w, true);
            for (what, a, e) in [("y", &ours.0, &reference.0), ("dx", &ours.1, &reference.1)] {
                let mut off = 0;
                for (i, (a, e)) in a.iter().zip(e.iter()).enumerate() {
                    assert!((a - e).abs() <= e.abs() / 128.0 + 1e-6, "{layout} {what}[{i}]: {a} vs {e}");
                    off += usize::from(a != e);
                }
                assert!(off * 50 <= a.len(), "{layout} {what}: {off} of {} elements differ", a.len());
            }
        }
    }

    /// The projection with its adapter as one operation against the same sum of burn's matmuls: output
    /// and the gradients of x, A and B to f32 rounding, for both weight layouts, a strided input, an
    /// input that needs no gradient (the first layer's) and a dropout mask on the adapter's input. Same
    /// bound as above: the sums are gemm's in other orders.
    #[test]
    fn project_lora_matches_burns_matmuls_and_their_gradients() {
        let device = Device::flex().autodiff();
        let cases = [
            (300, 200, 257, 16, true, false),
            (40, 33, 17, 3, true, false),
            (64, 48, 80, 8, false, false),
            (300, 200, 257, 16, true, true),
            (64, 48, 80, 8, false, true),
        ];
        for (m, k, n, r, x_grad, dropout) in cases {
            let normal =
                |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let x0 = normal([m, k + 3]).narrow(1, 1, k);
            let w = normal([n, k]);
            let wt = Tensor::<2>::from_data(w.clone().transpose().into_data(), &device).transpose();
            let (a0, b0, g) = (normal([r, k]), normal([n, r]), normal([m, n]));
            let scale = 0.7;
            let draw = dropout.then_some(Dropout { seed: 11 + m as u64, keep: 0.75 });
            // The mask the operation draws, as a tensor for burn's side.
            let mask = draw.map(|d| {
                let values: Vec<f32> =
                    (0..m * k).map(|e| if d.kept(e as u64) { 1.0 / 0.75 } else { 0.0 }).collect();
                Tensor::<2>::from_data(TensorData::new(values, [m, k]), &device)
            });
            let run = |w: &Tensor<2>, ours: bool| {
                let x = if x_grad { x0.clone().require_grad() } else { x0.clone() };
                let (a, b) = (a0.clone().require_grad(), b0.clone().require_grad());
                let y = if ours {
                    project_lora(&x, Frozen::Dense(w), &a, &b, scale, draw).unwrap()
                } else {
                    let xd = match &mask {
                        Some(mask) => x.clone() * mask.clone(),
                        None => x.clone(),
                    };
                    x.clone().matmul(w.clone().transpose())
                        + xd.matmul(a.clone().transpose()).mul_scalar(scale).matmul(b.clone().transpose())
                };
                let grads = (y.clone() * g.clone()).sum().backward();
                let dx = x.grad(&grads).map(values);
                (values(y.inner()), dx, values(a.grad(&grads).unwrap()), values(b.grad(&grads).unwrap()))
            };
            let reference = run(&w, false);
            assert_eq!(reference.1.is_some(), x_grad);
            let tol = 1e-5 * (k.max(n).max(m) as f32).sqrt();
            for (layout, w) in [("[out, in]", &w), ("view of [in, out]", &wt)] {
                let ours = run(w, true);
                assert_eq!(ours.1.is_some(), x_grad, "x gets a gradient exactly when it needs one");
                let dx = [(ours.1.unwrap_or_default(), reference.1.clone().unwrap_or_default())];
                let parts = [
                    ("y", &ours.0, &reference.0),
                    ("dA", &ours.2, &reference.2),
                    ("dB", &ours.3, &reference.3),
                ];
                for (what, a, e) in parts.into_iter().chain(dx.iter().map(|(a, e)| ("dx", a, e))) {
                    assert_eq!(a.len(), e.len(), "{what}");
                    for (i, (a, e)) in a.iter().zip(e.iter()).enumerate() {
                        assert!(
                            (a - e).abs() <= tol * (1.0 + e.abs()),
                            "{m}x{k}x{n} r{r} dropout {dropout} {layout} {what}[{i}]: {a} vs {e}"
                        );
                    }
                }
            }
        }
    }

    /// The counter-based draw keeps values at the requested rate, independently of each other and of the
    /// seed's neighbours: over 200,000 values, within 5 standard deviations.
    #[test]
    fn dropout_keeps_values_at_its_rate() {
        let n = 200_000u64;
        for keep in [0.95, 0.9, 0.5] {
            let d = Dropout { seed: 42, keep };
            let kept = (0..n).filter(|&e| d.kept(e)).count() as f64;
            let sd = (n as f64 * keep * (1.0 - keep)).sqrt();
            assert!((kept - n as f64 * keep).abs() < 5.0 * sd, "keep {keep}: {kept} of {n}");
            // Pairs of neighbours are both kept at keep^2.
            let both = (0..n).filter(|&e| d.kept(2 * e) && d.kept(2 * e + 1)).count() as f64;
            let sd2 = (n as f64 * keep * keep * (1.0 - keep * keep)).sqrt();
            assert!((both - n as f64 * keep * keep).abs() < 5.0 * sd2, "keep {keep}: pairs {both}");
        }
        // Another seed gives another mask.
        let (a, b) = (Dropout { seed: 1, keep: 0.5 }, Dropout { seed: 2, keep: 0.5 });
        let same = (0..n).filter(|&e| a.kept(e) == b.kept(e)).count() as f64;
        assert!((same / n as f64 - 0.5).abs() < 0.01, "{same}");
        let d = Dropout { seed: 3, keep: 0.8 };
        let bits = Bits::draw(d, 3, 130);
        for (i, j) in [(0, 0), (1, 63), (1, 64), (2, 129)] {
            let expected = if d.kept((i * 130 + j) as u64) { 1.25 } else { 0.0 };
            assert_eq!(bits.at(i, j), expected, "[{i}, {j}]");
        }
    }

    #[test]
    fn project_lora_without_autodiff_leaves_a_few_rows_to_the_decode_kernel() {
        let device = Device::flex();
        let normal = |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let (w, a, b) = (normal([24, 20]), normal([4, 20]), normal([24, 4]));
        let x = normal([40, 20]);
        let expected = values(
            x.clone().matmul(w.clone().transpose())
                + x.clone().matmul(a.clone().transpose()).mul_scalar(2.0).matmul(b.clone().transpose()),
        );
        let got = values(project_lora(&x, Frozen::Dense(&w), &a, &b, 2.0, None).unwrap());
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{g} vs {e}");
        }
        let few = x.clone().narrow(0, 0, crate::gemv::MAX_ROWS);
        assert!(project_lora(&few, Frozen::Dense(&w), &a, &b, 2.0, None).is_none());
        // Unless training with dropout: checkpointing's untracked pass draws the masks there.
        let dropout = Some(Dropout { seed: 5, keep: 0.9 });
        assert!(project_lora(&few, Frozen::Dense(&w), &a, &b, 2.0, dropout).is_some());
        assert!(
            project_lora(&x, Frozen::Dense(&w), &a, &Tensor::<2>::ones([24, 5], &device), 2.0, None)
                .is_none(),
            "rank mismatch"
        );
    }

    #[test]
    fn declines_trained_weights_other_dtypes_and_flipped_views() {
        let device = Device::flex();
        let x = Tensor::<2>::ones([4, 3], &device);
        let w = Tensor::<2>::ones([2, 3], &device);
        assert!(project(&x, &w).is_some());
        assert!(project(&x.clone().cast(DType::F16), &w).is_none());
        assert!(project(&x.clone().cast(DType::BF16), &w).is_none(), "mixed dtypes");
        assert!(project(&x.clone().cast(DType::BF16), &w.clone().cast(DType::BF16)).is_some());
        assert!(project(&x, &Tensor::<2>::ones([2, 4], &device)).is_none());
        assert!(project(&x.clone().flip([1]), &w).is_none());
        let ad = Device::flex().autodiff();
        let xa = Tensor::<2>::ones([4, 3], &ad).require_grad();
        assert!(project(&xa, &Tensor::<2>::ones([2, 3], &ad).require_grad()).is_none());
    }
}
