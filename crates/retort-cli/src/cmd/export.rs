//! `retort export`: the trained model in the formats people serve with (merged safetensors, GGUF for
//! llama.cpp and Ollama, PEFT and GGUF LoRA adapters, an Ollama Modelfile), from a recipe's run
//! directory or from any base plus adapter.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use retort_export::job::{Format, Job};
use retort_export::output::Disk;
use retort_export::{ExportError, OutDtype};
use retort_io::{Progress, Task};
use retort_recipe::schema::export::ExportDtype;
use retort_recipe::{LoadError, RenderStyle};

use crate::exit::{CliError, Exit};
use crate::ui::Ui;

/// `retort export`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  retort export recipes/support.toml
      the recipe's [export] formats, from its run directory: base from `base.model`, adapter from
      <output_dir>/adapter/ (where `retort train` writes it), outputs in <output_dir>/export/
  retort export --base ./Qwen2.5-0.5B-Instruct --adapter ./adapter --format gguf:q4_k_m --format ollama --out ./export
  retort export --base ./Llama-3.2-1B-Instruct --format gguf:q8_0 --out ./gguf      (a plain HF -> GGUF converter)

Formats: merged, adapter, gguf:TYPE, gguf-adapter, ollama
GGUF types: f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_1, q5_0, q4_k_m, q4_1, q4_0")]
pub struct ExportArgs {
    /// A recipe: its `[export]` section says what to write, its run directory where.
    #[arg(value_name = "RECIPE")]
    pub recipe: Option<PathBuf>,

    /// The base model: a Hugging Face directory (config.json, *.safetensors, tokenizer files).
    #[arg(long, value_name = "DIR")]
    pub base: Option<PathBuf>,

    /// A PEFT adapter directory (adapter_config.json, adapter_model.safetensors). Without it the base
    /// alone is converted.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    /// What to write (repeatable): merged, adapter, gguf:TYPE, gguf-adapter, ollama.
    #[arg(long = "format", value_name = "F")]
    pub formats: Vec<String>,

    /// Precision of the merged model (default: the base's).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,

    /// Output directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// File name stem and model name (default: the recipe's, or the base directory's name).
    #[arg(long)]
    pub name: Option<String>,
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// 16-bit float.
    F16,
}

impl From<DtypeArg> for OutDtype {
    fn from(d: DtypeArg) -> OutDtype {
        match d {
            DtypeArg::F32 => OutDtype::F32,
            DtypeArg::Bf16 => OutDtype::BF16,
            DtypeArg::F16 => OutDtype::F16,
        }
    }
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// Progress as one status line when each output starts (a long GGUF can take minutes).
struct StartLines(Ui);

struct Quiet;

impl Task for Quiet {
    fn inc(&self, _n: u64) {}
    fn set_message(&self, _msg: &str) {}
    fn finish(&self) {}
}

impl Progress for StartLines {
    fn task(&self, name: &str, total: u64) -> Box<dyn Task> {
        self.0.status("writing", &format!("{name} ({total} tensors)"));
        Box::new(Quiet)
    }
}

fn export_error(e: ExportError) -> anyhow::Error {
    let exit = if e.is_bad_input() { Exit::BadInput } else { Exit::Internal };
    CliError { exit, message: e.to_string(), hint: e.hint() }.into()
}

fn parse_formats(list: &[String]) -> anyhow::Result<Vec<Format>> {
    let mut out = Vec::new();
    for f in list {
        let parsed = Format::parse(f).map_err(export_error)?;
        if !out.contains(&parsed) {
            out.push(parsed);
        }
    }
    Ok(out)
}

/// Runs `retort export`.
pub fn run(ui: &Ui, args: ExportArgs) -> anyhow::Result<Exit> {
    let job = match &args.recipe {
        Some(recipe) => match from_recipe(ui, recipe, &args)? {
            Some(job) => job,
            None => return Ok(Exit::BadInput),
        },
        None => from_flags(&args)?,
    };
    let adapter_note =
        job.adapter.as_ref().map_or_else(String::new, |a| format!(" with adapter `{}`", a.display()));
    ui.status(
        "exporting",
        &format!("base `{}`{adapter_note} into `{}`", job.base.display(), job.out.display()),
    );
    let mut wrote = |w: &retort_export::Written| {
        ui.status(
            "wrote",
            &format!("{} ({}, {}, read back and checked)", w.path.display(), w.format, size(w.bytes)),
        );
        ui.stdout_line(&w.path.display().to_string());
    };
    let report = retort_export::run_with(&job, &Disk, &StartLines(*ui), &mut wrote).map_err(export_error)?;
    for n in &report.notes {
        ui.status("note", n);
    }
    if let Some(cmd) = &report.ollama_command {
        ui.status("next", &format!("create the Ollama model: {cmd}"));
    }
    Ok(Exit::Ok)
}

fn from_flags(args: &ExportArgs) -> anyhow::Result<Job> {
    let Some(base) = args.base.clone() else {
        return Err(CliError::input("nothing to export: give a RECIPE or `--base DIR`")
            .hint("e.g. `retort export --base ./model --format gguf:q4_k_m --out ./export`")
            .into());
    };
    if args.formats.is_empty() {
        return Err(CliError::input("no `--format` given")
            .hint("formats: merged, adapter, gguf:TYPE, gguf-adapter, ollama (e.g. `--format gguf:q4_k_m`)")
            .into());
    }
    let Some(out) = args.out.clone() else {
        return Err(CliError::input("no `--out DIR` given")
            .hint("say where the outputs go, e.g. `--out ./export`")
            .into());
    };
    let name = args.name.clone().unwrap_or_else(|| {
        retort_export::job::file_stem(
            &std::fs::canonicalize(&base)
                .unwrap_or(base.clone())
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        )
    });
    Ok(Job {
        base,
        adapter: args.adapter.clone(),
        formats: parse_formats(&args.formats)?,
        dtype: args.dtype.map(Into::into),
        out,
        name: retort_export::job::file_stem(&name),
        shard_size: 5_000_000_000,
        chat_template: None,
        system: None,
    })
}

fn from_recipe(ui: &Ui, path: &Path, args: &ExportArgs) -> anyhow::Result<Option<Job>> {
    let loaded = match retort_recipe::load(path) {
        Ok(l) => l,
        Err(LoadError::Invalid(report)) => {
            let style = if ui.color { RenderStyle::Color } else { RenderStyle::Plain };
            ui.stderr(&if ui.json { report.render_json() } else { report.render(style) });
            return Ok(None);
        }
        Err(LoadError::Read(e)) => {
            return Err(CliError { exit: Exit::BadInput, message: e.to_string(), hint: e.hint() }.into());
        }
    };
    let r = loaded.recipe;
    let base = match &args.base {
        Some(b) => b.clone(),
        None => crate::cmd::base::resolve(ui, &r)?.dir,
    };
    let adapter = args.adapter.clone().unwrap_or_else(|| r.project.output_dir.join("adapter"));
    if !adapter.join("adapter_config.json").is_file() {
        return Err(CliError::input(format!("no trained adapter at `{}`", adapter.display()))
            .hint(
                "`retort train` writes the adapter there; or pass `--adapter DIR` for one trained elsewhere",
            )
            .into());
    }
    let formats = if args.formats.is_empty() {
        r.export.formats.iter().map(ToString::to_string).collect()
    } else {
        args.formats.clone()
    };
    let chat_template = match &r.base.chat_template {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| {
            CliError::input(format!("cannot read `base.chat_template` file `{}`: {e}", p.display()))
        })?),
        None => None,
    };
    let dtype = args.dtype.map(Into::into).or(match r.export.dtype {
        ExportDtype::Auto => None,
        ExportDtype::F32 => Some(OutDtype::F32),
        ExportDtype::F16 => Some(OutDtype::F16),
        ExportDtype::Bf16 => Some(OutDtype::BF16),
    });
    Ok(Some(Job {
        base,
        adapter: Some(adapter),
        formats: parse_formats(&formats)?,
        dtype,
        out: args.out.clone().unwrap_or_else(|| r.project.output_dir.join("export")),
        name: retort_export::job::file_stem(
            args.name.as_deref().or(r.export.name.as_deref()).unwrap_or(&r.project.name),
        ),
        shard_size: r.export.shard_size.0,
        chat_template,
        system: r
            .export
            .ollama
            .system
            .clone()
            .or_else(|| r.distill.as_ref().map(|d| d.system_prompt.clone()).filter(|s| !s.is_empty())),
    }))
}
