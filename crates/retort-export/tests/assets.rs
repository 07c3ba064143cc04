//! Real tokenizers against the vocabularies llama.cpp's converter wrote for them (shared/assets:
//! `tokenizers/*` and `vocab-gguf/*`): the same tokens, token types, merges, pre-tokenizer and scores.
//! The assets live outside the repository; without them these tests print a notice and pass.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stderr)] // tests

use std::path::{Path, PathBuf};

use retort_export::gguf::{GgufFile, Value};
use retort_export::tokenizer::Tokenizer;
use retort_hf::ModelConfig;

fn assets() -> Option<PathBuf> {
    let default = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/assets");
    let dir = std::env::var_os("RETORT_SHARED_ASSETS").map_or(default, PathBuf::from);
    if dir.join("vocab-gguf").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "NOTICE: shared assets not found at {} (set RETORT_SHARED_ASSETS); real tokenizers not checked",
            dir.display()
        );
        None
    }
}

/// A model directory with the tokenizer files and a config of the given architecture and vocabulary.
fn model_dir(tmp: &Path, files: &[PathBuf], arch: &str, vocab: usize) -> (PathBuf, ModelConfig) {
    let dir = tmp.join(arch);
    std::fs::create_dir_all(&dir).unwrap();
    for f in files {
        std::fs::copy(f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let cfg = serde_json::json!({"architectures": [arch], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": vocab});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mc = ModelConfig::load(&dir).unwrap();
    (dir, mc)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

fn ints(v: &Value) -> Vec<i32> {
    v.as_array().unwrap().iter().map(|x| if let Value::I32(i) = x { *i } else { panic!("{x:?}") }).collect()
}

fn check(tok: &Tokenizer, gguf: &GgufFile, with_scores: bool, what: &str) {
    assert_eq!(tok.vocab.model, gguf.get_str("tokenizer.ggml.model").unwrap(), "{what}");
    assert_eq!(tok.vocab.pre, gguf.get_str("tokenizer.ggml.pre").unwrap(), "{what}");
    let tokens = strings(gguf.get("tokenizer.ggml.tokens").unwrap());
    assert_eq!(tok.vocab.tokens.len(), tokens.len(), "{what}");
    let diff = tok.vocab.tokens.iter().zip(&tokens).position(|(a, b)| a != b);
    assert!(diff.is_none(), "{what}: token {diff:?} differs");
    assert_eq!(tok.vocab.types, ints(gguf.get("tokenizer.ggml.token_type").unwrap()), "{what}");
    if let Some(m) = gguf.get("tokenizer.ggml.merges") {
        assert!(tok.vocab.merges == strings(m), "{what}: merges differ");
    }
    if with_scores {
        let scores: Vec<f32> = gguf
            .get("tokenizer.ggml.scores")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert!(tok.vocab.scores.as_deref() == Some(&scores[..]), "{what}: scores differ");
    }
    eprintln!("{what}: {} tokens identical to llama.cpp's", tokens.len());
}

#[test]
fn bpe_tokenizers_match_llama_cpp_vocabularies() {
    let Some(a) = assets() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (dir, gguf, arch, vocab) in [
        ("llama3-tokenizer", "ggml-vocab-llama-bpe.gguf", "LlamaForCausalLM", 128_256),
        ("qwen2-tokenizer", "ggml-vocab-qwen2.gguf", "Qwen2ForCausalLM", 151_936),
    ] {
        let src = a.join("tokenizers").join(dir);
        let (d, cfg) = model_dir(
            tmp.path(),
            &[src.join("tokenizer.json"), src.join("tokenizer_config.json")],
            arch,
            vocab,
        );
        let tok = Tokenizer::load(&d, &cfg, None).unwrap();
        check(&tok, &GgufFile::open(&a.join("vocab-gguf").join(gguf)).unwrap(), false, dir);
    }
}

#[test]
fn sentencepiece_model_matches_llama_cpp_vocabulary() {
    let Some(a) = assets() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (d, cfg) =
        model_dir(tmp.path(), &[a.join("tokenizers/llama2-spm/tokenizer.model")], "LlamaForCausalLM", 32_000);
    let tok = Tokenizer::load(&d, &cfg, None).unwrap();
    let gguf = GgufFile::open(&a.join("vocab-gguf/ggml-vocab-llama-spm.gguf")).unwrap();
    check(&tok, &gguf, true, "llama2-spm");
}
