//! The recipe schema: one struct per section, every field documented and defaulted.

pub mod distill;
pub mod eval;
pub mod export;
pub mod lora;
pub mod project;
pub mod teacher;
pub mod train;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use distill::Distill;
pub use eval::Eval;
pub use export::Export;
pub use lora::Lora;
pub use project::{Base, Project};
pub use teacher::Teacher;
pub use train::Train;

/// A retort recipe: one task, from teacher data to an exported model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Recipe {
    /// Names, seed and where outputs go.
    pub project: Project,
    /// The open model to fine-tune (required).
    pub base: Base,
    /// The frontier model that writes the data. Needed by `[distill]` and to compare with the teacher.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher: Option<Teacher>,
    /// How the teacher writes the dataset. Without it, bring your own `train.jsonl` (and `val.jsonl`,
    /// `test.jsonl`) in `project.data_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distill: Option<Distill>,
    /// Adapter shape.
    pub lora: Lora,
    /// Fine-tuning.
    pub train: Train,
    /// Held-out evaluation and the quality gate.
    pub eval: Eval,
    /// Outputs for serving.
    pub export: Export,
}

/// The top-level section names.
pub const SECTIONS: &[&str] = &["project", "base", "teacher", "distill", "lora", "train", "eval", "export"];
