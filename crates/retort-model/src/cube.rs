//! retort's own GPU kernels, written in cubecl (burn's kernel language) and launched on burn's GPU
//! backend (wgpu, CUDA) through burn's backend-extension mechanism, which also queues them in order
//! with burn's fused operations.
//!
//! Each kernel has a reference made of burn tensor operations beside it, and a test that compares the
//! two on the device `RETORT_TEST_DEVICE` names (`tests/parity.rs`; CI runs it on lavapipe).
//!
//! **NF4 dequantization.** burn's operations dequantize a projection in several passes: eight shifts
//! and masks of the packed words, a stack into one `i32` index per value, a gather from the 16-value
//! code book, a broadcast multiply by the block's absmax and a cast, with a 4-byte temporary per
//! value at each step (for an 8B model's 14336 x 4096 MLP weight about 235 MB each). The kernel reads
//! each packed word once, writes its eight values in the compute dtype and keeps nothing else; the
//! absmax (one per 64 values, double-quantized or not) still comes from tensor operations, so both
//! paths round the same products and agree bit for bit.
//!
//! **A projection by an NF4 weight under autodiff** ([`nf4_project`]) is one recorded operation that
//! dequantizes the weight for the forward and again for the input gradient in the backward, as
//! bitsandbytes' `MatMul4Bit` does: autodiff keeps the packed weight (0.52 bytes per value) instead
//! of the dequantized one (2 bytes in bf16) for every projection of the graph.

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{AutodiffBackend, Backend, backend_extension};
use burn::module::Module;
use burn::tensor::{DType, Int, Shape, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{Cube, CubeBackend};
use cubecl::prelude::*;

use crate::nf4::Nf4Weight;

/// One thread per packed word: its eight 4-bit codes (two per byte, the first value in the high
/// nibble of the lowest byte) times the absmax of the block the word lies in. `codes` is padded to
/// whole blocks; values past `output`'s end are not written.
#[cube(launch_unchecked)]
fn nf4_dequantize_kernel<F: Float>(
    codes: &[u32],
    absmax: &[f32],
    book: &[f32],
    output: &mut [F],
    #[comptime] words_per_block: usize,
) {
    let word = ABSOLUTE_POS;
    if word < codes.len() {
        let bits = codes[word];
        let scale = absmax[word / words_per_block];
        let first = word * 8;
        #[unroll]
        for k in 0..4usize {
            let byte = (bits >> u32::cast_from(k * 8)) & 255u32;
            let i = first + 2 * k;
            if i < output.len() {
                output[i] = F::cast_from(book[usize::cast_from(byte >> 4u32)] * scale);
            }
            if i + 1 < output.len() {
                output[i + 1] = F::cast_from(book[usize::cast_from(byte & 15u32)] * scale);
            }
        }
    }
}

/// Output metadata of [`RetortKernels::nf4_dequantize`] before it runs (for fusion's queue).
#[allow(clippy::too_many_arguments, reason = "the signature of the operation it describes")]
fn nf4_meta(
    _codes: &TensorSpec,
    _absmax: &TensorSpec,
    _book: &TensorSpec,
    rows: &usize,
    cols: &usize,
    _blocksize: &usize,
    dtype: &DType,
) -> TensorSpec {
    TensorSpec::new(Shape::new([*rows, *cols]), *dtype)
}

/// The operations retort adds to burn's GPU backend.
#[backend_extension(Cube, Fusion)]
pub trait RetortKernels: Backend {
    /// NF4 codes (the bitsandbytes bytes, four per 32-bit word, padded to whole blocks), one f32 absmax
    /// per block and the 16-value f32 code book to a `[rows, cols]` weight in `dtype`.
    #[fusion(meta = nf4_meta)]
    fn nf4_dequantize(
        codes: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        book: FloatTensor<Self>,
        rows: usize,
        cols: usize,
        blocksize: usize,
        dtype: DType,
    ) -> FloatTensor<Self>;
}

impl RetortKernels for CubeBackend {
    fn nf4_dequantize(
        codes: CubeTensor,
        absmax: CubeTensor,
        book: CubeTensor,
        rows: usize,
        cols: usize,
        blocksize: usize,
        dtype: DType,
    ) -> CubeTensor {
        let (codes, absmax, book) = (into_contiguous(codes), into_contiguous(absmax), into_contiguous(book));
        let client = codes.client.clone();
        let output =
            empty_device_dtype(client.clone(), codes.device.clone(), Shape::new([rows, cols]), dtype);
        let words = codes.meta.shape().num_elements();
        let (absmax_len, book_len) = (absmax.meta.shape().num_elements(), book.meta.shape().num_elements());
        // The bounds the launch below relies on, and a dtype it has a kernel for.
        assert!(
            matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
                && blocksize >= 8
                && blocksize.is_multiple_of(8)
                && words.div_ceil(blocksize / 8) <= absmax_len
                && book_len >= 16
                && words * 8 >= rows * cols,
            "nf4_dequantize: {words} code words, {absmax_len} absmax and {book_len} code book values do \
             not describe a {rows} x {cols} weight in blocks of {blocksize}, or {dtype:?} is not f32, \
             f16 or bf16"
        );
        let cube_dim = CubeDim::new(&client, words);
        let cube_count = cubecl::calculate_cube_count_elemwise(&client, words, cube_dim);
        // SAFETY: the lengths are those of the buffers; the kernel reads `codes` below its length, the
        // absmax of word `w` at `w / words_per_block` (< blocks, as `codes` holds whole blocks), the
        // book at a 4-bit index (16 values) and writes `output` below its length.
        #[allow(unsafe_code, reason = "cubecl's buffer arguments and unchecked launch; bounds argued above")]
        let out_arg = || unsafe { BufferArg::from_raw_parts(output.handle.clone(), rows * cols) };
        #[allow(unsafe_code, reason = "cubecl's buffer arguments and unchecked launch; bounds argued above")]
        unsafe {
            let (c, a, b) = (
                BufferArg::from_raw_parts(codes.handle.clone(), words),
                BufferArg::from_raw_parts(absmax.handle.clone(), absmax_len),
                BufferArg::from_raw_parts(book.handle.clone(), book_len),
            );
            let wpb = blocksize / 8;
            match dtype {
                DType::F32 => nf4_dequantize_kernel::launch_unchecked::<f32>(
                    &client,
                    cube_count,
                    cube_dim,
                    c,
                    a,
                    b,
                    out_arg(),
                    wpb,
                ),
                DType::F16 => nf4_dequantize_kernel::launch_unchecked::<half::f16>(
                    &client,
                    cube_count,
                    cube_dim,
                    c,
                    a,
                    b,
                    out_arg(),
                    wpb,
                ),
                // BF16, as asserted above.
                _ => nf4_dequantize_kernel::launch_unchecked::<half::bf16>(
                    &client,
                    cube_count,
                    cube_dim,
                    c,
                    a,
                    b,
                    out_arg(),
                    wpb,
                ),
            }
        }
        output
    }
}

type AdCube = burn_autodiff::Autodiff<Cube>;

/// The backend primitive of a float tensor on a GPU device, with or without autodiff (a constant: its
/// autodiff node, if any, is dropped). `None` on other backends.
fn float_primitive<const D: usize>(t: &Tensor<D>) -> Option<FloatTensor<Cube>> {
    match t.clone().try_into_primitive::<AdCube>() {
        Ok(p) => Some(p.into_primitive()),
        Err(_) => t.clone().try_into_primitive::<Cube>().ok(),
    }
}

fn int_primitive<const D: usize>(t: &Tensor<D, Int>) -> Option<IntTensor<Cube>> {
    match t.clone().try_into_primitive::<AdCube>() {
        Ok(p) => Some(p),
        Err(_) => t.clone().try_into_primitive::<Cube>().ok(),
    }
}

/// [`RetortKernels::nf4_dequantize`] on tensors of a GPU device, the result on the same device (an
/// untracked autodiff tensor on an autodiff device). `None` off burn's GPU backend.
pub(crate) fn nf4_dequantize(
    codes: &Tensor<1, Int>,
    absmax: &Tensor<1>,
    book: &Tensor<1>,
    shape: [usize; 2],
    blocksize: usize,
    dtype: DType,
) -> Option<Tensor<2>> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) || !blocksize.is_multiple_of(8) {
        return None;
    }
    let (c, a, b) = (int_primitive(codes)?, float_primitive(absmax)?, float_primitive(book)?);
    let out = <Cube as RetortKernels>::nf4_dequantize(c, a, b, shape[0], shape[1], blocksize, dtype);
    Some(if absmax.is_autodiff() {
        Tensor::from_primitive::<AdCube>(<AdCube as AutodiffBackend>::from_inner(out))
    } else {
        Tensor::from_primitive::<Cube>(out)
    })
}

/// The backward of [`nf4_project`]: `dx = dy W`, `W` dequantized again from the packed weight it keeps
/// (on the plain device).
#[derive(Debug)]
struct Nf4ProjectBackward;

impl Backward<Cube, 1> for Nf4ProjectBackward {
    type State = Box<Nf4Weight>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<Cube>(&ops.node);
        let Some(node) = node else { return };
        #[allow(clippy::expect_used, reason = "nf4_project kept it so; a failure is a bug, not bad input")]
        let w = ops
            .state
            .dequantize()
            .try_into_primitive::<Cube>()
            .expect("the kept NF4 weight lives on the plain device of burn's GPU backend");
        grads.register::<Cube>(node.id, Cube::float_matmul(dy, w));
    }
}

/// `x W^T` for `x` `[n, in]` under autodiff on burn's GPU backend, recorded as one operation whose
/// backward dequantizes `q` again (see the module documentation). `None` without autodiff (nothing is
/// kept then) or off the GPU backend.
pub(crate) fn nf4_project(x: &Tensor<2>, q: &Nf4Weight) -> Option<Tensor<2>> {
    if !x.is_autodiff() || x.dims()[1] != q.shape[1] || x.dtype() != q.dtype {
        return None;
    }
    let (xp, node) = x.clone().try_into_primitive::<AdCube>().ok()?.into_parts();
    let kept = Box::new(q.clone().valid());
    let w = kept.dequantize().try_into_primitive::<Cube>().ok()?;
    let y = Cube::float_matmul(xp, Cube::float_transpose(w));
    let recorded = match Nf4ProjectBackward.prepare::<NoCheckpointing>([node]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(kept, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Some(Tensor::from_primitive::<AdCube>(recorded))
}
