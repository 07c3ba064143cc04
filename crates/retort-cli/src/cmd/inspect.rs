//! `retort inspect`: look inside model files.

use std::path::PathBuf;

use clap::Subcommand;
use retort_export::gguf::{GgufFile, Value};

use crate::exit::{CliError, Exit};
use crate::ui::Ui;

/// `retort inspect ...`.
#[derive(Debug, Subcommand)]
pub enum InspectCommand {
    /// Print a GGUF file's metadata and tensor table (shapes outermost first, as in PyTorch).
    Gguf {
        /// The GGUF file.
        #[arg(value_name = "FILE")]
        file: PathBuf,

        /// Print whole strings and arrays instead of a short summary (token lists can be long).
        #[arg(long)]
        full: bool,
    },
}

/// Runs `retort inspect`.
pub fn run(ui: &Ui, cmd: InspectCommand) -> anyhow::Result<Exit> {
    match cmd {
        InspectCommand::Gguf { file, full } => gguf(ui, &file, full),
    }
}

fn full_value(v: &Value) -> String {
    match v {
        Value::Array(_, items) => {
            format!("[{}]", items.iter().map(full_value).collect::<Vec<_>>().join(", "))
        }
        Value::String(b) => format!("{:?}", String::from_utf8_lossy(b)),
        other => other.summary(usize::MAX),
    }
}

fn gguf(ui: &Ui, file: &PathBuf, full: bool) -> anyhow::Result<Exit> {
    let f = GgufFile::open(file).map_err(|e| {
        let hint =
            e.hint().unwrap_or_else(|| "is it a GGUF file? llama.cpp and Ollama models end in .gguf".into());
        CliError::input(e.to_string()).hint(hint)
    })?;
    let bytes = std::fs::metadata(file).map_or(0, |m| m.len());
    let params: usize = f.tensors.iter().map(|t| t.numel()).sum();
    ui.stdout_line(&format!(
        "{}: GGUF v{}, {} bytes, {} metadata keys, {} tensors, {} parameters",
        file.display(),
        f.version,
        bytes,
        f.metadata.len(),
        f.tensors.len(),
        params
    ));
    ui.stdout_line("");
    ui.stdout_line("metadata:");
    let kw = f.metadata.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in &f.metadata {
        let ty = match v {
            Value::Array(t, _) => format!("[{}]", t.name()),
            other => other.value_type().name().to_string(),
        };
        let shown = if full { full_value(v) } else { v.summary(60) };
        ui.stdout_line(&format!("  {k:kw$}  {ty:9}  {shown}"));
    }
    ui.stdout_line("");
    ui.stdout_line("tensors:");
    let nw = f.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
    ui.stdout_line(&format!("  {:nw$}  {:6}  {:>14}  {:>12}", "name", "type", "shape", "bytes"));
    for t in &f.tensors {
        let shape = t.shape.iter().map(ToString::to_string).collect::<Vec<_>>().join(" x ");
        ui.stdout_line(&format!("  {:nw$}  {:6}  {:>14}  {:>12}", t.name, t.ty.name(), shape, t.nbytes));
    }
    Ok(Exit::Ok)
}
