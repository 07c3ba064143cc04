//! `[distill]`: how the teacher turns inputs into training examples, and which ones are kept.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize, Serializer};

/// Writes a newtype variant as a table whose first key is the tag (`kind = "length"`), the inverse of
/// what the recipe deserializer accepts.
fn serialize_tagged<S: Serializer, T: Serialize>(
    s: S,
    tag: &str,
    variant: &str,
    inner: &T,
) -> Result<S::Ok, S::Error> {
    use serde::ser::{Error, SerializeMap};
    let value = toml::Value::try_from(inner).map_err(S::Error::custom)?;
    let toml::Value::Table(table) = value else { return Err(S::Error::custom("variant is not a table")) };
    let mut map = s.serialize_map(Some(table.len() + 1))?;
    map.serialize_entry(tag, variant)?;
    for (k, v) in &table {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

/// `[distill]`: the teacher's task and the filters its answers must pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Distill {
    /// The task in plain words, sent as the system prompt when the teacher answers, and kept as the
    /// system message of every training example (so the tuned model sees what it will see in
    /// production).
    pub system_prompt: String,
    /// Examples to keep after filtering, over all splits. Inputs are generated or read until this many
    /// pass, or the inputs run out.
    pub target_examples: u32,
    /// Where inputs come from: `from = "file"` or `from = "generate"`.
    pub inputs: Inputs,
    /// The user message for each input, as a Jinja template: `{{ input }}` is the input text, and every
    /// field of a JSONL input row is available by name.
    pub prompt: String,
    /// What the teacher must answer with.
    pub output: Output,
    /// Filters, applied in order; every rejected row goes to `rejected.jsonl` with its reason.
    pub filters: Vec<Filter>,
    /// How kept examples are split. The fractions must add up to 1; splitting is deterministic from
    /// `project.seed` and never puts near-duplicates in two splits.
    pub split: Split,
    /// Files (JSONL, one example per line) that must not leak into the distilled data, e.g. your own
    /// evaluation set: rows sharing an n-gram with them are dropped (see the `decontaminate` filter).
    pub exclude: Vec<PathBuf>,
    /// Format of the written `train/val/test.jsonl`.
    pub format: DatasetFormat,
    /// Attempts per input before giving up on it (refusals, invalid or rejected answers).
    pub max_attempts: u32,
}

impl Default for Distill {
    fn default() -> Self {
        Distill {
            system_prompt: String::new(),
            target_examples: 1000,
            inputs: Inputs::default(),
            prompt: "{{ input }}".into(),
            output: Output::default(),
            filters: Vec::new(),
            split: Split::default(),
            exclude: Vec::new(),
            format: DatasetFormat::Messages,
            max_attempts: 3,
        }
    }
}

/// Fractions of kept examples per split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Split {
    /// Training examples.
    pub train: f64,
    /// Validation examples (validation loss during training).
    pub val: f64,
    /// Held-out test examples (evaluation and the quality gate).
    pub test: f64,
}

impl Default for Split {
    fn default() -> Self {
        Split { train: 0.9, val: 0.05, test: 0.05 }
    }
}

/// Dataset file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetFormat {
    /// Detect the format from the first row.
    Auto,
    /// OpenAI chat format: `{"messages": [{"role": ..., "content": ...}]}`.
    Messages,
    /// `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}`.
    Sharegpt,
    /// `{"instruction", "input", "output"}`.
    Alpaca,
    /// `{"prompt", "completion"}`.
    PromptCompletion,
}

/// Where inputs come from.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[schemars(tag = "from")]
pub enum Inputs {
    /// One input per row of a file.
    File(FileInputs),
    /// The teacher writes the inputs from a template over topics and personas.
    Generate(GeneratedInputs),
}

impl Default for Inputs {
    fn default() -> Self {
        Inputs::File(FileInputs::default())
    }
}

impl Serialize for Inputs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Inputs::File(f) => serialize_tagged(s, "from", "file", f),
            Inputs::Generate(g) => serialize_tagged(s, "from", "generate", g),
        }
    }
}

/// Formats of an input file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    /// From the extension: `.jsonl`, `.csv`, anything else is text.
    Auto,
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated with a header row.
    Csv,
    /// One input per line.
    Text,
}

/// `from = "file"`: inputs read from a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FileInputs {
    /// Required. The file, relative to the recipe.
    pub path: PathBuf,
    /// The JSONL key or CSV column holding the input text (ignored for text files).
    pub field: String,
    /// How to read the file.
    pub format: InputFormat,
}

impl Default for FileInputs {
    fn default() -> Self {
        FileInputs { path: PathBuf::new(), field: "input".into(), format: InputFormat::Auto }
    }
}

/// `from = "generate"`: the teacher writes inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GeneratedInputs {
    /// Required. The request for one input, as a Jinja template with `{{ topic }}`, `{{ persona }}`
    /// and `{{ index }}` (a sample number that makes repeated requests differ).
    pub prompt: String,
    /// Topics to cover; every topic is combined with every persona.
    pub topics: Vec<String>,
    /// A text file with one topic per line, added to `topics`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topics_file: Option<PathBuf>,
    /// Who writes the input (e.g. "an angry customer", "a terse engineer"), for diversity.
    pub personas: Vec<String>,
    /// Inputs requested per needed example, to make up for the ones filters reject.
    pub oversample: f64,
    /// Sampling temperature when writing inputs; high for diversity.
    pub temperature: f64,
}

impl Default for GeneratedInputs {
    fn default() -> Self {
        GeneratedInputs {
            prompt: String::new(),
            topics: Vec::new(),
            topics_file: None,
            personas: Vec::new(),
            oversample: 1.3,
            temperature: 1.0,
        }
    }
}

/// What kind of answer the task has; decides defaults for filters and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Free text.
    Text,
    /// A JSON value matching `schema` or `schema_file`.
    Json,
    /// Exactly one of `labels` (classification, routing).
    Label,
}

/// `[distill.output]`: the shape of the teacher's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Output {
    /// Text, JSON or a label.
    pub kind: OutputKind,
    /// With `kind = "label"`: the allowed labels, spelled exactly as the model must answer.
    pub labels: Vec<String>,
    /// With `kind = "json"`: the JSON Schema as an inline table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
    /// With `kind = "json"`: the JSON Schema as a file (instead of `schema`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_file: Option<PathBuf>,
    /// With `kind = "json"`: ask the provider for strict structured output (`json_schema` response
    /// format) where it supports it.
    pub strict: bool,
}

impl Default for Output {
    fn default() -> Self {
        Output { kind: OutputKind::Text, labels: Vec::new(), schema: None, schema_file: None, strict: true }
    }
}

/// Which part of an example a filter looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TextField {
    /// The input (the user message).
    Input,
    /// The teacher's answer.
    Output,
}

/// One filter, chosen by `kind`.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[schemars(tag = "kind")]
pub enum Filter {
    /// The answer must validate against the output schema; one re-ask quotes the validation error.
    JsonSchema(JsonSchemaFilter),
    /// Length bounds in characters or base-model tokens.
    Length(LengthFilter),
    /// Regular expressions the text must or must not match.
    Regex(RegexFilter),
    /// Drops exact duplicates (normalised text) and near-duplicates (MinHash).
    Dedup(DedupFilter),
    /// An LLM judge scores each example against a rubric.
    Judge(JudgeFilter),
    /// Drops examples sharing an n-gram with the test split or `distill.exclude` files.
    Decontaminate(DecontaminateFilter),
    /// Samples several answers and keeps the example only when they agree.
    SelfConsistency(SelfConsistencyFilter),
}

impl Filter {
    /// The recipe spelling of the filter's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Filter::JsonSchema(_) => "json_schema",
            Filter::Length(_) => "length",
            Filter::Regex(_) => "regex",
            Filter::Dedup(_) => "dedup",
            Filter::Judge(_) => "judge",
            Filter::Decontaminate(_) => "decontaminate",
            Filter::SelfConsistency(_) => "self_consistency",
        }
    }
}

impl Serialize for Filter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let kind = self.kind();
        match self {
            Filter::JsonSchema(f) => serialize_tagged(s, "kind", kind, f),
            Filter::Length(f) => serialize_tagged(s, "kind", kind, f),
            Filter::Regex(f) => serialize_tagged(s, "kind", kind, f),
            Filter::Dedup(f) => serialize_tagged(s, "kind", kind, f),
            Filter::Judge(f) => serialize_tagged(s, "kind", kind, f),
            Filter::Decontaminate(f) => serialize_tagged(s, "kind", kind, f),
            Filter::SelfConsistency(f) => serialize_tagged(s, "kind", kind, f),
        }
    }
}

/// `kind = "json_schema"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct JsonSchemaFilter {
    /// On a validation failure, ask once more quoting the error (not an identical retry).
    pub reask: bool,
}

impl Default for JsonSchemaFilter {
    fn default() -> Self {
        JsonSchemaFilter { reask: true }
    }
}

/// `kind = "length"`. Set at least one bound.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LengthFilter {
    /// Which text to measure. Default: the output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<TextField>,
    /// Fewest characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_chars: Option<u32>,
    /// Most characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_chars: Option<u32>,
    /// Fewest tokens of the base model's tokenizer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<u32>,
    /// Most tokens of the base model's tokenizer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
}

/// `kind = "regex"`. Patterns use Rust `regex` syntax.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RegexFilter {
    /// Which text to match. Default: the output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<TextField>,
    /// Every pattern must match somewhere.
    pub must_match: Vec<String>,
    /// No pattern may match anywhere (e.g. "As an AI").
    pub must_not_match: Vec<String>,
}

/// `kind = "dedup"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DedupFilter {
    /// Which text to compare. Default: the input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<TextField>,
    /// Also drop near-duplicates (MinHash LSH over word shingles); exact duplicates are always dropped.
    pub near: bool,
    /// Estimated Jaccard similarity at or above which two texts are near-duplicates.
    pub threshold: f64,
    /// Words per shingle.
    pub shingle: u32,
    /// MinHash permutations: more is more accurate and slower.
    pub num_perm: u32,
}

impl Default for DedupFilter {
    fn default() -> Self {
        DedupFilter { field: None, near: true, threshold: 0.85, shingle: 5, num_perm: 128 }
    }
}

/// `kind = "judge"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeFilter {
    /// Required. What a good example is, in plain words; the judge scores against it.
    pub rubric: String,
    /// Lowest score kept, on a 1-to-`scale` scale.
    pub min_score: f64,
    /// The top of the score scale.
    pub scale: u32,
    /// The judge model. Default: the teacher's model (its cost is counted like any request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl Default for JudgeFilter {
    fn default() -> Self {
        JudgeFilter { rubric: String::new(), min_score: 7.0, scale: 10, model: None }
    }
}

/// `kind = "decontaminate"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DecontaminateFilter {
    /// Words per n-gram; a shared n-gram drops the row (13 is the GPT-3 paper's choice).
    pub ngram: u32,
}

impl Default for DecontaminateFilter {
    fn default() -> Self {
        DecontaminateFilter { ngram: 13 }
    }
}

/// `kind = "self_consistency"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SelfConsistencyFilter {
    /// Answers sampled per input (each is a paid request).
    pub n: u32,
    /// Fraction of answers that must agree with the majority answer.
    pub min_agreement: f64,
}

impl Default for SelfConsistencyFilter {
    fn default() -> Self {
        SelfConsistencyFilter { n: 5, min_agreement: 0.6 }
    }
}
