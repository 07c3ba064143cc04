//! `retort distill RECIPE [--dry-run]`.

use std::path::Path;

use retort_distill::{DistillError, Estimate, Options};
use retort_recipe::LoadError;
use retort_recipe::schema::teacher::Provider;

use crate::cmd::recipe::{print_read_error, print_report};
use crate::exit::{CliError, Exit};
use crate::progress::CliProgress;
use crate::ui::Ui;

pub fn run(ui: &Ui, file: &Path, dry_run: bool) -> anyhow::Result<Exit> {
    let loaded = match retort_recipe::load(file) {
        Ok(l) => l,
        Err(LoadError::Invalid(report)) => {
            print_report(ui, &report);
            return Ok(Exit::BadInput);
        }
        Err(LoadError::Read(e)) => {
            print_read_error(ui, &e);
            return Ok(Exit::BadInput);
        }
    };
    print_report(ui, &loaded.report);
    let recipe = loaded.recipe;
    let Some(teacher) = &recipe.teacher else {
        return Err(CliError::input(format!("`{}` has no `[teacher]` section", file.display()))
            .hint("add `[teacher]` with `provider` and `model` (see `retort recipe docs`)")
            .into());
    };
    if recipe.distill.is_none() {
        return Err(CliError::input(format!("`{}` has no `[distill]` section", file.display()))
            .hint("add `[distill]` (see `retort recipe docs`), or bring your own train.jsonl")
            .into());
    }
    // The key is read from the variable the recipe names, and goes nowhere but the client.
    let api_key = match (&teacher.api_key_env, teacher.provider) {
        (_, Provider::Replay) | (None, _) => None,
        (Some(env), _) => std::env::var(env).ok(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;

    if dry_run {
        let est = retort_distill::estimate(&recipe, api_key).map_err(|e| distill_error(&e))?;
        print_estimate(ui, &est, teacher.provider, &teacher.model);
        return Ok(Exit::Ok);
    }

    let data_dir = &recipe.project.data_dir;
    let _lock = retort_io::RunLock::acquire(data_dir, &format!("retort distill {}", file.display()))
        .map_err(|e| {
            CliError::input(e.to_string()).hint(
                "wait for the other run to finish; a lock left by a killed run is taken over automatically",
            )
        })?;
    ui.status(
        "distilling",
        &format!("{} with {}:{}", file.display(), teacher.provider.as_str(), teacher.model),
    );
    let progress = CliProgress::new(ui);
    let outcome = runtime.block_on(retort_distill::run(&recipe, api_key, &progress, &Options::default()));
    match outcome {
        Ok(o) => {
            let r = &o.report;
            let [train, val, test] = o.counts;
            ui.status(
                "wrote",
                &format!(
                    "{} examples to {} (train {train}, val {val}, test {test})",
                    train + val + test,
                    data_dir.display()
                ),
            );
            ui.status(
                "rejected",
                &format!(
                    "{} {}, each with its reason in {}",
                    o.rejected,
                    if o.rejected == 1 { "row" } else { "rows" },
                    data_dir.join("rejected.jsonl").display()
                ),
            );
            ui.status(
                "teacher",
                &format!(
                    "{} requests sent, {} from the cache, ${:.4} this run (${:.4} in total)",
                    r["requests"]["sent"],
                    r["requests"]["cache_hits"],
                    r["cost_usd"]["this_run"].as_f64().unwrap_or(0.0),
                    r["cost_usd"]["total"].as_f64().unwrap_or(0.0)
                ),
            );
            if r["status"] == "inputs_exhausted" {
                ui.status(
                    "warning",
                    &format!(
                        "the inputs ran out before `distill.target_examples` were kept; the report is in {}",
                        data_dir.join("distill.json").display()
                    ),
                );
            }
            Ok(Exit::Ok)
        }
        Err(e) if e.is_resumable() => {
            ui.error(&format!("{e}; stopped cleanly, every answer so far is saved"), e.hint().as_deref());
            Ok(Exit::Limit)
        }
        Err(DistillError::Write { path, source }) => {
            ui.error(
                &format!("cannot write `{}`: {source}", path.display()),
                Some("check that the data directory is writable and the disk is not full"),
            );
            Ok(Exit::Internal)
        }
        Err(e) => Err(distill_error(&e).into()),
    }
}

fn distill_error(e: &DistillError) -> CliError {
    let mut c = CliError::input(e.to_string());
    if let Some(h) = e.hint() {
        c = c.hint(h);
    }
    c
}

fn print_estimate(ui: &Ui, e: &Estimate, provider: Provider, model: &str) {
    ui.stdout_line(&format!(
        "requests: {} in the first pass ({} cached, {} to send)",
        e.requests,
        e.cached,
        e.requests - e.cached
    ));
    ui.stdout_line(&format!("input tokens: about {} (four bytes a token)", e.input_tokens));
    ui.stdout_line(&format!(
        "output tokens: at most {} (every answer at `teacher.max_tokens`)",
        e.max_output_tokens
    ));
    if provider == Provider::Replay {
        ui.stdout_line("cost: $0 (answers are replayed from the transcript)");
    } else if e.priced {
        ui.stdout_line(&format!(
            "cost: about ${:.4} for input + at most ${:.4} for output = at most ${:.4}",
            e.input_cost_usd,
            e.max_cost_usd - e.input_cost_usd,
            e.max_cost_usd
        ));
    } else {
        ui.stdout_line(&format!("cost: unknown (retort has no price for `{model}`; set `teacher.price`)"));
    }
    if let Some(b) = e.budget_usd {
        ui.stdout_line(&format!("budget: ${b:.2} (${:.4} spent by earlier runs)", e.spent_usd));
    }
    for n in &e.notes {
        ui.stdout_line(&format!("note: {n}"));
    }
}
