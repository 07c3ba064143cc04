//! Lint before ship: every output is read back by an independent path (retort's GGUF reader, the
//! safetensors reader of `retort-hf`, the adapter reader) and checked against what was meant to be
//! written. A failure means a bug in a writer; the output is reported, never presented as good.

use std::path::Path;

use retort_hf::{Checkpoint, LoadReport, ModelConfig, names};
use serde_json::Value as Json;

use crate::adapter::Adapter;
use crate::error::{ExportError, Result};
use crate::gguf::{GgufFile, GgufHeader};

fn fail(path: &Path, problem: impl Into<String>) -> ExportError {
    ExportError::Lint { path: path.to_path_buf(), problem: problem.into() }
}

fn count_non_finite(v: &[f32]) -> usize {
    use rayon::prelude::*;
    v.par_chunks(1 << 16).map(|c| c.iter().filter(|x| !x.is_finite()).count()).sum()
}

/// A GGUF model: same metadata keys and values, same tensor table, finite values, a usable tokenizer.
pub fn gguf_model(path: &Path, planned: &GgufHeader, want_template: bool) -> Result<GgufFile> {
    let f = GgufFile::open(path)?;
    if f.metadata.len() != planned.metadata().len() {
        return Err(fail(
            path,
            format!("{} metadata keys read back, {} written", f.metadata.len(), planned.metadata().len()),
        ));
    }
    for ((k, v), (pk, pv)) in f.metadata.iter().zip(planned.metadata()) {
        if k != pk || v != pv {
            return Err(fail(path, format!("metadata `{pk}` reads back as `{k}` = {}", v.summary(40))));
        }
    }
    if f.tensors.len() != planned.tensors().len() {
        return Err(fail(
            path,
            format!("{} tensors read back, {} written", f.tensors.len(), planned.tensors().len()),
        ));
    }
    for (t, p) in f.tensors.iter().zip(planned.tensors()) {
        if t.name != p.name || t.shape != p.shape || t.ty != p.ty {
            return Err(fail(
                path,
                format!("tensor `{}` reads back as `{}` {:?} {}", p.name, t.name, t.shape, t.ty),
            ));
        }
        let bad = crate::quant::count_non_finite(t.ty, f.data(t));
        if bad > 0 {
            return Err(ExportError::NonFinite {
                tensor: t.name.clone(),
                count: bad,
                origin: Some(path.to_path_buf()),
            });
        }
    }
    let arch = f.architecture().ok_or_else(|| fail(path, "`general.architecture` is missing"))?.to_string();
    for key in ["block_count", "embedding_length", "attention.head_count", "context_length"] {
        if f.get_u64(&format!("{arch}.{key}")).is_none() {
            return Err(fail(path, format!("`{arch}.{key}` is missing")));
        }
    }
    let n_tokens = f.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map_or(0, <[_]>::len);
    let types = f.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()).map_or(0, <[_]>::len);
    if n_tokens == 0 || types != n_tokens {
        return Err(fail(path, format!("the vocabulary has {n_tokens} tokens and {types} token types")));
    }
    if let Some(embd) = f.tensor("token_embd.weight")
        && embd.shape[0] != n_tokens
    {
        return Err(fail(
            path,
            format!(
                "token_embd has {} rows but the vocabulary {n_tokens} tokens; llama.cpp would refuse it",
                embd.shape[0]
            ),
        ));
    }
    match f.get_u64("tokenizer.ggml.eos_token_id") {
        Some(id) if (id as usize) < n_tokens => {}
        Some(id) => {
            return Err(fail(path, format!("`tokenizer.ggml.eos_token_id` {id} is outside the vocabulary")));
        }
        None => {
            return Err(fail(path, "`tokenizer.ggml.eos_token_id` is missing: the model would never stop"));
        }
    }
    if want_template && f.get_str("tokenizer.chat_template").is_none_or(str::is_empty) {
        return Err(fail(path, "`tokenizer.chat_template` is missing"));
    }
    Ok(f)
}

/// A GGUF LoRA adapter: its type keys, complete pairs with matching ranks, finite values.
pub fn gguf_lora(path: &Path, arch: &str) -> Result<()> {
    let f = GgufFile::open(path)?;
    let want = [("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", arch)];
    for (k, v) in want {
        if f.get_str(k) != Some(v) {
            return Err(fail(path, format!("`{k}` is not `{v}`")));
        }
    }
    if f.get("adapter.lora.alpha").and_then(|v| v.as_f64()).is_none() {
        return Err(fail(path, "`adapter.lora.alpha` is missing"));
    }
    for t in &f.tensors {
        if let Some(base) = t.name.strip_suffix(".lora_a") {
            let b = f
                .tensor(&format!("{base}.lora_b"))
                .ok_or_else(|| fail(path, format!("`{}` has no lora_b", t.name)))?;
            if t.shape.first() != b.shape.get(1) {
                return Err(fail(
                    path,
                    format!("`{base}`: rank {} in lora_a, {} in lora_b", t.shape[0], b.shape[1]),
                ));
            }
        } else if !t.name.ends_with(".lora_b") {
            return Err(fail(path, format!("unexpected tensor `{}`", t.name)));
        }
        let bad = count_non_finite(&f.to_f32(t)?);
        if bad > 0 {
            return Err(ExportError::NonFinite {
                tensor: t.name.clone(),
                count: bad,
                origin: Some(path.to_path_buf()),
            });
        }
    }
    Ok(())
}

/// A merged Hugging Face directory: config and checkpoint load, every tensor is there with the right
/// shape and dtype, values are finite.
pub fn merged_dir(dir: &Path, expected: &[(String, String, Vec<usize>)]) -> Result<()> {
    let cfg = ModelConfig::load(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let report = LoadReport::check(&names::tensors(&cfg), &ckpt);
    if !report.is_complete() {
        return Err(fail(dir, format!("the merged checkpoint does not load: {report}")));
    }
    if ckpt.len() != expected.len() {
        return Err(fail(dir, format!("{} tensors read back, {} written", ckpt.len(), expected.len())));
    }
    for (name, dtype, shape) in expected {
        let view = ckpt.get(name).ok_or_else(|| fail(dir, format!("tensor `{name}` is missing")))?;
        if view.dtype.name() != dtype || view.shape != shape.as_slice() {
            return Err(fail(
                dir,
                format!("tensor `{name}` reads back as {} {:?}", view.dtype.name(), view.shape),
            ));
        }
        if view.dtype.size() > 0 {
            let bad = count_non_finite(&crate::quant::view_to_f32(&view)?);
            if bad > 0 {
                return Err(ExportError::NonFinite {
                    tensor: name.clone(),
                    count: bad,
                    origin: Some(dir.to_path_buf()),
                });
            }
        }
    }
    Ok(())
}

/// A PEFT directory: it opens, fits the base, and holds finite values.
pub fn peft_dir(dir: &Path, cfg: &ModelConfig, base: &Checkpoint) -> Result<()> {
    let a = Adapter::open(dir)?;
    let mut c = cfg.clone();
    if c.tie_word_embeddings && a.touches_lm_head() {
        c.tie_word_embeddings = false;
    }
    a.check(&c, &names::tensors(&c), base)?;
    for name in a.weights.names() {
        let bad = count_non_finite(&a.values(name)?);
        if bad > 0 {
            return Err(ExportError::NonFinite {
                tensor: name.to_string(),
                count: bad,
                origin: Some(dir.to_path_buf()),
            });
        }
    }
    let cfg_json: Json = serde_json::from_str(
        &std::fs::read_to_string(dir.join("adapter_config.json")).map_err(|e| ExportError::read(dir, e))?,
    )
    .map_err(|e| fail(dir, format!("adapter_config.json: {e}")))?;
    if cfg_json.get("use_rslora").and_then(Json::as_bool) == Some(true) {
        return Err(fail(dir, "the served adapter still uses rsLoRA scaling"));
    }
    Ok(())
}

/// A Modelfile: it names an existing GGUF next to it and has a stop parameter.
pub fn modelfile(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| ExportError::read(path, e))?;
    let from =
        text.lines().find_map(|l| l.strip_prefix("FROM ")).ok_or_else(|| fail(path, "has no FROM line"))?;
    let target = path.parent().unwrap_or(Path::new(".")).join(from.trim());
    if !target.is_file() {
        return Err(fail(path, format!("FROM `{from}` does not exist")));
    }
    if !text.contains("PARAMETER stop ") {
        return Err(fail(path, "has no stop parameter: the model would not stop at the end of its turn"));
    }
    Ok(())
}
