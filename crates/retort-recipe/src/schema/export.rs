//! `[export]`: what to write for serving.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::types::{ByteSize, ExportFormat};

/// Precision of the merged model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportDtype {
    /// The base model's own dtype.
    Auto,
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
}

/// `[export.ollama]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Ollama {
    /// The `SYSTEM` line of the Modelfile. Default: `distill.system_prompt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

/// `[export]`: outputs for llama.cpp, Ollama, vLLM and transformers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Export {
    /// What to write: `merged` (HF safetensors), `adapter` (PEFT, for vLLM and transformers),
    /// `gguf:TYPE` (llama.cpp), `gguf-adapter` (llama.cpp `--lora`), `ollama` (a Modelfile for a GGUF).
    pub formats: Vec<ExportFormat>,
    /// Precision of `merged`.
    pub dtype: ExportDtype,
    /// `merged` is split into files of at most this size (with an index), as the hub does.
    pub shard_size: ByteSize,
    /// File name stem of the outputs, e.g. `<name>-Q4_K_M.gguf`. Default: `project.name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Ollama Modelfile options.
    pub ollama: Ollama,
}

impl Default for Export {
    fn default() -> Self {
        Export {
            formats: vec![ExportFormat::Adapter, ExportFormat::Gguf("q4_k_m".into()), ExportFormat::Ollama],
            dtype: ExportDtype::Auto,
            shard_size: ByteSize(5_000_000_000),
            name: None,
            ollama: Ollama::default(),
        }
    }
}
