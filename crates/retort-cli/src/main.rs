//! `retort`: distill a frontier LLM into a small, private model for one task.
//!
//! This binary parses arguments, sets up output and logging, runs a command and maps the outcome to
//! an exit code. The work itself lives in the library crates.

mod cli;
mod cmd;
mod exit;
mod progress;
mod ui;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::exit::{CliError, Exit};
use crate::ui::Ui;

fn init_logging(ui: &Ui) {
    let default = match ui.verbosity {
        i8::MIN..=-1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RETORT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if ui.json {
        builder.json().flatten_event(true).with_current_span(false).try_init()
    } else {
        builder.without_time().with_target(false).with_ansi(ui.color).try_init()
    };
    let _ = result;
}

fn run(cli: Cli, ui: &Ui) -> anyhow::Result<Exit> {
    match cli.command {
        Command::Recipe(cmd) => cmd::recipe::run(ui, cmd),
        Command::Run { recipe, from, only, force, max_time } => {
            cmd::run::run(ui, &recipe, cmd::run::Options { from, only, force, max_time })
        }
        Command::Distill { recipe, dry_run } => cmd::distill::run(ui, &recipe, dry_run),
        Command::Train { recipe, fresh, plan } => {
            ALLOC.set_caching(true);
            cmd::train::run(ui, &recipe, fresh, plan, None)
        }
        Command::Eval { recipe, force } => {
            ALLOC.set_caching(true);
            cmd::eval::run(ui, &recipe, force)
        }
        Command::Generate(args) => {
            ALLOC.set_caching(true);
            cmd::model::generate(ui, args)
        }
        Command::Logits(args) => cmd::model::logits(ui, args),
        Command::Export(args) => cmd::export::run(ui, args),
        Command::Inspect(cmd) => cmd::inspect::run(ui, cmd),
    }
}

/// Reuses freed attention-score and logit buffers instead of having the kernel map and zero them anew,
/// while a command runs a model step after step (train, eval, generate; `run` during those stages).
#[global_allocator]
pub(crate) static ALLOC: retort_model::alloc::TensorAlloc =
    retort_model::alloc::TensorAlloc::new(retort_model::alloc::DEFAULT_BUDGET);

fn main() -> ExitCode {
    retort_model::alloc::tune_for_tensors();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with exit 0; usage errors are bad input (1), not clap's 2,
            // which retort reserves for internal errors.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { Exit::BadInput.code() } else { Exit::Ok.code() });
        }
    };
    let verbosity = if cli.quiet > 0 { -(cli.quiet.min(2) as i8) } else { cli.verbose.min(3) as i8 };
    let ui = Ui::new(cli.log_format, verbosity);
    init_logging(&ui);

    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli, &ui)));
    let exit = match outcome {
        Ok(Ok(exit)) => exit,
        Ok(Err(err)) => match err.downcast_ref::<CliError>() {
            Some(e) => {
                ui.error(&e.message, e.hint.as_deref());
                e.exit
            }
            None => {
                ui.error(&format!("{err:#}"), Some("this looks like a bug in retort; please report it"));
                Exit::Internal
            }
        },
        Err(_) => {
            ui.error(
                "internal error: retort panicked (this is a bug)",
                Some("please report it with the message above"),
            );
            Exit::Internal
        }
    };
    ExitCode::from(exit.code())
}
