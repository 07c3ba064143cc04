//! `retort train RECIPE [--fresh] [--plan]`.
//!
//! Loads the recipe, resolves the base model and the device, takes the run lock on
//! `<output_dir>/train`, and runs (or resumes) training until it finishes, a signal arrives (exit 4
//! with a checkpoint) or `train.max_time` is reached (exit 4). A second Ctrl-C exits at once; the last
//! checkpoint is intact either way.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use retort_model::Precision;
use retort_train::{Layout, Outcome, Plan, Setup, TrainError};

use crate::exit::{CliError, Exit};
use crate::progress::CliProgress;
use crate::ui::Ui;

fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
}

fn train_error(e: &TrainError) -> CliError {
    let c = CliError::input(e.to_string()).hint(e.hint());
    if e.is_input() { c } else { CliError { exit: Exit::Internal, ..c } }
}

/// `deadline` (from `retort run --max-time`) caps `train.max_time` by the time left.
pub fn run(
    ui: &Ui,
    file: &Path,
    fresh: bool,
    plan_only: bool,
    deadline: Option<std::time::Instant>,
) -> anyhow::Result<Exit> {
    let Some(mut recipe) = crate::cmd::base::load_recipe(ui, file) else { return Ok(Exit::BadInput) };
    if let Some(d) = deadline {
        let left = d.saturating_duration_since(std::time::Instant::now());
        let cap = recipe.train.max_time.map_or(left, |m| m.0.min(left));
        recipe.train.max_time = Some(retort_recipe::types::Duration(cap));
    }
    let base = crate::cmd::base::resolve(ui, &recipe)?;
    let (device, precision) = crate::cmd::base::device(&recipe)?;
    let layout = Layout::of(&recipe);

    if plan_only {
        let (tok, template, _) =
            retort_train::run::text_tools(&recipe, &base.dir).map_err(|e| train_error(&e))?;
        let data =
            retort_train::run::load_data(&recipe, &layout, &tok, &template).map_err(|e| train_error(&e))?;
        let config = retort_hf::ModelConfig::load(&base.dir).map_err(|e| CliError::input(e.to_string()))?;
        let mut plan = retort_train::run::plan(&recipe, &data, &config, device.gpu, precision);
        ui.status("timing", "training steps of 1- and 2-layer stand-ins of the base (random weights)");
        plan.step_time = Some(
            retort_train::probe::for_recipe(
                &recipe,
                &config,
                plan.checkpointing,
                plan.offload_checkpoints,
                plan.autocast,
                precision,
                &device.device,
            )
            .map_err(|e| train_error(&e))?,
        );
        if ui.json {
            ui.stdout_line(&serde_json::json!({"plan": plan, "train_data": data.train_report}).to_string());
        } else {
            ui.stdout_line(&data.train_report.to_string());
            if let Some(v) = &data.val_report {
                ui.stdout_line(&v.to_string());
            }
            print_plan(ui, &plan, &device.name, precision);
        }
        return Ok(Exit::Ok);
    }

    let _lock = retort_io::RunLock::acquire(&layout.train_dir, &format!("retort train {}", file.display()))
        .map_err(|e| {
        CliError::input(e.to_string())
            .hint("wait for the other run to finish; a lock left by a killed run is taken over automatically")
    })?;
    // SIGINT/SIGTERM ask for a clean stop (checkpoint, exit 4); a second one while stopping exits now.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, Exit::Limit.code().into(), stop.clone())?;
        signal_hook::flag::register(sig, stop.clone())?;
    }
    ui.status(
        "training",
        &format!(
            "{} on {} ({}) in {precision:?}, adapters in {}",
            base.name,
            device.name,
            base.dir.display(),
            layout.adapter_dir.display()
        ),
    );
    let setup = Setup {
        base_dir: base.dir,
        base_name: base.name,
        device: device.device,
        gpu: device.gpu,
        precision,
        fresh,
    };
    if !fresh
        && !layout.train_dir.join("report.json").is_file()
        && let Some((step, dir)) = retort_train::checkpoint::list(&layout.train_dir).pop()
    {
        ui.status("resuming", &format!("from step {step} ({})", dir.display()));
    }
    let progress = CliProgress::new(ui);
    match retort_train::run(&recipe, &setup, &progress, &stop) {
        Ok(Outcome::Finished(r)) => {
            if ui.json {
                ui.stdout_line(&serde_json::to_string(&r)?);
            }
            if !r.replaced_finished_run.is_empty() {
                ui.status(
                    "retrained",
                    &format!(
                        "the recipe changed since the last finished run ({}), so it trained from scratch",
                        r.replaced_finished_run.join("; ")
                    ),
                );
            }
            ui.status(
                "trained",
                &format!(
                    "{} steps in {:.1}s ({:.0} tokens/s), loss {} -> {}{}",
                    r.steps,
                    r.elapsed_s,
                    r.tokens_per_s,
                    fmt_loss(r.first_loss),
                    fmt_loss(r.final_loss),
                    match r.best_val {
                        Some((step, v)) => format!(", best validation loss {v:.4} at step {step}"),
                        None => String::new(),
                    }
                ),
            );
            if r.skipped_steps > 0 {
                ui.status("warning", &format!("{} steps skipped for a non-finite loss", r.skipped_steps));
            }
            ui.status("wrote", &format!("the adapter to {}", r.adapter.display()));
            ui.status(
                "report",
                &format!(
                    "{} (loss curve: {})",
                    layout.train_dir.join("report.json").display(),
                    layout.train_dir.join("loss.svg").display()
                ),
            );
            Ok(Exit::Ok)
        }
        Ok(Outcome::UpToDate { adapter }) => {
            ui.up_to_date(&format!(
                "{} matches the recipe, data and base; `--fresh` trains again",
                adapter.display()
            ));
            Ok(Exit::Ok)
        }
        Ok(Outcome::Stopped { step, total, checkpoint, reason }) => {
            let why = if reason == "max_time" { "`train.max_time` reached" } else { "stopped by a signal" };
            ui.error(
                &format!("{why} after step {step} of {total}; checkpoint {}", checkpoint.display()),
                Some("run the same command again to resume from it"),
            );
            Ok(Exit::Limit)
        }
        Err(e) => Err(train_error(&e).into()),
    }
}

fn fmt_loss(l: Option<f64>) -> String {
    l.map_or_else(|| "-".into(), |v| format!("{v:.4}"))
}

/// Seconds as people read them: 0.42 s, 12.3 s, 4 min 10 s, 2 h 05 min.
fn secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.2} s")
    } else if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {:02} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{} h {:02} min", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    }
}

fn print_plan(ui: &Ui, p: &Plan, device: &str, precision: Precision) {
    let m = &p.memory;
    ui.stdout_line(&format!(
        "steps          {} ({} per epoch of {} rows, warmup {})\n\
         evaluate/save  every {} / {} steps\n\
         tokens         {} per epoch, {} with loss\n\
         device         {device} in {precision:?}, activation checkpointing {}, adapter products in {}\n\
         memory         about {} (weights {}, adapters+AdamW {}, activations {}, logits {}{})\n\
         compute        {:.3} PFLOP per epoch{}",
        p.total_steps,
        p.steps_per_epoch,
        p.rows,
        p.warmup_steps,
        p.eval_every,
        p.save_every,
        p.tokens_per_epoch,
        p.label_tokens_per_epoch,
        match (p.checkpointing, p.offload_checkpoints) {
            (true, true) => "on (layer inputs in host memory)",
            (true, false) => "on",
            _ => "off",
        },
        if p.autocast { format!("{precision:?} (autocast)") } else { "F32".into() },
        gib(m.total()),
        gib(m.weights),
        gib(m.adapters),
        gib(m.activations),
        gib(m.logits),
        if m.process > 0.0 { format!(", process {}", gib(m.process)) } else { String::new() },
        p.flops_per_epoch / 1e15,
        p.step_time.map_or(String::new(), |t| format!(
            "\ntime           about {} per step, {} for the run (timed: {} for a 1-layer stand-in, {} per layer)",
            secs(t.seconds_per_step),
            secs(t.seconds_per_step * p.total_steps as f64),
            secs(t.one_layer_s),
            secs(t.per_layer_s),
        ))
    ));
}
