//! Quantizers against ggml's reference (fixtures from `scripts/make_export_fixtures.py`): blocks
//! byte-identical, dequantized values identical, and llama.cpp's error bounds on its own test data.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::PathBuf;

use retort_export::gguf::GgmlType;
use retort_export::quant;
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant")
}

fn input() -> Vec<f32> {
    let b = std::fs::read(fixtures().join("input.f32")).unwrap();
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

const TYPES: [(&str, GgmlType); 9] = [
    ("Q4_0", GgmlType::Q4_0),
    ("Q4_1", GgmlType::Q4_1),
    ("Q5_0", GgmlType::Q5_0),
    ("Q5_1", GgmlType::Q5_1),
    ("Q8_0", GgmlType::Q8_0),
    ("Q4_K", GgmlType::Q4_K),
    ("Q5_K", GgmlType::Q5_K),
    ("Q6_K", GgmlType::Q6_K),
    ("Q8_K", GgmlType::Q8_K),
];

#[test]
fn blocks_are_byte_identical_to_ggml_reference() {
    let x = input();
    let exp = expected();
    for (name, ty) in TYPES {
        let ours = quant::quantize(ty, &x).unwrap();
        let reference = std::fs::read(fixtures().join(format!("{name}.bin"))).unwrap();
        assert_eq!(ours.len(), reference.len(), "{name}");
        if ours != reference {
            let ts = ty.type_size();
            let bad: Vec<usize> = ours
                .chunks(ts)
                .zip(reference.chunks(ts))
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, _)| i)
                .collect();
            let i = bad[0];
            panic!(
                "{name}: {} of {} blocks differ; first is block {i} (row {}):\n ours {:?}\n ggml {:?}",
                bad.len(),
                ours.len() / ts,
                i * ty.block_size() / 512,
                &ours[i * ts..(i + 1) * ts],
                &reference[i * ts..(i + 1) * ts]
            );
        }
        assert_eq!(hex(&ours), exp["types"][name]["blocks_sha256"], "{name}");
    }
    for (name, ty) in [("F16", GgmlType::F16), ("BF16", GgmlType::BF16)] {
        let ours = quant::quantize(ty, &x).unwrap();
        assert_eq!(hex(&ours), exp["types"][name]["blocks_sha256"], "{name}");
    }
}

#[test]
fn dequantized_values_are_identical_to_gguf_py() {
    let exp = expected();
    let n = input().len();
    for (name, ty) in TYPES {
        let blocks = std::fs::read(fixtures().join(format!("{name}.bin"))).unwrap();
        let y = quant::dequantize(ty, &blocks, n).unwrap();
        let bytes: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
        // serde_json parses floats to within an ulp of f64; compared as f32 they are exact.
        let first: Vec<f32> = y[..4].to_vec();
        let want: Vec<f32> = exp["types"][name]["dequant_first"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(first, want, "{name}");
        assert_eq!(hex(&bytes), exp["types"][name]["dequant_sha256"], "{name}");
    }
}

/// llama.cpp's `tests/test-quantize-fns.cpp`: `0.1 + 2 cos(i)` over 4096 values, error measured as
/// `sqrt(sum of squares) / n`, must stay under 0.002 for these types.
#[test]
fn error_on_llama_cpp_test_data_is_within_its_bounds() {
    let n = 32 * 128;
    let data: Vec<f32> = (0..n).map(|i| (0.1f64 + f64::from(2.0f32 * (i as f32).cos())) as f32).collect();
    for (name, ty) in TYPES {
        let q = quant::quantize(ty, &data).unwrap();
        let y = quant::dequantize(ty, &q, n).unwrap();
        let sum: f64 = data.iter().zip(&y).map(|(a, b)| f64::from(a - b).powi(2)).sum();
        let err = (sum.sqrt() as f32) / n as f32;
        eprintln!("{name}: total quantization error {err:.6}");
        assert!(err < 0.002, "{name}: error {err} exceeds llama.cpp's bound 0.002");
    }
}
