//! Every supported family against its references (fixtures from `scripts/make_export_fixtures.py`):
//! the merge against PEFT's `merge_and_unload`, and the GGUF conversion against llama.cpp's own
//! `convert_hf_to_gguf.py` (metadata values, tensor names, shapes, types and data hashes).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::{Path, PathBuf};

use retort_export::convert;
use retort_export::gguf::{GgufFile, Value};
use retort_export::merge::{Model, OutDtype};
use retort_export::output::Disk;
use retort_export::quant::mix::FileType;
use retort_export::tokenizer::Tokenizer;
use retort_hf::Checkpoint;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

const FAMILIES: [&str; 7] = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"];

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family)
}

fn hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn merge_matches_peft_merge_and_unload() {
    for family in FAMILIES {
        let dir = fixture(family);
        let model = Model::open(&dir.join("base"), Some(&dir.join("adapter")), None).unwrap();
        let expected = Checkpoint::open_files(&[dir.join("merged.safetensors")]).unwrap();
        let mut worst = 0f32;
        let (mut n, mut off_by_one_ulp) = (0usize, 0usize);
        for name in expected.names() {
            let want = expected.get(name).unwrap();
            let ours = model.values(name).unwrap();
            let want_v = want.to_f32().unwrap();
            assert_eq!(ours.len(), want_v.len(), "{family} {name}");
            for (a, b) in ours.iter().zip(&want_v) {
                n += 1;
                if want.dtype.name() == "BF16" {
                    // Both sides round an f32 sum to bf16; the sums may differ in the last f32 bit
                    // (torch's matmul order), which can move a value sitting on a bf16 rounding midpoint
                    // by one bf16 step. Anything more is a real difference.
                    if a != b {
                        let step = (b.abs() * 2f32.powi(-7)).max(f32::MIN_POSITIVE);
                        assert!((a - b).abs() <= step * 1.01, "{family} {name}: {a} vs {b}");
                        off_by_one_ulp += 1;
                    }
                } else {
                    worst = worst.max((a - b).abs());
                }
            }
        }
        assert!(worst < 1e-6, "{family}: f32 merge differs by {worst}");
        assert!(
            off_by_one_ulp * 1000 < n,
            "{family}: {off_by_one_ulp} of {n} bf16 values differ by one step"
        );
        eprintln!(
            "{family}: {n} merged values, max |f32 diff| {worst:e}, {off_by_one_ulp} bf16 values one step apart"
        );
    }
}

/// The bf16 output is exactly the f32 merge rounded to bf16 (round to nearest even), tensor for tensor.
#[test]
fn bf16_outputs_are_the_exact_rounding_of_the_f32_merge() {
    use retort_export::quant::float::round_bf16;
    for family in FAMILIES.into_iter().filter(|f| *f != "llama") {
        let dir = fixture(family);
        let bf16 = Model::open(&dir.join("base"), Some(&dir.join("adapter")), None).unwrap();
        let f32m = Model::open(&dir.join("base"), Some(&dir.join("adapter")), Some(OutDtype::F32)).unwrap();
        for spec in &bf16.specs {
            let a = bf16.values(&spec.name).unwrap();
            let b: Vec<f32> = f32m.values(&spec.name).unwrap().into_iter().map(round_bf16).collect();
            assert!(a == b, "{family} {}", spec.name);
        }
    }
}

#[test]
fn merge_in_f32_from_a_bf16_base_is_within_1e_6() {
    let dir = fixture("qwen3");
    let model = Model::open(&dir.join("base"), Some(&dir.join("adapter")), Some(OutDtype::F32)).unwrap();
    let expected = Checkpoint::open_files(&[dir.join("merged_f32.safetensors")]).unwrap();
    for name in expected.names() {
        let want = expected.get(name).unwrap().to_f32().unwrap();
        let ours = model.values(name).unwrap();
        let worst = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-6, "{name}: {worst}");
    }
}

/// Keys whose value depends on the directory name or on llama.cpp's model-card heuristics.
const NAME_KEYS: [&str; 3] = ["general.name", "general.size_label", "general.basename"];

fn value_json(v: &Value) -> Json {
    match v {
        Value::Array(_, items) => Json::Array(items.iter().map(value_json).collect()),
        Value::String(b) => Json::String(String::from_utf8_lossy(b).into_owned()),
        Value::Bool(b) => Json::Bool(*b),
        Value::F32(x) => serde_json::json!(f64::from(*x)),
        Value::F64(x) => serde_json::json!(x),
        other => serde_json::json!(other.as_u64().unwrap_or(u64::MAX)),
    }
}

fn same(ours: &Json, theirs: &Json) -> bool {
    match (ours, theirs) {
        (Json::Number(a), Json::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            a == b || (a as f32) == (b as f32)
        }
        (Json::Array(a), Json::Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y)),
        _ => ours == theirs,
    }
}

fn convert_base(family: &str, ft: FileType, out: &Path) -> GgufFile {
    let base = fixture(family).join("base");
    let model = Model::open(&base, None, None).unwrap();
    let raw: Json =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    let generation: Option<Json> = std::fs::read_to_string(base.join("generation_config.json"))
        .ok()
        .map(|t| serde_json::from_str(&t).unwrap());
    let tok = Tokenizer::load(&base, &model.cfg, None).unwrap();
    let plan = convert::plan(&model, &tok, ft, "Base", &raw, generation.as_ref()).unwrap();
    let path = out.join(format!("{family}-{}.gguf", ft.name()));
    convert::write(&model, plan, &path, &Disk, &mut |_| {}).unwrap();
    GgufFile::open(&path).unwrap()
}

#[test]
fn gguf_matches_llama_cpp_converter() {
    let tmp = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        let reference: Json =
            serde_json::from_str(&std::fs::read_to_string(fixture(family).join("llama_cpp.json")).unwrap())
                .unwrap();
        for (t, ft) in [
            ("f32", FileType::F32),
            ("f16", FileType::F16),
            ("bf16", FileType::BF16),
            ("q8_0", FileType::Q8_0),
        ] {
            let r = &reference[t];
            let f = convert_base(family, ft, tmp.path());
            let ctx = format!("{family} {t}");
            // Metadata: the same keys with the same types and values.
            let theirs = r["metadata"].as_object().unwrap();
            let mut problems = Vec::new();
            for (k, v) in theirs {
                if NAME_KEYS.contains(&k.as_str()) {
                    continue;
                }
                let Some(ours) = f.get(k) else {
                    problems.push(format!("missing `{k}`"));
                    continue;
                };
                let (ty, val) = if v[0] == "ARRAY" {
                    (v[1].as_str().unwrap(), &v[2])
                } else {
                    (v[0].as_str().unwrap(), &v[1])
                };
                let our_ty = match ours {
                    Value::Array(et, _) => et.name(),
                    x => x.value_type().name(),
                };
                if our_ty != ty {
                    problems.push(format!("`{k}` is {our_ty}, llama.cpp writes {ty}"));
                } else if !same(&value_json(ours), val) {
                    problems.push(format!(
                        "`{k}` = {} but llama.cpp writes {}",
                        ours.summary(60),
                        val.to_string().chars().take(80).collect::<String>()
                    ));
                }
            }
            for (k, _) in &f.metadata {
                if !theirs.contains_key(k) && !NAME_KEYS.contains(&k.as_str()) {
                    problems.push(format!("extra key `{k}`"));
                }
            }
            // Tensors: names, shapes, types and bytes.
            let tensors = r["tensors"].as_object().unwrap();
            if tensors.len() != f.tensors.len() {
                problems.push(format!("{} tensors, llama.cpp writes {}", f.tensors.len(), tensors.len()));
            }
            for t in &f.tensors {
                let Some(want) = tensors.get(&t.name) else {
                    problems.push(format!("extra tensor `{}`", t.name));
                    continue;
                };
                let shape: Vec<usize> =
                    want["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
                if shape != t.shape || want["type"] != t.ty.name() {
                    problems.push(format!(
                        "`{}` is {:?} {}, llama.cpp {:?} {}",
                        t.name, t.shape, t.ty, shape, want["type"]
                    ));
                } else if want["sha256"] != hex(f.data(t)) {
                    problems.push(format!("`{}` data differs", t.name));
                }
            }
            assert!(problems.is_empty(), "{ctx}:\n  {}", problems.join("\n  "));
            eprintln!("{ctx}: {} keys and {} tensors identical to llama.cpp's", theirs.len(), tensors.len());
        }
    }
}

/// Reading a GGUF back (what `retort eval` does with `compare = ["gguf"]`) undoes the converter's
/// changes: from an F32 file every family's tensors come back exactly (the Q/K permutation is a
/// reordering; Gemma's `1 + w` costs at most one rounding of `w + 1`), and from Q8_0 within its
/// quantization error (a block's absmax / 127, halved for rounding, plus the f16 scale's error).
#[test]
fn gguf_reads_back_as_the_hugging_face_tensors() {
    use retort_export::convert::back::GgufWeights;
    let tmp = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        let model = Model::open(&fixture(family).join("base"), None, Some(OutDtype::F32)).unwrap();
        for ft in [FileType::F32, FileType::Q8_0] {
            let f = convert_base(family, ft, tmp.path());
            let back = GgufWeights::open(f.path(), &model.cfg).unwrap();
            let mut worst = 0f32;
            for spec in &model.specs {
                let want = model.values(&spec.name).unwrap();
                let got = back.values(spec).unwrap();
                assert_eq!(got.len(), want.len(), "{family} {}", spec.name);
                let quantized = f.tensor(&spec.gguf_name).unwrap().ty.name() == "Q8_0";
                let amax = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (a, b) in got.iter().zip(&want) {
                    let bound = if quantized {
                        amax / 127.0 * 0.5 + amax * 1e-3
                    } else if spec.role.is_norm() && model.cfg.arch.gguf_norms_plus_one() {
                        (b.abs() + 1.0) * f32::EPSILON
                    } else {
                        0.0
                    };
                    assert!((a - b).abs() <= bound, "{family} {ft:?} {}: {a} vs {b}", spec.name);
                    worst = worst.max((a - b).abs());
                }
            }
            eprintln!("{family} {ft:?}: {} tensors read back, max |diff| {worst:e}", model.specs.len());
        }
    }
}

#[test]
fn gguf_of_another_model_is_refused_with_what_differs() {
    use retort_export::convert::back::GgufWeights;
    let tmp = tempfile::tempdir().unwrap();
    let qwen = convert_base("qwen2", FileType::F32, tmp.path());
    let llama = Model::open(&fixture("llama").join("base"), None, None).unwrap();
    let err = GgufWeights::open(qwen.path(), &llama.cfg).unwrap_err().to_string();
    assert!(err.contains("architecture is `qwen2`") && err.contains("`llama`"), "{err}");

    // Same architecture, other shapes: every differing tensor is named.
    let mut cfg = llama.cfg.clone();
    let lf = convert_base("llama", FileType::F32, tmp.path());
    cfg.num_layers += 1;
    let err = GgufWeights::open(lf.path(), &cfg).unwrap_err().to_string();
    let last = cfg.num_layers - 1;
    assert!(
        err.contains(&format!(
            "`blk.{last}.attn_q.weight` (for `model.layers.{last}.self_attn.q_proj.weight`) is missing"
        )),
        "{err}"
    );
}
