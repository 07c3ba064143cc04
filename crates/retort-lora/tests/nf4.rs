//! NF4 against bitsandbytes: every fixture in `tests/fixtures/` (written by
//! `scripts/make_nf4_fixtures.py` with bitsandbytes itself) must come out bit for bit, and bad input
//! must give a clear error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use retort_hf::{Checkpoint, Dtype, TensorView};
use retort_lora::nf4::{
    self, ABSMAX_BLOCKSIZE, Absmax, DYNAMIC_MAP, DoubleQuant, NF4, NF4_THRESHOLDS, Nf4Error, Nf4Tensor,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn open(name: &str) -> Checkpoint {
    Checkpoint::open_files(&[fixtures().join(name)]).unwrap()
}

fn bytes(ck: &Checkpoint, name: &str) -> Vec<u8> {
    ck.get(name).unwrap_or_else(|| panic!("fixture lacks `{name}`")).data.to_vec()
}

fn floats(ck: &Checkpoint, name: &str) -> Vec<f32> {
    ck.get(name).unwrap_or_else(|| panic!("fixture lacks `{name}`")).to_f32().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A parity fixture: file name, checkpoint, variants as (blocksize, double_quant).
type Case = (String, Checkpoint, Vec<(usize, bool)>);

fn cases() -> Vec<Case> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors") && n != "tables.safetensors")
        .collect();
    names.sort();
    assert!(names.len() >= 8, "fixtures missing: {names:?}");
    names
        .into_iter()
        .map(|name| {
            let ck = open(&name);
            let variants = ck.metadata()["variants"]
                .split(',')
                .map(|v| {
                    let (bs, kind) = v.split_once(':').unwrap();
                    (bs.parse().unwrap(), kind == "double")
                })
                .collect();
            (name, ck, variants)
        })
        .collect()
}

fn prefix(blocksize: usize, double: bool) -> String {
    format!("bs{blocksize}.{}.", if double { "double" } else { "plain" })
}

#[test]
fn code_books_are_bitsandbytes_tables() {
    let ck = open("tables.safetensors");
    assert_eq!(bits(&NF4), bits(&floats(&ck, "nf4")));
    assert_eq!(bits(&DYNAMIC_MAP), bits(&floats(&ck, "dynamic")));
    for (i, t) in NF4_THRESHOLDS.iter().enumerate() {
        assert_eq!(*t, (NF4[i] + NF4[i + 1]) / 2.0);
    }
    // The dynamic map follows its formula (computed in f64 here, so within f32 rounding of it).
    let mut want = vec![0.0f64, 1.0];
    for k in 0..7 {
        let n = (1 << k) + 1;
        for j in 0..n - 1 {
            let lo = 0.1 + 0.9 * j as f64 / (n - 1) as f64;
            let hi = 0.1 + 0.9 * (j + 1) as f64 / (n - 1) as f64;
            let v = (lo + hi) / 2.0 * 10f64.powi(k - 6);
            want.extend([v, -v]);
        }
    }
    want.sort_by(f64::total_cmp);
    for (got, want) in DYNAMIC_MAP.iter().zip(&want) {
        assert!((f64::from(*got) - want).abs() <= 4e-7 * want.abs(), "{got} vs {want}");
    }
}

#[test]
fn quantization_is_bit_exact_with_bitsandbytes() {
    let mut checked = 0;
    for (name, ck, variants) in cases() {
        let input = ck.get("input").unwrap();
        for (bs, double) in variants {
            let p = prefix(bs, double);
            let ctx = format!("{name} {p}");
            let q = nf4::quantize_tensor(&input, bs, double).unwrap();
            assert_eq!(q.shape(), input.shape, "{ctx}");
            assert!(q.codes() == bytes(&ck, &format!("{p}codes")), "{ctx}codes differ");
            match q.absmax() {
                Absmax::F32(a) => {
                    assert!(!double);
                    assert_eq!(bits(a), bits(&floats(&ck, &format!("{p}absmax"))), "{ctx}absmax");
                }
                Absmax::Double(d) => {
                    assert!(double);
                    assert_eq!(d.codes(), bytes(&ck, &format!("{p}absmax_codes")), "{ctx}absmax codes");
                    assert_eq!(
                        bits(d.scales()),
                        bits(&floats(&ck, &format!("{p}absmax_scales"))),
                        "{ctx}scales"
                    );
                    assert_eq!(
                        d.offset().to_bits(),
                        floats(&ck, &format!("{p}absmax_offset"))[0].to_bits(),
                        "{ctx}offset"
                    );
                    assert_eq!(
                        bits(&q.absmax().to_f32()),
                        bits(&floats(&ck, &format!("{p}absmax"))),
                        "{ctx}absmax"
                    );
                }
            }
            let deq = q.dequantize();
            assert_eq!(bits(&deq), bits(&floats(&ck, &format!("{p}dequant"))), "{ctx}dequant");
            // Rounded to the input's dtype (nearest even), as bitsandbytes returns it by default.
            match input.dtype {
                Dtype::BF16 => {
                    let want = ck.get(&format!("{p}dequant_bf16")).unwrap().to_f32().unwrap();
                    let got: Vec<f32> = deq.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
                    assert_eq!(bits(&got), bits(&want), "{ctx}dequant_bf16");
                }
                Dtype::F16 => {
                    let want = ck.get(&format!("{p}dequant_f16")).unwrap().to_f32().unwrap();
                    let got: Vec<f32> = deq.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
                    assert_eq!(bits(&got), bits(&want), "{ctx}dequant_f16");
                }
                _ => {}
            }
            checked += 1;
        }
    }
    assert!(checked >= 14, "only {checked} variants checked");
}

#[test]
fn slices_and_checkpoint_views_quantize_alike() {
    for (name, ck, variants) in cases() {
        let input = ck.get("input").unwrap();
        let (bs, double) = variants[0];
        let from_view = nf4::quantize_tensor(&input, bs, double).unwrap();
        let values = input.to_f32().unwrap();
        let from_f32 = nf4::quantize(&values, input.shape, bs, double).unwrap();
        assert_eq!(from_view, from_f32, "{name}");
        let halves: Vec<u16> = input.data.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        match input.dtype {
            Dtype::BF16 => {
                let v: Vec<bf16> = halves.into_iter().map(bf16::from_bits).collect();
                assert_eq!(nf4::quantize_bf16(&v, input.shape, bs, double).unwrap(), from_view, "{name}");
            }
            Dtype::F16 => {
                let v: Vec<f16> = halves.into_iter().map(f16::from_bits).collect();
                assert_eq!(nf4::quantize_f16(&v, input.shape, bs, double).unwrap(), from_view, "{name}");
            }
            _ => {}
        }
    }
}

#[test]
fn bitsandbytes_parts_dequantize_exactly() {
    // The decoder alone, fed bitsandbytes' own codes and absmax (as a loader of a bnb-4bit checkpoint
    // would), independent of our quantizer.
    for (name, ck, variants) in cases() {
        let shape = ck.get("input").unwrap().shape.to_vec();
        for (bs, double) in variants {
            let p = prefix(bs, double);
            let absmax = if double {
                Absmax::Double(
                    DoubleQuant::new(
                        bytes(&ck, &format!("{p}absmax_codes")),
                        floats(&ck, &format!("{p}absmax_scales")),
                        floats(&ck, &format!("{p}absmax_offset"))[0],
                    )
                    .unwrap(),
                )
            } else {
                Absmax::F32(floats(&ck, &format!("{p}absmax")))
            };
            let q =
                Nf4Tensor::from_parts(shape.clone(), bs, bytes(&ck, &format!("{p}codes")), absmax).unwrap();
            assert_eq!(bits(&q.dequantize()), bits(&floats(&ck, &format!("{p}dequant"))), "{name} {p}");
        }
    }
}

/// SplitMix64 of `len * 2^32 + i`, made into a non-negative f32 like the fixture script does.
fn splitmix_values(len: usize) -> Vec<f32> {
    (0..len as u64)
        .map(|i| {
            let mut z = ((len as u64) << 32).wrapping_add(i).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let mantissa = (z >> 40) as f32 * 2f32.powi(-24);
            mantissa * 2f32.powi(((z >> 8) & 7) as i32 - 3)
        })
        .collect()
}

#[test]
fn offset_is_pytorchs_f32_mean() {
    let text = std::fs::read_to_string(fixtures().join("torch_mean.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() > 80);
    for case in cases {
        let len = case["len"].as_u64().unwrap() as usize;
        let want = case["mean_bits"].as_u64().unwrap() as u32;
        let got = nf4::torch_mean(&splitmix_values(len));
        assert_eq!(got.to_bits(), want, "len {len}: {got} vs {}", f32::from_bits(want));
    }
}

#[test]
fn reconstruction_error_is_within_half_a_code_step() {
    // Largest half-gap between neighbouring NF4 levels (between -1 and -0.6961928).
    let half_gap = NF4.windows(2).map(|p| p[1] - p[0]).fold(0.0f32, f32::max) / 2.0;
    let ck = open("normal.safetensors");
    let x = floats(&ck, "input");
    for double in [false, true] {
        let q = nf4::quantize(&x, &[x.len()], 64, double).unwrap();
        let absmax = q.absmax().to_f32();
        let deq = q.dequantize();
        let (mut err2, mut x2) = (0.0f64, 0.0f64);
        for (i, (&a, &b)) in x.iter().zip(&deq).enumerate() {
            let block = i / 64;
            let exact = x[block * 64..(block + 1) * 64].iter().fold(0.0f32, |m, v| m.max(v.abs()));
            // The code step, plus whatever the double quantization moved the block's scale by.
            let bound = half_gap * exact + (absmax[block] - exact).abs() + 1e-6;
            assert!((a - b).abs() <= bound, "double {double}: value {i}: {a} -> {b}, bound {bound}");
            err2 += f64::from(a - b).powi(2);
            x2 += f64::from(a).powi(2);
        }
        // Stated bound for N(0, 1) weights at blocksize 64: relative RMS error below 10% (it is 9.3%).
        let rel = (err2 / x2).sqrt();
        assert!(rel < 0.10, "double {double}: relative RMS error {rel}");
    }
}

#[test]
fn bits_per_parameter_match_qlora() {
    // 256 x 4096: 16384 blocks of 64, 64 scales of the double quantization, one offset.
    let x: Vec<f32> = (0..256 * 4096).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let q = nf4::quantize(&x, &[256, 4096], 64, true).unwrap();
    let n = x.len() as f64;
    let want = 4.0 + 8.0 / 64.0 + 32.0 * 64.0 / n + 32.0 / n;
    assert_eq!(q.bits_per_parameter(), want);
    assert_eq!(q.storage_bytes(), x.len() / 2 + 16384 + 4 * 64 + 4);
    let plain = nf4::quantize(&x, &[256, 4096], 64, false).unwrap();
    assert_eq!(plain.bits_per_parameter(), 4.5);
    // A 4096 x 4096 layer (the accounting only, from parts): 4.127 bits.
    let blocks = 4096 * 4096 / 64;
    let dq = DoubleQuant::new(vec![0; blocks], vec![1.0; blocks / ABSMAX_BLOCKSIZE], 0.0).unwrap();
    let layer =
        Nf4Tensor::from_parts(vec![4096, 4096], 64, vec![0x77; 4096 * 4096 / 2], Absmax::Double(dq)).unwrap();
    assert!((layer.bits_per_parameter() - 4.127).abs() < 1e-3, "{}", layer.bits_per_parameter());
    // Odd count: the pad nibble is storage too.
    let odd = nf4::quantize(&[1.0; 3], &[3], 64, false).unwrap();
    assert_eq!(odd.bits_per_parameter(), (16.0 + 32.0) / 3.0);
}

fn message(e: Nf4Error) -> String {
    e.to_string()
}

#[test]
fn non_finite_values_are_named() {
    let mut x = vec![0.5f32; 4 * 64];
    for (bad, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf"), (f32::NEG_INFINITY, "-inf")] {
        x[3 * 64 + 17] = bad;
        x[3 * 64 + 20] = f32::NAN;
        let e = nf4::quantize(&x, &[4, 64], 64, true).unwrap_err();
        assert!(matches!(e, Nf4Error::NonFinite { index: 209, .. }), "{e:?}");
        assert_eq!(
            message(e),
            format!(
                "element [3, 17] (flat index 209) is {shown}; NF4 needs finite weights (is the checkpoint corrupt?)"
            )
        );
    }
    // Also from half-precision input and checkpoint views, where the message names the tensor.
    let h = vec![bf16::ONE, bf16::NAN];
    assert!(matches!(nf4::quantize_bf16(&h, &[2], 64, false), Err(Nf4Error::NonFinite { index: 1, .. })));
    let h = vec![f16::INFINITY];
    assert!(matches!(nf4::quantize_f16(&h, &[1], 64, false), Err(Nf4Error::NonFinite { index: 0, .. })));
    let data: Vec<u8> = [1.0f32, 2.0, f32::NAN].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView {
        name: "model.layers.0.mlp.up_proj.weight",
        dtype: &Dtype::F32,
        shape: &[1, 3],
        data: &data,
        path: Path::new("model.safetensors"),
    };
    assert_eq!(
        message(nf4::quantize_tensor(&view, 64, true).unwrap_err()),
        "tensor `model.layers.0.mlp.up_proj.weight`: element [0, 2] (flat index 2) is NaN; NF4 needs finite \
         weights (is the checkpoint corrupt?)"
    );
}

#[test]
fn empty_and_mismatched_shapes_are_refused() {
    for shape in [&[0usize][..], &[0, 4], &[4, 0], &[3, 0, 2]] {
        let e = nf4::quantize(&[], shape, 64, true).unwrap_err();
        assert_eq!(message(e), format!("cannot quantize an empty tensor (shape {shape:?})"));
    }
    let e = nf4::quantize(&[1.0; 5], &[2, 3], 64, true).unwrap_err();
    assert_eq!(message(e), "shape [2, 3] holds 6 values but 5 were given");
    let e = nf4::quantize(&[1.0], &[usize::MAX, 2], 64, true).unwrap_err();
    assert!(matches!(e, Nf4Error::ShapeOverflow { .. }), "{e:?}");
    for bs in [0, 16, 63, 100, 8192] {
        let e = nf4::quantize(&[1.0; 64], &[64], bs, true).unwrap_err();
        assert_eq!(
            message(e),
            format!("blocksize {bs} is not supported; use one of 32, 64, 128, 256, 512, 1024, 2048, 4096")
        );
    }
}

#[test]
fn unusable_checkpoint_tensors_are_refused() {
    let data = [0u8; 8];
    let path = Path::new("model.safetensors");
    let int = Dtype::Other("I32".into());
    let view = TensorView { name: "ids", dtype: &int, shape: &[2], data: &data, path };
    assert_eq!(
        message(nf4::quantize_tensor(&view, 64, true).unwrap_err()),
        "tensor `ids` is I32; NF4 quantizes F32, F16 and BF16 tensors"
    );
    let view = TensorView { name: "w", dtype: &Dtype::F32, shape: &[3], data: &data, path };
    assert_eq!(
        message(nf4::quantize_tensor(&view, 64, true).unwrap_err()),
        "tensor `w` has 8 bytes but its shape and dtype need 12"
    );
    let view = TensorView { name: "w", dtype: &Dtype::BF16, shape: &[0, 3], data: &[], path };
    assert_eq!(
        message(nf4::quantize_tensor(&view, 64, true).unwrap_err()),
        "tensor `w`: cannot quantize an empty tensor (shape [0, 3])"
    );
}

#[test]
fn absmax_overflow_in_double_quantization_is_an_error() {
    // Two blocks at f32's limit: their absmax are finite but their sum is not.
    let x = vec![f32::MAX; 128];
    let e = nf4::quantize(&x, &[128], 64, true).unwrap_err();
    assert!(matches!(e, Nf4Error::DoubleQuantOverflow), "{e:?}");
    assert!(message(e).contains("quantize without double quantization"));
    let plain = nf4::quantize(&x, &[128], 64, false).unwrap();
    assert_eq!(plain.dequantize(), x);
}

#[test]
fn parts_are_checked() {
    let q = nf4::quantize(&[0.5; 100], &[100], 64, true).unwrap();
    let (shape, bs, codes, absmax) = q.clone().into_parts();
    assert_eq!(Nf4Tensor::from_parts(shape.clone(), bs, codes.clone(), absmax.clone()).unwrap(), q);
    let e = Nf4Tensor::from_parts(shape.clone(), bs, codes[..49].to_vec(), absmax.clone()).unwrap_err();
    assert_eq!(message(e), "`codes`: 49 bytes for 100 values; expected 50");
    let e = Nf4Tensor::from_parts(shape.clone(), bs, codes.clone(), Absmax::F32(vec![1.0])).unwrap_err();
    assert_eq!(message(e), "`absmax`: 1 entries for 2 blocks of 64");
    let e = Nf4Tensor::from_parts(shape.clone(), bs, codes.clone(), Absmax::F32(vec![1.0, f32::NAN]))
        .unwrap_err();
    assert_eq!(message(e), "`absmax`: entry 1 is NaN");
    let e = DoubleQuant::new(vec![0; 300], vec![1.0], 0.0).unwrap_err();
    assert_eq!(message(e), "`absmax.scales`: 1 scales for 300 codes; expected 2 (one per 256)");
    let e = DoubleQuant::new(vec![0; 3], vec![1.0], f32::INFINITY).unwrap_err();
    assert_eq!(message(e), "`absmax.offset`: entry 0 is inf");
    let e = Nf4Tensor::from_parts(vec![100], 48, codes, absmax).unwrap_err();
    assert!(matches!(e, Nf4Error::Blocksize { blocksize: 48 }));
}

#[test]
fn block_access_is_checked() {
    let x: Vec<f32> = (0..100).map(|i| i as f32 - 50.0).collect();
    let q = nf4::quantize(&x, &[100], 64, false).unwrap();
    assert_eq!((q.num_blocks(), q.block_len(0), q.block_len(1), q.block_len(2)), (2, 64, 36, 0));
    let mut out = [0.0f32; 64];
    assert_eq!(q.dequantize_block_into(1, &mut out).unwrap(), 36);
    assert_eq!(&out[..36], &q.dequantize()[64..]);
    assert_eq!(
        message(q.dequantize_block_into(2, &mut out).unwrap_err()),
        "block 2 is out of range: the tensor has 2 blocks"
    );
    assert_eq!(
        message(q.dequantize_block_into(0, &mut out[..10]).unwrap_err()),
        "the output buffer holds 10 values but 64 are needed"
    );
    assert_eq!(
        message(q.dequantize_into(&mut [0.0; 99]).unwrap_err()),
        "the output buffer holds 99 values but 100 are needed"
    );
    assert_eq!(q.code(0), Some(0));
    assert_eq!(q.code(100), None);
    assert_eq!(q.absmax().get(1), Some(49.0));
    assert_eq!(q.absmax().get(2), None);
}
