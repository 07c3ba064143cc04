//! Whole exports of every family (base + adapter, all formats), checked across formats: the GGUF of a
//! merged export equals the GGUF of the merged directory converted on its own; base GGUF + GGUF LoRA
//! (as llama.cpp applies it) equals the merged GGUF; the served PEFT adapter merges to the same model
//! as the trained one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::{Path, PathBuf};

use retort_export::gguf::GgufFile;
use retort_export::job::{Format, Job};
use retort_export::merge::{Model, OutDtype};
use retort_export::output::Disk;
use retort_export::quant::mix::FileType;
use retort_io::NoProgress;

const FAMILIES: [&str; 7] = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"];
const DORA: [&str; 2] = ["qwen3", "gemma3"];

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family)
}

fn job(
    base: &Path,
    adapter: Option<&Path>,
    formats: Vec<Format>,
    out: &Path,
    dtype: Option<OutDtype>,
) -> Job {
    Job {
        base: base.to_path_buf(),
        adapter: adapter.map(Path::to_path_buf),
        formats,
        dtype,
        out: out.to_path_buf(),
        name: "m".into(),
        shard_size: 5_000_000_000,
        chat_template: None,
        system: Some("Answer briefly.".into()),
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn every_format_of_every_family_agrees_with_the_others() {
    for family in FAMILIES {
        let fx = fixture(family);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("export");
        let mut formats = vec![
            Format::Merged,
            Format::Gguf(FileType::Q8_0),
            Format::Gguf(FileType::F32),
            Format::Gguf(FileType::Q4_K_M),
            Format::Adapter,
            Format::Ollama,
        ];
        if !DORA.contains(&family) {
            formats.push(Format::GgufAdapter);
        }
        let report = retort_export::run(
            &job(&fx.join("base"), Some(&fx.join("adapter")), formats.clone(), &out, Some(OutDtype::F32)),
            &Disk,
            &NoProgress,
        )
        .unwrap();
        assert_eq!(report.written.len(), formats.len(), "{family}");
        let names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{family}: leftovers {names:?}");

        // 1. Merge, then convert the merged directory alone: the same GGUF tensors.
        let merged = GgufFile::open(&out.join("m-Q8_0.gguf")).unwrap();
        let again = tmp.path().join("again");
        retort_export::run(
            &job(&out.join("merged"), None, vec![Format::Gguf(FileType::Q8_0)], &again, None),
            &Disk,
            &NoProgress,
        )
        .unwrap();
        let converted = GgufFile::open(&again.join("m-Q8_0.gguf")).unwrap();
        assert_eq!(merged.tensors, converted.tensors, "{family}");
        for t in &merged.tensors {
            assert!(
                merged.data(t) == converted.data(converted.tensor(&t.name).unwrap()),
                "{family} {}",
                t.name
            );
        }

        // 2. Base GGUF + GGUF LoRA, applied as llama.cpp does (W + alpha/r * B A), equals the merged GGUF.
        if !DORA.contains(&family) {
            let base_dir = tmp.path().join("base");
            retort_export::run(
                &job(&fx.join("base"), None, vec![Format::Gguf(FileType::F32)], &base_dir, None),
                &Disk,
                &NoProgress,
            )
            .unwrap();
            let base = GgufFile::open(&base_dir.join("m-F32.gguf")).unwrap();
            let lora = GgufFile::open(&out.join("m-lora-F32.gguf")).unwrap();
            let full = GgufFile::open(&out.join("m-F32.gguf")).unwrap();
            let alpha = lora.get("adapter.lora.alpha").unwrap().as_f64().unwrap() as f32;
            let mut checked = 0;
            for t in &lora.tensors {
                let Some(name) = t.name.strip_suffix(".lora_a") else { continue };
                let a = lora.to_f32(t).unwrap();
                let bt = lora.tensor(&format!("{name}.lora_b")).unwrap();
                let b = lora.to_f32(bt).unwrap();
                let (r, cols) = (t.shape[0], t.shape[1]);
                let rows = bt.shape[0];
                let mut w = base.to_f32(base.tensor(name).unwrap()).unwrap();
                let s = alpha / r as f32;
                for o in 0..rows {
                    for i in 0..cols {
                        let d: f32 = (0..r).map(|k| b[o * r + k] * a[k * cols + i]).sum();
                        w[o * cols + i] += s * d;
                    }
                }
                let want = full.to_f32(full.tensor(name).unwrap()).unwrap();
                assert!(max_diff(&w, &want) < 1e-5, "{family} {name}: {}", max_diff(&w, &want));
                checked += 1;
            }
            assert!(checked > 0, "{family}");
        }

        // 3. The served PEFT adapter (scales baked where needed) merges to the same model.
        let original = Model::open(&fx.join("base"), Some(&fx.join("adapter")), Some(OutDtype::F32)).unwrap();
        let served = Model::open(&fx.join("base"), Some(&out.join("adapter")), Some(OutDtype::F32)).unwrap();
        for spec in &original.specs {
            let d = max_diff(&original.values(&spec.name).unwrap(), &served.values(&spec.name).unwrap());
            assert!(d < 1e-6, "{family} {}: {d}", spec.name);
        }

        // 4. The Modelfile points at the first GGUF and stops at the end of a turn.
        let mf = std::fs::read_to_string(out.join("Modelfile")).unwrap();
        assert!(mf.contains("FROM ./m-Q8_0.gguf\n"), "{family}: {mf}");
        assert!(
            mf.contains("TEMPLATE \"\"\"")
                && mf.contains("PARAMETER stop ")
                && mf.contains("SYSTEM \"\"\"Answer briefly.\"\"\""),
            "{family}: {mf}"
        );
        assert_eq!(
            report.ollama_command.as_deref(),
            Some(format!("ollama create m -f {}", out.join("Modelfile").display()).as_str())
        );
    }
}

#[test]
fn sharded_merged_output_loads_and_matches() {
    let fx = fixture("mistral");
    let tmp = tempfile::tempdir().unwrap();
    let mut j = job(&fx.join("base"), Some(&fx.join("adapter")), vec![Format::Merged], tmp.path(), None);
    j.shard_size = 60_000;
    retort_export::run(&j, &Disk, &NoProgress).unwrap();
    let dir = tmp.path().join("merged");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let files: std::collections::BTreeSet<&str> =
        index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert!(files.len() > 2, "{files:?}");
    assert!(files.iter().all(|f| f.ends_with(&format!("-of-{:05}.safetensors", files.len()))), "{files:?}");
    // The sharded directory converts like the original merge.
    let a = Model::open(&dir, None, None).unwrap();
    let b = Model::open(&fx.join("base"), Some(&fx.join("adapter")), None).unwrap();
    for s in &b.specs {
        assert_eq!(a.values(&s.name).unwrap(), b.values(&s.name).unwrap(), "{}", s.name);
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    for f in ["tokenizer.model", "tokenizer_config.json", "generation_config.json"] {
        assert!(dir.join(f).is_file(), "{f} copied");
    }
}

#[test]
fn dora_and_whole_tensors_are_refused_for_gguf_lora_with_a_reason() {
    let fx = fixture("qwen3");
    let tmp = tempfile::tempdir().unwrap();
    let e = retort_export::run(
        &job(&fx.join("base"), Some(&fx.join("adapter")), vec![Format::GgufAdapter], tmp.path(), None),
        &Disk,
        &NoProgress,
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("gguf-adapter") && msg.contains("DoRA"), "{msg}");
    assert!(e.hint().unwrap().contains("gguf:TYPE"), "{:?}", e.hint());
    assert!(!tmp.path().join("m-lora-F32.gguf").exists());
}

/// Without tokenizer.model, a SentencePiece-style tokenizer.json (byte-fallback BPE) gives the same
/// tokens, byte tokens typed as such, and scores that order merges as the BPE ranks do.
#[test]
fn sentencepiece_vocabulary_from_tokenizer_json_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    for e in std::fs::read_dir(fixture("mistral").join("base")).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "tokenizer.model" {
            std::fs::copy(e.path(), base.join(e.file_name())).unwrap();
        }
    }
    let cfg = retort_hf::ModelConfig::load(&base).unwrap();
    let spm =
        retort_export::tokenizer::Tokenizer::load(&fixture("mistral").join("base"), &cfg, None).unwrap();
    let hf = retort_export::tokenizer::Tokenizer::load(&base, &cfg, None).unwrap();
    assert_eq!(hf.vocab.model, "llama");
    assert_eq!(hf.vocab.tokens[..400], spm.vocab.tokens[..400]);
    let byte = hf.vocab.tokens.iter().position(|t| t == "<0x41>").unwrap();
    assert_eq!(hf.vocab.types[byte], 6);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("tokenizer.json")).unwrap()).unwrap();
    let merges = json["model"]["merges"].as_array().unwrap();
    let scores = hf.vocab.scores.as_ref().unwrap();
    for (rank, m) in merges.iter().enumerate().take(50) {
        let joined = match m {
            serde_json::Value::String(s) => s.replace(' ', ""),
            serde_json::Value::Array(p) => format!("{}{}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
            _ => unreachable!(),
        };
        let id = hf.vocab.tokens.iter().position(|t| *t == joined).unwrap();
        assert!(scores[id] >= -(rank as f32), "{joined}: score {} for merge rank {rank}", scores[id]);
    }
    retort_export::run(
        &job(&base, None, vec![Format::Gguf(FileType::Q8_0)], &tmp.path().join("o"), None),
        &Disk,
        &NoProgress,
    )
    .unwrap();
}
