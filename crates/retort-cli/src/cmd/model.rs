//! `retort generate` and `retort logits`: run a model directory directly.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

use retort_data::{RenderOptions, Tokenizer};
use retort_model::burn::tensor::DType;
use retort_model::device::{Selected, select};
use retort_model::{Batch, GenerateOptions, Precision, Sampling, Transformer, generate as run_generation};

use crate::cli::{DtypeArg, GenerateArgs, LogitsArgs, ModelArgs};
use crate::exit::{CliError, Exit};
use crate::ui::Ui;

/// A model ready to run, with its tokenizer when it has one.
pub(crate) struct Loaded {
    pub model: Transformer,
    pub tokenizer: Option<Tokenizer>,
    pub device: Selected,
    pub precision: Precision,
}

fn model_error(e: retort_model::ModelError) -> CliError {
    let hint = match &e {
        retort_model::ModelError::Incomplete { .. } => {
            "the checkpoint does not belong to this config.json (or was saved for another architecture)"
        }
        _ => {
            "a model directory holds config.json, *.safetensors and tokenizer.json, as saved by transformers"
        }
    };
    CliError::input(e.to_string()).hint(hint)
}

/// A local model directory: the path itself, or the hub snapshot of an `org/name` id.
pub(crate) fn resolve_model(ui: &Ui, model: &Path, revision: &str) -> anyhow::Result<std::path::PathBuf> {
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    let id = model.to_string_lossy();
    if !model.exists() && retort_hf::hub::is_hub_id(&id) {
        let hub = retort_hf::Hub::from_env();
        ui.status("fetching", &format!("{id} at {revision} into {}", hub.cache.display()));
        let dir = hub.snapshot(&id, revision).map_err(|e| {
            let hint = match &e {
                retort_hf::HubError::NotCached { .. } => {
                    "unset HF_HUB_OFFLINE to download it, or pass a local directory"
                }
                retort_hf::HubError::Download { .. } => {
                    "run the command again: finished files are kept and partial ones resume"
                }
                _ => "check the id on the hub, or pass a local directory",
            };
            CliError::input(e.to_string()).hint(hint)
        })?;
        return Ok(dir);
    }
    Err(CliError::input(format!("model directory `{}` does not exist", model.display()))
        .hint("pass a directory in Hugging Face format (config.json, *.safetensors, tokenizer.json) or a hub id `org/name`")
        .into())
}

/// Loads a model directory (or hub id) onto the requested device.
pub(crate) fn load(ui: &Ui, args: &ModelArgs) -> anyhow::Result<Loaded> {
    let resolved = resolve_model(ui, &args.model, &args.revision)?;
    let dir = resolved.as_path();
    let choice: retort_recipe::types::Device = args
        .device
        .parse()
        .map_err(|e: retort_recipe::types::ParseFail| CliError::input(e.message).hint(e.hint))?;
    let device = select(choice).map_err(|e| CliError::input(e.to_string()))?;
    let precision = match args.dtype {
        DtypeArg::Auto => device.auto_precision(),
        DtypeArg::F32 => Precision::F32,
        DtypeArg::Bf16 => Precision::Bf16,
        DtypeArg::F16 => Precision::F16,
    };
    let started = Instant::now();
    let (model, report) = Transformer::load(dir, precision, &device.device).map_err(model_error)?;
    let tokenizer = if dir.join("tokenizer.json").is_file() {
        let t = Tokenizer::load(dir).map_err(|e| CliError::input(e.to_string()))?;
        t.check_model_vocab(model.config.vocab_size).map_err(|e| CliError::input(e.to_string()))?;
        Some(t)
    } else {
        None
    };
    if !report.unused.is_empty() {
        tracing::warn!(unused = report.unused.len(), "the checkpoint has tensors the model does not use");
    }
    ui.status(
        "loaded",
        &format!(
            "{} ({}, {} layers) on {} in {:?} in {:.1}s",
            dir.display(),
            model.config.arch.hf_name(),
            model.config.num_layers,
            device.name,
            precision,
            started.elapsed().as_secs_f64()
        ),
    );
    Ok(Loaded { model, tokenizer, device, precision })
}

fn stop_ids(l: &Loaded) -> Vec<u32> {
    let mut eos = l.tokenizer.as_ref().map(|t| t.eos_ids.clone()).unwrap_or_default();
    for id in &l.model.config.eos_token_ids {
        if !eos.contains(id) {
            eos.push(*id);
        }
    }
    eos
}

/// Prints decoded text as tokens arrive, holding back an incomplete UTF-8 sequence.
struct Streamer<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl Streamer<'_> {
    fn emit(&mut self, last: bool) {
        if let Ok(text) = self.tokenizer.decode(&self.ids, true)
            && (last || !text.ends_with('\u{FFFD}'))
            && text.len() > self.printed
        {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.get(self.printed..).unwrap_or("").as_bytes());
            let _ = out.flush();
            self.printed = text.len();
        }
    }

    fn push(&mut self, id: u32) {
        self.ids.push(id);
        self.emit(false);
    }

    /// Prints what is left, an incomplete character included.
    fn finish(&mut self) {
        self.emit(true);
    }
}

pub fn generate(ui: &Ui, args: GenerateArgs) -> anyhow::Result<Exit> {
    let loaded = load(ui, &args.model)?;
    let Some(tokenizer) = loaded.tokenizer.as_ref() else {
        return Err(CliError::input(format!("`{}` has no tokenizer.json", args.model.model.display()))
            .hint("`retort generate` needs the model's tokenizer; `retort logits --ids` works without one")
            .into());
    };
    let template = tokenizer.template().map_err(|e| CliError::input(e.to_string()))?;
    let eos = stop_ids(&loaded);
    let pad = loaded.model.config.pad_token_id.or(eos.first().copied()).unwrap_or(0);
    let opts = GenerateOptions {
        max_new_tokens: args.max_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
        eos,
        pad,
    };
    let mut messages: Vec<serde_json::Value> = Vec::new();
    if let Some(s) = &args.system {
        messages.push(serde_json::json!({"role": "system", "content": s}));
    }
    let render = |messages: &[serde_json::Value]| -> anyhow::Result<Vec<u32>> {
        let Some(t) = &template else {
            return Err(CliError::input("this model has no chat template")
                .hint("use `--prompt TEXT --raw` to continue plain text")
                .into());
        };
        let opts = RenderOptions {
            add_generation_prompt: true,
            bos_token: tokenizer.bos_token.clone(),
            eos_token: tokenizer.eos_token.clone(),
            ..RenderOptions::default()
        };
        let text = t.render(messages, &opts).map_err(|e| CliError::input(e.to_string()))?;
        // The template writes special tokens itself, as apply_chat_template(tokenize=True) does.
        Ok(tokenizer.encode(&text, false)?)
    };
    let answer = |ids: Vec<u32>| -> anyhow::Result<String> {
        let started = Instant::now();
        let mut streamer = Streamer { tokenizer, ids: Vec::new(), printed: 0 };
        let out = run_generation(&loaded.model, &[ids], &opts, |_, t| streamer.push(t))
            .map_err(|e| CliError::input(e.to_string()))?;
        streamer.finish();
        let n = out.tokens[0].len();
        let secs = started.elapsed().as_secs_f64();
        println_stdout("");
        ui.status(
            "generated",
            &format!("{n} tokens in {secs:.2}s ({:.1} tokens/s)", n as f64 / secs.max(1e-9)),
        );
        Ok(tokenizer.decode(&out.tokens[0], true)?)
    };
    if let Some(prompt) = &args.prompt {
        let ids = if args.raw || template.is_none() {
            if template.is_none() && !args.raw {
                ui.status("note", "the model has no chat template: continuing the prompt as plain text");
            }
            tokenizer.encode(prompt, true)?
        } else {
            messages.push(serde_json::json!({"role": "user", "content": prompt}));
            render(&messages)?
        };
        answer(ids)?;
        return Ok(Exit::Ok);
    }
    // --chat: one user message per line of standard input.
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        messages.push(serde_json::json!({"role": "user", "content": line}));
        let reply = answer(render(&messages)?)?;
        messages.push(serde_json::json!({"role": "assistant", "content": reply}));
    }
    Ok(Exit::Ok)
}

fn println_stdout(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}");
}

/// The bytes of a `.npy` file (format 1.0) holding a little-endian float32 array.
pub(crate) fn npy_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text =
        if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic (6) + version (2) + length (2) + header + newline must be a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

pub fn logits(ui: &Ui, args: LogitsArgs) -> anyhow::Result<Exit> {
    let loaded = load(ui, &args.model)?;
    let ids = match &args.text {
        Some(text) => match &loaded.tokenizer {
            Some(t) => t.encode(text, true)?,
            None => {
                return Err(CliError::input("`--text` needs the model's tokenizer.json")
                    .hint("pass token ids with `--ids 1,2,3` instead")
                    .into());
            }
        },
        None => args.ids.clone(),
    };
    if ids.is_empty() {
        return Err(CliError::input("no tokens to score")
            .hint("pass `--ids 1,2,3` or a non-empty `--text`")
            .into());
    }
    let vocab = loaded.model.config.vocab_size;
    if let Some(bad) = ids.iter().find(|t| **t as usize >= vocab) {
        return Err(
            CliError::input(format!("token id {bad} is outside the model's vocabulary of {vocab}")).into()
        );
    }
    let logits = loaded.model.forward(&Batch::single(&ids), None).cast(DType::F32).into_data();
    let values: Vec<f32> = logits.try_into_vec().map_err(|e| anyhow::anyhow!("reading logits: {e:?}"))?;
    let bytes = npy_f32(&[ids.len(), vocab], &values);
    write_output(&args.out, &bytes)?;
    ui.status(
        "wrote",
        &format!(
            "{} ({} x {} float32, {:?} on {})",
            args.out.display(),
            ids.len(),
            vocab,
            loaded.precision,
            loaded.device.name
        ),
    );
    Ok(Exit::Ok)
}

fn write_output(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    retort_io::write_atomic(path, bytes, true).map_err(|e| {
        CliError::input(format!("cannot write `{}`: {e}", path.display()))
            .hint("check that the directory exists and is writable")
            .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_readable() {
        let b = npy_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)") && header.ends_with('\n'));
        assert_eq!(f32::from_le_bytes(b[10 + hlen + 20..10 + hlen + 24].try_into().unwrap()), 6.0);
    }
}
