//! `[train]`: the supervised fine-tuning run.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::schema::distill::DatasetFormat;
use crate::types::{Device, Duration};

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine decay to `min_lr_ratio` x `lr`.
    Cosine,
    /// Linear decay to `min_lr_ratio` x `lr`.
    Linear,
    /// Constant `lr`.
    Constant,
}

/// Which tokens the loss is computed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LossOn {
    /// Assistant turns only, including their end-of-turn token: the model learns to answer, not to
    /// imitate prompts.
    Completion,
    /// Every token.
    All,
}

/// What to do with an example longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TooLong {
    /// Cut it to `max_seq_len` tokens (counted and reported).
    Truncate,
    /// Leave it out (counted and reported).
    Drop,
}

/// What to do with a dataset row that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRow {
    /// Stop with the file and line number.
    Fail,
    /// Skip it, count it and report the count.
    Skip,
}

/// On, off, or decided by retort. Written `"auto"`, `true`/`"on"` or `false`/`"off"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[schemars(with = "ToggleSchema")]
pub enum Toggle {
    /// retort decides (documented per key).
    Auto,
    /// Always on.
    On,
    /// Always off.
    Off,
}

#[derive(JsonSchema)]
#[allow(dead_code)]
#[serde(untagged)]
enum ToggleSchema {
    Bool(bool),
    Word(ToggleWord),
}

#[derive(JsonSchema)]
#[allow(dead_code)]
#[serde(rename_all = "lowercase")]
enum ToggleWord {
    Auto,
    On,
    Off,
}

impl Serialize for Toggle {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Toggle::Auto => s.serialize_str("auto"),
            Toggle::On => s.serialize_bool(true),
            Toggle::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Toggle {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Toggle;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`true`, `false` or \"auto\"")
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Toggle, E> {
                Ok(if b { Toggle::On } else { Toggle::Off })
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Toggle, E> {
                match s {
                    "auto" => Ok(Toggle::Auto),
                    "on" | "true" => Ok(Toggle::On),
                    "off" | "false" => Ok(Toggle::Off),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(s), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `[train]`: optimisation and checkpointing. Defaults follow the QLoRA and Unsloth recipes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Train {
    /// Where to train: `auto` picks CUDA, then wgpu, then the CPU, and says which.
    pub device: Device,
    /// Passes over the training split.
    pub epochs: u32,
    /// Stop after this many optimizer steps instead of counting epochs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Sequences per forward/backward pass. Lower it (and raise `grad_accum`) when memory runs out.
    pub micro_batch_size: u32,
    /// Micro-batches per optimizer step. The loss is normalised over all label tokens of the step, so
    /// `micro_batch_size` x `grad_accum` is what matters for the result.
    pub grad_accum: u32,
    /// Longest sequence in tokens, and the length packed sequences are filled to.
    pub max_seq_len: u32,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning-rate decay after warmup.
    pub schedule: Schedule,
    /// Warmup as a fraction of all steps, in [0, 1).
    pub warmup_ratio: f64,
    /// Warmup in steps; overrides `warmup_ratio`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// The learning rate decays to this fraction of `lr`.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay on adapter weights.
    pub weight_decay: f64,
    /// AdamW beta1.
    pub adam_beta1: f64,
    /// AdamW beta2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_eps: f64,
    /// Clip gradients to this global L2 norm; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// Pack several examples into each sequence (no attention or loss across their boundaries).
    /// Much faster for short examples.
    pub packing: bool,
    /// Which tokens carry loss.
    pub loss_on: LossOn,
    /// Examples longer than `max_seq_len`: `truncate` or `drop`. Both are counted and reported.
    pub too_long: TooLong,
    /// Rows that cannot be read: `fail` or `skip` (counted).
    pub on_bad_row: OnBadRow,
    /// Format of the dataset files; `auto` detects it from the first row.
    pub data_format: DatasetFormat,
    /// Activation checkpointing: keep only each decoder layer's input and recompute the layer in the
    /// backward pass, as transformers does (several times less memory for a third more time). `auto` is on
    /// for GPUs and off on the CPU.
    pub checkpointing: Toggle,
    /// With activation checkpointing on a GPU, keep each layer's saved input in host memory instead of
    /// on the device, as Unsloth's offloaded gradient checkpointing does: device memory then no longer
    /// grows with layers x tokens (20 GB of the 24 for 78k tokens of an 8B model), for a copy of each
    /// layer's input to the host and back in every micro-batch. For long contexts. No effect on the
    /// CPU or without checkpointing.
    pub offload_checkpoints: bool,
    /// Run the adapters' matmuls in the base's 16-bit dtype, as `torch.autocast` does under HF
    /// Trainer's `bf16=True`: tensor-core kernels on GPUs, and the backward keeps the base's 16-bit
    /// activations instead of an f32 copy per adapter. Adapter weights, optimizer state and the loss stay
    /// f32. `auto` is on for GPUs with a bf16/f16 base and off on the CPU; no effect with an f32 base, or
    /// on DoRA (always f32).
    pub autocast: Toggle,
    /// Validation loss every N optimizer steps. Default: 10 times over the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<u64>,
    /// Save a resumable checkpoint every N optimizer steps (also on SIGINT/SIGTERM and at the end).
    /// Default: 10 times over the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_every: Option<u64>,
    /// Checkpoints to keep; older ones are deleted after a newer one is safely written.
    pub keep_last: u32,
    /// Stop cleanly with a checkpoint after this much wall time (exit code 4; rerun to resume).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_time: Option<Duration>,
    /// Consecutive steps with a NaN or infinite loss or gradient to skip before stopping with an
    /// error. Skipped steps never touch the adapters or checkpoints.
    pub max_bad_steps: u32,
}

impl Default for Train {
    fn default() -> Self {
        Train {
            device: Device::Auto,
            epochs: 3,
            max_steps: None,
            micro_batch_size: 4,
            grad_accum: 4,
            max_seq_len: 2048,
            lr: 2e-4,
            schedule: Schedule::Cosine,
            warmup_ratio: 0.03,
            warmup_steps: None,
            min_lr_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            packing: true,
            loss_on: LossOn::Completion,
            too_long: TooLong::Truncate,
            on_bad_row: OnBadRow::Fail,
            data_format: DatasetFormat::Auto,
            checkpointing: Toggle::Auto,
            offload_checkpoints: false,
            autocast: Toggle::Auto,
            eval_every: None,
            save_every: None,
            keep_last: 3,
            max_time: None,
            max_bad_steps: 5,
        }
    }
}
