//! `retort eval RECIPE [--force]`: base vs tuned vs teacher on the test split, with the quality gate
//! (exit 3 when it fails).

use std::path::Path;

use retort_eval::{EvalError, Report, Setup};

use crate::cmd::base::{device, load_recipe, resolve};
use crate::exit::{CliError, Exit};
use crate::progress::CliProgress;
use crate::ui::Ui;

fn eval_error(e: &EvalError) -> CliError {
    let c = CliError::input(e.to_string()).hint(e.hint());
    if e.is_input() { c } else { CliError { exit: Exit::Internal, ..c } }
}

pub fn run(ui: &Ui, file: &Path, force: bool) -> anyhow::Result<Exit> {
    let Some(recipe) = load_recipe(ui, file) else { return Ok(Exit::BadInput) };
    let base = resolve(ui, &recipe)?;
    let (dev, precision) = device(&recipe)?;
    let setup = Setup {
        base_dir: base.dir,
        base_name: base.name,
        device: dev.device,
        precision,
        device_name: dev.name.clone(),
    };
    let dir = retort_eval::eval_dir(&recipe);
    let fp = retort_eval::fingerprint(&recipe, &setup).map_err(|e| eval_error(&e))?;
    let report = match (force, retort_eval::up_to_date(&recipe, &fp)) {
        (false, Some(r)) => {
            ui.up_to_date(&format!("{} matches the test split, adapter and recipe", dir.display()));
            r
        }
        _ => {
            let _lock = retort_io::RunLock::acquire(&dir, &format!("retort eval {}", file.display()))
                .map_err(|e| CliError::input(e.to_string()).hint("wait for the other run to finish"))?;
            ui.status("evaluating", &format!("{} on {} in {precision:?}", file.display(), dev.name));
            let progress = CliProgress::new(ui);
            // The judge's key (for `judge_win_rate`) comes from the variable the recipe names, and goes
            // nowhere but the client.
            let judge_key = recipe
                .teacher
                .as_ref()
                .and_then(|t| t.api_key_env.as_ref())
                .and_then(|env| std::env::var(env).ok());
            retort_eval::run(&recipe, &setup, &progress, judge_key).map_err(|e| eval_error(&e))?
        }
    };
    print(ui, &report);
    ui.status("report", &format!("{} (and report.md, report.html)", dir.join("report.json").display()));
    match &report.gate {
        Some(g) if !g.passed => {
            let failed: Vec<&str> =
                g.checks.iter().filter(|c| !c.passed).map(|c| c.message.as_str()).collect();
            ui.error(
                &format!("the quality gate failed: {}", failed.join("; ")),
                Some(
                    "the model is not good enough to ship: more or better data, more steps, or a larger base",
                ),
            );
            Ok(Exit::GateFailed)
        }
        _ => Ok(Exit::Ok),
    }
}

fn print(ui: &Ui, r: &Report) {
    if ui.json {
        let models: Vec<serde_json::Value> = r
            .models
            .iter()
            .map(
                |m| serde_json::json!({"model": m.model, "scores": m.scores, "tokens_per_s": m.tokens_per_s}),
            )
            .collect();
        ui.stdout_line(
            &serde_json::json!({"examples": r.examples.len(), "primary": r.primary, "models": models, "gate": r.gate})
                .to_string(),
        );
        return;
    }
    ui.stdout_line(&format!("{} test examples; references are the teacher's answers", r.examples.len()));
    let mut header = format!("{:<8}", "model");
    for m in &r.metrics {
        header.push_str(&format!("  {m:<26}"));
    }
    ui.stdout_line(header.trim_end());
    for m in &r.models {
        let mut line = format!("{:<8}", m.model);
        for k in &r.metrics {
            let cell = m
                .scores
                .get(k)
                .map_or_else(|| "-".into(), |s| format!("{:.3} [{:.3}, {:.3}]", s.value, s.low, s.high));
            line.push_str(&format!("  {cell:<26}"));
        }
        ui.stdout_line(line.trim_end());
    }
    if let Some(g) = &r.gate {
        for c in &g.checks {
            ui.stdout_line(&format!("gate {}: {}", if c.passed { "ok" } else { "FAILED" }, c.message));
        }
    }
}
