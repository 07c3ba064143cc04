//! NF4 (4-bit NormalFloat) quantization of frozen base weights for QLoRA, bit for bit as bitsandbytes
//! does it (`bitsandbytes.functional.quantize_4bit(x, blocksize, compress_statistics, quant_type="nf4")`
//! on CPU tensors, version 0.50.2; the parity fixtures come from it).
//!
//! # Algorithm
//! The tensor is flattened (row-major) and cut into blocks of `blocksize` values (64 by default); the
//! last block holds the remainder when the count is not a multiple. Per block, `absmax = max |x|`, each
//! value is scaled into [-1, 1] and replaced by the index of the nearest of the 16 [`NF4`] levels
//! ([`NF4_THRESHOLDS`] decide, ties to the lower code). Dequantization is `NF4[code] * absmax`.
//!
//! With double quantization the f32 absmax (one per block, 32 bits per 64 weights) are themselves
//! quantized: their mean is subtracted (the `offset`), and the centred values are coded in 8 bits with
//! the [`DYNAMIC_MAP`] in blocks of [`ABSMAX_BLOCKSIZE`], each block keeping its own f32 `scale` (its
//! largest |value|). A block's absmax is then `DYNAMIC_MAP[code] * scale + offset`. At blocksize 64
//! this stores 4 + 8/64 + 32/(64 * 256) ≈ 4.127 bits per weight.
//!
//! # Layout (bitsandbytes' own, so checkpoints and device kernels can share it)
//! - `codes`: `numel.div_ceil(2)` bytes. Value `2i` is the high nibble of byte `i`, value `2i + 1` the
//!   low nibble. An odd count leaves a pad nibble, always [`NF4_ZERO_CODE`]. Block `b` starts at byte
//!   `b * blocksize / 2` (block sizes are even).
//! - [`Absmax::F32`]: one f32 per block, `numel.div_ceil(blocksize)`.
//! - [`Absmax::Double`]: `codes` one byte per block; `scales` one f32 per 256 blocks
//!   (`blocks.div_ceil(256)`, block `b` uses `scales[b / 256]`); `offset` one f32.
//!
//! # Where bitsandbytes differs from itself
//! The fixtures pin its CPU path. Its CUDA kernels agree on the NF4 thresholds and the layout but not in
//! four corners, each worth at most a rounding step: an all-zero block gets code 0 on CUDA (7 here; both
//! dequantize to zero); the partial last block is multiplied by the reciprocal on CUDA (divided here),
//! which can move a value sitting on a threshold to the next code; the 8-bit absmax codes come from a
//! search of the map on CUDA but from a 65536-bin table on the CPU, which can pick a neighbouring code
//! (at most 2/65535 of the block's scale away); and the offset is a differently ordered f32 sum (see
//! [`torch_mean`]). Dequantization follows the flat blocks above, as CUDA and bitsandbytes' PyTorch code
//! do; its native AVX-512 CPU kernel indexes the absmax per row instead, which is wrong for rows that are
//! a multiple of 16 values but not of the blocksize.

mod double_quant;
mod kernel;
#[cfg(test)]
mod reference;
mod tables;

use std::fmt;

use half::{bf16, f16};
use rayon::prelude::*;
use retort_hf::{Dtype, TensorView};

pub use double_quant::{ABSMAX_BLOCKSIZE, torch_mean};
pub use tables::{DYNAMIC_MAP, NF4, NF4_THRESHOLDS, NF4_ZERO_CODE};

/// The block size QLoRA uses.
pub const DEFAULT_BLOCKSIZE: usize = 64;

/// The block sizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Values per parallel task when quantizing or dequantizing: large enough that scheduling is noise.
const TASK_VALUES: usize = 1 << 15;

/// A problem quantizing, or with the parts of a quantized tensor.
#[derive(Debug, thiserror::Error)]
pub enum Nf4Error {
    /// No values to quantize.
    #[error("cannot quantize an empty tensor (shape {shape:?})")]
    Empty {
        /// The shape given.
        shape: Vec<usize>,
    },
    /// The shape's element count does not fit in `usize`.
    #[error("shape {shape:?} has more elements than fit in memory")]
    ShapeOverflow {
        /// The shape given.
        shape: Vec<usize>,
    },
    /// The values do not fill the shape.
    #[error("shape {shape:?} holds {expected} values but {found} were given")]
    ShapeMismatch {
        /// The shape given.
        shape: Vec<usize>,
        /// Its element count.
        expected: usize,
        /// The number of values.
        found: usize,
    },
    /// A block size bitsandbytes does not use.
    #[error("blocksize {blocksize} is not supported; use one of 32, 64, 128, 256, 512, 1024, 2048, 4096")]
    Blocksize {
        /// The block size given.
        blocksize: usize,
    },
    /// NaN or infinity in the input.
    #[error("element {} is {value}; NF4 needs finite weights (is the checkpoint corrupt?)", position(*index, shape))]
    NonFinite {
        /// Flat (row-major) index of the first non-finite value.
        index: usize,
        /// The tensor's shape, to name the element.
        shape: Vec<usize>,
        /// The value.
        value: f32,
    },
    /// The mean of the absmax is not finite (weights near f32's limit).
    #[error(
        "the block absmax values sum past f32's range, so they cannot be double-quantized; quantize without double quantization"
    )]
    DoubleQuantOverflow,
    /// A part of a quantized tensor has the wrong length or a non-finite value.
    #[error("`{part}`: {reason}")]
    Parts {
        /// Which part (`codes`, `absmax`, `absmax.scales`, ...).
        part: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A block index past the end.
    #[error("block {block} is out of range: the tensor has {blocks} blocks")]
    BlockOutOfRange {
        /// The index asked for.
        block: usize,
        /// The number of blocks.
        blocks: usize,
    },
    /// An output buffer of the wrong length.
    #[error("the output buffer holds {found} values but {expected} are needed")]
    OutputLength {
        /// Values needed.
        expected: usize,
        /// The buffer's length.
        found: usize,
    },
    /// A checkpoint tensor whose dtype is not a float NF4 can start from.
    #[error("tensor `{name}` is {dtype}; NF4 quantizes F32, F16 and BF16 tensors")]
    Dtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// A checkpoint tensor whose bytes do not match its shape and dtype.
    #[error("tensor `{name}` has {found} bytes but its shape and dtype need {expected}")]
    DataLength {
        /// The tensor.
        name: String,
        /// Bytes needed.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// Any of the above, for a named checkpoint tensor.
    #[error("tensor `{name}`: {source}")]
    Tensor {
        /// The tensor.
        name: String,
        /// What went wrong.
        source: Box<Nf4Error>,
    },
}

/// `[r, c] (flat index i)` for a 2-D or higher shape, `index i` otherwise.
fn position(index: usize, shape: &[usize]) -> String {
    if shape.len() < 2 {
        return format!("index {index}");
    }
    let mut coords = vec![0; shape.len()];
    let mut rest = index;
    for (c, &d) in coords.iter_mut().zip(shape).rev() {
        *c = rest % d.max(1);
        rest /= d.max(1);
    }
    let coords: Vec<String> = coords.iter().map(usize::to_string).collect();
    format!("[{}] (flat index {index})", coords.join(", "))
}

/// The double-quantized absmax of a tensor: see the module documentation for the layout.
#[derive(Clone, PartialEq)]
pub struct DoubleQuant {
    codes: Vec<u8>,
    scales: Vec<f32>,
    offset: f32,
}

impl DoubleQuant {
    /// Assembles the parts (e.g. read from a bitsandbytes checkpoint: `absmax`, `nested_absmax`,
    /// `nested_offset`), checking that there is one scale per 256 codes and that the floats are finite.
    pub fn new(codes: Vec<u8>, scales: Vec<f32>, offset: f32) -> Result<DoubleQuant, Nf4Error> {
        let expected = codes.len().div_ceil(ABSMAX_BLOCKSIZE);
        if scales.len() != expected {
            return Err(Nf4Error::Parts {
                part: "absmax.scales",
                reason: format!(
                    "{} scales for {} codes; expected {expected} (one per {ABSMAX_BLOCKSIZE})",
                    scales.len(),
                    codes.len()
                ),
            });
        }
        check_finite("absmax.scales", &scales)?;
        check_finite("absmax.offset", &[offset])?;
        Ok(DoubleQuant { codes, scales, offset })
    }

    /// One 8-bit code per NF4 block, indices into [`DYNAMIC_MAP`].
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// One f32 scale per [`ABSMAX_BLOCKSIZE`] codes.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The mean of the original absmax, added back after scaling.
    pub fn offset(&self) -> f32 {
        self.offset
    }

    /// The absmax of NF4 block `block`, if it exists.
    pub fn get(&self, block: usize) -> Option<f32> {
        let code = *self.codes.get(block)?;
        let scale = *self.scales.get(block / ABSMAX_BLOCKSIZE)?;
        Some(double_quant::dequantize(code, scale, self.offset))
    }
}

impl fmt::Debug for DoubleQuant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DoubleQuant")
            .field("codes", &self.codes.len())
            .field("scales", &self.scales.len())
            .field("offset", &self.offset)
            .finish()
    }
}

/// The per-block scales of an NF4 tensor.
#[derive(Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    F32(Vec<f32>),
    /// Double-quantized: 8 bits per block plus an f32 per 256 blocks and an offset.
    Double(DoubleQuant),
}

impl Absmax {
    /// Number of blocks described.
    pub fn len(&self) -> usize {
        match self {
            Absmax::F32(v) => v.len(),
            Absmax::Double(d) => d.codes.len(),
        }
    }

    /// True when it describes no block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The absmax of block `block`, if it exists.
    pub fn get(&self, block: usize) -> Option<f32> {
        match self {
            Absmax::F32(v) => v.get(block).copied(),
            Absmax::Double(d) => d.get(block),
        }
    }

    /// Every block's absmax as f32 (dequantized when double-quantized).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Absmax::F32(v) => v.clone(),
            Absmax::Double(d) => (0..d.codes.len()).filter_map(|b| d.get(b)).collect(),
        }
    }

    /// Bits of storage: 32 per block, or 8 per block plus 32 per scale plus 32 for the offset.
    pub fn bits(&self) -> usize {
        match self {
            Absmax::F32(v) => 32 * v.len(),
            Absmax::Double(d) => 8 * d.codes.len() + 32 * d.scales.len() + 32,
        }
    }
}

impl fmt::Debug for Absmax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Absmax::F32(v) => write!(f, "Absmax::F32({} blocks)", v.len()),
            Absmax::Double(d) => write!(f, "Absmax::{d:?}"),
        }
    }
}

fn check_finite(part: &'static str, values: &[f32]) -> Result<(), Nf4Error> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Nf4Error::Parts { part, reason: format!("entry {i} is {}", values[i]) }),
    }
}

/// A tensor in NF4: packed 4-bit codes and per-block absmax, in bitsandbytes' layout (see the module
/// documentation). Immutable once built; [`Nf4Tensor::from_parts`] and [`Nf4Tensor::into_parts`] move
/// the buffers in and out without copies.
#[derive(Clone, PartialEq)]
pub struct Nf4Tensor {
    shape: Vec<usize>,
    numel: usize,
    blocksize: usize,
    codes: Vec<u8>,
    absmax: Absmax,
}

impl fmt::Debug for Nf4Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nf4Tensor")
            .field("shape", &self.shape)
            .field("blocksize", &self.blocksize)
            .field("absmax", &self.absmax)
            .field("bits_per_parameter", &self.bits_per_parameter())
            .finish()
    }
}

/// The element count of a quantizable shape.
fn checked_numel(shape: &[usize], blocksize: usize) -> Result<usize, Nf4Error> {
    if !BLOCKSIZES.contains(&blocksize) {
        return Err(Nf4Error::Blocksize { blocksize });
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Nf4Error::ShapeOverflow { shape: shape.to_vec() })?;
    if numel == 0 {
        return Err(Nf4Error::Empty { shape: shape.to_vec() });
    }
    Ok(numel)
}

impl Nf4Tensor {
    /// Assembles a quantized tensor from its parts (e.g. a bitsandbytes checkpoint's `weight` bytes and
    /// absmax), checking every length against `shape` and `blocksize`.
    pub fn from_parts(
        shape: Vec<usize>,
        blocksize: usize,
        codes: Vec<u8>,
        absmax: Absmax,
    ) -> Result<Nf4Tensor, Nf4Error> {
        let numel = checked_numel(&shape, blocksize)?;
        if codes.len() != numel.div_ceil(2) {
            return Err(Nf4Error::Parts {
                part: "codes",
                reason: format!("{} bytes for {numel} values; expected {}", codes.len(), numel.div_ceil(2)),
            });
        }
        let blocks = numel.div_ceil(blocksize);
        if absmax.len() != blocks {
            return Err(Nf4Error::Parts {
                part: "absmax",
                reason: format!("{} entries for {blocks} blocks of {blocksize}", absmax.len()),
            });
        }
        if let Absmax::F32(v) = &absmax {
            check_finite("absmax", v)?;
        }
        Ok(Nf4Tensor { shape, numel, blocksize, codes, absmax })
    }

    /// The parts: shape, blocksize, packed codes and absmax.
    pub fn into_parts(self) -> (Vec<usize>, usize, Vec<u8>, Absmax) {
        (self.shape, self.blocksize, self.codes, self.absmax)
    }

    /// The original shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Values per block.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// Number of blocks (the last may be partial).
    pub fn num_blocks(&self) -> usize {
        self.numel.div_ceil(self.blocksize)
    }

    /// The packed codes: two per byte, first value in the high nibble.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// The per-block scales.
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }

    /// The 4-bit code of value `index`, if it exists.
    pub fn code(&self, index: usize) -> Option<u8> {
        if index >= self.numel {
            return None;
        }
        let byte = self.codes[index / 2];
        Some(if index.is_multiple_of(2) { byte >> 4 } else { byte & 0x0f })
    }

    /// Values in block `block` (the blocksize, or the remainder for the last block).
    pub fn block_len(&self, block: usize) -> usize {
        self.numel.saturating_sub(block.saturating_mul(self.blocksize)).min(self.blocksize)
    }

    /// Storage bits per value: the codes (with the pad nibble) and the absmax. The code books are
    /// constants and not counted. ≈ 4.127 with double quantization at blocksize 64, 4.5 without.
    pub fn bits_per_parameter(&self) -> f64 {
        (8 * self.codes.len() + self.absmax.bits()) as f64 / self.numel as f64
    }

    /// Bytes of storage: the codes and the absmax.
    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + self.absmax.bits() / 8
    }

    /// Dequantizes block `block` into `out[..self.block_len(block)]` and returns that length.
    pub fn dequantize_block_into(&self, block: usize, out: &mut [f32]) -> Result<usize, Nf4Error> {
        let blocks = self.num_blocks();
        let scale = self.absmax.get(block).ok_or(Nf4Error::BlockOutOfRange { block, blocks })?;
        let len = self.block_len(block);
        let found = out.len();
        let out = out.get_mut(..len).ok_or(Nf4Error::OutputLength { expected: len, found })?;
        let start = block * self.blocksize / 2;
        kernel::dequantize_block(&self.codes[start..], scale, out);
        Ok(len)
    }

    /// Dequantizes every value into `out` (exactly [`Nf4Tensor::numel`] long), in parallel.
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<(), Nf4Error> {
        if out.len() != self.numel {
            return Err(Nf4Error::OutputLength { expected: self.numel, found: out.len() });
        }
        let absmax = self.absmax.to_f32();
        let per_task = (TASK_VALUES / self.blocksize).max(1);
        out.par_chunks_mut(per_task * self.blocksize)
            .zip(self.codes.par_chunks(per_task * self.blocksize / 2))
            .zip(absmax.par_chunks(per_task))
            .for_each(|((out, codes), absmax)| {
                let blocks = out.chunks_mut(self.blocksize).zip(codes.chunks(self.blocksize / 2));
                for ((out, codes), &scale) in blocks.zip(absmax) {
                    kernel::dequantize_block(codes, scale, out);
                }
            });
        Ok(())
    }

    /// Every value as f32: `NF4[code] * absmax` of its block, flat in row-major order.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel];
        // Cannot fail: the buffer has exactly `numel` values.
        let _ = self.dequantize_into(&mut out);
        out
    }
}

/// Values to quantize: `count` values from `start` as f32, borrowed when stored as f32, decoded into
/// `scratch` if not.
trait Source: Sync {
    fn read<'a>(&'a self, start: usize, count: usize, scratch: &'a mut Vec<f32>) -> &'a [f32];
}

impl Source for [f32] {
    fn read<'a>(&'a self, start: usize, count: usize, _: &'a mut Vec<f32>) -> &'a [f32] {
        &self[start..start + count]
    }
}

impl Source for [bf16] {
    fn read<'a>(&'a self, start: usize, count: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        scratch.clear();
        scratch.extend(self[start..start + count].iter().map(|v| v.to_f32()));
        scratch
    }
}

impl Source for [f16] {
    fn read<'a>(&'a self, start: usize, count: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        scratch.clear();
        scratch.extend(self[start..start + count].iter().map(|v| v.to_f32()));
        scratch
    }
}

/// Little-endian bytes of a checkpoint tensor (possibly unaligned in the mapped file).
struct LeBytes<'a> {
    data: &'a [u8],
    dtype: Float,
}

#[derive(Clone, Copy)]
enum Float {
    F32,
    F16,
    BF16,
}

impl Source for LeBytes<'_> {
    fn read<'a>(&'a self, start: usize, count: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        scratch.clear();
        match self.dtype {
            Float::F32 => {
                let bytes = self.data[4 * start..4 * (start + count)].chunks_exact(4);
                scratch.extend(bytes.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
            Float::F16 => {
                let bytes = self.data[2 * start..2 * (start + count)].chunks_exact(2);
                scratch.extend(bytes.map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()));
            }
            Float::BF16 => {
                let bytes = self.data[2 * start..2 * (start + count)].chunks_exact(2);
                scratch.extend(bytes.map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()));
            }
        }
        scratch
    }
}

/// The shared driver: blocks in parallel, then the optional second quantization.
fn quantize_source<S: Source + ?Sized>(
    source: &S,
    len: usize,
    shape: &[usize],
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor, Nf4Error> {
    let numel = checked_numel(shape, blocksize)?;
    if len != numel {
        return Err(Nf4Error::ShapeMismatch { shape: shape.to_vec(), expected: numel, found: len });
    }
    let blocks = numel.div_ceil(blocksize);
    let mut codes = vec![0u8; numel.div_ceil(2)];
    let mut absmax = vec![0.0f32; blocks];
    let per_task = (TASK_VALUES / blocksize).max(1);
    let first_bad = codes
        .par_chunks_mut(per_task * blocksize / 2)
        .zip(absmax.par_chunks_mut(per_task))
        .enumerate()
        .map_init(Vec::new, |scratch: &mut Vec<f32>, (task, (codes, absmax))| {
            let start = task * per_task * blocksize;
            let count = (numel - start).min(per_task * blocksize);
            let values = source.read(start, count, scratch);
            let blocks = values.chunks(blocksize).zip(codes.chunks_mut(blocksize / 2)).zip(absmax);
            for (b, ((values, codes), absmax)) in blocks.enumerate() {
                let full = values.len() == blocksize;
                match kernel::quantize_block(values, full, codes) {
                    Ok(a) => *absmax = a,
                    Err(offset) => return Some(start + b * blocksize + offset),
                }
            }
            None
        })
        .flatten()
        .min();
    if let Some(index) = first_bad {
        let value = source.read(index, 1, &mut Vec::new())[0];
        return Err(Nf4Error::NonFinite { index, shape: shape.to_vec(), value });
    }
    let absmax = if double_quant {
        let q = double_quant::quantize(&absmax);
        if !q.offset.is_finite() {
            return Err(Nf4Error::DoubleQuantOverflow);
        }
        Absmax::Double(DoubleQuant { codes: q.codes, scales: q.scales, offset: q.offset })
    } else {
        Absmax::F32(absmax)
    };
    Ok(Nf4Tensor { shape: shape.to_vec(), numel, blocksize, codes, absmax })
}

/// Quantizes f32 `values` (row-major, `shape`) to NF4 in blocks of `blocksize` (64 for QLoRA), with
/// the absmax double-quantized when `double_quant` is set (QLoRA's default).
///
/// Errors on an empty or zero-sized shape, a count that does not match it, a block size bitsandbytes
/// does not use, or a NaN or infinite value (the first one is named).
pub fn quantize(
    values: &[f32],
    shape: &[usize],
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor, Nf4Error> {
    quantize_source(values, values.len(), shape, blocksize, double_quant)
}

/// [`quantize`] from bf16 values (converted exactly, block by block, never as a whole f32 copy).
pub fn quantize_bf16(
    values: &[bf16],
    shape: &[usize],
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor, Nf4Error> {
    quantize_source(values, values.len(), shape, blocksize, double_quant)
}

/// [`quantize`] from f16 values (converted exactly, block by block, never as a whole f32 copy).
pub fn quantize_f16(
    values: &[f16],
    shape: &[usize],
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor, Nf4Error> {
    quantize_source(values, values.len(), shape, blocksize, double_quant)
}

/// [`quantize`] straight from a checkpoint tensor (F32, F16 or BF16, read from the mapped bytes block
/// by block), so a loader can quantize a model tensor by tensor without an f32 copy of any of them.
/// Errors name the tensor.
pub fn quantize_tensor(
    view: &TensorView<'_>,
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor, Nf4Error> {
    let named = |source: Nf4Error| Nf4Error::Tensor { name: view.name.to_string(), source: Box::new(source) };
    let dtype = match view.dtype {
        Dtype::F32 => Float::F32,
        Dtype::F16 => Float::F16,
        Dtype::BF16 => Float::BF16,
        Dtype::Other(d) => return Err(Nf4Error::Dtype { name: view.name.to_string(), dtype: d.clone() }),
    };
    let numel = checked_numel(view.shape, blocksize).map_err(named)?;
    let expected = numel
        .checked_mul(view.dtype.size())
        .ok_or_else(|| named(Nf4Error::ShapeOverflow { shape: view.shape.to_vec() }))?;
    if view.data.len() != expected {
        return Err(Nf4Error::DataLength { name: view.name.to_string(), expected, found: view.data.len() });
    }
    let source = LeBytes { data: view.data, dtype };
    quantize_source(&source, numel, view.shape, blocksize, double_quant).map_err(named)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Values with the awkward cases mixed in: exact zeros, subnormals, ties at thresholds, outliers.
    fn values() -> impl Strategy<Value = Vec<f32>> {
        let value = prop_oneof![
            6 => -4.0f32..4.0,
            1 => Just(0.0f32),
            1 => -1.0e-39f32..1.0e-39,
            1 => proptest::sample::select(NF4_THRESHOLDS.to_vec()),
            1 => -1.0e30f32..1.0e30,
        ];
        proptest::collection::vec(value, 1..2500)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn fast_path_matches_the_reference(values in values(), bs in proptest::sample::select(vec![32usize, 64, 128, 256])) {
            let (codes, absmax, (dq_codes, scales, offset)) = reference::quantize(&values, bs);
            let plain = quantize(&values, &[values.len()], bs, false).unwrap();
            prop_assert_eq!(plain.codes(), &codes[..]);
            prop_assert_eq!(plain.absmax(), &Absmax::F32(absmax.clone()));
            let double = quantize(&values, &[values.len()], bs, true).unwrap();
            prop_assert_eq!(double.codes(), &codes[..]);
            let Absmax::Double(d) = double.absmax() else { panic!("not double-quantized") };
            prop_assert_eq!(d.codes(), &dq_codes[..]);
            prop_assert_eq!(d.scales(), &scales[..]);
            prop_assert_eq!(d.offset().to_bits(), offset.to_bits());
        }

        #[test]
        fn every_input_type_quantizes_alike(values in values()) {
            let halves: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
            let widened: Vec<f32> = halves.iter().map(|v| v.to_f32()).collect();
            let shape = [1, values.len()];
            prop_assert_eq!(quantize_bf16(&halves, &shape, 64, true).unwrap(), quantize(&widened, &shape, 64, true).unwrap());
            let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v.clamp(-6.0e4, 6.0e4))).collect();
            let widened: Vec<f32> = halves.iter().map(|v| v.to_f32()).collect();
            prop_assert_eq!(quantize_f16(&halves, &shape, 64, true).unwrap(), quantize(&widened, &shape, 64, true).unwrap());
        }

        #[test]
        fn dequantize_by_block_matches_the_whole(values in values(), double in any::<bool>()) {
            let q = quantize(&values, &[values.len()], 32, double).unwrap();
            let whole = q.dequantize();
            let mut block = [0.0f32; 32];
            for b in 0..q.num_blocks() {
                let n = q.dequantize_block_into(b, &mut block).unwrap();
                prop_assert_eq!(&whole[b * 32..b * 32 + n], &block[..n]);
            }
        }
    }

    #[test]
    fn positions_name_rows_and_columns() {
        assert_eq!(position(209, &[4, 64]), "[3, 17] (flat index 209)");
        assert_eq!(position(5, &[2, 3, 4]), "[0, 1, 1] (flat index 5)");
        assert_eq!(position(7, &[10]), "index 7");
    }

    #[test]
    fn large_tensors_are_split_into_tasks_at_block_boundaries() {
        // Several parallel tasks with a partial last block: same as the reference.
        let n = 3 * TASK_VALUES + 37;
        let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0).collect();
        let (codes, absmax, _) = reference::quantize(&values, 64);
        let q = quantize(&values, &[n], 64, false).unwrap();
        assert_eq!(q.codes(), &codes[..]);
        assert_eq!(q.absmax(), &Absmax::F32(absmax));
    }
}
