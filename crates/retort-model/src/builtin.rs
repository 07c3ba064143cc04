//! Built-in tiny models (`builtin:NAME` in a recipe): complete Hugging Face model directories that retort
//! writes itself, so the whole pipeline runs offline without downloading weights. They are random, so
//! they show that the pipeline works, not model quality.
//!
//! `tiny-llama` is a Llama architecture (GQA, SwiGLU, RoPE) of about a million parameters with a
//! byte-level BPE tokenizer (GPT-2's byte alphabet and pre-tokenizer, no merges: one token per byte),
//! Llama 3's special tokens and a Llama 3 style chat template. The files are the same on every machine:
//! weights come from a fixed seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::ModelError;

/// Names accepted after `builtin:`.
pub const NAMES: &[&str] = &["tiny-llama"];

/// Bumped whenever the files written change, so an old copy is rebuilt.
const VERSION: u32 = 1;

const SPECIALS: &[&str] = &[
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
];

const TEMPLATE: &str = "{{- bos_token }}\n{%- for message in messages %}\n{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n";

/// GPT-2's map from bytes to printable characters (what byte-level BPE vocabularies are written in).
pub fn byte_alphabet() -> Vec<char> {
    let mut out = vec!['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        out[b as usize] = char::from_u32(c).unwrap_or('\u{fffd}');
    }
    out
}

fn config() -> serde_json::Value {
    let vocab = 256 + SPECIALS.len();
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 256,
        "eos_token_id": [257, 260],
        "pad_token_id": 261,
        "head_dim": 32,
        "hidden_act": "silu",
        "hidden_size": 128,
        "initializer_range": 0.02,
        "intermediate_size": 384,
        "max_position_embeddings": 2048,
        "mlp_bias": false,
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "vocab_size": vocab,
    })
}

fn tokenizer_json() -> serde_json::Value {
    let alphabet = byte_alphabet();
    let vocab: BTreeMap<String, usize> =
        alphabet.iter().enumerate().map(|(i, c)| (c.to_string(), i)).collect();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let byte_level =
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [256], "tokens": ["<|begin_of_text|>"]}}
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}

fn tokenizer_config() -> serde_json::Value {
    let decoder: serde_json::Map<String, serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                (256 + i).to_string(),
                json!({"content": s, "lstrip": false, "normalized": false,
                "rstrip": false, "single_word": false, "special": true}),
            )
        })
        .collect();
    json!({
        "added_tokens_decoder": decoder,
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|pad|>",
        "clean_up_tokenization_spaces": false,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": TEMPLATE,
    })
}

/// Normal(0, std) values from a fixed-seed SplitMix64 and Box-Muller, the same on every machine.
fn normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let u1 = next().max(f64::MIN_POSITIVE);
            let u2 = next();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32 * std
        })
        .collect()
}

fn weights(config: &retort_hf::ModelConfig) -> Result<Vec<u8>, String> {
    use retort_hf::names::Role;
    let specs = retort_hf::names::tensors(config);
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let n = spec.numel();
        let values = match spec.role {
            Role::FinalNorm | Role::AttnNorm | Role::FfnNorm | Role::PostAttnNorm | Role::PostFfnNorm => {
                vec![1.0f32; n]
            }
            _ => normal(n, 0.02, 0x7e57_0000 + i as u64),
        };
        data.push((
            spec.name.clone(),
            spec.shape.clone(),
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let meta: std::collections::HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
}

fn marker(name: &str) -> String {
    format!("{{\"builtin\": \"{name}\", \"version\": {VERSION}}}\n")
}

/// Writes model `name` into `dir` (unless a complete copy of this version is there) and returns `dir`.
/// The directory is built aside and renamed into place, so it is complete or absent.
pub fn materialize(name: &str, dir: &Path) -> Result<PathBuf, ModelError> {
    if !NAMES.contains(&name) {
        return Err(ModelError::Builtin {
            name: name.to_string(),
            message: format!("there is no built-in model `{name}`; built-in models: {}", NAMES.join(", ")),
        });
    }
    let done = dir.join("retort-builtin.json");
    if std::fs::read_to_string(&done).is_ok_and(|s| s == marker(name)) {
        return Ok(dir.to_path_buf());
    }
    let fail = |message: String| ModelError::Builtin { name: name.to_string(), message };
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(|e| fail(format!("cannot create `{}`: {e}", parent.display())))?;
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| fail(format!("cannot create `{}`: {e}", tmp.display())))?;
    let cfg_json = config();
    let cfg = retort_hf::ModelConfig::parse(&cfg_json.to_string(), &tmp.join("config.json"))
        .map_err(|e| fail(e.to_string()))?;
    let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).unwrap_or_default();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("config.json", pretty(&cfg_json)),
        (
            "generation_config.json",
            pretty(&json!({"bos_token_id": 256, "eos_token_id": [257, 260], "do_sample": false})),
        ),
        ("tokenizer.json", pretty(&tokenizer_json())),
        ("tokenizer_config.json", pretty(&tokenizer_config())),
        (
            "special_tokens_map.json",
            pretty(
                &json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|pad|>"}),
            ),
        ),
        ("model.safetensors", weights(&cfg).map_err(fail)?),
        ("retort-builtin.json", marker(name).into_bytes()),
    ];
    for (file, bytes) in files {
        let p = tmp.join(file);
        retort_io_write(&p, &bytes).map_err(|e| fail(format!("cannot write `{}`: {e}", p.display())))?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| fail(format!("cannot replace `{}`: {e}", dir.display())))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| fail(format!("cannot create `{}`: {e}", dir.display())))?;
    Ok(dir.to_path_buf())
}

fn retort_io_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
