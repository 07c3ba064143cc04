//! `retort eval`: answers of the base model, the tuned model (base + the trained adapter) and the
//! teacher on the held-out test split, scored against the test split's references with the recipe's
//! metrics, each with a bootstrapped 95% interval; a JSON and a Markdown report; and the quality gate.
//!
//! The test split's answers *are* the teacher's (distill wrote them), so the teacher is the reference:
//! its scores are 1 by construction, and "tuned vs teacher" is the tuned model's agreement with the
//! teacher on inputs neither model trained on. Answers are generated greedily in batches with the KV
//! cache, from the prompt the chat template renders for the conversation before its last assistant turn.

pub mod html;
pub mod judge;
pub mod metrics;
pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use retort_data::{ChatTemplate, Conversation, RenderOptions, Role, Tokenizer};
use retort_io::Progress;
use retort_model::burn::tensor::Device;
use retort_model::{GenerateOptions, Precision, Sampling, Transformer};
use retort_recipe::Recipe;
use retort_recipe::schema::distill::OutputKind;
use retort_recipe::schema::eval::{Compare, Metric};
use retort_recipe::schema::train::OnBadRow;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use report::{GateCheck, GateResult, gate};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The test split could not be read.
    #[error(transparent)]
    Data(#[from] retort_data::DataError),
    /// The tokenizer or template.
    #[error(transparent)]
    Tokenizer(#[from] retort_data::TokenizerError),
    /// Rendering a prompt.
    #[error("test.jsonl:{line}: {message}")]
    Template {
        /// Line of the test row.
        line: usize,
        /// What failed.
        message: String,
    },
    /// The model.
    #[error(transparent)]
    Model(#[from] retort_model::ModelError),
    /// The adapter.
    #[error(transparent)]
    Lora(#[from] retort_lora::LoraError),
    /// The exported GGUF could not be read as the model.
    #[error(transparent)]
    Export(#[from] retort_export::ExportError),
    /// Input that cannot be evaluated.
    #[error("{0}")]
    Input(String),
    /// The LLM judge could not be asked (key, network, budget, journal).
    #[error("judge_win_rate: {message}")]
    Judge {
        /// What failed.
        message: String,
        /// How to fix it.
        hint: String,
    },
    /// A file could not be written or read.
    #[error("`{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl EvalError {
    /// How to fix it.
    pub fn hint(&self) -> String {
        match self {
            EvalError::Data(e) => e.hint(),
            EvalError::Lora(_) => {
                "run `retort train` first; it writes the adapter to <output_dir>/adapter".into()
            }
            EvalError::Io { .. } => {
                "check that the output directory is writable and the disk is not full".into()
            }
            EvalError::Judge { hint, .. } if !hint.is_empty() => hint.clone(),
            EvalError::Export(e) => {
                e.hint().unwrap_or_else(|| "run `retort export` on the recipe again".into())
            }
            _ => "see `retort recipe docs` for `[eval]`".into(),
        }
    }

    /// True when the error is in the input, not the machine.
    pub fn is_input(&self) -> bool {
        !matches!(self, EvalError::Io { .. } | EvalError::Judge { .. })
    }
}

/// Where the models are.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The base model directory.
    pub base_dir: PathBuf,
    /// What the recipe calls it.
    pub base_name: String,
    /// Where to run.
    pub device: Device,
    /// Weights' precision.
    pub precision: Precision,
    /// The device in words (e.g. `cpu (2 threads)`), for the report's throughput figures.
    pub device_name: String,
}

/// One score with its interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// The value on all examples.
    pub value: f64,
    /// 2.5th percentile of the bootstrap.
    pub low: f64,
    /// 97.5th percentile of the bootstrap.
    pub high: f64,
}

/// One evaluated model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelResult {
    /// `base`, `tuned` or `teacher`.
    pub model: String,
    /// Scores by metric name.
    pub scores: BTreeMap<String, Score>,
    /// Generation seconds (0 for the teacher, whose answers are cached).
    pub seconds: f64,
    /// Generated tokens per second.
    pub tokens_per_s: f64,
    /// Answered requests per second at `eval.batch_size` (0 for the teacher).
    #[serde(default)]
    pub requests_per_s: f64,
    /// Median seconds from a request's batch starting to its answer (0 for the teacher).
    #[serde(default)]
    pub latency_p50_s: f64,
    /// 95th percentile of the same.
    #[serde(default)]
    pub latency_p95_s: f64,
    /// Answers in test order.
    pub answers: Vec<String>,
}

/// What serving costs: the tuned model on the machine eval ran on, against the teacher's API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Serving {
    /// The machine the throughput was measured on.
    pub device: String,
    /// Requests generated together.
    pub batch_size: u32,
    /// The tuned model's measured throughput.
    pub tuned_requests_per_hour: f64,
    /// `eval.hardware_usd_per_hour`, when the recipe gives it.
    pub hardware_usd_per_hour: Option<f64>,
    /// The tuned model's cost per 1,000 requests (needs `hardware_usd_per_hour`).
    pub tuned_usd_per_1k: Option<f64>,
    /// The teacher's mean paid cost per request in distill (`distill.json`), times 1,000.
    pub teacher_usd_per_1k: Option<f64>,
    /// Where the teacher's figure comes from, or why there is none.
    pub teacher_note: String,
}

impl Serving {
    /// From the tuned model's measurements, the recipe's hardware price and `distill.json`.
    pub fn of(tuned: &ModelResult, recipe: &Recipe, device: &str) -> Serving {
        let per_hour = tuned.requests_per_s * 3600.0;
        let hw = recipe.eval.hardware_usd_per_hour;
        let tuned_usd_per_1k = hw.filter(|_| per_hour > 0.0).map(|usd| usd / per_hour * 1000.0);
        let (teacher_usd_per_1k, teacher_note) = teacher_cost(&recipe.project.data_dir.join("distill.json"));
        Serving {
            device: device.to_string(),
            batch_size: recipe.eval.batch_size,
            tuned_requests_per_hour: per_hour,
            hardware_usd_per_hour: hw,
            tuned_usd_per_1k,
            teacher_usd_per_1k,
            teacher_note,
        }
    }
}

/// The teacher's mean paid cost per request from a `distill.json`, times 1,000, and a note.
pub fn teacher_cost(distill_json: &Path) -> (Option<f64>, String) {
    let Some(v) = std::fs::read_to_string(distill_json)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    else {
        return (None, format!("no `{}` to take the teacher's cost from", distill_json.display()));
    };
    let sent = v["requests"]["sent"].as_f64().unwrap_or(0.0);
    let usd = v["cost_usd"]["total"].as_f64().unwrap_or(0.0);
    let who = format!(
        "{} `{}`",
        v["teacher"]["provider"].as_str().unwrap_or("?"),
        v["teacher"]["model"].as_str().unwrap_or("?")
    );
    if sent > 0.0 && usd > 0.0 {
        let batch =
            if v["teacher"]["batch"].as_bool() == Some(true) { ", at the batch discount" } else { "" };
        (
            Some(usd / sent * 1000.0),
            format!("{who}: ${usd:.4} over {sent} distill requests{batch} (distill.json)"),
        )
    } else {
        (
            None,
            format!("{who}: distill.json records no paid requests (no price known, or a replayed teacher)"),
        )
    }
}

/// One test example.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Example {
    /// Line in test.jsonl.
    pub line: usize,
    /// The last user message.
    pub input: String,
    /// The reference (teacher) answer.
    pub reference: String,
}

/// `eval/report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Format version.
    pub format: u32,
    /// The test file.
    pub test_file: PathBuf,
    /// The primary metric.
    pub primary: String,
    /// Metrics in recipe order.
    pub metrics: Vec<String>,
    /// The examples.
    pub examples: Vec<Example>,
    /// The models.
    pub models: Vec<ModelResult>,
    /// Labels (for `label` outputs), for the confusion matrix.
    pub labels: Vec<String>,
    /// What was evaluated: hashes of the inputs; an unchanged fingerprint means an unchanged report.
    pub fingerprint: String,
    /// The gate's verdict.
    pub gate: Option<GateResult>,
    /// Throughput and cost per 1,000 requests, when the tuned model was evaluated.
    #[serde(default)]
    pub serving: Option<Serving>,
    /// The LLM judge's bill, when `judge_win_rate` was asked for.
    #[serde(default)]
    pub judge: Option<judge::JudgeStats>,
}

impl Report {
    /// A model's result.
    pub fn model(&self, name: &str) -> Option<&ModelResult> {
        self.models.iter().find(|m| m.model == name)
    }

    /// A model's primary score.
    pub fn primary_score(&self, name: &str) -> Option<f64> {
        self.model(name).and_then(|m| m.scores.get(&self.primary)).map(|s| s.value)
    }
}

/// The metrics the recipe asks for, defaulted from the output kind.
pub fn metrics_of(recipe: &Recipe) -> Vec<Metric> {
    if !recipe.eval.metrics.is_empty() {
        return recipe.eval.metrics.clone();
    }
    match recipe.distill.as_ref().map(|d| d.output.kind) {
        Some(OutputKind::Label) => vec![Metric::LabelAccuracy, Metric::MacroF1],
        Some(OutputKind::Json) => vec![Metric::FieldAccuracy, Metric::SchemaValidity],
        _ => vec![Metric::RougeL, Metric::Chrf],
    }
}

/// The models the recipe compares, defaulted.
pub fn compare_of(recipe: &Recipe) -> Vec<Compare> {
    if !recipe.eval.compare.is_empty() {
        return recipe.eval.compare.clone();
    }
    let mut c = vec![Compare::Base, Compare::Tuned];
    if recipe.teacher.is_some() {
        c.push(Compare::Teacher);
    }
    c
}

/// The GGUF file `eval.compare = ["gguf"]` evaluates: the first `gguf:TYPE` of `export.formats`, where
/// `retort export RECIPE` writes it.
pub fn exported_gguf(recipe: &Recipe) -> Option<PathBuf> {
    let ty = recipe.export.formats.iter().find_map(|f| match f {
        retort_recipe::types::ExportFormat::Gguf(t) => Some(t),
        _ => None,
    })?;
    let ft = retort_export::FileType::parse(ty).ok()?;
    let name = retort_export::job::file_stem(recipe.export.name.as_deref().unwrap_or(&recipe.project.name));
    Some(recipe.project.output_dir.join("export").join(retort_export::job::gguf_file_name(&name, ft)))
}

/// `<output_dir>/eval`.
pub fn eval_dir(recipe: &Recipe) -> PathBuf {
    recipe.project.output_dir.join("eval")
}

fn hash_file(h: &mut Sha256, path: &Path) -> Result<(), EvalError> {
    let bytes = std::fs::read(path).map_err(|source| EvalError::Io { path: path.to_path_buf(), source })?;
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(&bytes);
    Ok(())
}

/// Hash of what the report depends on: test split, adapter, base, `[eval]` and the output spec.
pub fn fingerprint(recipe: &Recipe, setup: &Setup) -> Result<String, EvalError> {
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    hash_file(&mut h, &recipe.project.data_dir.join("test.jsonl"))?;
    let adapter = recipe.project.output_dir.join("adapter");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        hash_file(&mut h, &adapter.join(f))?;
    }
    h.update(setup.base_name.as_bytes());
    h.update(format!("{:?}", setup.precision).as_bytes());
    h.update(serde_json::to_vec(&recipe.eval).unwrap_or_default());
    h.update(serde_json::to_vec(&recipe.distill.as_ref().map(|d| &d.output)).unwrap_or_default());
    h.update(serde_json::to_vec(&recipe.base.chat_template).unwrap_or_default());
    h.update(recipe.project.seed.to_le_bytes());
    if compare_of(recipe).contains(&Compare::Gguf)
        && let Some(gguf) = exported_gguf(recipe)
    {
        // Size and modification time stand for the (multi-gigabyte) file: a new export changes them.
        let meta = std::fs::metadata(&gguf).map_err(|source| EvalError::Io { path: gguf.clone(), source })?;
        h.update(meta.len().to_le_bytes());
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        h.update(mtime.unwrap_or_default().as_nanos().to_le_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The report of an earlier run with this fingerprint, if any.
pub fn up_to_date(recipe: &Recipe, fp: &str) -> Option<Report> {
    let text = std::fs::read_to_string(eval_dir(recipe).join("report.json")).ok()?;
    let r: Report = serde_json::from_str(&text).ok()?;
    (r.fingerprint == fp).then_some(r)
}

fn reference_of(c: &Conversation) -> Option<(usize, &str)> {
    c.messages.iter().rposition(|m| m.role == Role::Assistant).map(|i| (i, c.messages[i].content.as_str()))
}

struct Prompts {
    ids: Vec<Vec<u32>>,
    examples: Vec<Example>,
}

fn prompts(
    convs: &[Conversation],
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
) -> Result<Prompts, EvalError> {
    let mut out = Prompts { ids: Vec::new(), examples: Vec::new() };
    for c in convs {
        let Some((i, reference)) = reference_of(c) else { continue };
        let messages: Vec<serde_json::Value> = c.messages[..i].iter().map(|m| m.to_json()).collect();
        let opts = RenderOptions {
            add_generation_prompt: true,
            tools: c.tools.clone(),
            bos_token: tok.bos_token.clone(),
            eos_token: tok.eos_token.clone(),
            ..RenderOptions::default()
        };
        let text = template
            .render(&messages, &opts)
            .map_err(|e| EvalError::Template { line: c.line, message: e.to_string() })?;
        let mut ids = tok.encode(&text, false)?;
        if ids.len() > max_len {
            // Keep the end: the generation prompt and the latest turn matter most.
            ids.drain(..ids.len() - max_len);
        }
        let input = c.messages[..i]
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.clone())
            .unwrap_or_default();
        out.ids.push(ids);
        out.examples.push(Example { line: c.line, input, reference: reference.to_string() });
    }
    Ok(out)
}

/// One model's answers and how fast they came.
struct Generated {
    answers: Vec<String>,
    seconds: f64,
    tokens_per_s: f64,
    /// Per request: the seconds its batch took.
    latencies: Vec<f64>,
}

/// The `q` quantile (nearest rank) of `v`; 0 for none.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn answers(
    model: &Transformer,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    recipe: &Recipe,
    progress: &dyn Progress,
    name: &str,
) -> Result<Generated, EvalError> {
    let mut eos = tok.eos_ids.clone();
    for id in &model.config.eos_token_ids {
        if !eos.contains(id) {
            eos.push(*id);
        }
    }
    let pad = model.config.pad_token_id.or(eos.first().copied()).unwrap_or(0);
    let opts = GenerateOptions {
        max_new_tokens: recipe.eval.max_new_tokens as usize,
        sampling: Sampling::greedy(),
        eos: eos.clone(),
        pad,
    };
    let task = progress.task(&format!("eval {name}"), prompts.len() as u64);
    let started = Instant::now();
    let mut out = Vec::with_capacity(prompts.len());
    let mut latencies = Vec::with_capacity(prompts.len());
    let mut tokens = 0usize;
    for chunk in prompts.chunks(recipe.eval.batch_size.max(1) as usize) {
        let t = Instant::now();
        let g = retort_model::generate(model, chunk, &opts, |_, _| {})?;
        latencies.extend(std::iter::repeat_n(t.elapsed().as_secs_f64(), chunk.len()));
        for row in g.tokens {
            tokens += row.len();
            let body: Vec<u32> = row.into_iter().filter(|t| !eos.contains(t)).collect();
            out.push(tok.decode(&body, true)?);
        }
        task.inc(chunk.len() as u64);
    }
    task.finish();
    let seconds = started.elapsed().as_secs_f64();
    Ok(Generated { answers: out, seconds, tokens_per_s: tokens as f64 / seconds.max(1e-9), latencies })
}

impl Generated {
    fn result(self, model: &str, scores: BTreeMap<String, Score>) -> ModelResult {
        ModelResult {
            model: model.into(),
            scores,
            seconds: self.seconds,
            tokens_per_s: self.tokens_per_s,
            requests_per_s: self.answers.len() as f64 / self.seconds.max(1e-9),
            latency_p50_s: quantile(&self.latencies, 0.5),
            latency_p95_s: quantile(&self.latencies, 0.95),
            answers: self.answers,
        }
    }
}

/// The bootstrap seed of the `k`-th metric, so each metric resamples independently of the others.
fn metric_seed(seed: u64, k: usize) -> u64 {
    seed ^ (k as u64).wrapping_mul(0x9e37_79b9)
}

/// The mean of per-example values with its bootstrapped 95% interval.
fn mean_score(v: &[f64], resamples: u32, seed: u64) -> Score {
    let mean = |idx: &[usize]| idx.iter().map(|&i| v[i]).sum::<f64>() / idx.len().max(1) as f64;
    let all: Vec<usize> = (0..v.len()).collect();
    let (low, high) = metrics::bootstrap(v.len(), resamples, seed, &mean);
    Score { value: mean(&all), low, high }
}

/// Scores `answers` against the examples' references.
pub fn score(
    metrics: &[Metric],
    answers: &[String],
    examples: &[Example],
    labels: &[String],
    schema: Option<&serde_json::Value>,
    resamples: u32,
    seed: u64,
) -> Result<BTreeMap<String, Score>, EvalError> {
    let mut out = BTreeMap::new();
    for (k, m) in metrics.iter().enumerate() {
        let per_example = |f: &dyn Fn(&str, &str) -> f64| -> Vec<f64> {
            answers.iter().zip(examples).map(|(a, e)| f(a, &e.reference)).collect()
        };
        let values: Option<Vec<f64>> = match m {
            Metric::ExactMatch => Some(per_example(&metrics::exact_match)),
            Metric::NormalizedExactMatch => Some(per_example(&metrics::normalized_exact_match)),
            Metric::LabelAccuracy => Some(per_example(&|a, r| metrics::label_accuracy(a, r, labels))),
            Metric::FieldAccuracy => Some(per_example(&metrics::field_accuracy)),
            Metric::SchemaValidity => Some(per_example(&|a, _| metrics::schema_validity(a, schema))),
            Metric::RougeL => Some(per_example(&metrics::rouge_l)),
            Metric::Chrf => Some(per_example(&metrics::chrf)),
            Metric::MacroF1 => None,
            // Asked of the judge for the tuned model only; see `judge`.
            Metric::JudgeWinRate => continue,
        };
        let seed = metric_seed(seed, k);
        let n = examples.len();
        let s = match values {
            Some(v) => mean_score(&v, resamples, seed),
            None => {
                let pairs: Vec<(Option<&str>, Option<&str>)> = answers
                    .iter()
                    .zip(examples)
                    .map(|(a, e)| (metrics::label_of(a, labels), metrics::label_of(&e.reference, labels)))
                    .collect();
                let f = |idx: &[usize]| metrics::macro_f1(&idx.iter().map(|&i| pairs[i]).collect::<Vec<_>>());
                let all: Vec<usize> = (0..n).collect();
                let (low, high) = metrics::bootstrap(n, resamples, seed, &f);
                Score { value: f(&all), low, high }
            }
        };
        out.insert(m.as_str().to_string(), s);
    }
    Ok(out)
}

/// The judge's win rates of the tuned answers over the teacher's references, bootstrapped.
fn judge_score(
    recipe: &Recipe,
    examples: &[Example],
    tuned: &[String],
    judge_key: Option<String>,
    k: usize,
) -> Result<(Score, judge::JudgeStats), EvalError> {
    let (Some(teacher), Some(j)) = (&recipe.teacher, &recipe.eval.judge) else {
        return Err(EvalError::Input(
            "`judge_win_rate` needs `[teacher]` (the judge's client) and `[eval.judge]` with a `rubric`"
                .into(),
        ));
    };
    let system = recipe.distill.as_ref().map_or("", |d| d.system_prompt.as_str());
    let pairs: Vec<judge::Pair<'_>> = examples
        .iter()
        .zip(tuned)
        .map(|(e, t)| judge::Pair { input: &e.input, teacher: &e.reference, tuned: t })
        .collect();
    let journal = recipe.project.data_dir.join(retort_distill::JOURNAL);
    let (v, stats) = judge::win_rates(teacher, j, system, &pairs, &journal, judge_key, Default::default())?;
    Ok((mean_score(&v, recipe.eval.bootstrap, metric_seed(recipe.project.seed, k)), stats))
}

/// The exported GGUF as a model: its tensors dequantized to f32 (see `retort_export::convert::back`),
/// on the base model's config, in the evaluation's precision.
fn load_gguf(recipe: &Recipe, setup: &Setup) -> Result<Transformer, EvalError> {
    let Some(path) = exported_gguf(recipe) else {
        return Err(EvalError::Input(
            "`eval.compare` has `gguf`, but `export.formats` has no `gguf:TYPE`".into(),
        ));
    };
    if !path.exists() {
        return Err(EvalError::Input(format!(
            "`eval.compare` has `gguf`, but `{}` does not exist yet: run `retort export` on the recipe \
             first (`retort run` exports before it evaluates when `gguf` is compared)",
            path.display()
        )));
    }
    let cfg = retort_hf::ModelConfig::load(&setup.base_dir).map_err(retort_model::ModelError::from)?;
    let weights = retort_export::convert::back::GgufWeights::open(&path, &cfg)?;
    let specs = retort_hf::names::tensors(&cfg);
    let fetch = |spec: &retort_hf::TensorSpec| {
        weights.values(spec).map_err(|e| retort_model::ModelError::Input(e.to_string()))
    };
    Ok(Transformer::from_tensors(&cfg, &specs, setup.precision, &setup.device, &fetch)?)
}

/// Evaluates and writes `eval/report.json`, `report.md` and `report.html`. The gate is checked and
/// recorded, not enforced: the caller decides the exit code. `judge_key` is the value of the
/// teacher's `api_key_env`, for `judge_win_rate`.
pub fn run(
    recipe: &Recipe,
    setup: &Setup,
    progress: &dyn Progress,
    judge_key: Option<String>,
) -> Result<Report, EvalError> {
    let fp = fingerprint(recipe, setup)?;
    let test_file = recipe.project.data_dir.join("test.jsonl");
    let (mut convs, _) = retort_data::read_jsonl(&test_file, recipe.train.data_format, OnBadRow::Fail)?;
    if let Some(max) = recipe.eval.max_examples {
        convs.truncate(max as usize);
    }
    let tok = Tokenizer::load(&setup.base_dir)?;
    let source = match &recipe.base.chat_template {
        Some(p) => std::fs::read_to_string(p).map_err(|source| EvalError::Io { path: p.clone(), source })?,
        None => tok.chat_template.clone().ok_or_else(|| {
            EvalError::Input("the base model has no chat template; set `base.chat_template`".into())
        })?,
    };
    let template =
        ChatTemplate::new(&source).map_err(|e| EvalError::Template { line: 0, message: e.to_string() })?;
    let p = prompts(&convs, &tok, &template, recipe.train.max_seq_len as usize)?;
    if p.examples.is_empty() {
        return Err(EvalError::Input(format!(
            "`{}` has no example with an assistant answer to compare with",
            test_file.display()
        )));
    }
    let metrics = metrics_of(recipe);
    let primary = recipe.eval.primary.unwrap_or(metrics[0]);
    let compare = compare_of(recipe);
    let output = recipe.distill.as_ref().map(|d| &d.output);
    let labels: Vec<String> = output.map(|o| o.labels.clone()).unwrap_or_default();
    let schema = match output {
        Some(o) => match (&o.schema, &o.schema_file) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(f)) => {
                let text =
                    std::fs::read_to_string(f).map_err(|source| EvalError::Io { path: f.clone(), source })?;
                Some(
                    serde_json::from_str(&text)
                        .map_err(|e| EvalError::Input(format!("`{}`: {e}", f.display())))?,
                )
            }
            _ => None,
        },
        None => None,
    };
    let seed = recipe.project.seed;
    let resamples = recipe.eval.bootstrap;
    let mut models = Vec::new();
    let mut judge_stats = None;
    let needs_model = compare.iter().any(|c| matches!(c, Compare::Base | Compare::Tuned));
    if needs_model {
        let (mut model, _) = Transformer::load(&setup.base_dir, setup.precision, &setup.device)?;
        tok.check_model_vocab(model.config.vocab_size)?;
        if compare.contains(&Compare::Base) {
            let g = answers(&model, &tok, &p.ids, recipe, progress, "base")?;
            let scores = score(&metrics, &g.answers, &p.examples, &labels, schema.as_ref(), resamples, seed)?;
            models.push(g.result("base", scores));
        }
        if compare.contains(&Compare::Tuned) {
            let (tuned, _) = retort_lora::load_adapter(model, &recipe.project.output_dir.join("adapter"))?;
            model = tuned;
            let g = answers(&model, &tok, &p.ids, recipe, progress, "tuned")?;
            let mut scores =
                score(&metrics, &g.answers, &p.examples, &labels, schema.as_ref(), resamples, seed)?;
            if let Some(k) = metrics.iter().position(|m| *m == Metric::JudgeWinRate) {
                let task = progress.task("judge", p.examples.len() as u64);
                let (s, stats) = judge_score(recipe, &p.examples, &g.answers, judge_key.clone(), k)?;
                task.inc(p.examples.len() as u64);
                task.finish();
                scores.insert(Metric::JudgeWinRate.as_str().to_string(), s);
                judge_stats = Some(stats);
            }
            models.push(g.result("tuned", scores));
        }
    }
    if compare.contains(&Compare::Gguf) {
        let model = load_gguf(recipe, setup)?;
        tok.check_model_vocab(model.config.vocab_size)?;
        let g = answers(&model, &tok, &p.ids, recipe, progress, "gguf")?;
        let scores = score(&metrics, &g.answers, &p.examples, &labels, schema.as_ref(), resamples, seed)?;
        models.push(g.result("gguf", scores));
    }
    if compare.contains(&Compare::Teacher) {
        let a: Vec<String> = p.examples.iter().map(|e| e.reference.clone()).collect();
        let scores = score(&metrics, &a, &p.examples, &labels, schema.as_ref(), resamples, seed)?;
        models.push(ModelResult {
            model: "teacher".into(),
            scores,
            seconds: 0.0,
            tokens_per_s: 0.0,
            requests_per_s: 0.0,
            latency_p50_s: 0.0,
            latency_p95_s: 0.0,
            answers: a,
        });
    }
    let mut r = Report {
        format: 1,
        test_file,
        primary: primary.as_str().to_string(),
        metrics: metrics.iter().map(|m| m.as_str().to_string()).collect(),
        examples: p.examples,
        models,
        labels,
        fingerprint: fp,
        gate: None,
        serving: None,
        judge: judge_stats,
    };
    r.serving = r.model("tuned").map(|t| Serving::of(t, recipe, &setup.device_name));
    r.gate = Some(gate(&r, &recipe.eval.gate)?);
    let loss = std::fs::read_to_string(recipe.project.output_dir.join("train").join("loss.svg")).ok();
    report::write(&r, &eval_dir(recipe), loss.as_deref())?;
    Ok(r)
}
