//! One export run: a base, an optional adapter, the formats to write and where. Everything that can be
//! checked is checked before the first byte is written (formats, the adapter against the base, the
//! tokenizer, the output directory); then each output is written, read back ([`crate::lint`]) and
//! reported.

use std::path::{Path, PathBuf};

use retort_hf::ModelConfig;
use retort_io::Progress;
use serde_json::Value as Json;

use crate::adapter::{gguf_lora, peft_out};
use crate::convert;
use crate::error::{ExportError, Result};
use crate::lint;
use crate::merge::{Model, OutDtype};
use crate::ollama::{self, Family};
use crate::output::{Sink, StagedDir, write_file};
use crate::quant::mix::FileType;
use crate::safetensors_out::{Entry, write_checkpoint};
use crate::tokenizer::Tokenizer;

/// An output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The merged model as a Hugging Face directory.
    Merged,
    /// The PEFT adapter, for vLLM and transformers.
    Adapter,
    /// A GGUF model of this file type.
    Gguf(FileType),
    /// A GGUF LoRA adapter.
    GgufAdapter,
    /// An Ollama Modelfile.
    Ollama,
}

/// A model name made usable in file names and by Ollama: lowercase letters, digits, `-`, `_`, `.`.
pub fn file_stem(name: &str) -> String {
    let s: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .collect();
    let s = s.trim_matches(|c| c == '-' || c == '.').to_string();
    if s.is_empty() { "model".into() } else { s }
}

/// The file name of the GGUF model `name` (a [`file_stem`]) of file type `ft`.
pub fn gguf_file_name(name: &str, ft: FileType) -> String {
    format!("{name}-{}.gguf", ft.name())
}

/// The names `Format::parse` accepts, for messages.
pub const FORMAT_NAMES: &str = "merged, adapter, gguf:TYPE, gguf-adapter, ollama";

impl Format {
    /// Parses `merged`, `adapter`, `gguf:q4_k_m`, `gguf-adapter`, `ollama`.
    pub fn parse(s: &str) -> Result<Format> {
        let t = s.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "merged" => Format::Merged,
            "adapter" | "peft" => Format::Adapter,
            "gguf-adapter" => Format::GgufAdapter,
            "ollama" => Format::Ollama,
            _ => match t.strip_prefix("gguf:") {
                Some(ty) => Format::Gguf(FileType::parse(ty)?),
                None => {
                    return Err(ExportError::Unsupported {
                        format: s.to_string(),
                        reason: "it is not an export format".into(),
                        hint: format!(
                            "formats: {FORMAT_NAMES} (TYPE: {})",
                            FileType::ALL.map(|t| t.name().to_ascii_lowercase()).join(", ")
                        ),
                    });
                }
            },
        })
    }

    /// The name as written in recipes.
    pub fn label(self) -> String {
        match self {
            Format::Merged => "merged".into(),
            Format::Adapter => "adapter".into(),
            Format::Gguf(t) => format!("gguf:{}", t.name().to_ascii_lowercase()),
            Format::GgufAdapter => "gguf-adapter".into(),
            Format::Ollama => "ollama".into(),
        }
    }
}

/// What to export.
#[derive(Debug, Clone)]
pub struct Job {
    /// The base model directory.
    pub base: PathBuf,
    /// The PEFT adapter directory, if any.
    pub adapter: Option<PathBuf>,
    /// Outputs, in the order given.
    pub formats: Vec<Format>,
    /// The merged model's dtype (default: the base's).
    pub dtype: Option<OutDtype>,
    /// The output directory (created if missing).
    pub out: PathBuf,
    /// File name stem and model name.
    pub name: String,
    /// Largest safetensors shard of `merged`, in bytes.
    pub shard_size: u64,
    /// A chat template that replaces the model's own.
    pub chat_template: Option<String>,
    /// The Modelfile's SYSTEM prompt.
    pub system: Option<String>,
}

/// One written output.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// The format.
    pub format: String,
    /// The file or directory.
    pub path: PathBuf,
    /// Bytes on disk.
    pub bytes: u64,
}

/// What an export did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Outputs, in order.
    pub written: Vec<Written>,
    /// Things the user should know (baked scales, untied embeddings, missing template, ...).
    pub notes: Vec<String>,
    /// The command that creates the Ollama model, when a Modelfile was written.
    pub ollama_command: Option<String>,
}

fn size_of(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path).map_or(0, |rd| rd.flatten().map(|e| size_of(&e.path())).sum())
    } else {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ExportError::read(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| ExportError::Read {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not valid JSON: {e}")),
    })
}

/// Files of a Hugging Face directory that travel with the merged weights.
const COPIED: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// Runs an export.
pub fn run(job: &Job, sink: &dyn Sink, progress: &dyn Progress) -> Result<Report> {
    run_with(job, sink, progress, &mut |_| {})
}

/// Runs an export, calling `on_written` as soon as each output has been written and checked.
pub fn run_with(
    job: &Job,
    sink: &dyn Sink,
    progress: &dyn Progress,
    on_written: &mut dyn FnMut(&Written),
) -> Result<Report> {
    let needs_adapter = job.formats.iter().any(|f| matches!(f, Format::Adapter | Format::GgufAdapter));
    if needs_adapter && job.adapter.is_none() {
        return Err(ExportError::Unsupported {
            format: job
                .formats
                .iter()
                .find(|f| matches!(f, Format::Adapter | Format::GgufAdapter))
                .map(|f| f.label())
                .unwrap_or_default(),
            reason: "there is no adapter to export".into(),
            hint: "pass `--adapter DIR`, or drop `adapter`/`gguf-adapter` from the formats".into(),
        });
    }
    let ggufs: Vec<FileType> =
        job.formats.iter().filter_map(|f| if let Format::Gguf(t) = f { Some(*t) } else { None }).collect();
    if job.formats.contains(&Format::Ollama) && ggufs.is_empty() {
        return Err(ExportError::Unsupported {
            format: "ollama".into(),
            reason: "a Modelfile needs a GGUF model to point at".into(),
            hint: "add a GGUF format, e.g. `gguf:q4_k_m`".into(),
        });
    }
    let model = Model::open(&job.base, job.adapter.as_deref(), job.dtype)?;
    let raw_config = read_json(&job.base.join("config.json"))?.unwrap_or(Json::Null);
    let generation = read_json(&job.base.join("generation_config.json"))?;
    let tokenizer = if ggufs.is_empty() {
        None
    } else {
        Some(Tokenizer::load(&job.base, &model.cfg, job.chat_template.clone())?)
    };
    let mut report = Report::default();
    if model.untied {
        report.notes.push(
            "the adapter changes lm_head of a model with tied embeddings; the outputs untie them (own lm_head, tie_word_embeddings = false) so the input embeddings stay as trained".into(),
        );
    }
    if !model.extra.is_empty() {
        report.notes.push(format!(
            "base tensors outside the model's table are copied to `merged` only: {}",
            model.extra.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    std::fs::create_dir_all(&job.out).map_err(|e| ExportError::write(&job.out, e))?;
    probe_writable(&job.out)?;

    let mut done = |report: &mut Report, w: Written| {
        on_written(&w);
        report.written.push(w);
    };
    for format in &job.formats {
        match format {
            Format::Merged => {
                let path = job.out.join("merged");
                write_merged(job, &model, &path, sink, progress)?;
                done(
                    &mut report,
                    Written { format: format.label(), path: path.clone(), bytes: size_of(&path) },
                );
            }
            Format::Gguf(ft) => {
                let Some(tok) = &tokenizer else { continue };
                let path = job.out.join(gguf_file_name(&job.name, *ft));
                let plan = convert::plan(&model, tok, *ft, &job.name, &raw_config, generation.as_ref())?;
                let header = plan.header.clone();
                let task = progress.task(&format.label(), plan.sources.len() as u64);
                convert::write(&model, plan, &path, sink, &mut |_| task.inc(1))?;
                task.finish();
                let want_template = tok.chat_template.is_some();
                if !want_template {
                    report.notes.push(format!(
                        "{}: the model has no chat template; chat front-ends will need one",
                        path.display()
                    ));
                }
                lint::gguf_model(&path, &header, want_template)?;
                done(
                    &mut report,
                    Written { format: format.label(), path: path.clone(), bytes: size_of(&path) },
                );
            }
            Format::Adapter => {
                let Some(adapter) = &model.adapter else { continue };
                let path = job.out.join("adapter");
                let staged = StagedDir::new(&path).map_err(|e| ExportError::write(&path, e))?;
                let notes = peft_out::write(adapter, staged.path(), sink)?;
                lint::peft_dir(staged.path(), &ModelConfig::load(&job.base)?, &model.base)?;
                staged.commit().map_err(|e| ExportError::write(&path, e))?;
                report.notes.extend(notes);
                done(
                    &mut report,
                    Written { format: format.label(), path: path.clone(), bytes: size_of(&path) },
                );
            }
            Format::GgufAdapter => {
                let Some(adapter) = &model.adapter else { continue };
                let path = job.out.join(format!("{}-lora-F32.gguf", job.name));
                let base_cfg = ModelConfig::load(&job.base)?;
                gguf_lora::write(adapter, &base_cfg, &job.name, &path, sink)?;
                lint::gguf_lora(&path, base_cfg.arch.gguf_arch())?;
                done(
                    &mut report,
                    Written { format: format.label(), path: path.clone(), bytes: size_of(&path) },
                );
            }
            Format::Ollama => {
                let (Some(tok), Some(ft)) = (&tokenizer, ggufs.first()) else { continue };
                let path = job.out.join("Modelfile");
                let family =
                    tok.chat_template.as_ref().and_then(|t| t.default_template()).and_then(Family::detect);
                if family.is_none() {
                    report.notes.push("Modelfile: the chat template is not one retort translates (Llama 3, ChatML, Gemma, Phi-3, Mistral); no TEMPLATE line, so Ollama uses the template embedded in the GGUF".into());
                }
                let stops = ollama::stops(family, tok, &model.cfg.eos_token_ids);
                let from = format!("./{}", gguf_file_name(&job.name, *ft));
                let text =
                    ollama::modelfile(&from, family, &stops, job.system.as_deref()).map_err(|reason| {
                        ExportError::Unsupported {
                            format: "ollama".into(),
                            reason,
                            hint: "remove `\"\"\"` from export.ollama.system".into(),
                        }
                    })?;
                write_file(sink, &path, text.as_bytes()).map_err(|e| ExportError::write(&path, e))?;
                lint::modelfile(&path)?;
                report.ollama_command = Some(format!("ollama create {} -f {}", job.name, path.display()));
                done(
                    &mut report,
                    Written { format: format.label(), path: path.clone(), bytes: size_of(&path) },
                );
            }
        }
    }
    Ok(report)
}

/// Fails early, with the directory's name, when nothing can be created in it.
fn probe_writable(dir: &Path) -> Result<()> {
    tempfile::Builder::new()
        .prefix(".retort-probe-")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| ExportError::write(dir, e))
}

fn write_merged(
    job: &Job,
    model: &Model,
    path: &Path,
    sink: &dyn Sink,
    progress: &dyn Progress,
) -> Result<()> {
    let staged = StagedDir::new(path).map_err(|e| ExportError::write(path, e))?;
    let dir = staged.path().to_path_buf();
    let mut entries = Vec::new();
    for s in &model.specs {
        entries.push(Entry {
            name: s.name.clone(),
            dtype: model.out_dtype(&s.name)?.dtype(),
            shape: s.shape.clone(),
        });
    }
    for name in &model.extra {
        if let Some(info) = model.base.info(name) {
            let dtype = match (model.dtype, info.dtype.size()) {
                (Some(d), n) if n > 0 => d.dtype(),
                _ => info.dtype.clone(),
            };
            entries.push(Entry { name: name.clone(), dtype, shape: info.shape.clone() });
        }
    }
    let task = progress.task("merged", entries.len() as u64);
    write_checkpoint(sink, &dir, &entries, job.shard_size, &mut |e| {
        task.inc(1);
        if model.spec(&e.name).is_none() && model.base.info(&e.name).is_some_and(|i| i.dtype.size() == 0) {
            return Ok(model.base.get(&e.name).map(|v| v.data.to_vec()).unwrap_or_default());
        }
        if model.spec(&e.name).is_some()
            && let Some(view) = model.unchanged_view(&e.name)
        {
            // Unchanged and already in the output dtype: the stored bytes, checked for NaN.
            let ty = match view.dtype {
                retort_hf::Dtype::F16 => crate::gguf::GgmlType::F16,
                retort_hf::Dtype::BF16 => crate::gguf::GgmlType::BF16,
                _ => crate::gguf::GgmlType::F32,
            };
            let bad = crate::quant::count_non_finite(ty, view.data);
            if bad > 0 {
                return Err(ExportError::NonFinite {
                    tensor: e.name.clone(),
                    count: bad,
                    origin: Some(model.dir.clone()),
                });
            }
            return Ok(view.data.to_vec());
        }
        let values = if model.spec(&e.name).is_some() {
            model.values(&e.name)?
        } else {
            let v = model.base.get(&e.name).map(|v| v.to_f32()).transpose()?.unwrap_or_default();
            let d = model.dtype.unwrap_or(OutDtype::F32);
            v.into_iter().map(|x| d.round(x)).collect()
        };
        Ok(encode(&values, &e.dtype))
    })?;
    task.finish();
    // config.json: the base's, with the output dtype and tie flag.
    let mut config = read_json(&job.base.join("config.json"))?.unwrap_or(Json::Null);
    if let Json::Object(c) = &mut config {
        let dtype = model
            .dtype
            .or_else(|| model.out_dtype("model.embed_tokens.weight").ok())
            .map(OutDtype::torch_name);
        if let Some(d) = dtype {
            let key = if c.contains_key("dtype") || !c.contains_key("torch_dtype") {
                "dtype"
            } else {
                "torch_dtype"
            };
            c.insert(key.into(), Json::String(d.into()));
        }
        if model.untied {
            c.insert("tie_word_embeddings".into(), Json::Bool(false));
        }
    }
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
    write_file(sink, &cfg_path, text.as_bytes()).map_err(|e| ExportError::write(&cfg_path, e))?;
    for name in COPIED {
        let src = job.base.join(name);
        if !src.is_file() {
            continue;
        }
        let mut bytes = std::fs::read(&src).map_err(|e| ExportError::read(&src, e))?;
        if *name == "tokenizer_config.json"
            && let Some(t) = &job.chat_template
            && let Ok(Json::Object(mut tc)) = serde_json::from_slice::<Json>(&bytes)
        {
            tc.insert("chat_template".into(), Json::String(t.clone()));
            bytes = (serde_json::to_string_pretty(&Json::Object(tc)).unwrap_or_default() + "\n").into_bytes();
        }
        if *name == "chat_template.jinja"
            && let Some(t) = &job.chat_template
        {
            bytes = t.clone().into_bytes();
        }
        let dst = dir.join(name);
        write_file(sink, &dst, &bytes).map_err(|e| ExportError::write(&dst, e))?;
    }
    let expected: Vec<(String, String, Vec<usize>)> =
        entries.iter().map(|e| (e.name.clone(), e.dtype.name().to_string(), e.shape.clone())).collect();
    lint::merged_dir(&dir, &expected)?;
    staged.commit().map_err(|e| ExportError::write(path, e))
}

/// Encodes f32 values (already rounded) in a safetensors dtype.
pub fn encode(values: &[f32], dtype: &retort_hf::Dtype) -> Vec<u8> {
    let ty = match dtype {
        retort_hf::Dtype::BF16 => crate::gguf::GgmlType::BF16,
        retort_hf::Dtype::F16 => crate::gguf::GgmlType::F16,
        _ => crate::gguf::GgmlType::F32,
    };
    // Plain types have blocks of one value, so this cannot fail; it runs on every core.
    crate::quant::quantize(ty, values).unwrap_or_default()
}
