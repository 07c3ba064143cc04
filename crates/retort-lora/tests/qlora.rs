//! The device-side NF4 weight: its in-graph dequantization equals the host reference bit for bit
//! (plain and double-quantized absmax, partial blocks, odd counts, more than 256 blocks), and a QLoRA
//! base stores its projections in about 4.13 bits per weight, with no dense copy.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use retort_lora::nf4::{Nf4Tensor, quantize};
use retort_lora::qlora::{load_quantized, to_device};
use retort_model::burn::tensor::{DType, Device, Int, Tensor};
use retort_model::linear::Weight;
use retort_model::nf4::Nf4Scales;
use retort_model::{Precision, Transformer};

/// Deterministic values with outliers and exact zeros (SplitMix64).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|i| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let u = ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            match i % 97 {
                0 => 0.0,
                1 => u * 40.0,
                _ => u * 0.1,
            }
        })
        .collect()
}

fn device_values(q: &Nf4Tensor, dtype: DType) -> Vec<f32> {
    let w = to_device(q, dtype, &Device::flex()).unwrap();
    assert_eq!(w.dequantize().dims(), [q.shape()[0], q.shape()[1]]);
    w.dequantize().cast(DType::F32).into_data().try_into_vec::<f32>().unwrap()
}

#[test]
fn in_graph_dequantization_is_the_reference_bit_for_bit() {
    // Shapes: whole blocks; an odd count with a partial last block; more than 256 blocks with a
    // partial group of double-quantization scales; a partial block past 256 blocks.
    let shapes = [[64, 128], [37, 53], [300, 64], [17, 1000], [1, 7]];
    for (k, shape) in shapes.iter().enumerate() {
        let v = values(shape[0] * shape[1], k as u64);
        for blocksize in [32, 64, 256] {
            for double in [false, true] {
                let q = quantize(&v, shape, blocksize, double).unwrap();
                let want: Vec<u32> = q.dequantize().iter().map(|x| x.to_bits()).collect();
                let got: Vec<u32> = device_values(&q, DType::F32).iter().map(|x| x.to_bits()).collect();
                assert!(got == want, "{shape:?} blocksize {blocksize} double {double}: values differ");
            }
        }
    }
}

#[test]
fn the_compute_dtype_is_the_reference_rounded_once() {
    let v = values(300 * 64, 9);
    let q = quantize(&v, &[300, 64], 64, true).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let want: Vec<f32> = Tensor::<1>::from_data(
            retort_model::burn::tensor::TensorData::new(q.dequantize(), [q.numel()]),
            (&Device::flex(), DType::F32),
        )
        .cast(dtype)
        .cast(DType::F32)
        .into_data()
        .try_into_vec()
        .unwrap();
        assert_eq!(device_values(&q, dtype), want, "{dtype:?}");
    }
}

fn bytes_int(t: &Tensor<1, Int>) -> usize {
    t.clone().into_data().as_bytes().len()
}

fn bytes_float(t: &Tensor<1>) -> usize {
    t.clone().into_data().as_bytes().len()
}

/// Storage of the quantized projections, from the bytes of their device tensors, and their weights.
fn storage(m: &Transformer) -> (usize, usize) {
    let (mut bytes, mut numel) = (0, 0);
    m.visit_linears(&mut |site, lin| {
        let Weight::Nf4(w) = &lin.weight else { panic!("`{}` is not NF4", site.path) };
        numel += w.numel();
        bytes += bytes_int(&w.codes)
            + match &w.scales {
                Nf4Scales::Plain(a) => bytes_float(a),
                Nf4Scales::Double(d) => bytes_int(&d.codes) + bytes_float(&d.scales) + 4,
            };
        assert_eq!(bytes_float(&w.code_book), 64);
    });
    (bytes, numel)
}

#[test]
fn a_quantized_base_stores_about_4_13_bits_per_projection_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let base = retort_model::builtin::materialize("tiny-llama", &tmp.path().join("base")).unwrap();
    let (m, _) = load_quantized(&base, Precision::F32, &Device::flex(), true).unwrap();
    let (bytes, numel) = storage(&m);
    let bits = 8.0 * bytes as f64 / numel as f64;
    // 4 + 8/64 + 32/(64 * 256) = 4.127, plus the offset per tensor (tiny at these sizes: 128 x 128).
    assert!((4.127..4.135).contains(&bits), "{bits} bits per weight with double quantization");
    let (plain, _) = load_quantized(&base, Precision::F32, &Device::flex(), false).unwrap();
    let (bytes, _) = storage(&plain);
    assert_eq!(8.0 * bytes as f64 / numel as f64, 4.5, "4 bits plus an f32 per 64");
    // The LM head and embeddings stay dense, as bitsandbytes leaves them.
    assert!(m.lm_head.as_ref().is_none_or(|h| matches!(h.weight, Weight::Dense(_))));
    let dense = Transformer::load(&base, Precision::F32, &Device::flex()).unwrap().0;
    assert_eq!(m.embed.val().into_data(), dense.embed.val().into_data());
}
