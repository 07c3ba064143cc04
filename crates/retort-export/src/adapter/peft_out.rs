//! The PEFT adapter directory for serving (vLLM, transformers, PEFT).
//!
//! vLLM applies one scale, `lora_alpha / r`, to every module and ignores `use_rslora`,
//! `rank_pattern` and `alpha_pattern`. When an adapter relies on any of those, each module's true scale
//! is baked into its `lora_B` and `lora_alpha` is set equal to the rank (also through `alpha_pattern`
//! for modules with their own rank), so every reader computes the same update.

use std::path::Path;

use retort_hf::Dtype;
use serde_json::{Map, Value as Json};

use crate::adapter::Adapter;
use crate::error::{ExportError, Result};
use crate::output::{Sink, write_file};
use crate::quant::float::{bf16_bits, f16_bits};
use crate::safetensors_out::{Entry, write_checkpoint};

fn encode(values: &[f32], dtype: &Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values.iter().flat_map(|&v| bf16_bits(v).to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|&v| f16_bits(v).to_le_bytes()).collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Writes the adapter into `dir` (a staged directory). Returns notes for the user.
pub fn write(adapter: &Adapter, dir: &Path, sink: &dyn Sink) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let bake = adapter.config.needs_baked_scales();
    let mut config = adapter.raw_config.clone();
    if bake {
        let Json::Object(c) = &mut config else {
            return Err(ExportError::Adapter {
                path: adapter.dir.join("adapter_config.json"),
                problem: "is not a JSON object".into(),
                hint: "save the adapter again with PEFT".into(),
            });
        };
        c.insert("use_rslora".into(), Json::Bool(false));
        c.insert("lora_alpha".into(), Json::from(adapter.config.r));
        let mut alpha_pattern = Map::new();
        for (k, r) in &adapter.config.rank_pattern {
            alpha_pattern.insert(k.clone(), Json::from(*r));
        }
        c.insert("alpha_pattern".into(), Json::Object(alpha_pattern));
        notes.push(format!(
            "adapter: {} scales baked into lora_B; lora_alpha = r, so vLLM's single alpha/r scale gives the trained update",
            if adapter.config.use_rslora { "rsLoRA" } else { "per-module (rank/alpha pattern)" }
        ));
    }
    if adapter.config.use_dora {
        notes.push("adapter: DoRA adapters load in transformers/PEFT; vLLM does not support DoRA (serve `merged` or a GGUF instead)".into());
    }
    if !adapter.replaced.is_empty() {
        notes.push(format!(
            "adapter: carries whole tensors ({}); vLLM serves only LoRA modules, so prefer `merged` for vLLM",
            adapter.replaced.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    let mut entries = Vec::new();
    for name in adapter.weights.names() {
        let info = adapter.weights.info(name).ok_or_else(|| ExportError::Lint {
            path: adapter.dir.clone(),
            problem: format!("tensor `{name}` vanished"),
        })?;
        entries.push(Entry { name: name.to_string(), dtype: info.dtype.clone(), shape: info.shape.clone() });
    }
    let scale_of = |key: &str| -> Option<f32> {
        adapter.modules.values().find(|m| m.b == key || m.bias.as_deref() == Some(key)).map(|m| m.scale)
    };
    write_checkpoint(sink, dir, &entries, u64::MAX, &mut |e| {
        let view = adapter.weights.get(&e.name).ok_or_else(|| ExportError::Lint {
            path: adapter.dir.clone(),
            problem: format!("tensor `{}` vanished", e.name),
        })?;
        match scale_of(&e.name).filter(|_| bake) {
            Some(s) => {
                let v: Vec<f32> = view.to_f32()?.into_iter().map(|x| x * s).collect();
                Ok(encode(&v, &e.dtype))
            }
            None => Ok(view.data.to_vec()),
        }
    })?;
    // write_checkpoint names a single file model.safetensors; PEFT's name is adapter_model.safetensors.
    let from = dir.join("model.safetensors");
    let to = dir.join("adapter_model.safetensors");
    std::fs::rename(&from, &to).map_err(|e| ExportError::write(&to, e))?;
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
    write_file(sink, &path, text.as_bytes()).map_err(|e| ExportError::write(&path, e))?;
    Ok(notes)
}
