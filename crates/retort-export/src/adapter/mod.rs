//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, read and checked against a
//! base model before anything is written.
//!
//! Per module the scale is PEFT's: `alpha / r` (`alpha / sqrt(r)` with rsLoRA), with `rank_pattern` and
//! `alpha_pattern` matched the way PEFT matches them (`re.match(r"(.*\.)?(key)$", module)`, first key
//! wins). Full tensors (`modules_to_save`, trained biases) replace the base's.

pub mod gguf_lora;
pub mod peft_out;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use retort_hf::{Checkpoint, ModelConfig, TensorSpec};
use serde_json::Value as Json;

use crate::error::{ExportError, Result};

/// The fields of `adapter_config.json` retort uses.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// Default rank.
    pub r: usize,
    /// Default alpha.
    pub lora_alpha: f64,
    /// rsLoRA: scale `alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// DoRA: a magnitude vector per adapted module.
    pub use_dora: bool,
    /// Per-module ranks, in file order.
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alphas, in file order.
    pub alpha_pattern: Vec<(String, f64)>,
    /// Modules trained in full and saved whole.
    pub modules_to_save: Vec<String>,
    /// What the adapter says it was trained on.
    pub base_model: Option<String>,
}

/// How a module is adapted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleKind {
    /// A linear layer: `W += s * B @ A`.
    Linear,
    /// An embedding: `W += s * (B @ A)^T` (PEFT's `lora_embedding_A/B`).
    Embedding,
}

/// One adapted module.
#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    /// Linear or embedding.
    pub kind: ModuleKind,
    /// Key of A (`[r, in]`, or `[r, vocab]` for embeddings).
    pub a: String,
    /// Key of B (`[out, r]`, or `[hidden, r]`).
    pub b: String,
    /// DoRA magnitude (`[out]`).
    pub magnitude: Option<String>,
    /// `lora_bias`: a bias on B.
    pub bias: Option<String>,
    /// Rank (from A's shape, checked against the config).
    pub rank: usize,
    /// Alpha after `alpha_pattern`.
    pub alpha: f64,
    /// The scale PEFT applies: `alpha / r` or `alpha / sqrt(r)`.
    pub scale: f32,
}

/// An opened adapter.
pub struct Adapter {
    /// The adapter directory.
    pub dir: PathBuf,
    /// Its config.
    pub config: AdapterConfig,
    /// The config as written (re-exported with changes).
    pub raw_config: Json,
    /// The tensors.
    pub weights: Checkpoint,
    /// Adapted modules by module path (`model.layers.0.self_attn.q_proj`).
    pub modules: BTreeMap<String, Module>,
    /// Whole tensors that replace the base's, by base key (`lm_head.weight` -> adapter key).
    pub replaced: BTreeMap<String, String>,
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("dir", &self.dir)
            .field("modules", &self.modules.len())
            .field("replaced", &self.replaced.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn bad(path: &Path, problem: impl Into<String>, hint: impl Into<String>) -> ExportError {
    ExportError::Adapter { path: path.to_path_buf(), problem: problem.into(), hint: hint.into() }
}

/// PEFT's pattern match: `re.match(rf"(.*\.)?({key})$", module)`.
fn pattern_matches(key: &str, module: &str) -> bool {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).is_ok_and(|re| re.is_match(module))
}

fn pattern<'a, T: Copy>(list: &'a [(String, T)], module: &str) -> Option<(&'a str, T)> {
    list.iter().find(|(k, _)| pattern_matches(k, module)).map(|(k, v)| (k.as_str(), *v))
}

impl AdapterConfig {
    fn parse(v: &Json, path: &Path) -> Result<AdapterConfig> {
        let peft_type = v.get("peft_type").and_then(Json::as_str).unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(bad(
                path,
                format!("is a {peft_type} adapter; retort exports LoRA adapters (LoRA, rsLoRA, DoRA)"),
                "train a LoRA adapter, or convert this one with the tool that made it",
            ));
        }
        let num = |k: &str| v.get(k).and_then(Json::as_f64);
        let flag = |k: &str| v.get(k).and_then(Json::as_bool).unwrap_or(false);
        let r = v.get("r").and_then(Json::as_u64).filter(|&r| r > 0).ok_or_else(|| {
            bad(
                path,
                "has no positive integer `r`",
                "adapter_config.json must come from PEFT's save_pretrained",
            )
        })? as usize;
        let lora_alpha = num("lora_alpha").unwrap_or(8.0);
        if flag("fan_in_fan_out") {
            return Err(bad(
                path,
                "has `fan_in_fan_out: true` (GPT-2 style Conv1D layers), which none of the supported architectures use",
                "export an adapter trained on one of: Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3",
            ));
        }
        for k in ["trainable_token_indices", "target_parameters", "layer_replication"] {
            if v.get(k).is_some_and(|x| {
                !x.is_null() && x != &Json::Array(vec![]) && x != &Json::Object(Default::default())
            }) {
                return Err(bad(
                    path,
                    format!("uses `{k}`, which retort cannot merge or convert yet"),
                    "train without it, or merge with PEFT's merge_and_unload in Python",
                ));
            }
        }
        let obj_pairs = |k: &str| -> Result<Vec<(String, Json)>> {
            match v.get(k) {
                None | Some(Json::Null) => Ok(Vec::new()),
                Some(Json::Object(o)) => Ok(o.iter().map(|(a, b)| (a.clone(), b.clone())).collect()),
                Some(_) => {
                    Err(bad(path, format!("`{k}` is not an object"), "it maps module names to numbers"))
                }
            }
        };
        let rank_pattern = obj_pairs("rank_pattern")?
            .into_iter()
            .map(|(k, x)| match x.as_u64() {
                Some(n) if n > 0 => Ok((k, n as usize)),
                _ => Err(bad(
                    path,
                    format!("`rank_pattern.{k}` is not a positive integer"),
                    "fix adapter_config.json",
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let alpha_pattern = obj_pairs("alpha_pattern")?
            .into_iter()
            .map(|(k, x)| {
                x.as_f64().map(|a| (k.clone(), a)).ok_or_else(|| {
                    bad(path, format!("`alpha_pattern.{k}` is not a number"), "fix adapter_config.json")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let modules_to_save = v
            .get("modules_to_save")
            .and_then(Json::as_array)
            .map(|a| a.iter().filter_map(Json::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        Ok(AdapterConfig {
            r,
            lora_alpha,
            use_rslora: flag("use_rslora"),
            use_dora: flag("use_dora"),
            rank_pattern,
            alpha_pattern,
            modules_to_save,
            base_model: v.get("base_model_name_or_path").and_then(Json::as_str).map(str::to_string),
        })
    }

    /// Rank and alpha of a module after the patterns.
    pub fn rank_alpha(&self, module: &str) -> (usize, f64) {
        let r = pattern(&self.rank_pattern, module).map_or(self.r, |p| p.1);
        let a = pattern(&self.alpha_pattern, module).map_or(self.lora_alpha, |p| p.1);
        (r, a)
    }

    /// PEFT's scale for a rank and alpha.
    pub fn scale(&self, r: usize, alpha: f64) -> f32 {
        (if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 }) as f32
    }

    /// True when one global `lora_alpha / r` does not describe every module (what vLLM and
    /// llama.cpp assume).
    pub fn needs_baked_scales(&self) -> bool {
        self.use_rslora || !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty()
    }
}

/// The parts of an adapter key: module path and what it is.
fn split_key(key: &str) -> (String, &str) {
    let k = key.strip_prefix("base_model.model.").unwrap_or(key);
    for suffix in [
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora_B.bias",
        ".lora_magnitude_vector.weight",
        ".lora_magnitude_vector",
        ".lora_embedding_A",
        ".lora_embedding_B",
    ] {
        if let Some(m) = k.strip_suffix(suffix) {
            return (m.to_string(), suffix);
        }
    }
    (k.to_string(), "")
}

impl Adapter {
    /// Opens a PEFT adapter directory.
    pub fn open(dir: &Path) -> Result<Adapter> {
        let cfg_path = dir.join("adapter_config.json");
        if !dir.is_dir() {
            return Err(bad(
                dir,
                "does not exist",
                "give the directory PEFT's save_pretrained wrote (`--adapter DIR`)",
            ));
        }
        if !cfg_path.is_file() {
            return Err(bad(
                dir,
                "has no adapter_config.json",
                "give the directory PEFT's save_pretrained (or `retort train`) wrote",
            ));
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ExportError::read(&cfg_path, e))?;
        let raw: Json = serde_json::from_str(&text).map_err(|e| {
            bad(&cfg_path, format!("is not valid JSON (line {}): {e}", e.line()), "fix or regenerate it")
        })?;
        let config = AdapterConfig::parse(&raw, &cfg_path)?;
        let st = dir.join("adapter_model.safetensors");
        if !st.is_file() {
            let hint = if dir.join("adapter_model.bin").is_file() {
                "this adapter is a pickle (adapter_model.bin); load it with PEFT and save it again with safe_serialization=True"
            } else {
                "the directory needs adapter_model.safetensors next to adapter_config.json"
            };
            return Err(bad(dir, "has no adapter_model.safetensors", hint));
        }
        let weights = Checkpoint::open_files(std::slice::from_ref(&st))?;
        let mut parts: BTreeMap<String, BTreeMap<&'static str, String>> = BTreeMap::new();
        let mut replaced = BTreeMap::new();
        for key in weights.names() {
            let (module, what) = split_key(key);
            let what: &'static str = match what {
                ".lora_A.weight" => "A",
                ".lora_B.weight" => "B",
                ".lora_B.bias" => "bias",
                ".lora_magnitude_vector.weight" | ".lora_magnitude_vector" => "m",
                ".lora_embedding_A" => "eA",
                ".lora_embedding_B" => "eB",
                _ => {
                    if module.ends_with(".weight") || module.ends_with(".bias") {
                        replaced.insert(module, key.to_string());
                        continue;
                    }
                    return Err(bad(
                        &st,
                        format!("tensor `{key}` is neither a LoRA tensor nor a whole weight"),
                        "retort reads adapters PEFT wrote for LoRA, rsLoRA and DoRA",
                    ));
                }
            };
            parts.entry(module).or_default().insert(what, key.to_string());
        }
        let mut modules = BTreeMap::new();
        for (module, p) in parts {
            let (kind, a, b) = match (p.get("A"), p.get("B"), p.get("eA"), p.get("eB")) {
                (Some(a), Some(b), None, None) => (ModuleKind::Linear, a.clone(), b.clone()),
                (None, None, Some(a), Some(b)) => (ModuleKind::Embedding, a.clone(), b.clone()),
                _ => {
                    return Err(bad(
                        &st,
                        format!("module `{module}` does not have exactly one pair of LoRA A and B tensors"),
                        "the file is incomplete or mixes adapters; save it again with PEFT",
                    ));
                }
            };
            let shape = |k: &str| weights.info(k).map(|i| i.shape.clone()).unwrap_or_default();
            let (sa, sb) = (shape(&a), shape(&b));
            let rank = sa.first().copied().unwrap_or(0);
            if sa.len() != 2 || sb.len() != 2 || sb[1] != rank || rank == 0 {
                return Err(bad(
                    &st,
                    format!(
                        "module `{module}`: A has shape {sa:?} and B {sb:?}; expected [r, in] and [out, r]"
                    ),
                    "the file is corrupt or not a PEFT LoRA adapter",
                ));
            }
            let (r_cfg, alpha) = config.rank_alpha(&module);
            if r_cfg != rank {
                return Err(bad(
                    &cfg_path,
                    format!("says module `{module}` has rank {r_cfg}, but its tensors have rank {rank}"),
                    "adapter_config.json does not belong to these weights (check `r` and `rank_pattern`)",
                ));
            }
            if config.use_dora && kind == ModuleKind::Linear && !p.contains_key("m") {
                return Err(bad(
                    &st,
                    format!("DoRA module `{module}` has no lora_magnitude_vector"),
                    "save the adapter again with PEFT",
                ));
            }
            if kind == ModuleKind::Embedding && p.contains_key("m") {
                return Err(bad(
                    &st,
                    format!("module `{module}`: DoRA on embeddings is not supported"),
                    "train DoRA on linear layers only",
                ));
            }
            modules.insert(
                module,
                Module {
                    kind,
                    a,
                    b,
                    magnitude: if config.use_dora { p.get("m").cloned() } else { None },
                    bias: p.get("bias").cloned(),
                    rank,
                    alpha,
                    scale: config.scale(rank, alpha),
                },
            );
        }
        if modules.is_empty() && replaced.is_empty() {
            return Err(bad(&st, "holds no tensors", "the adapter is empty; train it again"));
        }
        Ok(Adapter { dir: dir.to_path_buf(), config, raw_config: raw, weights, modules, replaced })
    }

    /// The shape of an adapter tensor.
    pub fn shape(&self, key: &str) -> Vec<usize> {
        self.weights.info(key).map(|i| i.shape.clone()).unwrap_or_default()
    }

    /// An adapter tensor as f32.
    pub fn values(&self, key: &str) -> Result<Vec<f32>> {
        let view = self
            .weights
            .get(key)
            .ok_or_else(|| bad(&self.dir, format!("tensor `{key}` is missing"), "save the adapter again"))?;
        Ok(crate::quant::view_to_f32(&view)?)
    }

    /// True when the adapter changes `lm_head` (LoRA or a whole saved copy).
    pub fn touches_lm_head(&self) -> bool {
        self.modules.contains_key("lm_head") || self.replaced.contains_key("lm_head.weight")
    }

    /// Checks every adapter tensor against the base: the module exists and the shapes fit. `specs` is
    /// the base's tensor table (untied when the adapter changes `lm_head` of a tied model).
    pub fn check(&self, cfg: &ModelConfig, specs: &[TensorSpec], base: &Checkpoint) -> Result<()> {
        let trained_on = self.config.base_model.clone();
        let base_shape = |key: &str| -> Option<Vec<usize>> {
            specs
                .iter()
                .find(|s| s.name == key)
                .map(|s| s.shape.clone())
                .or_else(|| base.info(key).map(|i| i.shape.clone()))
        };
        let arch = cfg.arch.hf_name().to_string();
        for (module, m) in &self.modules {
            let weight = format!("{module}.weight");
            let Some(w) = base_shape(&weight) else {
                return Err(ExportError::AdapterModule {
                    tensor: m.a.clone(),
                    module: module.clone(),
                    arch,
                    trained_on,
                });
            };
            if w.len() != 2 {
                return Err(bad(
                    &self.dir,
                    format!(
                        "tensor `{}` adapts `{module}`, which is not a linear layer or an embedding (shape {w:?})",
                        m.a
                    ),
                    "LoRA adapts linear layers and embeddings; export the adapter with the base it was trained on",
                ));
            }
            let (sa, sb) = (self.shape(&m.a), self.shape(&m.b));
            let (expect_a, expect_b) = match m.kind {
                ModuleKind::Linear => (vec![m.rank, w[1]], vec![w[0], m.rank]),
                ModuleKind::Embedding => (vec![m.rank, w[0]], vec![w[1], m.rank]),
            };
            for (key, found, expected) in [(&m.a, sa, expect_a), (&m.b, sb, expect_b)] {
                if found != expected {
                    return Err(ExportError::AdapterShape {
                        tensor: key.clone(),
                        expected,
                        found,
                        trained_on,
                    });
                }
            }
            if let Some(k) = &m.magnitude
                && self.shape(k) != [w[0]]
            {
                return Err(ExportError::AdapterShape {
                    tensor: k.clone(),
                    expected: vec![w[0]],
                    found: self.shape(k),
                    trained_on,
                });
            }
            if let Some(k) = &m.bias {
                let bias = format!("{module}.bias");
                if base_shape(&bias).is_none() {
                    return Err(bad(
                        &self.dir,
                        format!(
                            "module `{module}` has a LoRA bias (`lora_bias`), but the base layer has no bias to merge it into"
                        ),
                        "PEFT cannot merge it either; train without lora_bias",
                    ));
                }
                if self.shape(k) != [w[0]] {
                    return Err(ExportError::AdapterShape {
                        tensor: k.clone(),
                        expected: vec![w[0]],
                        found: self.shape(k),
                        trained_on,
                    });
                }
            }
        }
        for (target, key) in &self.replaced {
            let Some(expected) = base_shape(target) else {
                return Err(ExportError::AdapterModule {
                    tensor: key.clone(),
                    module: target.trim_end_matches(".weight").trim_end_matches(".bias").to_string(),
                    arch,
                    trained_on,
                });
            };
            let found = self.shape(key);
            if found != expected {
                let rows = |s: &[usize]| s.first().copied().unwrap_or(0);
                if (target.contains("embed_tokens") || target.starts_with("lm_head"))
                    && found.len() == 2
                    && rows(&found) != rows(&expected)
                {
                    return Err(bad(
                        &self.dir,
                        format!(
                            "`{key}` has {} rows but the base vocabulary has {}: the adapter was trained with a resized vocabulary (added tokens)",
                            rows(&found),
                            rows(&expected)
                        ),
                        "retort cannot export resized vocabularies yet: the tokenizer files would not match; merge with PEFT and save the tokenizer together",
                    ));
                }
                return Err(ExportError::AdapterShape { tensor: key.clone(), expected, found, trained_on });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_pattern_matching() {
        assert!(pattern_matches("v_proj", "model.layers.0.self_attn.v_proj"));
        assert!(pattern_matches("model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj"));
        assert!(!pattern_matches("model.layers.1.mlp.down_proj", "model.layers.11.mlp.down_proj"));
        assert!(!pattern_matches("proj", "model.layers.0.self_attn.v_proj"), "whole name segments only");
        assert!(pattern_matches(r"layers\.[01]\.self_attn\.q_proj", "model.layers.1.self_attn.q_proj"));
        let c = AdapterConfig {
            r: 8,
            lora_alpha: 16.0,
            use_rslora: true,
            use_dora: false,
            rank_pattern: vec![("v_proj".into(), 4)],
            alpha_pattern: vec![("o_proj".into(), 32.0)],
            modules_to_save: vec![],
            base_model: None,
        };
        assert_eq!(c.rank_alpha("model.layers.0.self_attn.v_proj"), (4, 16.0));
        assert_eq!(c.rank_alpha("model.layers.0.self_attn.o_proj"), (8, 32.0));
        assert_eq!(c.scale(4, 16.0), 8.0);
        assert!(c.needs_baked_scales());
    }

    #[test]
    fn key_forms() {
        assert_eq!(
            split_key("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"),
            ("model.layers.0.mlp.up_proj".into(), ".lora_A.weight")
        );
        assert_eq!(split_key("base_model.model.lm_head.weight"), ("lm_head.weight".into(), ""));
        assert_eq!(
            split_key("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector").1,
            ".lora_magnitude_vector"
        );
    }
}
