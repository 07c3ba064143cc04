//! `[eval]`: held-out comparison of base, tuned and teacher, and the quality gate.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A score, always reported in [0, 1] with a bootstrapped 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// The answer equals the reference exactly.
    ExactMatch,
    /// Equal after lowercasing, trimming and collapsing whitespace.
    NormalizedExactMatch,
    /// Classification accuracy (`distill.output.kind = "label"`).
    LabelAccuracy,
    /// Macro-averaged F1 over labels (`label` outputs).
    MacroF1,
    /// Mean fraction of JSON fields equal to the reference (`json` outputs).
    FieldAccuracy,
    /// Fraction of answers that are valid JSON matching the schema (`json` outputs).
    SchemaValidity,
    /// ROUGE-L F-measure (free text).
    RougeL,
    /// chrF (free text), scaled to [0, 1].
    Chrf,
    /// How often an LLM judge prefers the tuned model's answer to the teacher's (ties count half).
    JudgeWinRate,
}

impl Metric {
    /// The recipe spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::ExactMatch => "exact_match",
            Metric::NormalizedExactMatch => "normalized_exact_match",
            Metric::LabelAccuracy => "label_accuracy",
            Metric::MacroF1 => "macro_f1",
            Metric::FieldAccuracy => "field_accuracy",
            Metric::SchemaValidity => "schema_validity",
            Metric::RougeL => "rouge_l",
            Metric::Chrf => "chrf",
            Metric::JudgeWinRate => "judge_win_rate",
        }
    }
}

/// A model to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compare {
    /// The base model without the adapter.
    Base,
    /// The base with the trained adapter.
    Tuned,
    /// The teacher, through the distill cache (answers already paid for cost nothing).
    Teacher,
    /// The exported GGUF file (the first `gguf:` format), read by retort's GGUF reader.
    Gguf,
}

/// `[eval.gate]`: bounds a run must meet; `retort eval` exits with code 3 when one fails.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Gate {
    /// The tuned model's primary score must be at least this, in [0, 1].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_score: Option<f64>,
    /// The tuned model's primary score must be at least this fraction of the teacher's (0.95 = within
    /// 5% of the teacher). Needs `teacher` in `compare`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_vs_teacher: Option<f64>,
    /// A previous `report.json` to compare with: the primary score may drop by at most
    /// `max_regression`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_regression_vs: Option<PathBuf>,
    /// Largest allowed drop of the primary score against `max_regression_vs`, in score points.
    pub max_regression: f64,
}

/// `[eval.judge]`: the LLM judge for `judge_win_rate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Judge {
    /// Required with `judge_win_rate`. What makes one answer better than another.
    pub rubric: String,
    /// The judge model. Default: the teacher's model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// `[eval]`: what to measure on the test split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Eval {
    /// Scores to report. Default: from `distill.output.kind`: `label_accuracy` and `macro_f1` for labels,
    /// `field_accuracy` and `schema_validity` for JSON, `rouge_l` and `chrf` for text.
    pub metrics: Vec<Metric>,
    /// The score the gate and "worst examples" use. Default: the first of `metrics`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<Metric>,
    /// Models to evaluate. Default: `base` and `tuned`, plus `teacher` when there is a `[teacher]`.
    pub compare: Vec<Compare>,
    /// Evaluate at most this many test examples (all by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_examples: Option<u32>,
    /// Most tokens each model may generate per answer (greedy decoding).
    pub max_new_tokens: u32,
    /// Prompts generated together.
    pub batch_size: u32,
    /// Bootstrap resamples for the 95% confidence intervals.
    pub bootstrap: u32,
    /// The judge for `judge_win_rate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge: Option<Judge>,
    /// What an hour of the machine that serves the tuned model costs, in US dollars (e.g. 1.20 for a
    /// cloud L4). With it the report gives the tuned model's cost per 1,000 requests beside the
    /// teacher's, from the throughput measured during eval. Without it only the throughput is reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hardware_usd_per_hour: Option<f64>,
    /// Quality gate.
    pub gate: Gate,
}

impl Default for Eval {
    fn default() -> Self {
        Eval {
            metrics: Vec::new(),
            primary: None,
            compare: Vec::new(),
            max_examples: None,
            max_new_tokens: 512,
            batch_size: 8,
            bootstrap: 1000,
            judge: None,
            hardware_usd_per_hour: None,
            gate: Gate::default(),
        }
    }
}
