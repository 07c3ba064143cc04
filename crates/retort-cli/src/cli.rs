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

    /// Run every stage in order (distill, train, eval, export), skipping what is up to date.
    ///
    /// Stops at the first stage that does not succeed and exits with its code (4: stopped or over
    /// budget, resumable by running the same command; 3: the quality gate failed, nothing exported).
    /// What ran is recorded in `<output_dir>/run.json`.
    Run {
        /// The recipe file.
        #[arg(value_name = "RECIPE")]
        recipe: PathBuf,

        /// Start at this stage (earlier ones are assumed done).
        #[arg(long, value_enum, conflicts_with = "only")]
        from: Option<crate::cmd::run::Stage>,

        /// Run only this stage.
        #[arg(long, value_enum)]
        only: Option<crate::cmd::run::Stage>,

        /// Redo train (from scratch), eval and export even when up to date.
        #[arg(long)]
        force: bool,

        /// Stop after this long (e.g. `3h30m`): a stage that would start later is not started, training
        /// checkpoints in time (its `max_time` is capped by what is left), and the run exits 4; the
        /// next run resumes.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        max_time: Option<std::time::Duration>,
    },

    /// Have the teacher write and grade the dataset: `train/val/test.jsonl` in `project.data_dir`.
    ///
    /// Answered requests are journaled, so a rerun after a crash, a budget stop (exit 4) or an
    /// edited template only pays for what is new.
    Distill {
        /// The recipe file.
        #[arg(value_name = "RECIPE")]
        recipe: PathBuf,

        /// Print how many requests would be sent and what they may cost, and send nothing.
        #[arg(long)]
        dry_run: bool,
    },

    /// Train LoRA adapters on the base model from `train.jsonl` (and `val.jsonl`) in `project.data_dir`.
    ///
    /// Checkpoints go to `<output_dir>/train`, the final PEFT adapter to `<output_dir>/adapter`. Ctrl-C
    /// or SIGTERM stops cleanly with a checkpoint (exit 4); running the same command again resumes
    /// from it, ending exactly where an uninterrupted run would.
    Train {
        /// The recipe file.
        #[arg(value_name = "RECIPE")]
        recipe: PathBuf,

        /// Discard the checkpoints and the adapter of earlier runs and start over.
        #[arg(long)]
        fresh: bool,

        /// Read and pack the data, print the plan (steps, tokens, memory, compute) and train nothing.
        #[arg(long)]
        plan: bool,
    },

    /// Compare the base, tuned and teacher models on the test split, and check the quality gate.
    ///
    /// Writes `<output_dir>/eval/report.json` and `report.md`; exits 3 when `[eval.gate]` fails.
    Eval {
        /// The recipe file.
        #[arg(value_name = "RECIPE")]
        recipe: PathBuf,

        /// Evaluate again even when the test split, adapter and recipe are unchanged.
        #[arg(long)]
        force: bool,
    },

    /// Generate text with a model: one prompt, or a chat read from standard input (`--chat`).
    Generate(GenerateArgs),

    /// Write a model's logits for given tokens to a `.npy` file, to compare with transformers or llama.cpp.
    Logits(LogitsArgs),

    /// Write the model for serving: merged safetensors, GGUF, adapters, Ollama Modelfile.
    Export(crate::cmd::export::ExportArgs),

    /// Look inside models and model files: what a model needs to train, what a GGUF file holds.
    #[command(subcommand)]
    Inspect(InspectCommand),
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

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// bf16 on GPUs (f16 where bf16 is missing), f32 on the CPU.
    Auto,
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// 16-bit float.
    F16,
}

/// Where and how to load a model.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// The model: a Hugging Face directory (config.json, *.safetensors, tokenizer.json) or a hub id
    /// (`org/name`, downloaded into the Hugging Face cache; `HF_TOKEN` for gated models,
    /// `HF_HUB_OFFLINE=1` to use the cache only).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    pub model: PathBuf,

    /// Hub revision (branch, tag or commit) for a hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,

    /// Where to run: auto, cpu, cuda:N or wgpu:N.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: String,

    /// Precision of weights and activations.
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
}

/// `retort generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// The prompt. With a chat template (instruct models) it is sent as one user message; see `--raw`.
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    pub prompt: Option<String>,

    /// Chat: read user messages from standard input, one per line, and answer each in turn.
    #[arg(long)]
    pub chat: bool,

    /// A system message for the chat template.
    #[arg(long)]
    pub system: Option<String>,

    /// Continue the prompt as plain text, without the chat template.
    #[arg(long, conflicts_with = "chat")]
    pub raw: bool,

    /// Most new tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,

    /// Sample from the k most likely tokens only.
    #[arg(long)]
    pub top_k: Option<usize>,

    /// Sample from the smallest set of tokens with this much probability.
    #[arg(long)]
    pub top_p: Option<f32>,

    /// Penalise repeated tokens (1.0 is none).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,

    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `retort logits`.
#[derive(Debug, clap::Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with = "text", required_unless_present = "text")]
    pub ids: Vec<u32>,

    /// Text, tokenized with the model's tokenizer (special tokens such as BOS added as the tokenizer
    /// does).
    #[arg(long)]
    pub text: Option<String>,

    /// The `.npy` file to write: float32, shape [tokens, vocab].
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `retort inspect ...`.
#[derive(Debug, Subcommand)]
pub enum InspectCommand {
    /// Architecture, parameter count, dtype, and estimated training memory of a model directory.
    Model {
        /// The model directory.
        #[arg(value_name = "DIR")]
        model: PathBuf,

        /// Sequence length for the memory estimate.
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,

        /// Micro-batch size for the memory estimate.
        #[arg(long, default_value_t = 4)]
        batch: usize,

        /// LoRA rank for the memory estimate (all linear layers).
        #[arg(long, default_value_t = 16)]
        rank: usize,
    },

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

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<retort_recipe::types::Duration>()
        .map(|d| d.0)
        .map_err(|_| format!("`{s}` is not a duration; write e.g. `90m`, `3h30m` or `45s`"))
}
