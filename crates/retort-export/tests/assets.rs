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

/// The public config.json fields of the models in ollama/convert-testdata (the fields the GGUF model
/// keys come from), and the file type of Ollama's conversion (F16).
const TESTDATA_CONFIGS: &[(&str, &str)] = &[
    (
        "Meta-Llama-3-8B-Instruct",
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":14336,
        "max_position_embeddings":8192,"num_attention_heads":32,"num_hidden_layers":32,"num_key_value_heads":8,
        "rms_norm_eps":1e-05,"rope_theta":500000.0,"vocab_size":128256,"tie_word_embeddings":false}"#,
    ),
    (
        "Qwen2.5-0.5B-Instruct",
        r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":896,"intermediate_size":4864,
        "max_position_embeddings":32768,"num_attention_heads":14,"num_hidden_layers":24,"num_key_value_heads":2,
        "rms_norm_eps":1e-06,"rope_theta":1000000.0,"vocab_size":151936,"tie_word_embeddings":true,
        "sliding_window":32768,"use_sliding_window":false,"max_window_layers":21}"#,
    ),
    (
        "gemma-2-2b-it",
        r#"{"architectures":["Gemma2ForCausalLM"],"hidden_size":2304,"intermediate_size":9216,
        "max_position_embeddings":8192,"num_attention_heads":8,"num_hidden_layers":26,"num_key_value_heads":4,
        "head_dim":256,"rms_norm_eps":1e-06,"vocab_size":256000,"attn_logit_softcapping":50.0,
        "final_logit_softcapping":30.0,"query_pre_attn_scalar":256,"sliding_window":4096,"rope_theta":10000.0}"#,
    ),
    (
        "gemma-2-9b-it",
        r#"{"architectures":["Gemma2ForCausalLM"],"hidden_size":3584,"intermediate_size":14336,
        "max_position_embeddings":8192,"num_attention_heads":16,"num_hidden_layers":42,"num_key_value_heads":8,
        "head_dim":256,"rms_norm_eps":1e-06,"vocab_size":256000,"attn_logit_softcapping":50.0,
        "final_logit_softcapping":30.0,"query_pre_attn_scalar":256,"sliding_window":4096,"rope_theta":10000.0}"#,
    ),
    (
        "Mistral-7B-Instruct-v0.2",
        r#"{"architectures":["MistralForCausalLM"],"hidden_size":4096,"intermediate_size":14336,
        "max_position_embeddings":32768,"num_attention_heads":32,"num_hidden_layers":32,"num_key_value_heads":8,
        "rms_norm_eps":1e-05,"rope_theta":1000000.0,"vocab_size":32000,"sliding_window":null,"tie_word_embeddings":false}"#,
    ),
    (
        "Phi-3-mini-128k-instruct",
        r#"{"architectures":["Phi3ForCausalLM"],"hidden_size":3072,"intermediate_size":8192,
        "max_position_embeddings":131072,"original_max_position_embeddings":4096,"num_attention_heads":32,
        "num_hidden_layers":32,"num_key_value_heads":32,"rms_norm_eps":1e-05,"rope_theta":10000.0,
        "sliding_window":262144,"vocab_size":32064,"rope_scaling":{"type":"longrope","long_factor":LONG,"short_factor":LONG}}"#,
    ),
];

/// retort's model keys against Ollama's conversions of real models: every `{arch}.*` and
/// `general.architecture` / `general.file_type` key Ollama writes, retort writes with the same value.
/// (Ollama leaves out some keys llama.cpp writes, e.g. Gemma 2's soft-capping for the 2B model and
/// Mistral's rope.freq_base; retort follows llama.cpp, so it may write more.)
#[test]
fn model_keys_match_ollama_convert_testdata() {
    use retort_export::convert::meta::{Hparams, write_model_keys};
    use retort_export::gguf::GgufHeader;
    let Some(a) = assets() else { return };
    let long = format!("[{}]", vec!["1.0"; 48].join(","));
    for (name, cfg_text) in TESTDATA_CONFIGS {
        let text = cfg_text.replace("LONG", &long);
        let raw: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cfg = ModelConfig::parse(&text, Path::new("config.json")).unwrap();
        let mut h = GgufHeader::new();
        h.set("general.architecture", Value::str(cfg.arch.gguf_arch()));
        write_model_keys(&mut h, &cfg, &Hparams::new(&raw), 1);
        let theirs: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(a.join("ollama/convert-testdata").join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        let arch = cfg.arch.gguf_arch();
        let mut n = 0;
        for (k, v) in theirs.as_object().unwrap() {
            if !(k.starts_with(&format!("{arch}."))
                || k == "general.architecture"
                || k == "general.file_type")
            {
                continue;
            }
            let ours = h.get(k).unwrap_or_else(|| panic!("{name}: retort does not write `{k}`"));
            let want = v.as_str().unwrap();
            let same = match ours {
                Value::String(_) => ours.as_str() == Some(want),
                Value::F32(x) => want.parse::<f32>().unwrap() == *x,
                other => other.as_u64() == want.parse::<u64>().ok(),
            };
            assert!(same, "{name}: `{k}` = {} but Ollama writes {want}", ours.summary(20));
            n += 1;
        }
        eprintln!("{name}: {n} model keys equal to Ollama's conversion");
    }
}
