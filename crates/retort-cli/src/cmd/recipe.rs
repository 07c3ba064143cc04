//! `retort recipe check | show | new | docs | schema`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use retort_recipe::{LoadError, ReadError, RenderStyle, Report, starter};

use crate::cli::{RecipeCommand, ShowFormat};
use crate::exit::{CliError, Exit};
use crate::ui::Ui;
use retort_io::write_atomic;

pub fn run(ui: &Ui, cmd: RecipeCommand) -> anyhow::Result<Exit> {
    match cmd {
        RecipeCommand::Check { files, deny_warnings } => check(ui, &files, deny_warnings),
        RecipeCommand::Show { file, format } => show(ui, &file, format),
        RecipeCommand::New { name, task, force } => new(ui, &name, task.into(), force),
        RecipeCommand::Docs => {
            ui.stdout_line(retort_recipe::docs::render_reference().trim_end());
            Ok(Exit::Ok)
        }
        RecipeCommand::Schema => {
            let schema = retort_recipe::docs::json_schema();
            ui.stdout_line(&serde_json::to_string_pretty(&schema)?);
            Ok(Exit::Ok)
        }
    }
}

pub(crate) fn print_report(ui: &Ui, report: &Report) {
    if report.diagnostics.is_empty() {
        return;
    }
    let text = if ui.json {
        report.render_json()
    } else if ui.color {
        report.render(RenderStyle::Color)
    } else {
        report.render(RenderStyle::Plain)
    };
    ui.stderr(&text);
}

pub(crate) fn print_read_error(ui: &Ui, e: &ReadError) {
    ui.error(&e.to_string(), e.hint().as_deref());
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") }
}

fn check(ui: &Ui, files: &[PathBuf], deny_warnings: bool) -> anyhow::Result<Exit> {
    let mut failed = 0usize;
    for file in files {
        let started = std::time::Instant::now();
        let (errors, warnings) = match retort_recipe::load(file) {
            Ok(loaded) => {
                print_report(ui, &loaded.report);
                (0, loaded.report.warning_count())
            }
            Err(LoadError::Invalid(report)) => {
                print_report(ui, &report);
                (report.error_count(), report.warning_count())
            }
            Err(LoadError::Read(e)) => {
                print_read_error(ui, &e);
                (1, 0)
            }
        };
        tracing::debug!(file = %file.display(), ms = started.elapsed().as_millis() as u64, "checked recipe");
        let bad = errors > 0 || (deny_warnings && warnings > 0);
        if bad {
            failed += 1;
        }
        let detail = match (errors, warnings) {
            (0, 0) => format!("{}: ok", file.display()),
            (0, w) if deny_warnings => {
                format!("{}: {} (denied by --deny-warnings)", file.display(), plural(w, "warning"))
            }
            (0, w) => format!("{}: ok with {}", file.display(), plural(w, "warning")),
            (e, 0) => format!("{}: {}", file.display(), plural(e, "error")),
            (e, w) => format!("{}: {}, {}", file.display(), plural(e, "error"), plural(w, "warning")),
        };
        ui.status(if bad { "failed" } else { "checked" }, &detail);
    }
    if files.len() > 1 {
        ui.status(
            "summary",
            &format!("{} checked, {} ok, {} failed", files.len(), files.len() - failed, failed),
        );
    }
    Ok(if failed > 0 { Exit::BadInput } else { Exit::Ok })
}

fn show(ui: &Ui, file: &Path, format: ShowFormat) -> anyhow::Result<Exit> {
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
    let text = match format {
        ShowFormat::Toml => loaded.recipe.to_toml().context("serializing the resolved recipe")?,
        ShowFormat::Json => serde_json::to_string_pretty(&loaded.recipe)?,
    };
    ui.stdout_line(text.trim_end());
    Ok(Exit::Ok)
}

fn new(ui: &Ui, name_arg: &str, task: starter::Task, force: bool) -> anyhow::Result<Exit> {
    let arg = Path::new(name_arg);
    let stem = arg.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = if arg.extension().is_some_and(|e| e == "toml") {
        stem
    } else {
        arg.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    };
    if !starter::is_valid_name(&name) {
        let suggestion: String = name
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
            .collect();
        let suggestion = suggestion.trim_matches('-');
        let hint = if starter::is_valid_name(suggestion) {
            format!("names use lowercase letters, digits, `-`, `_` and `.`; try `{suggestion}`")
        } else {
            "names use lowercase letters, digits, `-`, `_` and `.`, starting with a letter or digit"
                .to_string()
        };
        return Err(CliError::input(format!("`{name}` is not a valid project name")).hint(hint).into());
    }
    let path = arg.with_file_name(format!("{name}.toml"));
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return Err(CliError::input(format!("directory `{}` does not exist", parent.display()))
            .hint("create it first, or give a name without a directory")
            .into());
    }
    let text = starter::render(&name, task);
    match write_atomic(&path, text.as_bytes(), force) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(CliError::input(format!("`{}` already exists", path.display()))
                .hint("pass `--force` to overwrite it, or choose another name")
                .into());
        }
        Err(e) => {
            return Err(CliError::input(format!("cannot write `{}`: {e}", path.display()))
                .hint("check that the directory is writable")
                .into());
        }
    }
    ui.status("created", &format!("{} ({} starter)", path.display(), task));
    if ui.verbosity >= 0 && !ui.json {
        ui.stderr(&format!(
            "\nNext: edit it (every key is explained by `retort recipe docs`), then run\n  retort recipe check {}\n",
            path.display()
        ));
    }
    Ok(Exit::Ok)
}
