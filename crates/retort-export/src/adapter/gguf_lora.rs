//! GGUF LoRA adapters for llama.cpp's `--lora` (and Ollama's `ADAPTER`): `general.type = adapter`,
//! `adapter.type = lora`, `adapter.lora.alpha`, and `<tensor>.lora_a` / `<tensor>.lora_b` pairs under
//! the base tensor's llama.cpp name, as `convert_lora_to_gguf.py` writes them.
//!
//! llama.cpp scales each pair by `alpha / rank` (rank from the tensor). Modules whose PEFT scale differs
//! (rsLoRA, rank or alpha patterns) get the difference baked into `lora_b`; the llama architecture's
//! Q/K row permutation is applied to `lora_b`'s rows, as to the base weights.

use std::io::Write;
use std::path::Path;

use retort_hf::{ModelConfig, Role};

use crate::adapter::{Adapter, ModuleKind};
use crate::convert::permute_rows;
use crate::error::{ExportError, Result};
use crate::gguf::{GgmlType, GgufHeader, GgufWriter, TensorInfo, Value};
use crate::output::Sink;
use crate::quant::mix::llama_order;

fn refuse(reason: String, hint: &str) -> ExportError {
    ExportError::Unsupported { format: "gguf-adapter".into(), reason, hint: hint.into() }
}

/// Writes the adapter as a GGUF LoRA file for a base of config `cfg` (the base's own config, tied
/// embeddings included).
pub fn write(adapter: &Adapter, cfg: &ModelConfig, name: &str, path: &Path, sink: &dyn Sink) -> Result<u64> {
    let merge_instead = "export `gguf:TYPE` (the merged model) instead, which carries every change";
    if adapter.config.use_dora {
        return Err(refuse("llama.cpp's LoRA loader has no DoRA magnitudes".into(), merge_instead));
    }
    if let Some(t) = adapter.replaced.keys().next() {
        return Err(refuse(
            format!("the adapter replaces `{t}` whole (modules_to_save), which a GGUF LoRA cannot carry"),
            merge_instead,
        ));
    }
    let specs = retort_hf::names::tensors(cfg);
    let alpha = adapter.config.lora_alpha;
    let mut planned: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (module, m) in &adapter.modules {
        if m.kind == ModuleKind::Embedding {
            return Err(refuse(format!("`{module}` has an embedding LoRA"), merge_instead));
        }
        if m.bias.is_some() {
            return Err(refuse(format!("`{module}` has a LoRA bias (lora_bias)"), merge_instead));
        }
        let weight = format!("{module}.weight");
        let Some(spec) = specs.iter().find(|s| s.name == weight) else {
            if module == "lm_head" && cfg.tie_word_embeddings {
                return Err(refuse(
                    "the adapter changes lm_head, but the base ties it to the embeddings and llama.cpp has no separate output tensor to apply it to".into(),
                    merge_instead,
                ));
            }
            return Err(ExportError::AdapterModule {
                tensor: m.a.clone(),
                module: module.clone(),
                arch: cfg.arch.hf_name().into(),
                trained_on: adapter.config.base_model.clone(),
            });
        };
        let a = adapter.values(&m.a)?;
        let mut b = adapter.values(&m.b)?;
        // llama.cpp applies alpha / rank; make that equal PEFT's scale.
        let fix = (f64::from(m.scale) * m.rank as f64 / alpha) as f32;
        if fix != 1.0 {
            b.iter_mut().for_each(|x| *x *= fix);
        }
        let out = spec.shape[0];
        if cfg.arch.gguf_permutes_qk() {
            match spec.role {
                Role::Q => b = permute_rows(&b, out, m.rank, cfg.num_heads),
                Role::K => b = permute_rows(&b, out, m.rank, cfg.num_kv_heads),
                _ => {}
            }
        }
        planned.push((format!("{}.lora_a", spec.gguf_name), vec![m.rank, spec.shape[1]], a));
        planned.push((format!("{}.lora_b", spec.gguf_name), vec![out, m.rank], b));
    }
    if planned.is_empty() {
        return Err(refuse("the adapter has no LoRA modules".into(), "nothing to convert"));
    }
    planned.sort_by(|x, y| llama_order(&x.0, &y.0));
    let mut h = GgufHeader::new();
    h.set("general.architecture", Value::str(cfg.arch.gguf_arch()));
    h.set("general.type", Value::str("adapter"));
    h.set("adapter.type", Value::str("lora"));
    h.set("general.name", Value::str(name));
    h.set("adapter.lora.alpha", Value::F32(alpha as f32));
    h.set("general.file_type", Value::U32(0));
    h.set("general.quantization_version", Value::U32(2));
    for (n, shape, _) in &planned {
        h.add_tensor(TensorInfo { name: n.clone(), shape: shape.clone(), ty: GgmlType::F32 })
            .map_err(|e| refuse(e, "report this as a bug"))?;
    }
    let werr = |e| ExportError::write(path, e);
    let size = h.file_size();
    let file = sink.create(path).map_err(werr)?;
    let mut w = GgufWriter::start(file, h).map_err(werr)?;
    for (n, _, v) in &planned {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write_tensor(n, &bytes).map_err(werr)?;
    }
    let mut f = w.finish().map_err(werr)?;
    f.flush().map_err(werr)?;
    f.commit().map_err(werr)?;
    Ok(size)
}
