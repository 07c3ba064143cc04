//! `config.json` as published on the hub, and the validated [`ModelConfig`] the rest of retort uses.
//!
//! The raw struct keeps HF's field names (`num_key_value_heads`, `rope_scaling`, ...) and ignores fields
//! retort does not need. [`ModelConfig::from_hf`] turns it into explicit family behaviour: every quirk
//! (Qwen2 q/k/v bias, Qwen3 and Gemma 3 q/k norms, Phi-3 fused projections, Gemma `1 + w` norms and
//! embedding scale, soft-capping, sliding-window layers, tied embeddings) becomes a field here, so model
//! code never branches on the family name.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// A supported architecture, keyed by `architectures[0]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// `LlamaForCausalLM` (Llama 2/3.x and many derivatives).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5).
    Qwen2,
    /// `Qwen3ForCausalLM`.
    Qwen3,
    /// `Phi3ForCausalLM` (Phi-3, Phi-3.5, Phi-4-mini).
    Phi3,
    /// `Gemma2ForCausalLM`.
    Gemma2,
    /// `Gemma3ForCausalLM` (the text-only checkpoints).
    Gemma3,
}

impl Arch {
    /// Every supported architecture.
    pub const ALL: [Arch; 7] =
        [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Qwen3, Arch::Phi3, Arch::Gemma2, Arch::Gemma3];

    /// The `architectures[0]` string.
    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
            Arch::Gemma2 => "Gemma2ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// Looks an architecture up by its `architectures[0]` string.
    pub fn from_hf_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.hf_name() == name)
    }

    /// llama.cpp's `general.architecture` (Mistral is written as `llama`, as llama.cpp's converter does).
    pub fn gguf_arch(self) -> &'static str {
        match self {
            Arch::Llama | Arch::Mistral => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// True when llama.cpp applies rotary embeddings to interleaved pairs for this architecture, so its
    /// converter permutes the rows of the Q and K projections (HF uses `rotate_half` on halves).
    pub fn gguf_permutes_qk(self) -> bool {
        matches!(self, Arch::Llama | Arch::Mistral)
    }

    /// True when llama.cpp's converter stores RMSNorm weights as `1 + w` (Gemma keeps `w` and adds one at
    /// run time; llama.cpp bakes it in).
    pub fn gguf_norms_plus_one(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }
}

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU MLP).
    Silu,
    /// GELU with the tanh approximation, `gelu_pytorch_tanh` (GeGLU MLP).
    GeluTanh,
    /// Exact GELU (erf).
    Gelu,
}

/// How rotary position frequencies are scaled, as `rope_scaling` says.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// The factor.
        factor: f64,
    },
    /// Dynamic NTK (Qwen and others): frequencies change only past the original context.
    Dynamic {
        /// The factor.
        factor: f64,
    },
    /// Llama 3.1+: low frequencies scaled by `factor`, high kept, smooth in between.
    Llama3 {
        /// The factor.
        factor: f64,
        /// Wavelengths longer than `original / low_freq_factor` are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
    /// YaRN.
    Yarn {
        /// The factor.
        factor: f64,
        /// The context the model was pre-trained with.
        original_max_position_embeddings: usize,
        /// Fast boundary of the ramp.
        beta_fast: f64,
        /// Slow boundary of the ramp.
        beta_slow: f64,
        /// Attention temperature; default `0.1 ln(factor) + 1`.
        attention_factor: Option<f64>,
    },
    /// Phi-3 "LongRoPE": per-dimension factors for short and long contexts.
    LongRope {
        /// Factors used up to `original_max_position_embeddings`.
        short_factor: Vec<f64>,
        /// Factors used beyond it.
        long_factor: Vec<f64>,
        /// The context the model was pre-trained with.
        original_max_position_embeddings: usize,
        /// Attention temperature; default from the context ratio.
        attention_factor: Option<f64>,
    },
}

/// How a layer's attention sees the past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerAttention {
    /// Every earlier position.
    Full,
    /// Only the last `window` positions (the query's own included).
    Sliding {
        /// Window length in tokens.
        window: usize,
    },
}

/// A validated model configuration: every family difference is an explicit field.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The architecture.
    pub arch: Arch,
    /// Vocabulary rows of the embedding (may exceed the tokenizer's vocabulary: padding rows).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Dimensions of each head that get rotary embeddings (all, unless `partial_rotary_factor` < 1).
    pub rotary_dim: usize,
    /// Trained context length.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency (for full-attention layers).
    pub rope_theta: f64,
    /// RoPE base for sliding-window layers, when it differs (Gemma 3).
    pub rope_local_theta: Option<f64>,
    /// RoPE scaling (for full-attention layers).
    pub rope_scaling: RopeScaling,
    /// RoPE scaling of sliding-window layers when they have their own RoPE (Gemma 3; usually none).
    pub rope_local_scaling: RopeScaling,
    /// MLP activation.
    pub activation: Activation,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (Qwen2, `attention_bias`).
    pub qkv_bias: bool,
    /// The output projection has a bias (`attention_bias` in Llama-style configs).
    pub o_bias: bool,
    /// MLP projections have biases.
    pub mlp_bias: bool,
    /// RMSNorm on each query and key head before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// RMSNorm multiplies by `1 + w` instead of `w` (Gemma).
    pub norm_plus_one: bool,
    /// The embedding output is multiplied by `sqrt(hidden_size)` (Gemma).
    pub scale_embeddings: bool,
    /// Gemma 2/3 "sandwich" norms: a norm after attention and another pair around the MLP.
    pub sandwich_norms: bool,
    /// Phi-3: q, k and v in one `qkv_proj`, gate and up in one `gate_up_proj`.
    pub fused_projections: bool,
    /// Attention scores are multiplied by this (`1/sqrt(head_dim)`, or `query_pre_attn_scalar^-0.5`).
    pub attn_scale: f64,
    /// `tanh` soft-capping of attention scores (Gemma 2).
    pub attn_logit_softcap: Option<f64>,
    /// `tanh` soft-capping of the final logits (Gemma 2).
    pub final_logit_softcap: Option<f64>,
    /// Attention span of each layer.
    pub layers: Vec<LayerAttention>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids (config.json may list several).
    pub eos_token_ids: Vec<u32>,
    /// Padding token id.
    pub pad_token_id: Option<u32>,
    /// The dtype the weights were saved in (`torch_dtype` / `dtype`), if stated.
    pub torch_dtype: Option<String>,
}

/// A problem with `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The directory has no `config.json`.
    #[error("`{}` has no config.json; a model directory in Hugging Face format holds config.json, tokenizer files and *.safetensors", dir.display())]
    Missing {
        /// The model directory.
        dir: PathBuf,
    },
    /// It could not be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// It is not valid JSON or a field has the wrong JSON type.
    #[error("`{}` is not a valid model config at line {line}, column {col}: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Line of the problem.
        line: usize,
        /// Column of the problem.
        col: usize,
        /// What serde_json said.
        message: String,
    },
    /// The architecture is not one retort supports.
    #[error("`{}`: architecture `{found}` is not supported; supported: {}", path.display(), Arch::ALL.map(|a| a.hf_name()).join(", "))]
    UnsupportedArch {
        /// The file.
        path: PathBuf,
        /// What `architectures[0]` says (or `model_type` when that is absent).
        found: String,
    },
    /// A field is missing or has an impossible value.
    #[error("`{}`: field `{field}` {problem}", path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// The HF field name.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// `config.json` as written by `transformers`; only the fields retort reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HfConfig {
    /// Model class names; the first selects the family.
    pub architectures: Option<Vec<String>>,
    /// `model_type` (used when `architectures` is absent).
    pub model_type: Option<String>,
    /// Vocabulary size.
    pub vocab_size: Option<usize>,
    /// Width.
    pub hidden_size: Option<usize>,
    /// MLP width.
    pub intermediate_size: Option<usize>,
    /// Layers.
    pub num_hidden_layers: Option<usize>,
    /// Query heads.
    pub num_attention_heads: Option<usize>,
    /// Key/value heads.
    pub num_key_value_heads: Option<usize>,
    /// Head width.
    pub head_dim: Option<usize>,
    /// Activation (`hidden_act`).
    pub hidden_act: Option<String>,
    /// Activation (Gemma's `hidden_activation`, preferred when present).
    pub hidden_activation: Option<String>,
    /// Context length.
    pub max_position_embeddings: Option<usize>,
    /// Phi-3: pre-training context (also inside `rope_scaling` for others).
    pub original_max_position_embeddings: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: Option<f64>,
    /// RoPE base.
    pub rope_theta: Option<f64>,
    /// Gemma 3: RoPE base of sliding layers.
    pub rope_local_base_freq: Option<f64>,
    /// RoPE scaling object (transformers 4).
    pub rope_scaling: Option<Value>,
    /// transformers 5's replacement for `rope_theta` and `rope_scaling`: one object (`rope_type`,
    /// `rope_theta`, scaling fields) or one per layer type (`full_attention`, `sliding_attention`).
    pub rope_parameters: Option<Value>,
    /// Phi-3/4: fraction of each head that is rotated.
    pub partial_rotary_factor: Option<f64>,
    /// Tied embeddings.
    pub tie_word_embeddings: Option<bool>,
    /// Llama-style attention biases.
    pub attention_bias: Option<bool>,
    /// MLP biases.
    pub mlp_bias: Option<bool>,
    /// Sliding window length (null when off).
    pub sliding_window: Option<Value>,
    /// Qwen2: whether sliding windows are used at all.
    pub use_sliding_window: Option<bool>,
    /// Qwen2: layers below this use full attention.
    pub max_window_layers: Option<usize>,
    /// Gemma 3: every N-th layer is global.
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3 as written by transformers 5.
    #[serde(rename = "_sliding_window_pattern")]
    pub sliding_window_pattern_private: Option<usize>,
    /// Newer configs: per-layer `sliding_attention` / `full_attention`.
    pub layer_types: Option<Vec<String>>,
    /// Gemma 2: attention soft-cap.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: logits soft-cap.
    pub final_logit_softcapping: Option<f64>,
    /// Gemma: attention scale denominator.
    pub query_pre_attn_scalar: Option<f64>,
    /// BOS id.
    pub bos_token_id: Option<Value>,
    /// EOS id or ids.
    pub eos_token_id: Option<Value>,
    /// PAD id.
    pub pad_token_id: Option<Value>,
    /// Saved dtype (older transformers).
    pub torch_dtype: Option<String>,
    /// Saved dtype (newer transformers).
    pub dtype: Option<String>,
}

impl HfConfig {
    /// The config with `rope_theta`, `rope_scaling`, `rope_local_base_freq` and
    /// `partial_rotary_factor` taken from `rope_parameters` where it gives them (configs saved by
    /// transformers 5 carry only `rope_parameters`; older ones only the flat fields). Like
    /// transformers 5, a value inside `rope_parameters` wins over a flat field beside it.
    pub fn with_rope_parameters(&self) -> HfConfig {
        let mut c = self.clone();
        let Some(Value::Object(p)) = &self.rope_parameters else { return c };
        let full = match p.get("full_attention") {
            Some(Value::Object(f)) => f,
            _ => p,
        };
        if let Some(theta) = full.get("rope_theta").and_then(Value::as_f64) {
            c.rope_theta = Some(theta);
        }
        if let Some(f) = full.get("partial_rotary_factor").and_then(Value::as_f64) {
            c.partial_rotary_factor = Some(f);
        }
        if let Some(theta) =
            p.get("sliding_attention").and_then(|s| s.get("rope_theta")).and_then(Value::as_f64)
        {
            c.rope_local_base_freq = Some(theta);
        }
        let kind = full.get("rope_type").or_else(|| full.get("type")).and_then(Value::as_str);
        if kind.is_some_and(|k| k != "default") {
            let mut scaling = full.clone();
            scaling.remove("rope_theta");
            scaling.remove("partial_rotary_factor");
            c.rope_scaling = Some(Value::Object(scaling));
        } else if kind.is_some() {
            c.rope_scaling = None;
        }
        c
    }
}

/// `x > 0`, false for NaN (so a NaN in a config is rejected).
fn positive(x: f64) -> bool {
    x > 0.0
}

fn token_ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
        Some(Value::Array(a)) => {
            a.iter().filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok())).collect()
        }
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Reads and validates `<dir>/config.json`.
    pub fn load(dir: &Path) -> Result<ModelConfig, ConfigError> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(ConfigError::Missing { dir: dir.to_path_buf() });
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ConfigError::Io { path: path.clone(), source })?;
        ModelConfig::parse(&text, &path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<ModelConfig, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: HfConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let message = if field.is_empty() || field == "." {
                inner.to_string()
            } else {
                format!("field `{field}`: {inner}")
            };
            ConfigError::Json { path: path.to_path_buf(), line: inner.line(), col: inner.column(), message }
        })?;
        ModelConfig::from_hf(&raw, path)
    }

    /// Validates a parsed config into family behaviour.
    pub fn from_hf(raw: &HfConfig, path: &Path) -> Result<ModelConfig, ConfigError> {
        let normalized = raw.with_rope_parameters();
        let raw = &normalized;
        let field = |field: &'static str, problem: String| ConfigError::Field {
            path: path.to_path_buf(),
            field,
            problem,
        };
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| raw.model_type.clone())
            .unwrap_or_default();
        let arch = Arch::from_hf_name(&arch_name).ok_or_else(|| ConfigError::UnsupportedArch {
            path: path.to_path_buf(),
            found: arch_name.clone(),
        })?;

        let need = |v: Option<usize>, name: &'static str| -> Result<usize, ConfigError> {
            match v {
                Some(0) => Err(field(name, "is 0; it must be at least 1".into())),
                Some(n) => Ok(n),
                None => Err(field(name, "is missing".into())),
            }
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let intermediate_size = need(raw.intermediate_size, "intermediate_size")?;
        let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        let num_kv_heads = need(Some(raw.num_key_value_heads.unwrap_or(num_heads)), "num_key_value_heads")?;
        if num_heads % num_kv_heads != 0 {
            return Err(field(
                "num_key_value_heads",
                format!("is {num_kv_heads}, which does not divide num_attention_heads ({num_heads})"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(0) => return Err(field("head_dim", "is 0; it must be at least 1".into())),
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(field(
                        "head_dim",
                        format!(
                            "is missing and hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_heads})"
                        ),
                    ));
                }
                hidden_size / num_heads
            }
        };
        let rope = RopeSource::of(raw, path)?;
        let partial = rope
            .full
            .and_then(|o| o.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            .or(raw.partial_rotary_factor)
            .unwrap_or(1.0);
        if !positive(partial) || partial > 1.0 {
            return Err(field("partial_rotary_factor", format!("is {partial}; it must be in (0, 1]")));
        }
        let rotary_dim = ((head_dim as f64) * partial).round() as usize;
        if !rotary_dim.is_multiple_of(2) || rotary_dim == 0 {
            return Err(field(
                "partial_rotary_factor",
                format!("gives {rotary_dim} rotary dimensions; it must be even"),
            ));
        }
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(match arch {
            Arch::Gemma2 | Arch::Gemma3 => 8192,
            _ => 4096,
        });
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(match arch {
            Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Qwen3 | Arch::Phi3 => 1e-6,
            Arch::Gemma2 | Arch::Gemma3 => 1e-6,
        });
        if !positive(rms_norm_eps) {
            return Err(field("rms_norm_eps", format!("is {rms_norm_eps}; it must be > 0")));
        }
        let rope_theta =
            rope.full.and_then(|o| o.get("rope_theta")).and_then(Value::as_f64).or(raw.rope_theta).unwrap_or(
                match arch {
                    Arch::Gemma3 => 1_000_000.0,
                    _ => 10_000.0,
                },
            );
        if !positive(rope_theta) {
            return Err(field("rope_theta", format!("is {rope_theta}; it must be > 0")));
        }

        let act_name =
            raw.hidden_activation.clone().or_else(|| raw.hidden_act.clone()).unwrap_or_else(|| {
                match arch {
                    Arch::Gemma2 | Arch::Gemma3 => "gelu_pytorch_tanh",
                    _ => "silu",
                }
                .to_string()
            });
        let activation = match act_name.as_str() {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => {
                let f = if raw.hidden_activation.is_some() { "hidden_activation" } else { "hidden_act" };
                return Err(field(f, format!("is `{other}`; supported: silu, gelu_pytorch_tanh, gelu")));
            }
        };

        let rope_scaling = match rope.full {
            Some(o) => parse_rope_scaling(o, raw, max_position_embeddings, rotary_dim, path)?,
            None => RopeScaling::None,
        };
        let rope_local_scaling = match rope.local {
            Some(o) => parse_rope_scaling(o, raw, max_position_embeddings, rotary_dim, path)?,
            None => RopeScaling::None,
        };
        let rope_local_theta =
            rope.local.and_then(|o| o.get("rope_theta")).and_then(Value::as_f64).or(raw.rope_local_base_freq);

        let gemma = matches!(arch, Arch::Gemma2 | Arch::Gemma3);
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let qkv_bias = matches!(arch, Arch::Qwen2) || attention_bias;
        let o_bias = !matches!(arch, Arch::Qwen2 | Arch::Qwen3) && attention_bias;
        let attn_scale = match raw.query_pre_attn_scalar {
            Some(q) if gemma => {
                if !positive(q) {
                    return Err(field("query_pre_attn_scalar", format!("is {q}; it must be > 0")));
                }
                1.0 / q.sqrt()
            }
            _ => 1.0 / (head_dim as f64).sqrt(),
        };

        let layers = layer_attention(raw, arch, num_layers, path)?;

        let tie_word_embeddings = raw.tie_word_embeddings.unwrap_or(gemma);
        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rotary_dim,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            rope_local_theta: if arch == Arch::Gemma3 {
                Some(rope_local_theta.unwrap_or(10_000.0))
            } else {
                rope_local_theta
            },
            rope_scaling,
            rope_local_scaling,
            activation,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            norm_plus_one: gemma,
            scale_embeddings: gemma,
            sandwich_norms: gemma,
            fused_projections: arch == Arch::Phi3,
            attn_scale,
            attn_logit_softcap: if arch == Arch::Gemma2 { raw.attn_logit_softcapping } else { None },
            final_logit_softcap: if gemma { raw.final_logit_softcapping } else { None },
            layers,
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
            pad_token_id: token_ids(&raw.pad_token_id).first().copied(),
            torch_dtype: raw.dtype.clone().or_else(|| raw.torch_dtype.clone()),
        })
    }

    /// Number of parameters of the full model (embedding counted once when tied).
    pub fn parameter_count(&self) -> u64 {
        crate::names::tensors(self).iter().map(|t| t.shape.iter().product::<usize>() as u64).sum()
    }
}

fn sliding_window(raw: &HfConfig, path: &Path) -> Result<Option<usize>, ConfigError> {
    match &raw.sliding_window {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(0) | None => Err(ConfigError::Field {
                path: path.to_path_buf(),
                field: "sliding_window",
                problem: format!("is {n}; it must be a positive integer or null"),
            }),
            Some(w) => Ok(Some(w as usize)),
        },
        Some(other) => Err(ConfigError::Field {
            path: path.to_path_buf(),
            field: "sliding_window",
            problem: format!("is {other}; it must be a positive integer or null"),
        }),
    }
}

fn layer_attention(
    raw: &HfConfig,
    arch: Arch,
    n: usize,
    path: &Path,
) -> Result<Vec<LayerAttention>, ConfigError> {
    let window = sliding_window(raw, path)?;
    let sliding = |on: bool| -> Result<LayerAttention, ConfigError> {
        match (on, window) {
            (false, _) => Ok(LayerAttention::Full),
            (true, Some(w)) => Ok(LayerAttention::Sliding { window: w }),
            (true, None) => Err(ConfigError::Field {
                path: path.to_path_buf(),
                field: "sliding_window",
                problem: "is missing but some layers use sliding-window attention".into(),
            }),
        }
    };
    if let Some(types) = &raw.layer_types {
        if types.len() != n {
            return Err(ConfigError::Field {
                path: path.to_path_buf(),
                field: "layer_types",
                problem: format!("has {} entries for {n} layers", types.len()),
            });
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(LayerAttention::Full),
                "sliding_attention" => sliding(true),
                other => Err(ConfigError::Field {
                    path: path.to_path_buf(),
                    field: "layer_types",
                    problem: format!("has `{other}`; supported: full_attention, sliding_attention"),
                }),
            })
            .collect();
    }
    (0..n)
        .map(|i| match arch {
            // transformers: Gemma 2 alternates, starting with a sliding layer.
            Arch::Gemma2 => sliding(window.is_some() && (i + 1) % 2 != 0),
            // Gemma 3: every `sliding_window_pattern`-th layer is global.
            Arch::Gemma3 => {
                let pattern =
                    raw.sliding_window_pattern.or(raw.sliding_window_pattern_private).unwrap_or(6).max(1);
                sliding(window.is_some() && (i + 1) % pattern != 0)
            }
            // Qwen2: only with use_sliding_window, and only from max_window_layers on.
            Arch::Qwen2 | Arch::Qwen3 => {
                let on = raw.use_sliding_window.unwrap_or(false) && i >= raw.max_window_layers.unwrap_or(0);
                sliding(on && window.is_some())
            }
            // Mistral and Phi-3 slide on every layer when a window is set.
            Arch::Mistral | Arch::Phi3 => sliding(window.is_some()),
            Arch::Llama => Ok(LayerAttention::Full),
        })
        .collect()
}

/// Where a config keeps its RoPE settings: transformers 5's `rope_parameters` (flat, or per layer type)
/// or transformers 4's `rope_scaling` (with `rope_theta` beside it).
struct RopeSource<'a> {
    /// Settings of full-attention layers (or of all layers).
    full: Option<&'a serde_json::Map<String, Value>>,
    /// Settings of sliding-window layers, when given separately.
    local: Option<&'a serde_json::Map<String, Value>>,
}

type JsonObject = serde_json::Map<String, Value>;

impl<'a> RopeSource<'a> {
    fn of(raw: &'a HfConfig, path: &Path) -> Result<RopeSource<'a>, ConfigError> {
        let obj = |v: &'a Value, field: &'static str| -> Result<Option<&'a JsonObject>, ConfigError> {
            match v {
                Value::Null => Ok(None),
                Value::Object(o) => Ok(Some(o)),
                other => Err(ConfigError::Field {
                    path: path.to_path_buf(),
                    field,
                    problem: format!("is {other}; expected an object or null"),
                }),
            }
        };
        if let Some(v) = &raw.rope_parameters {
            let Some(o) = obj(v, "rope_parameters")? else {
                return Ok(RopeSource { full: None, local: None });
            };
            if o.contains_key("full_attention") || o.contains_key("sliding_attention") {
                let full = o.get("full_attention").map(|v| obj(v, "rope_parameters")).transpose()?.flatten();
                let local =
                    o.get("sliding_attention").map(|v| obj(v, "rope_parameters")).transpose()?.flatten();
                return Ok(RopeSource { full, local });
            }
            return Ok(RopeSource { full: Some(o), local: None });
        }
        let full = raw.rope_scaling.as_ref().map(|v| obj(v, "rope_scaling")).transpose()?.flatten();
        Ok(RopeSource { full, local: None })
    }
}

fn parse_rope_scaling(
    o: &JsonObject,
    raw: &HfConfig,
    max_pos: usize,
    rotary_dim: usize,
    path: &Path,
) -> Result<RopeScaling, ConfigError> {
    let field = if raw.rope_parameters.is_some() { "rope_parameters" } else { "rope_scaling" };
    let err = |problem: String| ConfigError::Field { path: path.to_path_buf(), field, problem };
    let kind = o.get("rope_type").or_else(|| o.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |k: &str| o.get(k).and_then(Value::as_f64);
    let factor = || -> Result<f64, ConfigError> {
        match num("factor") {
            Some(f) if f > 0.0 => Ok(f),
            Some(f) => Err(err(format!("has factor {f}; it must be > 0"))),
            None => Err(err(format!("`{kind}` needs `factor`"))),
        }
    };
    let original = o
        .get("original_max_position_embeddings")
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .or(raw.original_max_position_embeddings);
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
        "dynamic" => Ok(RopeScaling::Dynamic { factor: factor()? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: original.unwrap_or(8192),
        }),
        "yarn" => Ok(RopeScaling::Yarn {
            factor: match num("factor") {
                Some(_) => factor()?,
                None => max_pos as f64 / original.unwrap_or(max_pos) as f64,
            },
            original_max_position_embeddings: original.unwrap_or(max_pos),
            beta_fast: num("beta_fast").unwrap_or(32.0),
            beta_slow: num("beta_slow").unwrap_or(1.0),
            attention_factor: num("attention_factor"),
        }),
        "longrope" | "su" => {
            let list = |k: &str| -> Result<Vec<f64>, ConfigError> {
                let a = o
                    .get(k)
                    .and_then(Value::as_array)
                    .ok_or_else(|| err(format!("`longrope` needs `{k}`")))?;
                let v: Vec<f64> = a.iter().filter_map(Value::as_f64).collect();
                if v.len() != rotary_dim / 2 || v.len() != a.len() {
                    return Err(err(format!(
                        "`{k}` has {} numbers; the model needs {}",
                        a.len(),
                        rotary_dim / 2
                    )));
                }
                Ok(v)
            };
            let original =
                original.ok_or_else(|| err("`longrope` needs `original_max_position_embeddings`".into()))?;
            Ok(RopeScaling::LongRope {
                short_factor: list("short_factor")?,
                long_factor: list("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor: num("attention_factor"),
            })
        }
        other => Err(err(format!(
            "has type `{other}`; supported: default, linear, dynamic, llama3, yarn, longrope"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig, ConfigError> {
        ModelConfig::parse(json, Path::new("config.json"))
    }

    const LLAMA32_1B: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 128000,
      "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
      "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
      "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
      "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16", "vocab_size": 128256}"#;

    #[test]
    fn llama_3_2() {
        let c = parse(LLAMA32_1B).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim, c.rotary_dim), (32, 8, 64, 64));
        assert_eq!(c.eos_token_ids, [128001, 128008, 128009]);
        assert!(c.tie_word_embeddings && !c.qkv_bias && !c.qk_norm);
        assert!(
            matches!(c.rope_scaling, RopeScaling::Llama3 { factor, original_max_position_embeddings: 8192, .. } if factor == 32.0)
        );
        assert!(c.layers.iter().all(|l| *l == LayerAttention::Full));
        // 1.24B parameters with the tied embedding counted once.
        assert_eq!(c.parameter_count(), 1_235_814_400);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_no_window_by_default() {
        let c = parse(r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":896,"intermediate_size":4864,
            "num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,"vocab_size":151936,
            "max_position_embeddings":32768,"rope_theta":1000000.0,"rms_norm_eps":1e-06,"sliding_window":32768,
            "use_sliding_window":false,"max_window_layers":21,"tie_word_embeddings":true,"eos_token_id":151645}"#)
        .unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert!(c.layers.iter().all(|l| *l == LayerAttention::Full));
        // 494M: Qwen2.5-0.5B.
        assert_eq!(c.parameter_count(), 494_032_768);
    }

    #[test]
    fn gemma2_quirks() {
        let c = parse(r#"{"architectures":["Gemma2ForCausalLM"],"hidden_size":2304,"intermediate_size":9216,
            "num_hidden_layers":26,"num_attention_heads":8,"num_key_value_heads":4,"head_dim":256,"vocab_size":256000,
            "hidden_act":"gelu_pytorch_tanh","hidden_activation":"gelu_pytorch_tanh","query_pre_attn_scalar":256,
            "sliding_window":4096,"attn_logit_softcapping":50.0,"final_logit_softcapping":30.0,"rms_norm_eps":1e-06}"#)
        .unwrap();
        assert_eq!(c.activation, Activation::GeluTanh);
        assert!(c.norm_plus_one && c.scale_embeddings && c.sandwich_norms && c.tie_word_embeddings);
        assert_eq!(c.attn_logit_softcap, Some(50.0));
        assert_eq!(c.final_logit_softcap, Some(30.0));
        assert_eq!(c.layers[0], LayerAttention::Sliding { window: 4096 });
        assert_eq!(c.layers[1], LayerAttention::Full);
        assert!((c.attn_scale - 1.0 / 16.0).abs() < 1e-12);
        // gemma-2-2b: 2.61B.
        assert_eq!(c.parameter_count(), 2_614_341_888);
    }

    #[test]
    fn gemma3_layer_pattern_and_local_rope() {
        let c = parse(r#"{"architectures":["Gemma3ForCausalLM"],"hidden_size":1152,"intermediate_size":6912,
            "num_hidden_layers":26,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":256,"vocab_size":262144,
            "query_pre_attn_scalar":256,"sliding_window":512,"sliding_window_pattern":6,"rope_theta":1000000.0,
            "rope_local_base_freq":10000.0,"final_logit_softcapping":null,"attn_logit_softcapping":null}"#)
        .unwrap();
        let globals: Vec<usize> = c
            .layers
            .iter()
            .enumerate()
            .filter(|(_, l)| **l == LayerAttention::Full)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(globals, [5, 11, 17, 23]);
        assert_eq!(c.rope_local_theta, Some(10_000.0));
        assert!(c.qk_norm);
        assert_eq!(c.final_logit_softcap, None);
    }

    #[test]
    fn phi3_fused_and_longrope() {
        let short: Vec<String> = (0..48).map(|i| format!("{}", 1.0 + i as f64 * 0.01)).collect();
        let json = format!(
            r#"{{"architectures":["Phi3ForCausalLM"],"hidden_size":3072,"intermediate_size":8192,"num_hidden_layers":32,
            "num_attention_heads":32,"num_key_value_heads":32,"vocab_size":32064,"max_position_embeddings":131072,
            "original_max_position_embeddings":4096,"sliding_window":262144,"rope_scaling":{{"type":"longrope",
            "short_factor":[{s}],"long_factor":[{s}]}}}}"#,
            s = short.join(",")
        );
        let c = parse(&json).unwrap();
        assert!(c.fused_projections);
        assert!(
            matches!(&c.rope_scaling, RopeScaling::LongRope { short_factor, original_max_position_embeddings: 4096, .. } if short_factor.len() == 48)
        );
        assert_eq!(c.layers[0], LayerAttention::Sliding { window: 262144 });
    }

    #[test]
    fn transformers_5_rope_parameters() {
        // What transformers 5 saves for Llama 3.2: no rope_theta, no rope_scaling.
        let c = parse(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":320,
            "rope_parameters":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
            "original_max_position_embeddings":64,"rope_theta":500000.0,"rope_type":"llama3"}}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { original_max_position_embeddings: 64, .. }));
        // Gemma 3: one object per layer type.
        let c = parse(r#"{"architectures":["Gemma3ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"vocab_size":320,
            "sliding_window":32,"layer_types":["sliding_attention","full_attention"],
            "rope_parameters":{"full_attention":{"rope_theta":1000000.0,"rope_type":"linear","factor":8.0},
            "sliding_attention":{"rope_theta":10000.0,"rope_type":"default"}}}"#)
        .unwrap();
        assert_eq!((c.rope_theta, c.rope_local_theta), (1_000_000.0, Some(10_000.0)));
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 8.0 });
        // As in transformers 5, a value inside rope_parameters wins over a flat field beside it.
        let c = parse(
            r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":320,"rope_theta":5.0,
            "rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"}}"#,
        )
        .unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling.clone()), (1_000_000.0, RopeScaling::None));
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(r#"{"architectures":["GPT2LMHeadModel"]}"#).unwrap_err().to_string();
        assert!(
            e.contains("GPT2LMHeadModel")
                && e.contains("LlamaForCausalLM")
                && e.contains("Gemma3ForCausalLM"),
            "{e}"
        );
        let e = parse(r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64}"#).unwrap_err().to_string();
        assert!(e.contains("`intermediate_size` is missing"), "{e}");
        let e = parse(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":3,"vocab_size":10}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`num_key_value_heads` is 3, which does not divide num_attention_heads (4)"),
            "{e}"
        );
        let e =
            parse(r#"{"architectures":["LlamaForCausalLM"], "hidden_size": "big"}"#).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("hidden_size"), "{e}");
        let e = parse(r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":10,"rope_scaling":{"rope_type":"magic","factor":2}}"#)
        .unwrap_err()
        .to_string();
        assert!(e.contains("`rope_scaling`") && e.contains("magic"), "{e}");
    }
}
