//! The model metadata of a GGUF file (`general.*`, `{arch}.*`), key for key as llama.cpp's
//! `convert_hf_to_gguf.py` writes it for each supported architecture: the base `TextModel` keys and
//! each family's own (`LlamaModel`, `Qwen2Model`, `Qwen3Model`, `Phi3MiniModel`, `Gemma2Model`,
//! `Gemma3Model`). Values are taken from the raw `config.json` so that presence follows llama.cpp too
//! (a key is written only when the config has the field).

use retort_hf::{Arch, ModelConfig};
use serde_json::{Map, Value as Json};

use crate::gguf::{GgufHeader, Value};

/// `config.json` with llama.cpp's view of RoPE parameters.
pub struct Hparams<'a> {
    raw: &'a Json,
    rope: Map<String, Json>,
}

impl<'a> Hparams<'a> {
    /// Wraps a parsed config.json.
    pub fn new(raw: &'a Json) -> Hparams<'a> {
        let mut rope = match raw.get("rope_parameters").or_else(|| raw.get("rope_scaling")) {
            Some(Json::Object(o)) => o.clone(),
            _ => Map::new(),
        };
        if !rope.contains_key("full_attention") && !rope.contains_key("sliding_attention") {
            let find =
                |keys: &[&str]| keys.iter().find_map(|k| raw.get(*k).filter(|v| !v.is_null()).cloned());
            if let Some(local) = find(&[
                "local_rope_theta",
                "rope_local_theta",
                "rope_theta_local",
                "swa_rope_theta",
                "rope_local_base_freq",
            ]) {
                rope.insert("sliding_attention".into(), serde_json::json!({ "rope_theta": local }));
            }
            if !rope.contains_key("rope_theta")
                && let Some(t) = find(&[
                    "global_rope_theta",
                    "rope_global_theta",
                    "rope_theta_global",
                    "rope_theta",
                    "rotary_emb_base",
                ])
            {
                rope.insert("rope_theta".into(), t);
            }
            if !rope.contains_key("rope_type")
                && let Some(t) = rope.get("type").cloned()
            {
                rope.insert("rope_type".into(), t);
            }
            if !rope.contains_key("partial_rotary_factor")
                && let Some(p) = find(&["partial_rotary_factor", "rope_pct", "rope_percent"])
            {
                rope.insert("partial_rotary_factor".into(), p);
            }
            if !rope.contains_key("original_max_position_embeddings")
                && let Some(p) = find(&["original_max_position_embeddings"])
            {
                rope.insert("original_max_position_embeddings".into(), p);
            }
        }
        Hparams { raw, rope }
    }

    /// The first of `keys` present and not null.
    pub fn find(&self, keys: &[&str]) -> Option<&'a Json> {
        keys.iter().find_map(|k| self.raw.get(*k).filter(|v| !v.is_null()))
    }

    fn u32(&self, keys: &[&str]) -> Option<u32> {
        self.find(keys).and_then(Json::as_u64).and_then(|v| u32::try_from(v).ok())
    }

    fn f32(&self, keys: &[&str]) -> Option<f32> {
        self.find(keys).and_then(Json::as_f64).map(|v| v as f32)
    }

    /// RoPE parameters of full-attention layers.
    pub fn rope_full(&self) -> &Map<String, Json> {
        match self.rope.get("full_attention") {
            Some(Json::Object(o)) => o,
            _ => &self.rope,
        }
    }

    /// The RoPE theta of sliding-window layers, when it differs.
    pub fn rope_swa_theta(&self) -> Option<f32> {
        self.rope
            .get("sliding_attention")
            .and_then(|s| s.get("rope_theta"))
            .and_then(Json::as_f64)
            .map(|v| v as f32)
    }

    /// A RoPE parameter (full attention).
    pub fn rope_get(&self, key: &str) -> Option<&Json> {
        self.rope_full().get(key)
    }
}

struct Keys<'h> {
    h: &'h mut GgufHeader,
    arch: &'static str,
}

impl Keys<'_> {
    fn set(&mut self, key: &str, v: Value) {
        self.h.set(format!("{}.{key}", self.arch), v);
    }
    fn u32(&mut self, key: &str, v: Option<u32>) {
        if let Some(v) = v {
            self.set(key, Value::U32(v));
        }
    }
    fn f32(&mut self, key: &str, v: Option<f32>) {
        if let Some(v) = v {
            self.set(key, Value::F32(v));
        }
    }
}

/// Writes the architecture keys. `file_type` is llama.cpp's `llama_ftype` number.
pub fn write_model_keys(h: &mut GgufHeader, cfg: &ModelConfig, hp: &Hparams<'_>, file_type: u32) {
    let arch = cfg.arch.gguf_arch();
    let mut k = Keys { h, arch };
    let n_layers = Some(cfg.num_layers as u32);
    match cfg.arch {
        Arch::Gemma2 => {
            k.u32("context_length", hp.u32(&["max_position_embeddings"]));
            k.u32("embedding_length", hp.u32(&["hidden_size"]));
            k.u32("block_count", n_layers);
            k.u32("feed_forward_length", hp.u32(&["intermediate_size"]));
            k.u32("attention.head_count", hp.u32(&["num_attention_heads"]));
            k.u32("attention.head_count_kv", Some(cfg.num_kv_heads as u32));
            k.f32("attention.layer_norm_rms_epsilon", hp.f32(&["rms_norm_eps"]));
            k.u32("attention.key_length", Some(cfg.head_dim as u32));
            k.u32("attention.value_length", Some(cfg.head_dim as u32));
            k.h.set("general.file_type", Value::U32(file_type));
            k.f32("attn_logit_softcapping", hp.f32(&["attn_logit_softcapping"]));
            k.f32("final_logit_softcapping", hp.f32(&["final_logit_softcapping"]));
            k.u32("attention.sliding_window", hp.u32(&["sliding_window"]));
        }
        Arch::Phi3 => {
            let n_embd = cfg.hidden_size;
            let rot = hp.rope_get("partial_rotary_factor").and_then(Json::as_f64).unwrap_or(1.0);
            let rope_dims = ((rot * n_embd as f64) as usize / cfg.num_heads) as u32;
            let orig =
                hp.rope_get("original_max_position_embeddings").and_then(Json::as_u64).map(|v| v as u32);
            if let Some(f) = phi3_attn_factor(cfg, hp) {
                k.f32("rope.scaling.attn_factor", Some(f));
            }
            k.u32("context_length", hp.u32(&["n_positions", "max_position_embeddings"]));
            k.u32("rope.scaling.original_context_length", orig);
            k.u32("embedding_length", Some(n_embd as u32));
            k.u32("feed_forward_length", hp.u32(&["intermediate_size"]));
            k.u32("block_count", n_layers);
            k.u32("attention.head_count", Some(cfg.num_heads as u32));
            k.u32("attention.head_count_kv", Some(cfg.num_kv_heads as u32));
            k.f32("attention.layer_norm_rms_epsilon", hp.f32(&["rms_norm_eps"]));
            k.u32("rope.dimension_count", Some(rope_dims));
            k.f32("rope.freq_base", hp.rope_get("rope_theta").and_then(Json::as_f64).map(|v| v as f32));
            k.h.set("general.file_type", Value::U32(file_type));
            k.u32("attention.sliding_window", Some(hp.u32(&["sliding_window"]).unwrap_or(0)));
        }
        Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => {
            text_model_keys(&mut k, cfg, hp, file_type);
            match cfg.arch {
                Arch::Llama | Arch::Mistral => {
                    k.u32("vocab_size", hp.u32(&["vocab_size"]));
                    let dim = hp.u32(&["head_dim"]).unwrap_or((cfg.hidden_size / cfg.num_heads) as u32);
                    k.u32("rope.dimension_count", Some(dim));
                }
                Arch::Gemma3 => {
                    k.u32("context_length", Some(hp.u32(&["max_position_embeddings"]).unwrap_or(131072)));
                    k.u32("attention.head_count", Some(hp.u32(&["num_attention_heads"]).unwrap_or(8)));
                    k.f32(
                        "attention.layer_norm_rms_epsilon",
                        Some(hp.f32(&["rms_norm_eps"]).unwrap_or(1e-6)),
                    );
                    let hd = hp.u32(&["head_dim"]).unwrap_or(256);
                    k.u32("attention.key_length", Some(hd));
                    k.u32("attention.value_length", Some(hd));
                    let theta = hp.rope_get("rope_theta").and_then(Json::as_f64).unwrap_or(1_000_000.0);
                    k.f32("rope.freq_base", Some(theta as f32));
                    if let Some(c) = hp.f32(&["final_logit_softcapping"]).filter(|&c| c != 0.0) {
                        k.f32("final_logit_softcapping", Some(c));
                    }
                    if hp.raw.get("sliding_window_pattern").and_then(Json::as_u64) != Some(1) {
                        k.u32("attention.sliding_window", hp.u32(&["sliding_window"]));
                    }
                    k.u32("attention.head_count_kv", Some(hp.u32(&["num_key_value_heads"]).unwrap_or(4)));
                }
                _ => {}
            }
        }
    }
}

/// `TextModel.set_gguf_parameters`.
fn text_model_keys(k: &mut Keys<'_>, cfg: &ModelConfig, hp: &Hparams<'_>, file_type: u32) {
    k.u32("block_count", Some(cfg.num_layers as u32));
    k.u32(
        "context_length",
        hp.u32(&[
            "max_position_embeddings",
            "n_ctx",
            "n_positions",
            "max_length",
            "max_sequence_length",
            "model_max_length",
        ]),
    );
    k.u32("embedding_length", hp.u32(&["hidden_size", "n_embd", "dim"]));
    k.u32(
        "feed_forward_length",
        hp.u32(&[
            "prefix_dense_intermediate_size",
            "dense_intermediate_size",
            "intermediate_size",
            "n_inner",
            "hidden_dim",
        ]),
    );
    k.u32("attention.head_count", hp.u32(&["num_attention_heads", "n_head", "n_heads"]));
    k.u32("attention.head_count_kv", hp.u32(&["num_key_value_heads", "n_kv_heads"]));
    let rp = hp.rope_full();
    let factor = rp.get("factor").and_then(Json::as_f64).map(|v| v as f32);
    match rp.get("rope_type").and_then(Json::as_str) {
        Some("linear") if factor.is_some() => {
            k.set("rope.scaling.type", Value::str("linear"));
            k.f32("rope.scaling.factor", factor);
        }
        Some("yarn") if factor.is_some() => {
            k.set("rope.scaling.type", Value::str("yarn"));
            k.f32("rope.scaling.factor", factor);
            let get_f = |key: &str| rp.get(key).and_then(Json::as_f64).map(|v| v as f32);
            k.u32(
                "rope.scaling.original_context_length",
                rp.get("original_max_position_embeddings").and_then(Json::as_u64).map(|v| v as u32),
            );
            k.f32("rope.scaling.yarn_ext_factor", get_f("extrapolation_factor"));
            k.f32(
                "rope.scaling.yarn_attn_factor",
                get_f("attention_factor").or_else(|| get_f("attn_factor")),
            );
            k.f32("rope.scaling.yarn_beta_fast", get_f("beta_fast"));
            k.f32("rope.scaling.yarn_beta_slow", get_f("beta_slow"));
        }
        Some("su" | "longrope") => k.set("rope.scaling.type", Value::str("longrope")),
        _ => {}
    }
    k.f32("rope.freq_base", rp.get("rope_theta").and_then(Json::as_f64).map(|v| v as f32));
    k.f32("rope.freq_base_swa", hp.rope_swa_theta());
    k.f32("attention.layer_norm_rms_epsilon", hp.f32(&["rms_norm_eps", "norm_eps"]));
    if let Some(hd) = hp.u32(&["head_dim"]) {
        k.u32("attention.key_length", Some(hd));
        k.u32("attention.value_length", Some(hd));
    }
    k.h.set("general.file_type", Value::U32(file_type));
}

/// Phi-3's attention factor for long-context RoPE (written only with `long_factor`).
pub fn phi3_attn_factor(cfg: &ModelConfig, hp: &Hparams<'_>) -> Option<f32> {
    hp.rope_get("long_factor").filter(|v| v.as_array().is_some_and(|a| !a.is_empty()))?;
    let max_pos = hp.find(&["n_positions", "max_position_embeddings"]).and_then(Json::as_f64)?;
    let orig = hp.rope_get("original_max_position_embeddings").and_then(Json::as_f64)?;
    let scale = max_pos / orig;
    let kind = hp.rope_get("rope_type").and_then(Json::as_str).unwrap_or("").to_ascii_lowercase();
    let _ = cfg;
    let f = match kind.as_str() {
        "su" | "longrope" if scale > 1.0 => (1.0 + scale.ln() / orig.ln()).sqrt(),
        "yarn" if scale > 1.0 => 0.1 * scale.ln() + 1.0,
        _ => 1.0,
    };
    Some(f as f32)
}

/// `general.*` keys: type, name, sampling defaults from `generation_config.json`.
pub fn write_general_keys(h: &mut GgufHeader, name: &str, generation: Option<&Json>, adapter: bool) {
    h.set("general.type", Value::str(if adapter { "adapter" } else { "model" }));
    if let Some(g) = generation {
        let f = |k: &str| g.get(k).and_then(Json::as_f64).map(|v| Value::F32(v as f32));
        let i = |k: &str| g.get(k).and_then(Json::as_i64).and_then(|v| i32::try_from(v).ok()).map(Value::I32);
        for (key, v) in [
            ("general.sampling.top_k", i("top_k")),
            ("general.sampling.top_p", f("top_p")),
            ("general.sampling.min_p", f("min_p")),
            ("general.sampling.temp", f("temperature")),
            ("general.sampling.penalty_repeat", f("penalty_repeat").or_else(|| f("repetition_penalty"))),
        ] {
            if let Some(v) = v {
                h.set(key, v);
            }
        }
    }
    h.set("general.name", Value::str(name));
}
