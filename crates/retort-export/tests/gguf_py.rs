//! Every GGUF retort writes, read by an independent reader: llama.cpp's `gguf` Python package. All
//! metadata keys and tensors must parse, with the same values, and gguf-py's dequantization of every
//! tensor must equal retort's.
//!
//! The interpreter is `RETORT_PYTHON` (else `python3`). When it cannot `import gguf`, the test prints a
//! notice and passes, except with `RETORT_REQUIRE_GGUF_PY=1` (set by `.ci/run`, which installs gguf).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stderr)] // tests

use std::path::{Path, PathBuf};
use std::process::Command;

use retort_export::gguf::{GgufFile, Value};
use retort_export::job::{Format, Job};
use retort_export::output::Disk;
use retort_export::quant::mix::FileType;
use retort_export::safetensors_out::{Entry, write_checkpoint};
use retort_hf::Dtype;
use retort_io::NoProgress;
use serde_json::Value as Json;

const READER: &str = r#"
import json, sys
import numpy as np
import gguf
out = {}
blob = open(sys.argv[1], "wb")
for path in sys.argv[2:]:
    r = gguf.GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            meta[k] = ["ARRAY", f.types[1].name, [f.contents(i) for i in range(len(f.data))]]
        else:
            meta[k] = [t.name, f.contents()]
    tensors = []
    for t in r.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        offset = blob.tell()
        blob.write(values.tobytes())
        tensors.append({"name": t.name, "type": t.tensor_type.name, "ne": [int(x) for x in t.shape], "offset": offset, "n": int(values.size)})
    out[path] = {"metadata": meta, "tensors": tensors}
blob.close()
print(json.dumps(out))
"#;

fn python() -> String {
    std::env::var("RETORT_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// True when gguf-py can be used; otherwise a loud notice (or a failure when it is required).
fn gguf_py_available() -> bool {
    let py = python();
    let ok = Command::new(&py).args(["-c", "import gguf, numpy"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        let required = std::env::var("RETORT_REQUIRE_GGUF_PY").is_ok_and(|v| v == "1");
        let msg = format!(
            "\n==================================================================\n\
             NOTICE: `{py}` cannot `import gguf`; the gguf-py read-back of the\n\
             GGUFs retort writes was SKIPPED. Install it (pip install gguf==0.19.0)\n\
             or point RETORT_PYTHON at a Python that has it. .ci/run does both.\n\
             ==================================================================\n"
        );
        assert!(!required, "RETORT_REQUIRE_GGUF_PY=1 but gguf-py is not importable{msg}");
        eprintln!("{msg}");
    }
    ok
}

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family)
}

/// A llama-architecture model wide enough (rows of 256 and 512) for the k-quants, with the tiny
/// fixture tokenizer. Deterministic pseudo-random bf16 weights.
fn wide_model(dir: &Path, tied: bool) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(fixture("llama").join("base").join(f), dir.join(f)).unwrap();
    }
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": tied, "bos_token_id": 300, "eos_token_id": 304, "dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mc = retort_hf::ModelConfig::load(dir).unwrap();
    let entries: Vec<Entry> = retort_hf::names::tensors(&mc)
        .into_iter()
        .map(|s| Entry { name: s.name, dtype: Dtype::BF16, shape: s.shape })
        .collect();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    write_checkpoint(&Disk, dir, &entries, u64::MAX, &mut |e| {
        let n: usize = e.shape.iter().product();
        let norm = e.name.contains("norm");
        Ok((0..n)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let v = if norm {
                    1.0 + 0.2 * u
                } else {
                    0.08 * u + if state.is_multiple_of(97) { 2.0 * u } else { 0.0 }
                };
                retort_export::quant::float::bf16_bits(v).to_le_bytes()
            })
            .collect())
    })
    .unwrap();
}

fn export(base: &Path, adapter: Option<&Path>, formats: Vec<Format>, out: &Path) {
    let job = Job {
        base: base.to_path_buf(),
        adapter: adapter.map(Path::to_path_buf),
        formats,
        dtype: None,
        out: out.to_path_buf(),
        name: "m".into(),
        shard_size: u64::MAX,
        chat_template: None,
        system: None,
    };
    retort_export::run(&job, &Disk, &NoProgress).unwrap();
}

fn value_json(v: &Value) -> Json {
    match v {
        Value::Array(_, items) => Json::Array(items.iter().map(value_json).collect()),
        Value::String(b) => Json::String(String::from_utf8_lossy(b).into_owned()),
        Value::Bool(b) => Json::Bool(*b),
        Value::F32(x) => serde_json::json!(f64::from(*x)),
        Value::F64(x) => serde_json::json!(x),
        Value::I32(x) => serde_json::json!(x),
        Value::I64(x) => serde_json::json!(x),
        other => serde_json::json!(other.as_u64().unwrap()),
    }
}

fn same(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => x.as_f64().unwrap() as f32 == y.as_f64().unwrap() as f32,
        (Json::Array(x), Json::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q)),
        _ => a == b,
    }
}

#[test]
fn gguf_py_reads_every_gguf_retort_writes() {
    if !gguf_py_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (tied, tag) in [(false, "untied"), (true, "tied")] {
        let base = tmp.path().join(format!("wide-{tag}"));
        wide_model(&base, tied);
        let out = tmp.path().join(format!("out-{tag}"));
        // Every file type untied; the tied model's embedding doubles as the output (its own rules).
        let types: Vec<FileType> = if tied {
            vec![FileType::Q4_K_M, FileType::Q4_0, FileType::Q8_0]
        } else {
            FileType::ALL.to_vec()
        };
        export(&base, None, types.iter().copied().map(Format::Gguf).collect(), &out);
        files.extend(types.iter().map(|t| out.join(format!("m-{}.gguf", t.name()))));
    }
    for family in ["phi3", "gemma2", "qwen2"] {
        let fx = fixture(family);
        let out = tmp.path().join(family);
        export(
            &fx.join("base"),
            Some(&fx.join("adapter")),
            vec![Format::Gguf(FileType::Q4_K_M), Format::GgufAdapter],
            &out,
        );
        files.push(out.join("m-Q4_K_M.gguf"));
        files.push(out.join("m-lora-F32.gguf"));
    }
    let blob = tmp.path().join("values.f32");
    let script = tmp.path().join("read.py");
    std::fs::write(&script, READER).unwrap();
    let o = Command::new(python()).arg(&script).arg(&blob).args(&files).output().unwrap();
    assert!(o.status.success(), "gguf-py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let read: Json = serde_json::from_slice(&o.stdout).unwrap();
    let values = std::fs::read(&blob).unwrap();
    let mut types_seen = std::collections::BTreeSet::new();
    for path in &files {
        let ours = GgufFile::open(path).unwrap();
        let theirs = &read[path.to_str().unwrap()];
        let meta = theirs["metadata"].as_object().unwrap();
        assert_eq!(meta.len(), ours.metadata.len(), "{}", path.display());
        for (k, v) in &ours.metadata {
            let t = &meta[k];
            let val = if t[0] == "ARRAY" { &t[2] } else { &t[1] };
            assert!(
                same(&value_json(v), val),
                "{}: `{k}` = {} but gguf-py reads {}",
                path.display(),
                v.summary(40),
                val
            );
        }
        let tensors = theirs["tensors"].as_array().unwrap();
        assert_eq!(tensors.len(), ours.tensors.len(), "{}", path.display());
        for (t, p) in ours.tensors.iter().zip(tensors) {
            assert_eq!(p["name"], t.name.as_str());
            assert_eq!(p["type"], t.ty.name(), "{}", t.name);
            let ne: Vec<usize> = t.shape.iter().rev().copied().collect();
            assert_eq!(p["ne"], serde_json::json!(ne), "{}", t.name);
            let (off, n) = (p["offset"].as_u64().unwrap() as usize, p["n"].as_u64().unwrap() as usize);
            let py: Vec<f32> = values[off..off + 4 * n]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let mine = ours.to_f32(t).unwrap();
            assert!(py == mine, "{} {}: dequantized values differ from gguf-py's", path.display(), t.name);
            types_seen.insert(t.ty.name());
        }
    }
    eprintln!("gguf-py read {} files; tensor types: {:?}", files.len(), types_seen);
    for ty in ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0"] {
        assert!(types_seen.contains(ty), "no {ty} tensor was checked");
    }
}
