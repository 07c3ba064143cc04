//! The command line, declared with clap; help text comes from these doc comments.

use std::path::PathBuf;

use clap::{ArgAction, Parser, Subcommand, ValueEnum};

use crate::exit::EXIT_CODES_HELP;
use crate::ui::LogFormat;

/// Distill a frontier LLM into a small, cheap, private model for one task.
///
/// One TOML recipe describes the task, the teacher, the base model, training, evaluation and export.
/// Start with `retort recipe new my-task`, then `retort recipe check my-task.toml`.
#[derive(Debug, Parser)]
#[command(name = "retort", version, after_help = EXIT_CODES_HELP, propagate_version = true)]
pub struct Cli {
    /// More output: -v debug, -vv trace.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Less output: -q hides status lines.
    #[arg(short, long, action = ArgAction::Count, global = true, conflicts_with = "verbose")]
    pub quiet: u8,

    /// Output style. `auto` is human text on a terminal and JSON lines otherwise (job logs, pipes).
    /// `NO_COLOR` turns colour off.
    #[arg(long, value_enum, default_value_t = LogFormat::Auto, global = true, env = "RETORT_LOG_FORMAT")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, check, show and document recipes.
    #[command(subcommand)]
    Recipe(RecipeCommand),

    /// Write the model for serving: merged safetensors, GGUF, adapters, Ollama Modelfile.
    Export(crate::cmd::export::ExportArgs),

    /// Look inside model files.
    #[command(subcommand)]
    Inspect(crate::cmd::inspect::InspectCommand),
}

/// `retort recipe ...`.
#[derive(Debug, Subcommand)]
pub enum RecipeCommand {
    /// Validate recipes, reporting every problem at once with its position and a hint.
    ///
    /// Exits 0 when every recipe is valid (warnings allowed unless --deny-warnings), 1 otherwise.
    Check {
        /// Recipe files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,

        /// Treat warnings as errors.
        #[arg(long)]
        deny_warnings: bool,
    },

    /// Print a recipe with every default filled in and every path resolved.
    Show {
        /// The recipe file.
        #[arg(value_name = "FILE")]
        file: PathBuf,

        /// Output format.
        #[arg(long, value_enum, default_value_t = ShowFormat::Toml)]
        format: ShowFormat,
    },

    /// Write a commented starter recipe that passes `retort recipe check`.
    New {
        /// Project name (lowercase letters, digits, `-`, `_`, `.`), or a path ending in it; the file is
        /// NAME.toml.
        #[arg(value_name = "NAME")]
        name: String,

        /// The kind of task to start from.
        #[arg(long, value_enum, default_value_t = TaskArg::Classify)]
        task: TaskArg,

        /// Overwrite the file if it exists.
        #[arg(long)]
        force: bool,
    },

    /// Print every recipe key with its meaning, type and default, as an annotated TOML file.
    Docs,

    /// Print the recipe's JSON Schema, for editor completion (e.g. Taplo's `#:schema` comment).
    Schema,
}

/// `recipe show --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShowFormat {
    /// TOML, loadable as a recipe.
    Toml,
    /// JSON.
    Json,
}

/// `recipe new --task`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskArg {
    /// One label per input (routing, classification).
    Classify,
    /// JSON matching a schema (structured extraction).
    Extract,
    /// Free-text answers (a narrow assistant).
    Chat,
}

impl From<TaskArg> for retort_recipe::starter::Task {
    fn from(t: TaskArg) -> Self {
        match t {
            TaskArg::Classify => retort_recipe::starter::Task::Classify,
            TaskArg::Extract => retort_recipe::starter::Task::Extract,
            TaskArg::Chat => retort_recipe::starter::Task::Chat,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
