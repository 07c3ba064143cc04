//! `[lora]`: the low-rank adapters trained on the frozen base.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A module to adapt, by its PEFT `target_modules` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Every linear layer of the attention and MLP blocks (not `lm_head`), as the QLoRA paper recommends.
    #[serde(rename = "all-linear")]
    AllLinear,
    /// Attention query projection.
    QProj,
    /// Attention key projection.
    KProj,
    /// Attention value projection.
    VProj,
    /// Attention output projection.
    OProj,
    /// MLP gate projection.
    GateProj,
    /// MLP up projection.
    UpProj,
    /// MLP down projection.
    DownProj,
    /// Fused query/key/value projection (Phi-3).
    QkvProj,
    /// Fused gate/up projection (Phi-3).
    GateUpProj,
}

/// All target names as written in recipes.
pub const TARGET_NAMES: &[&str] = &[
    "all-linear",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
];

/// Which LoRA formulation to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Classic LoRA: scale `alpha / r`.
    Lora,
    /// Rank-stabilised LoRA: scale `alpha / sqrt(r)`, better at high ranks.
    Rslora,
    /// Weight-decomposed LoRA: a learned magnitude per output feature; closer to full fine-tuning,
    /// slower per step.
    Dora,
}

/// `[lora]`: adapter shape. The base never changes; only these adapters train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Lora {
    /// Rank of each adapter. 8-32 covers most single tasks; higher learns more and costs memory.
    pub r: u32,
    /// Scaling numerator: the adapter's update is multiplied by `alpha / r` (`alpha / sqrt(r)` for
    /// rsLoRA). Keeping `alpha` = 2 x `r` is a common rule.
    pub alpha: f64,
    /// Dropout on the adapter input during training, in [0, 1).
    pub dropout: f64,
    /// Modules to adapt, by PEFT name (`q_proj`, ..., or `all-linear`).
    pub targets: Vec<Target>,
    /// LoRA, rsLoRA or DoRA.
    pub variant: Variant,
}

impl Default for Lora {
    fn default() -> Self {
        Lora { r: 16, alpha: 32.0, dropout: 0.05, targets: vec![Target::AllLinear], variant: Variant::Lora }
    }
}
