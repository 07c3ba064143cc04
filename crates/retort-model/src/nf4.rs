//! A frozen projection weight kept on the device in NF4 (QLoRA's 4-bit NormalFloat) and dequantized
//! inside the forward pass, from tensor operations only, so it runs on every backend (flex, wgpu, cuda)
//! without a host round-trip.
//!
//! The parts are bitsandbytes' layout (see `retort_lora::nf4`, which quantizes and is the reference):
//! two 4-bit codes per byte, the first value in the high nibble, one absmax per block of `blocksize`
//! values, optionally double-quantized (8-bit codes, one f32 scale per 256 blocks, an f32 offset). On
//! the device the bytes are packed four to an `i32` word (little-endian), because 32-bit integers are
//! the one integer type every backend has; unpacking is shifts and masks.
//!
//! Dequantization computes, in f32 and in the reference's order of rounding,
//! `absmax[b] = MAP[dq_code[b]] * scale[b / 256] + offset` (double quantization), then
//! `w[i] = NF4[code[i]] * absmax[i / blocksize]`, and casts to the compute dtype; so it equals
//! `Nf4Tensor::dequantize` bit for bit on any backend that rounds each f32 operation (no fused
//! multiply-add across the two steps).
//!
//! Memory: only the packed parts persist. The dense weight exists during a forward; where the matmul
//! is burn's, autodiff keeps it for the backward pass (it saves the right-hand side of a matmul), so a
//! step holds one compute-dtype copy of the projections at its peak. Not on the CPU in f32, where the
//! projection with its adapter is one operation whose backward dequantizes again
//! ([`crate::dense::project_lora`], as bitsandbytes' `MatMul4Bit` does), nor on burn's GPU backend,
//! where the projection is such an operation too ([`Nf4Weight::project_recorded`]). The fast
//! dequantizations, a direct parallel pass on the CPU and one kernel on GPUs ([`crate::cube`]), give
//! the tensor operations' bits.

use burn::module::Module;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use rayon::prelude::*;

/// The per-block scales of an [`Nf4Weight`] on the device.
#[derive(Module, Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per NF4 projection; tensor handles, not data, make up the size"
)]
pub enum Nf4Scales {
    /// One f32 absmax per block.
    Plain(Tensor<1>),
    /// Double-quantized absmax.
    Double(DoubleQuantScales),
}

/// Double-quantized absmax on the device.
#[derive(Module, Debug)]
pub struct DoubleQuantScales {
    /// The 8-bit codes, four per word (first block in the lowest byte), zero-padded to whole words.
    pub codes: Tensor<1, Int>,
    /// One f32 scale per 256 blocks.
    pub scales: Tensor<1>,
    /// The 256-entry code book of the codes (bitsandbytes' signed dynamic map), f32.
    pub code_book: Tensor<1>,
    /// The mean added back.
    #[module(skip)]
    pub offset: f32,
}

/// A weight `[out, in]` stored as NF4 on the device; see the module documentation.
#[derive(Module, Debug)]
pub struct Nf4Weight {
    /// Packed 4-bit codes: the bitsandbytes bytes four per `i32` word, zero-padded to whole blocks.
    pub codes: Tensor<1, Int>,
    /// The per-block absmax.
    pub scales: Nf4Scales,
    /// The 16 NF4 values, f32.
    pub code_book: Tensor<1>,
    /// `[out, in]`.
    #[module(skip)]
    pub shape: [usize; 2],
    /// Values per block.
    #[module(skip)]
    pub blocksize: usize,
    /// The dtype the forward computes in.
    #[module(skip)]
    pub dtype: DType,
}

/// Host-side absmax handed to [`Nf4Weight::new`].
#[derive(Debug, Clone, Copy)]
pub enum HostScales<'a> {
    /// One f32 per block.
    Plain(&'a [f32]),
    /// Double-quantized: one code per block, one scale per 256 blocks, the offset, and the code book.
    Double {
        /// 8-bit codes, one per block.
        codes: &'a [u8],
        /// f32 scales, one per 256 blocks.
        scales: &'a [f32],
        /// The mean of the original absmax.
        offset: f32,
        /// The 256 values the codes index.
        code_book: &'a [f32; 256],
    },
}

/// Host-side parts of an NF4 weight, in bitsandbytes' layout.
#[derive(Debug, Clone, Copy)]
pub struct HostNf4<'a> {
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Values per block (even, at least 8).
    pub blocksize: usize,
    /// `numel.div_ceil(2)` bytes, two codes per byte, first in the high nibble.
    pub codes: &'a [u8],
    /// The per-block absmax.
    pub scales: HostScales<'a>,
    /// The 16 values the 4-bit codes index.
    pub code_book: &'a [f32; 16],
}

/// Bytes as little-endian `i32` words, zero-padded to `words` words.
fn words(bytes: &[u8], words: usize) -> Vec<i32> {
    let mut out = vec![0i32; words];
    for (w, chunk) in out.iter_mut().zip(bytes.chunks(4)) {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = i32::from_le_bytes(b);
    }
    out
}

fn int_tensor(words: Vec<i32>, device: &Device) -> Tensor<1, Int> {
    let n = words.len();
    Tensor::from_data(TensorData::new(words, [n]), (device, DType::I32))
}

fn float_tensor(values: &[f32], device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), (device, DType::F32))
}

/// The `width`-bit fields of each word, lowest shifts first in `shifts` order, flattened:
/// `[words * shifts.len()]` indices.
fn unpack(words: Tensor<1, Int>, shifts: &[u32], mask: i32) -> Tensor<1, Int> {
    let n = words.dims()[0];
    let fields: Vec<Tensor<1, Int>> = shifts
        .iter()
        .map(|&s| words.clone().bitwise_right_shift_scalar(s).bitwise_and_scalar(mask))
        .collect();
    Tensor::stack::<2>(fields, 1).reshape([n * shifts.len()])
}

/// Nibble shifts of a little-endian word, in value order: byte 0's high nibble is value 0.
const NIBBLE_SHIFTS: [u32; 8] = [4, 0, 12, 8, 20, 16, 28, 24];
/// Byte shifts of a little-endian word, in value order.
const BYTE_SHIFTS: [u32; 4] = [0, 8, 16, 24];

impl Nf4Weight {
    /// Uploads the parts to `device`; the forward will compute in `dtype`. Errors (as text) when the
    /// lengths do not fit the shape and blocksize.
    pub fn new(host: HostNf4<'_>, dtype: DType, device: &Device) -> Result<Nf4Weight, String> {
        let [out, inp] = host.shape;
        let numel = out * inp;
        let bs = host.blocksize;
        if numel == 0 || bs < 8 || !bs.is_multiple_of(8) {
            return Err(format!("shape {:?} with blocksize {bs} cannot be NF4", host.shape));
        }
        if host.codes.len() != numel.div_ceil(2) {
            return Err(format!("{} code bytes for {numel} values", host.codes.len()));
        }
        let blocks = numel.div_ceil(bs);
        // Whole blocks of codes, so the dequantization is one broadcast multiply.
        let codes = int_tensor(words(host.codes, blocks * bs / 8), device);
        let scales = match host.scales {
            HostScales::Plain(a) if a.len() == blocks => Nf4Scales::Plain(float_tensor(a, device)),
            HostScales::Double { codes, scales, offset, code_book }
                if codes.len() == blocks && scales.len() == blocks.div_ceil(256) =>
            {
                Nf4Scales::Double(DoubleQuantScales {
                    codes: int_tensor(words(codes, blocks.div_ceil(4)), device),
                    scales: float_tensor(scales, device),
                    code_book: float_tensor(code_book, device),
                    offset,
                })
            }
            _ => return Err(format!("absmax lengths do not fit {blocks} blocks")),
        };
        Ok(Nf4Weight {
            codes,
            scales,
            code_book: float_tensor(host.code_book, device),
            shape: host.shape,
            blocksize: bs,
            dtype,
        })
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    fn blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// The device the parts live on.
    pub fn device(&self) -> Device {
        self.code_book.device()
    }

    /// Every block's absmax, f32 `[blocks]`.
    pub fn absmax(&self) -> Tensor<1> {
        match &self.scales {
            Nf4Scales::Plain(a) => a.clone(),
            Nf4Scales::Double(d) => {
                let blocks = self.blocks();
                let groups = d.scales.dims()[0];
                let codes = unpack(d.codes.clone(), &BYTE_SHIFTS, 0xff).slice(0..blocks);
                let per_block =
                    d.scales.clone().reshape([groups, 1]).expand([groups, 256]).reshape([groups * 256]);
                let per_block = if groups * 256 == blocks { per_block } else { per_block.slice(0..blocks) };
                // Two roundings, product then sum, as the reference does.
                (d.code_book.clone().select(0, codes) * per_block).add_scalar(d.offset)
            }
        }
    }

    /// The dense weight `[out, in]` in the compute dtype, computed from the packed parts.
    pub fn dequantize(&self) -> Tensor<2> {
        self.dequantize_fast().unwrap_or_else(|| self.dequantize_ops())
    }

    /// The dense weight by the device's direct path: one parallel pass on the CPU in f32, one kernel
    /// on burn's GPU backend ([`crate::cube`]). `None` where there is none (the CPU in 16-bit dtypes,
    /// builds without GPU features), where [`Nf4Weight::dequantize`] uses tensor operations.
    pub fn dequantize_fast(&self) -> Option<Tensor<2>> {
        if let Some(w) = self.dequantize_host() {
            return Some(w);
        }
        #[cfg(feature = "gpu-kernels")]
        if let Some(w) = crate::cube::nf4_dequantize(
            &self.codes,
            &self.absmax(),
            &self.code_book,
            self.shape,
            self.blocksize,
            self.dtype,
        ) {
            return Some(w);
        }
        None
    }

    /// `x W^T` for `x` `[n, in]` on burn's GPU backend under autodiff, as one recorded operation that
    /// dequantizes for the forward and again in the backward, so that autodiff keeps this packed weight
    /// instead of the dense one (bitsandbytes' `MatMul4Bit`; [`crate::cube`]). `None` elsewhere: the
    /// caller multiplies by [`Nf4Weight::dequantize`] (the CPU has its own fused operation,
    /// [`crate::dense::project_lora`]).
    pub fn project_recorded(&self, x: &Tensor<2>) -> Option<Tensor<2>> {
        #[cfg(feature = "gpu-kernels")]
        return crate::cube::nf4_project(x, self);
        #[cfg(not(feature = "gpu-kernels"))]
        {
            let _ = x;
            None
        }
    }

    /// The dense weight from burn's tensor operations alone: what [`Nf4Weight::dequantize`]'s faster
    /// paths (the CPU pass, the GPU kernel) are tested and measured against.
    pub fn dequantize_reference(&self) -> Tensor<2> {
        self.dequantize_ops()
    }

    /// On the CPU in f32: the same products, `NF4[code] * absmax`, computed directly with the blocks in
    /// parallel, where burn's operations unpack, gather and multiply in several passes over the weight
    /// (a training step of QLoRA dequantizes every projection twice). `None` elsewhere.
    fn dequantize_host(&self) -> Option<Tensor<2>> {
        let device = self.device();
        if self.dtype != DType::F32 || !crate::device::is_cpu(&device) {
            return None;
        }
        let codes = self.codes.clone().into_data();
        let codes = codes.as_slice::<i32>().ok()?;
        let absmax = self.absmax().into_data();
        let absmax = absmax.as_slice::<f32>().ok()?;
        let book = self.code_book.clone().into_data();
        let book = book.as_slice::<f32>().ok()?;
        let (numel, bs) = (self.numel(), self.blocksize);
        if codes.len() * 8 < numel || absmax.len() * bs < numel || book.len() != 16 {
            return None;
        }
        let mut out = vec![0f32; numel];
        out.par_chunks_mut(bs).zip(absmax.par_iter()).enumerate().for_each(|(b, (chunk, &scale))| {
            for (j, v) in chunk.iter_mut().enumerate() {
                let i = b * bs + j;
                let code = (codes[i / 8] as u32 >> NIBBLE_SHIFTS[i % 8]) & 0x0f;
                *v = book[code as usize] * scale;
            }
        });
        Some(Tensor::from_data(TensorData::new(out, self.shape), (&device, DType::F32)))
    }

    /// [`Nf4Weight::dequantize`] from tensor operations, on any device.
    fn dequantize_ops(&self) -> Tensor<2> {
        let (numel, blocks, bs) = (self.numel(), self.blocks(), self.blocksize);
        let codes = unpack(self.codes.clone(), &NIBBLE_SHIFTS, 0x0f);
        let values = self.code_book.clone().select(0, codes).reshape([blocks, bs]);
        let w = (values * self.absmax().reshape([blocks, 1])).reshape([blocks * bs]);
        let w = if blocks * bs == numel { w } else { w.slice(0..numel) };
        let w = w.reshape(self.shape);
        if self.dtype == DType::F32 { w } else { w.cast(self.dtype) }
    }

    /// Bytes the quantized parts occupy on the device (code books excluded, like the reference's
    /// count; the double-quantization offset counted as 4 bytes).
    pub fn storage_bytes(&self) -> usize {
        let ints = |t: &Tensor<1, Int>| t.dtype().size() * t.dims()[0];
        let floats = |t: &Tensor<1>| t.dtype().size() * t.dims()[0];
        ints(&self.codes)
            + match &self.scales {
                Nf4Scales::Plain(a) => floats(a),
                Nf4Scales::Double(d) => ints(&d.codes) + floats(&d.scales) + 4,
            }
    }
}
