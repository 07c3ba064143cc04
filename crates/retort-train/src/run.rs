//! A whole training run from a recipe: the dataset read into packed rows, adapters attached to the
//! frozen base, optimizer steps over shuffled epochs with the learning-rate schedule, validation loss,
//! checkpoints, a clean stop on a signal or time limit, and an exact resume.
//!
//! Layout under `project.output_dir`:
//! - `train/step-NNNNNN/`: resumable checkpoints (see [`crate::checkpoint`]), the newest `keep_last`;
//! - `train/metrics.jsonl`: one line per step (and per validation), cut back to the checkpoint on resume;
//! - `train/report.json` and `train/loss.svg`: written when the run finishes;
//! - `adapter/`: the final PEFT adapter, what `retort eval` and `retort export` read.
//!
//! Determinism: the order of epoch `e` is a shuffle seeded by `project.seed` and `e`; dropout of step `s`
//! is seeded by `project.seed` and `s`; so the data cursor and the step number are all the state a resume
//! needs besides tensors, and a resumed run on the CPU computes what the uninterrupted run computes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use retort_data::{ChatTemplate, PrepareOptions, PrepareReport, Row, Tokenizer, collate_to, prepare};
use retort_io::Progress;
use retort_model::burn::module::Module as _;
use retort_model::burn::tensor::Device;
use retort_model::memory::{MemoryEstimate, TrainShape};
use retort_model::{Batch, Precision, Transformer};
use retort_recipe::Recipe;
use retort_recipe::schema::lora::Variant;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::checkpoint::{self, CheckpointError, TrainState};
use crate::loss::nll_sum;
use crate::optim::{AdamW, AdamWConfig};
use crate::scaler::LossScaler;
use crate::schedule::LrSchedule;
use crate::step::{MicroBatch, train_step, train_step_scaled};

/// Where and how to train, decided by the caller (the command line resolves the base and device).
#[derive(Debug, Clone)]
pub struct Setup {
    /// The base model directory (Hugging Face layout).
    pub base_dir: PathBuf,
    /// How the base is named in `adapter_config.json` (`base_model_name_or_path`): the hub id or the path.
    pub base_name: String,
    /// The device, without autodiff (the run adds it).
    pub device: Device,
    /// True on GPUs (activation checkpointing `auto` turns on).
    pub gpu: bool,
    /// Precision of the frozen base.
    pub precision: Precision,
    /// Discard earlier checkpoints and start over.
    pub fresh: bool,
}

/// Why a run could not go on.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The dataset.
    #[error(transparent)]
    Data(#[from] retort_data::DataError),
    /// The tokenizer.
    #[error(transparent)]
    Tokenizer(#[from] retort_data::TokenizerError),
    /// The chat template.
    #[error("chat template `{}`: {message}", path.display())]
    Template {
        /// Where the template came from.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The base model.
    #[error(transparent)]
    Model(#[from] retort_model::ModelError),
    /// The adapters.
    #[error(transparent)]
    Lora(#[from] retort_lora::LoraError),
    /// A checkpoint.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A file of the run directory.
    #[error("`{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The checkpoint belongs to a different run.
    #[error("the checkpoint `{}` was trained with other settings:\n{}", checkpoint.display(), diff_lines(diffs))]
    Mismatch {
        /// The newest checkpoint.
        checkpoint: PathBuf,
        /// `(what, then, now)`.
        diffs: Vec<(String, String, String)>,
    },
    /// Too many consecutive non-finite steps.
    #[error(
        "the loss or gradient was not finite for {streak} steps in a row (last at step {step}); training stopped"
    )]
    Diverged {
        /// The step of the last bad update.
        step: u64,
        /// Consecutive bad steps.
        streak: u32,
    },
    /// The recipe asks for something this build cannot do.
    #[error("{0}")]
    Unsupported(String),
}

fn diff_lines(diffs: &[(String, String, String)]) -> String {
    diffs.iter().map(|(k, a, b)| format!("  {k}: {a} then, {b} now")).collect::<Vec<_>>().join("\n")
}

impl TrainError {
    /// How to fix it.
    pub fn hint(&self) -> String {
        match self {
            TrainError::Data(e) => e.hint(),
            TrainError::Tokenizer(_) => "the base model directory needs a tokenizer.json".into(),
            TrainError::Template { .. } => {
                "set `base.chat_template` to a Jinja template file for a base model without one".into()
            }
            TrainError::Model(_) => {
                "a base model directory holds config.json, *.safetensors and tokenizer.json".into()
            }
            TrainError::Lora(_) => "check `[lora]` against the model (`retort inspect model`)".into(),
            TrainError::Checkpoint(_) => {
                "the checkpoint is damaged: delete that `step-*` directory to resume from the one before, or pass `--fresh`".into()
            }
            TrainError::Io { .. } => "check that the output directory is writable and the disk is not full".into(),
            TrainError::Mismatch { .. } => {
                "restore those settings to resume, or pass `--fresh` to discard the checkpoints and start over".into()
            }
            TrainError::Diverged { .. } => {
                "lower `train.lr`, keep `train.max_grad_norm` on, or use `base.dtype = \"f32\"`; the last checkpoint is intact".into()
            }
            TrainError::Unsupported(_) => "see `retort recipe docs`".into(),
        }
    }

    /// True when the error is in the input (recipe, data, model), not in retort or the machine.
    pub fn is_input(&self) -> bool {
        !matches!(self, TrainError::Io { .. })
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

/// The datasets, tokenized and packed.
#[derive(Debug, Clone)]
pub struct Data {
    /// Training rows in their packed order.
    pub train: Vec<Row>,
    /// Validation rows (empty without `val.jsonl`).
    pub val: Vec<Row>,
    /// What reading the training file did.
    pub train_report: PrepareReport,
    /// What reading the validation file did.
    pub val_report: Option<PrepareReport>,
}

/// The shape of the run, known before any step.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Training rows (packed sequences).
    pub rows: usize,
    /// Micro-batches per epoch.
    pub micro_per_epoch: u64,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: u64,
    /// Optimizer steps of the run.
    pub total_steps: u64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Validation every N steps (0: no validation set).
    pub eval_every: u64,
    /// Checkpoint every N steps.
    pub save_every: u64,
    /// Tokens per epoch.
    pub tokens_per_epoch: usize,
    /// Label tokens per epoch.
    pub label_tokens_per_epoch: usize,
    /// Activation checkpointing.
    pub checkpointing: bool,
    /// Checkpointed layer inputs kept in host memory (`train.offload_checkpoints`, on a GPU with
    /// checkpointing).
    pub offload_checkpoints: bool,
    /// Adapter products in the base's 16-bit dtype (`train.autocast`; false with an f32 base).
    pub autocast: bool,
    /// Peak memory estimate.
    pub memory: MemoryEstimate,
    /// FLOPs of one epoch (forward and backward through the frozen base and the adapters).
    pub flops_per_epoch: f64,
    /// Step time, when measured ([`crate::probe`]; `retort train --plan` does).
    pub step_time: Option<crate::probe::StepTime>,
}

/// How a run ended without an error.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Every step is done; the adapter is written.
    Finished(Box<Report>),
    /// Stopped on a signal or `train.max_time`, with a checkpoint to resume from.
    Stopped {
        /// Steps done.
        step: u64,
        /// Steps of the run.
        total: u64,
        /// The checkpoint written.
        checkpoint: PathBuf,
        /// `signal` or `max_time`.
        reason: &'static str,
    },
    /// The adapter already matches the recipe, data and base.
    UpToDate {
        /// The adapter directory.
        adapter: PathBuf,
    },
}

/// The summary of a finished run, written to `train/report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The adapter directory.
    pub adapter: PathBuf,
    /// Steps done.
    pub steps: u64,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped_steps: u64,
    /// Mean loss of the first step.
    pub first_loss: Option<f64>,
    /// Mean loss of the last logged steps (up to 10).
    pub final_loss: Option<f64>,
    /// Validation loss before the first step (the base's: a fresh adapter changes nothing).
    pub first_val_loss: Option<f64>,
    /// Validation loss at the end.
    pub val_loss: Option<f64>,
    /// Best validation loss and its step.
    pub best_val: Option<(u64, f64)>,
    /// Training seconds over all sessions.
    pub elapsed_s: f64,
    /// Tokens per second in this session.
    pub tokens_per_s: f64,
    /// Label tokens trained on.
    pub label_tokens: u64,
    /// The run's shape.
    pub plan: Plan,
    /// The datasets.
    pub train_data: PrepareReport,
    /// The validation set.
    pub val_data: Option<PrepareReport>,
    /// What was trained.
    pub fingerprint: BTreeMap<String, String>,
    /// When this run replaced a finished run of other settings: what changed (`key: old then, new now`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replaced_finished_run: Vec<String>,
}

/// Paths of the run.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `<output_dir>/train`.
    pub train_dir: PathBuf,
    /// `<output_dir>/adapter`.
    pub adapter_dir: PathBuf,
    /// `<data_dir>/train.jsonl`.
    pub train_file: PathBuf,
    /// `<data_dir>/val.jsonl`.
    pub val_file: PathBuf,
}

impl Layout {
    /// The layout of a recipe.
    pub fn of(recipe: &Recipe) -> Layout {
        let out = &recipe.project.output_dir;
        let data = &recipe.project.data_dir;
        Layout {
            train_dir: out.join("train"),
            adapter_dir: out.join("adapter"),
            train_file: data.join("train.jsonl"),
            val_file: data.join("val.jsonl"),
        }
    }
}

fn sha256_file(path: &Path) -> Result<String, TrainError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io_err(path))?;
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The base model's identity: its config, tokenizer files, and the names and sizes of its weight files
/// (hashing many gigabytes of weights on every start would cost minutes).
fn base_identity(dir: &Path) -> Result<String, TrainError> {
    let mut h = Sha256::new();
    let mut names: Vec<(String, u64)> = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(io_err(dir))?;
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if matches!(name.as_str(), "config.json" | "tokenizer.json" | "tokenizer_config.json") {
            h.update(name.as_bytes());
            h.update(std::fs::read(&path).map_err(io_err(&path))?);
        } else if name.ends_with(".safetensors") {
            let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
            names.push((name, len));
        }
    }
    names.sort();
    for (n, len) in names {
        h.update(format!("{n}:{len};").as_bytes());
    }
    Ok(hex(&h.finalize()))
}

/// Recipe keys that change what is trained (everything else, such as the device, checkpoint cadence or
/// time limit, may change between a stop and a resume).
const NOT_FINGERPRINTED: &[&str] = &[
    "device",
    "checkpointing",
    "offload_checkpoints",
    "eval_every",
    "save_every",
    "keep_last",
    "max_time",
    "max_bad_steps",
];

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    if let serde_json::Value::Object(map) = v {
        for (k, v) in map {
            if prefix == "train" && NOT_FINGERPRINTED.contains(&k.as_str()) {
                continue;
            }
            out.insert(format!("{prefix}.{k}"), v.to_string());
        }
    }
}

/// What a run trains: recipe settings, base identity, precision, template and data hashes.
pub fn fingerprint(
    recipe: &Recipe,
    setup: &Setup,
    template_source: &str,
    layout: &Layout,
) -> Result<BTreeMap<String, String>, TrainError> {
    let mut f = BTreeMap::new();
    let to_value = |v: serde_json::Result<serde_json::Value>| v.unwrap_or(serde_json::Value::Null);
    flatten("lora", &to_value(serde_json::to_value(&recipe.lora)), &mut f);
    flatten("train", &to_value(serde_json::to_value(&recipe.train)), &mut f);
    f.insert("project.seed".into(), recipe.project.seed.to_string());
    f.insert("base.quantize".into(), format!("{:?}", recipe.base.quantize).to_lowercase());
    f.insert("base.double_quant".into(), recipe.base.double_quant.to_string());
    f.insert("base.precision".into(), format!("{:?}", setup.precision).to_lowercase());
    f.insert("base.identity".into(), base_identity(&setup.base_dir)?);
    f.insert("base.chat_template".into(), hex(&Sha256::digest(template_source.as_bytes())));
    f.insert("data.train".into(), sha256_file(&layout.train_file)?);
    Ok(f)
}

/// The tokenizer and chat template of the run (`base.chat_template`, else the base's own), with the
/// template's source.
pub fn text_tools(recipe: &Recipe, base_dir: &Path) -> Result<(Tokenizer, ChatTemplate, String), TrainError> {
    let tok = Tokenizer::load(base_dir)?;
    let (source, path) = match &recipe.base.chat_template {
        Some(p) => (std::fs::read_to_string(p).map_err(io_err(p))?, p.clone()),
        None => match &tok.chat_template {
            Some(s) => (s.clone(), base_dir.join("tokenizer_config.json")),
            None => {
                return Err(TrainError::Template {
                    path: base_dir.join("tokenizer_config.json"),
                    message: "the base model has no chat template".into(),
                });
            }
        },
    };
    let template =
        ChatTemplate::new(&source).map_err(|e| TrainError::Template { path, message: e.to_string() })?;
    Ok((tok, template, source))
}

/// Reads the training and validation files.
pub fn load_data(
    recipe: &Recipe,
    layout: &Layout,
    tok: &Tokenizer,
    template: &ChatTemplate,
) -> Result<Data, TrainError> {
    let opts = PrepareOptions::from_recipe(&recipe.train, recipe.project.seed);
    let (train, train_report) = prepare(&layout.train_file, tok, template, &opts)?;
    let (val, val_report) = if layout.val_file.is_file() {
        let (v, r) = prepare(&layout.val_file, tok, template, &opts)?;
        (v, Some(r))
    } else {
        (Vec::new(), None)
    };
    Ok(Data { train, val, train_report, val_report })
}

fn checkpointing_on(recipe: &Recipe, gpu: bool) -> bool {
    use retort_recipe::schema::train::Toggle;
    match recipe.train.checkpointing {
        Toggle::On => true,
        Toggle::Off => false,
        Toggle::Auto => gpu,
    }
}

/// `train.autocast`: `auto` is on for GPUs. Never on with an f32 base, where it would change nothing.
fn autocast_on(recipe: &Recipe, gpu: bool, precision: Precision) -> bool {
    use retort_recipe::schema::train::Toggle;
    precision != Precision::F32
        && match recipe.train.autocast {
            Toggle::On => true,
            Toggle::Off => false,
            Toggle::Auto => gpu,
        }
}

/// The run's shape for this data and model, with the base in `precision`.
pub fn plan(
    recipe: &Recipe,
    data: &Data,
    config: &retort_hf::ModelConfig,
    gpu: bool,
    precision: Precision,
) -> Plan {
    let t = &recipe.train;
    let rows = data.train.len();
    let mb = t.micro_batch_size.max(1) as u64;
    let accum = t.grad_accum.max(1) as u64;
    let micro_per_epoch = (rows as u64).div_ceil(mb);
    let steps_per_epoch = micro_per_epoch.div_ceil(accum).max(1);
    let total_steps = t.max_steps.unwrap_or(steps_per_epoch * u64::from(t.epochs)).max(1);
    let warmup_steps = LrSchedule::warmup_steps(total_steps, t.warmup_ratio, t.warmup_steps);
    let every = |explicit: Option<u64>| explicit.unwrap_or((total_steps / 10).max(1)).max(1);
    let checkpointing = checkpointing_on(recipe, gpu);
    let offload_checkpoints = t.offload_checkpoints && checkpointing && gpu;
    let autocast = autocast_on(recipe, gpu, precision);
    let memory = retort_model::memory::estimate(
        config,
        TrainShape {
            batch: t.micro_batch_size as usize,
            seq: padded_max_len(t.max_seq_len as usize, gpu),
            rank: recipe.lora.r as usize,
            nf4: recipe.base.quantize == retort_recipe::schema::project::Quantize::Nf4,
            checkpointing,
            offload: offload_checkpoints,
            dtype_bytes: precision.dtype().size(),
            // What `retort_model::attention_grad` records: f32 on the CPU.
            fused_attention: !gpu && precision.dtype() == retort_model::burn::tensor::DType::F32,
            head_chunk_bytes: if gpu {
                retort_model::memory::GPU_HEAD_CHUNK_BYTES
            } else {
                retort_model::memory::HEAD_CHUNK_BYTES
            },
            mlp_chunk_bytes: retort_model::model::MLP_CHUNK_BYTES,
            cpu: !gpu,
            dropout: recipe.lora.dropout > 0.0,
            autocast,
        },
    );
    let tokens = data.train_report.pack.tokens;
    let params: f64 = retort_hf::names::tensors(config).iter().map(|s| s.numel() as f64).sum();
    Plan {
        rows,
        micro_per_epoch,
        steps_per_epoch,
        total_steps,
        warmup_steps,
        eval_every: if data.val.is_empty() { 0 } else { every(t.eval_every) },
        save_every: every(t.save_every),
        tokens_per_epoch: tokens,
        label_tokens_per_epoch: data.train_report.pack.label_tokens,
        checkpointing,
        offload_checkpoints,
        autocast,
        memory,
        // Forward 2 FLOPs per weight per token, backward 2 more for activation gradients (frozen
        // weights need no weight gradients), plus a recomputed forward with checkpointing.
        flops_per_epoch: tokens as f64 * params * if checkpointing { 6.0 } else { 4.0 },
        step_time: None,
    }
}

/// The frozen base: with `base.quantize = "nf4"` its projections are quantized while loading (QLoRA),
/// deterministically, so a resume re-quantizes to the same bits and checkpoints hold only the adapter.
pub fn load_base(
    recipe: &Recipe,
    setup: &Setup,
    device: &Device,
) -> Result<(Transformer, retort_hf::LoadReport), TrainError> {
    Ok(match recipe.base.quantize {
        retort_recipe::schema::project::Quantize::Nf4 => retort_lora::qlora::load_quantized(
            &setup.base_dir,
            setup.precision,
            device,
            recipe.base.double_quant,
        )?,
        retort_recipe::schema::project::Quantize::None => {
            Transformer::load(&setup.base_dir, setup.precision, device)?
        }
    })
}

fn mix(seed: u64, salt: u64, n: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ n.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The order of the rows in epoch `epoch`.
pub fn epoch_order(rows: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows).collect();
    retort_data::shuffle(&mut order, mix(seed, 0x0e0c, epoch));
    order
}

/// Micro-batches on GPUs are padded to a multiple of this many tokens per row, so that their shapes, and
/// the kernels compiled and tuned for them, repeat from step to step.
pub const GPU_LEN_MULTIPLE: usize = 64;

/// What row lengths are padded to a multiple of on `gpu` or the CPU (exact there: no kernels to reuse).
pub fn len_multiple(gpu: bool) -> usize {
    if gpu { GPU_LEN_MULTIPLE } else { 1 }
}

/// The longest row of a micro-batch: `max_seq_len` padded as the run pads rows on `gpu` (what the memory
/// plan and the step-time probe size a micro-batch by).
pub fn padded_max_len(max_seq_len: usize, gpu: bool) -> usize {
    max_seq_len.next_multiple_of(len_multiple(gpu))
}

fn micro_batch(rows: &[&Row], len_multiple: usize) -> MicroBatch {
    let owned: Vec<Row> = rows.iter().map(|r| (*r).clone()).collect();
    let b = collate_to(&owned, 0, len_multiple);
    MicroBatch {
        batch: Batch {
            rows: b.rows,
            len: b.len,
            ids: b.ids,
            positions: b.positions,
            valid: b.valid,
            segments: b.segments,
        },
        labels: b.labels,
    }
}

/// Mean validation loss per label token, rows padded to a multiple of `len_multiple` tokens.
pub fn val_loss(
    model: &Transformer,
    val: &[Row],
    micro_batch_size: usize,
    len_multiple: usize,
) -> Option<f64> {
    // Without autodiff: a forward that is never differentiated must not record a graph.
    let model = &model.valid();
    let mut sum = 0f64;
    let mut count = 0usize;
    for chunk in val.chunks(micro_batch_size.max(1)) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let mb = micro_batch(&refs, len_multiple);
        count += mb.label_tokens();
        let hidden = model.hidden(&mb.batch, None);
        if let Some(nll) = nll_sum(model, hidden, &mb.labels) {
            let v: f32 = nll.into_scalar();
            sum += f64::from(v);
        }
    }
    (count > 0).then(|| sum / count as f64)
}

fn adapter_config(
    recipe: &Recipe,
    model: &Transformer,
    setup: &Setup,
) -> Result<retort_lora::AdapterConfig, TrainError> {
    let spec = retort_lora::AdapterSpec::from_recipe(&recipe.lora);
    let targets = spec.target_names(model)?;
    let cfg = retort_lora::AdapterConfig::new(
        spec.r,
        spec.alpha,
        spec.dropout,
        &targets,
        spec.variant == Variant::Rslora,
        spec.variant == Variant::Dora,
        &setup.base_name,
    );
    Ok(cfg)
}

/// Appends JSON lines to `metrics.jsonl`, flushed per line so a killed run loses at most one.
struct Metrics {
    file: std::fs::File,
    path: PathBuf,
}

impl Metrics {
    /// Opens the file, keeping only lines of steps up to `step` (later ones are recomputed; a run at
    /// step 0 starts an empty file).
    fn open(path: &Path, step: u64) -> Result<Metrics, TrainError> {
        let kept: Vec<String> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= step && step > 0)
            })
            .map(str::to_string)
            .collect();
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        retort_io::write_atomic(path, text.as_bytes(), true).map_err(io_err(path))?;
        let file = std::fs::OpenOptions::new().append(true).open(path).map_err(io_err(path))?;
        Ok(Metrics { file, path: path.to_path_buf() })
    }

    fn write(&mut self, v: &serde_json::Value) -> Result<(), TrainError> {
        writeln!(self.file, "{v}").map_err(io_err(&self.path))
    }
}

/// Replaces `dir` with a fresh copy of the adapter (written aside, then renamed).
fn write_adapter(
    model: &Transformer,
    cfg: &retort_lora::AdapterConfig,
    dir: &Path,
) -> Result<(), TrainError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = parent.join(format!(".adapter.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    retort_lora::save_adapter(model, cfg, &tmp)?;
    let old = parent.join(format!(".adapter.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(io_err(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
    if old.exists() {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// The report of a finished run, if its fingerprint is `fp` and its adapter exists.
fn finished_report(layout: &Layout, fp: &BTreeMap<String, String>) -> bool {
    let path = layout.train_dir.join("report.json");
    let Ok(text) = std::fs::read_to_string(path) else { return false };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    let same = serde_json::to_value(fp).is_ok_and(|f| v["fingerprint"] == f);
    same && layout.adapter_dir.join("adapter_model.safetensors").is_file()
}

/// Deletes the checkpoints, metrics and report of an earlier run.
fn discard(layout: &Layout) -> Result<(), TrainError> {
    for (_, dir) in checkpoint::list(&layout.train_dir) {
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    for name in ["metrics.jsonl", "report.json", "loss.svg"] {
        let p = layout.train_dir.join(name);
        if p.exists() {
            std::fs::remove_file(&p).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

/// Runs (or resumes) training. `stop` is polled between steps: when it is set, a checkpoint is written
/// and the run returns [`Outcome::Stopped`]. The caller holds the run lock.
pub fn run(
    recipe: &Recipe,
    setup: &Setup,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<Outcome, TrainError> {
    let session = Instant::now();
    let layout = Layout::of(recipe);
    let t = &recipe.train;
    let (tok, template, template_source) = text_tools(recipe, &setup.base_dir)?;
    let fp = fingerprint(recipe, setup, &template_source, &layout)?;
    std::fs::create_dir_all(&layout.train_dir).map_err(io_err(&layout.train_dir))?;
    checkpoint::clean_partial(&layout.train_dir);
    if setup.fresh {
        discard(&layout)?;
    } else if finished_report(&layout, &fp) {
        return Ok(Outcome::UpToDate { adapter: layout.adapter_dir.clone() });
    }
    let mut latest = checkpoint::list(&layout.train_dir).pop();
    let mut replaced = Vec::new();
    if let Some((_, dir)) = &latest {
        let state = checkpoint::read_state(dir)?;
        let diffs = checkpoint::fingerprint_diff(&state.fingerprint, &fp);
        if !diffs.is_empty() {
            if state.step < state.total_steps {
                // An unfinished run: resuming it with other settings would mix two trainings, and
                // starting over would throw its work away; the user decides.
                return Err(TrainError::Mismatch { checkpoint: dir.clone(), diffs });
            }
            // A finished run of an older recipe: its adapter is superseded, as `retort run` expects
            // when a recipe field changes. Its checkpoints go; the report says what changed.
            discard(&layout)?;
            latest = None;
            replaced = diffs.iter().map(|(k, a, b)| format!("{k}: {a} then, {b} now")).collect();
        }
    }

    let data = load_data(recipe, &layout, &tok, &template)?;
    let device = setup.device.clone().autodiff();
    let (base, _) = load_base(recipe, setup, &device)?;
    tok.check_model_vocab(base.config.vocab_size)?;
    let plan = plan(recipe, &data, &base.config, setup.gpu, setup.precision);
    let opt_config = AdamWConfig {
        beta1: t.adam_beta1,
        beta2: t.adam_beta2,
        eps: t.adam_eps,
        weight_decay: t.weight_decay,
    };
    let seed = recipe.project.seed;
    let (mut model, adapter, mut opt, mut state) = match &latest {
        Some((_, dir)) => {
            let (m, a, o, s) = checkpoint::load(dir, base, opt_config)?;
            (m, a, o, s)
        }
        None => {
            let spec = retort_lora::AdapterSpec::from_recipe(&recipe.lora);
            let m = retort_lora::attach(base, &spec, seed)?;
            let a = adapter_config(recipe, &m, setup)?;
            let s = TrainState {
                format: checkpoint::FORMAT,
                retort: env!("CARGO_PKG_VERSION").into(),
                step: 0,
                total_steps: plan.total_steps,
                epoch: 0,
                cursor: 0,
                seed,
                skipped_steps: 0,
                bad_streak: 0,
                label_tokens: 0,
                tokens: 0,
                elapsed_s: 0.0,
                best_val: None,
                loss_scale: None,
                overflow_steps: 0,
                fingerprint: fp.clone(),
            };
            (m, a, AdamW::new(opt_config), s)
        }
    };
    // A base in f16 trains with dynamic loss scaling (f16 gradients underflow otherwise); a checkpoint
    // carries the scaler on. (bf16 has f32's exponent range and needs none.)
    if setup.precision == Precision::F16 && state.loss_scale.is_none() {
        state.loss_scale = Some(LossScaler::default());
    }
    // Activation checkpointing recomputes each layer in the backward pass (see `step`).
    model.checkpoint_layers = plan.checkpointing;
    model.offload_checkpoints = plan.offload_checkpoints;
    model = model.with_lora_autocast(plan.autocast);
    let schedule = LrSchedule {
        lr: t.lr,
        kind: t.schedule,
        warmup: plan.warmup_steps,
        total: plan.total_steps,
        min_ratio: t.min_lr_ratio,
    };
    let mut metrics = Metrics::open(&layout.train_dir.join("metrics.jsonl"), state.step)?;
    if state.step == 0
        && plan.eval_every > 0
        && let Some(v) =
            val_loss(&model, &data.val, t.micro_batch_size.max(1) as usize, len_multiple(setup.gpu))
    {
        // The untrained adapter's validation loss (B = 0: the base's), the curve's starting point.
        metrics.write(&json!({"step": 0, "val_loss": v}))?;
    }
    let task = progress.task("train", plan.total_steps);
    task.inc(state.step);
    let mb = t.micro_batch_size.max(1) as usize;
    let accum = t.grad_accum.max(1) as usize;
    let mut order = epoch_order(data.train.len(), seed, state.epoch);
    let mut order_epoch = state.epoch;
    let mut last_saved = latest.as_ref().map(|(s, _)| *s);
    let mut session_tokens = 0u64;
    let mut session_steps = 0u64;
    let mut last_step_s = 0f64;
    let mut last_val = None;
    let elapsed_before = state.elapsed_s;
    let save = |model: &Transformer, opt: &AdamW, state: &TrainState| {
        checkpoint::save(&layout.train_dir, model, &adapter, opt, state, t.keep_last)
    };

    while state.step < plan.total_steps {
        // At least one step per session, so a limit shorter than start-up still makes progress.
        let over_time = session_steps > 0
            && t.max_time.is_some_and(|m| session.elapsed().as_secs_f64() + last_step_s > m.0.as_secs_f64());
        if stop.load(Ordering::SeqCst) || over_time {
            state.elapsed_s = elapsed_before + session.elapsed().as_secs_f64();
            let dir = if last_saved == Some(state.step) {
                layout.train_dir.join(checkpoint::dir_name(state.step))
            } else {
                save(&model, &opt, &state)?
            };
            task.finish();
            return Ok(Outcome::Stopped {
                step: state.step,
                total: plan.total_steps,
                checkpoint: dir,
                reason: if over_time { "max_time" } else { "signal" },
            });
        }
        let started = Instant::now();
        // The micro-batches of this step: up to `grad_accum`, never across an epoch boundary.
        if state.cursor >= plan.micro_per_epoch {
            state.epoch += 1;
            state.cursor = 0;
        }
        if order_epoch != state.epoch {
            order = epoch_order(data.train.len(), seed, state.epoch);
            order_epoch = state.epoch;
        }
        let mut micro = Vec::with_capacity(accum);
        while micro.len() < accum && state.cursor < plan.micro_per_epoch {
            let start = state.cursor as usize * mb;
            let rows: Vec<&Row> =
                order[start..(start + mb).min(order.len())].iter().map(|&i| &data.train[i]).collect();
            micro.push(micro_batch(&rows, len_multiple(setup.gpu)));
            state.cursor += 1;
        }
        let tokens: u64 = micro.iter().map(|m| m.batch.valid.iter().filter(|&&v| v).count() as u64).sum();
        let lr = schedule.at(state.step);
        let step_seed = mix(seed, 0xd40f, state.step);
        let (next, stats) = match state.loss_scale.as_mut() {
            Some(scaler) => {
                train_step_scaled(model, &mut opt, &micro, lr, t.max_grad_norm, step_seed, scaler)
            }
            None => train_step(model, &mut opt, &micro, lr, t.max_grad_norm, step_seed),
        };
        model = next;
        state.step += 1;
        state.tokens += tokens;
        state.label_tokens += stats.label_tokens as u64;
        session_tokens += tokens;
        session_steps += 1;
        if stats.applied {
            state.bad_streak = 0;
        } else if stats.overflow {
            // Loss scaling at work: the scale was halved; not a sign of divergence.
            state.skipped_steps += 1;
            state.overflow_steps += 1;
        } else {
            state.skipped_steps += 1;
            state.bad_streak += 1;
            if state.bad_streak > t.max_bad_steps {
                return Err(TrainError::Diverged { step: state.step, streak: state.bad_streak });
            }
        }
        last_step_s = started.elapsed().as_secs_f64();
        let epoch_f = state.epoch as f64 + state.cursor as f64 / plan.micro_per_epoch.max(1) as f64;
        let mut line = json!({
            "step": state.step,
            "epoch": (epoch_f * 1000.0).round() / 1000.0,
            "loss": stats.loss,
            "grad_norm": stats.grad_norm,
            "lr": lr,
            "label_tokens": stats.label_tokens,
            "tokens": tokens,
            "tokens_per_s": tokens as f64 / last_step_s.max(1e-9),
            "skipped": !stats.applied,
        });
        if let Some(s) = &state.loss_scale {
            // The scale for the next step, and whether this one overflowed.
            line["loss_scale"] = json!(s.scale);
            line["overflow"] = json!(stats.overflow);
        }
        metrics.write(&line)?;
        task.inc(1);
        task.set_message(&format!("loss {:.4} lr {lr:.2e}", stats.loss));
        let last = state.step == plan.total_steps;
        if plan.eval_every > 0
            && (state.step % plan.eval_every == 0 || last)
            && let Some(v) = val_loss(&model, &data.val, mb, len_multiple(setup.gpu))
        {
            if state.best_val.is_none_or(|(_, b)| v < b) {
                state.best_val = Some((state.step, v));
            }
            last_val = Some(v);
            metrics.write(&json!({"step": state.step, "val_loss": v}))?;
        }
        if state.step % plan.save_every == 0 || last {
            state.elapsed_s = elapsed_before + session.elapsed().as_secs_f64();
            save(&model, &opt, &state)?;
            last_saved = Some(state.step);
        }
    }
    task.finish();
    state.elapsed_s = elapsed_before + session.elapsed().as_secs_f64();
    if last_saved != Some(state.step) {
        save(&model, &opt, &state)?;
    }
    write_adapter(&model, &adapter, &layout.adapter_dir)?;
    let history = read_history(&layout.train_dir.join("metrics.jsonl"));
    let tail: Vec<f64> = history.loss.iter().rev().take(10).map(|(_, l)| *l).collect();
    let report = Report {
        adapter: layout.adapter_dir.clone(),
        steps: state.step,
        skipped_steps: state.skipped_steps,
        first_loss: history.loss.first().map(|(_, l)| *l),
        final_loss: (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64),
        first_val_loss: history.val.first().filter(|(step, _)| *step == 0).map(|(_, v)| *v),
        val_loss: last_val.or_else(|| history.val.last().map(|(_, v)| *v)),
        best_val: state.best_val,
        elapsed_s: state.elapsed_s,
        tokens_per_s: session_tokens as f64 / session.elapsed().as_secs_f64().max(1e-9),
        label_tokens: state.label_tokens,
        plan,
        train_data: data.train_report,
        val_data: data.val_report,
        fingerprint: fp,
        replaced_finished_run: replaced,
    };
    let svg = crate::plot::loss_svg(&history.loss, &history.val, &recipe.project.name);
    let svg_path = layout.train_dir.join("loss.svg");
    retort_io::write_atomic(&svg_path, svg.as_bytes(), true).map_err(io_err(&svg_path))?;
    let report_path = layout.train_dir.join("report.json");
    let json = serde_json::to_vec_pretty(&report)
        .map_err(|e| TrainError::Io { path: report_path.clone(), source: std::io::Error::other(e) })?;
    retort_io::write_atomic(&report_path, &json, true).map_err(io_err(&report_path))?;
    Ok(Outcome::Finished(Box::new(report)))
}

/// Loss and validation loss by step, read from `metrics.jsonl`.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// `(step, loss)` of applied steps.
    pub loss: Vec<(u64, f64)>,
    /// `(step, val_loss)`.
    pub val: Vec<(u64, f64)>,
}

/// Reads a run's metrics.
pub fn read_history(path: &Path) -> History {
    let mut h = History::default();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(step) = v["step"].as_u64() else { continue };
        if let Some(l) = v["val_loss"].as_f64() {
            h.val.push((step, l));
        } else if let (Some(l), false) = (v["loss"].as_f64(), v["skipped"].as_bool().unwrap_or(false)) {
            h.loss.push((step, l));
        }
    }
    h
}
