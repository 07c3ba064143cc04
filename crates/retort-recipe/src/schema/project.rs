//! `[project]` and `[base]`.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::types::ModelRef;

/// `[project]`: names and places.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Project {
    /// Names the output folders and the exported model. Lowercase letters, digits, `-`, `_` and `.`.
    /// Default: the recipe's file name without `.toml`.
    pub name: String,
    /// Seed for everything random: data shuffling and splits, LoRA initialisation, dropout, sampling.
    /// The same recipe with the same seed gives the same result on the CPU.
    pub seed: u64,
    /// One line about the task, shown in reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Where the dataset lives: distill writes `train.jsonl`, `val.jsonl` and `test.jsonl` here, train and
    /// eval read them. Without `[distill]`, put your own files here. Default: `data/<name>` next to the
    /// recipe.
    pub data_dir: PathBuf,
    /// Where training runs, evaluation reports and exports go. Default: `checkpoints/<name>` next to the
    /// recipe.
    pub output_dir: PathBuf,
}

impl Default for Project {
    fn default() -> Self {
        Project {
            name: String::new(),
            seed: 42,
            description: None,
            data_dir: PathBuf::new(),
            output_dir: PathBuf::new(),
        }
    }
}

/// Precision of the frozen base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// bf16 on GPUs that support it (f16 on older ones), f32 on the CPU.
    Auto,
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
}

/// Quantization of the frozen base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Quantize {
    /// Keep the base in `dtype` (LoRA).
    None,
    /// 4-bit NormalFloat, bitsandbytes-compatible (QLoRA): about a quarter of the memory of bf16.
    Nf4,
}

/// `[base]`: the open model to fine-tune.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Base {
    /// Required. A Hugging Face hub id (`Qwen/Qwen2.5-1.5B-Instruct`), a local directory in Hugging Face
    /// format, or `builtin:tiny-llama` (a tiny random model retort creates, to try the pipeline offline;
    /// it shows the pipeline works, not quality).
    pub model: ModelRef,
    /// Hub revision: branch, tag or commit hash. Pin a commit for reproducible jobs. Hub ids only.
    pub revision: String,
    /// Precision of the frozen weights and activations. LoRA adapter weights, optimizer state and the
    /// loss are always f32.
    pub dtype: Dtype,
    /// `nf4` trains QLoRA: the base is quantized to 4 bits when loaded. Slower per step than `none`
    /// but fits a model about three times larger in the same memory.
    pub quantize: Quantize,
    /// With `nf4`: also quantize the per-block scales (8-bit, blocks of 256), saving about 0.37
    /// bits per parameter, as in the QLoRA paper.
    pub double_quant: bool,
    /// A Jinja chat template file that replaces the model's own (`chat_template` in
    /// `tokenizer_config.json`). Use it for base models without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<PathBuf>,
}

impl Default for Base {
    fn default() -> Self {
        Base {
            model: ModelRef::default(),
            revision: "main".into(),
            dtype: Dtype::Auto,
            quantize: Quantize::None,
            double_quant: true,
            chat_template: None,
        }
    }
}
