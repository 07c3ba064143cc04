//! QLoRA's frozen base: a model loaded with its adaptable projections quantized to NF4 one by one
//! (straight from the mapped checkpoint bytes, block by block: no dense copy of any projection, on the
//! host or the device), and the bridge from a host [`Nf4Tensor`] to `retort_model`'s device-side
//! [`Nf4Weight`], which dequantizes inside the forward.
//!
//! Quantization is deterministic, so a resumed run re-quantizes the base to the same bits and only the
//! adapter needs saving.

use std::path::Path;

use retort_hf::{LoadReport, TensorView};
use retort_model::burn::tensor::{DType, Device};
use retort_model::nf4::{HostNf4, HostScales, Nf4Weight};
use retort_model::{ModelError, Precision, Transformer};

use crate::nf4::{Absmax, DEFAULT_BLOCKSIZE, DYNAMIC_MAP, NF4, Nf4Error, Nf4Tensor, quantize_tensor};

/// Uploads a quantized 2-D tensor to `device` for a model computing in `dtype`.
pub fn to_device(t: &Nf4Tensor, dtype: DType, device: &Device) -> Result<Nf4Weight, Nf4Error> {
    let shape = match *t.shape() {
        [out, inp] => [out, inp],
        _ => {
            return Err(Nf4Error::Parts {
                part: "shape",
                reason: format!("{:?} is not a 2-D weight", t.shape()),
            });
        }
    };
    let scales = match t.absmax() {
        Absmax::F32(a) => HostScales::Plain(a),
        Absmax::Double(d) => HostScales::Double {
            codes: d.codes(),
            scales: d.scales(),
            offset: d.offset(),
            code_book: &DYNAMIC_MAP,
        },
    };
    let host = HostNf4 { shape, blocksize: t.blocksize(), codes: t.codes(), scales, code_book: &NF4 };
    Nf4Weight::new(host, dtype, device).map_err(|reason| Nf4Error::Parts { part: "codes", reason })
}

/// Quantizes one checkpoint tensor and uploads it (the [`retort_model::Quantizer`] of QLoRA).
pub fn quantize_view(
    view: &TensorView<'_>,
    double_quant: bool,
    dtype: DType,
    device: &Device,
) -> Result<Nf4Weight, ModelError> {
    let fail = |e: Nf4Error| ModelError::Input(format!("cannot quantize to NF4: {e}"));
    let q = quantize_tensor(view, DEFAULT_BLOCKSIZE, double_quant).map_err(fail)?;
    to_device(&q, dtype, device)
        .map_err(|e| fail(Nf4Error::Tensor { name: view.name.to_string(), source: Box::new(e) }))
}

/// Loads `dir` with every adaptable projection in NF4 (blocks of 64, QLoRA's), the absmax
/// double-quantized when `double_quant` is set; everything else as [`Transformer::load`] does.
pub fn load_quantized(
    dir: &Path,
    precision: Precision,
    device: &Device,
    double_quant: bool,
) -> Result<(Transformer, LoadReport), ModelError> {
    let quantize = |view: &TensorView<'_>, dtype: DType, device: &Device| {
        quantize_view(view, double_quant, dtype, device)
    };
    Transformer::load_quantized(dir, precision, device, &quantize)
}
