//! `retort run RECIPE`: distill → train → eval → export (export before eval when the recipe compares the
//! exported GGUF), each stage skipping work that is up to date,
//! stopping at the first stage that does not succeed (its exit code is the run's), and recording what
//! happened in `<output_dir>/run.json`.
//!
//! Up to date means: distill answers come from its journal (a rerun pays for nothing already answered),
//! train finds a finished run with the same fingerprint, eval a report with the same fingerprint, and
//! export a stamp with the same inputs (adapter, base, `[export]`).

use std::path::Path;
use std::time::Instant;

use clap::ValueEnum;
use sha2::{Digest, Sha256};

use crate::cmd::base::load_recipe;
use crate::cmd::export::ExportArgs;
use crate::exit::{CliError, Exit};
use crate::ui::Ui;

/// A pipeline stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Stage {
    /// The teacher writes the dataset.
    Distill,
    /// LoRA training.
    Train,
    /// Held-out comparison and the gate.
    Eval,
    /// Files for serving.
    Export,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Distill => "distill",
            Stage::Train => "train",
            Stage::Eval => "eval",
            Stage::Export => "export",
        }
    }
}

const STAMP: &str = ".retort-export.json";

fn export_fingerprint(recipe: &retort_recipe::Recipe) -> Option<String> {
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    let adapter = recipe.project.output_dir.join("adapter");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        h.update(std::fs::read(adapter.join(f)).ok()?);
    }
    h.update(recipe.base.model.to_string().as_bytes());
    h.update(recipe.base.revision.as_bytes());
    h.update(serde_json::to_vec(&recipe.export).ok()?);
    h.update(recipe.project.name.as_bytes());
    Some(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn git_commit(dir: &Path) -> Option<String> {
    let out =
        std::process::Command::new("git").arg("-C").arg(dir).args(["rev-parse", "HEAD"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What `retort run` was asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Start at this stage.
    pub from: Option<Stage>,
    /// Run only this stage.
    pub only: Option<Stage>,
    /// Redo what is up to date.
    pub force: bool,
    /// Wall-clock limit for the whole run.
    pub max_time: Option<std::time::Duration>,
}

pub fn run(ui: &Ui, file: &Path, opts: Options) -> anyhow::Result<Exit> {
    let Options { from, only, force, max_time } = opts;
    let Some(recipe) = load_recipe(ui, file) else { return Ok(Exit::BadInput) };
    let started = Instant::now();
    let deadline = max_time.map(|m| started + m);
    // One `retort run` per output directory (its own lock directory, so that no stage's lock, e.g.
    // distill's on a data_dir equal to output_dir, can collide with it); each stage also locks its own.
    let _lock = retort_io::RunLock::acquire(
        &recipe.project.output_dir.join(".run"),
        &format!("retort run {}", file.display()),
    )
    .map_err(|e| {
        CliError::input(e.to_string())
            .hint("wait for the other run to finish; a lock left by a killed run is taken over automatically")
    })?;
    let mut record = Vec::new();
    let mut exit = Exit::Ok;
    // Evaluating the exported GGUF needs it written first; a failing gate still fails the run (exit 3).
    let gguf_first = retort_eval::compare_of(&recipe).contains(&retort_recipe::schema::eval::Compare::Gguf);
    let order = if gguf_first {
        [Stage::Distill, Stage::Train, Stage::Export, Stage::Eval]
    } else {
        [Stage::Distill, Stage::Train, Stage::Eval, Stage::Export]
    };
    for stage in order {
        // Cached tensor buffers pay off for model steps; export streams each tensor once.
        crate::ALLOC.set_caching(matches!(stage, Stage::Train | Stage::Eval));
        let wanted = only.map_or_else(|| from.is_none_or(|f| stage >= f), |o| o == stage);
        let configured = match stage {
            Stage::Distill => recipe.teacher.is_some() && recipe.distill.is_some(),
            Stage::Export => !recipe.export.formats.is_empty(),
            Stage::Train | Stage::Eval => true,
        };
        if !wanted || !configured {
            let why = if wanted { "not configured in the recipe" } else { "not selected" };
            ui.status("skipping", &format!("{}: {why}", stage.name()));
            record.push(serde_json::json!({"stage": stage.name(), "decision": "skipped", "why": why}));
            continue;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            ui.error(
                &format!("`--max-time` reached before {}; the work so far is saved", stage.name()),
                Some("run the same command again to continue"),
            );
            record.push(
                serde_json::json!({"stage": stage.name(), "decision": "not started", "why": "max_time"}),
            );
            exit = Exit::Limit;
            break;
        }
        ui.status("stage", stage.name());
        let t = Instant::now();
        crate::ui::take_up_to_date();
        let result = match stage {
            Stage::Distill => crate::cmd::distill::run(ui, file, false),
            Stage::Train => crate::cmd::train::run(ui, file, force, false, deadline),
            Stage::Eval => crate::cmd::eval::run(ui, file, force),
            Stage::Export => {
                let fp = export_fingerprint(&recipe);
                let stamp = recipe.project.output_dir.join("export").join(STAMP);
                let same = fp.is_some() && std::fs::read_to_string(&stamp).ok() == fp;
                if same && !force {
                    ui.up_to_date("export: the adapter, base and `[export]` are unchanged");
                    Ok(Exit::Ok)
                } else {
                    let args = ExportArgs {
                        recipe: Some(file.to_path_buf()),
                        base: None,
                        adapter: None,
                        formats: Vec::new(),
                        dtype: None,
                        out: None,
                        name: None,
                    };
                    let r = crate::cmd::export::run(ui, args);
                    if let (Ok(Exit::Ok), Some(fp)) = (&r, &fp) {
                        retort_io::write_atomic(&stamp, fp.as_bytes(), true)?;
                    }
                    r
                }
            }
        };
        let seconds = t.elapsed().as_secs_f64();
        let decision = if crate::ui::take_up_to_date() { "up to date" } else { "ran" };
        let code = match &result {
            Ok(e) => *e,
            Err(_) => Exit::BadInput,
        };
        record.push(serde_json::json!({
            "stage": stage.name(), "decision": decision, "exit": code.code(), "seconds": seconds,
        }));
        match result {
            Ok(Exit::Ok) => {}
            Ok(e) => {
                exit = e;
                break;
            }
            Err(e) => {
                write_record(&recipe, file, &record, started, None);
                return Err(e);
            }
        }
    }
    write_record(&recipe, file, &record, started, Some(exit));
    if exit == Exit::Ok {
        ui.status(
            "done",
            &format!(
                "in {:.1}s; {}",
                started.elapsed().as_secs_f64(),
                recipe.project.output_dir.join("run.json").display()
            ),
        );
    }
    Ok(exit)
}

fn write_record(
    recipe: &retort_recipe::Recipe,
    file: &Path,
    stages: &[serde_json::Value],
    started: Instant,
    exit: Option<Exit>,
) {
    let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let data = &recipe.project.data_dir;
    let out = &recipe.project.output_dir;
    // What the run consumed and produced, by content, so two runs can be compared file by file.
    let mut hashes = serde_json::Map::new();
    for (name, path) in [
        ("recipe", file.to_path_buf()),
        ("train.jsonl", data.join("train.jsonl")),
        ("val.jsonl", data.join("val.jsonl")),
        ("test.jsonl", data.join("test.jsonl")),
        ("adapter_model.safetensors", out.join("adapter").join("adapter_model.safetensors")),
        ("eval/report.json", out.join("eval").join("report.json")),
    ] {
        if let Ok(bytes) = std::fs::read(&path) {
            hashes.insert(name.to_string(), serde_json::Value::String(hex(&Sha256::digest(&bytes))));
        }
    }
    let distill: Option<serde_json::Value> =
        std::fs::read(data.join("distill.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let costs = distill.map(|d| {
        serde_json::json!({
            "teacher_usd_total": d["cost_usd"]["total"],
            "teacher_usd_last_distill": d["cost_usd"]["this_run"],
            "teacher_requests_last_distill": d["requests"]["sent"],
        })
    });
    let v = serde_json::json!({
        "retort": env!("CARGO_PKG_VERSION"),
        "recipe": file.display().to_string(),
        "git_commit": git_commit(dir),
        "hashes": hashes,
        "costs": costs,
        "stages": stages,
        "exit": exit.map(Exit::code),
        "seconds": started.elapsed().as_secs_f64(),
    });
    let out = out.join("run.json");
    let _ = std::fs::create_dir_all(&recipe.project.output_dir);
    if let Err(e) = retort_io::write_atomic(&out, &serde_json::to_vec_pretty(&v).unwrap_or_default(), true) {
        tracing::warn!(path = %out.display(), error = %e, "cannot write run.json");
    }
}
