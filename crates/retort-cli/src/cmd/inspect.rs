//! `retort inspect`: what a model is and what training it would need (`model`), what a GGUF file
//! holds (`gguf`).

use std::path::Path;

use retort_export::gguf::{GgufFile, Value};
use retort_hf::{Checkpoint, ModelConfig};
use retort_model::memory::{TrainShape, estimate};

use crate::cli::InspectCommand;
use crate::exit::{CliError, Exit};
use crate::ui::Ui;

fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
}

/// What a GPU run trains by default: 16-bit base with autocast, checkpointing on, blockwise attention.
fn gpu_shape(rank: usize) -> TrainShape {
    TrainShape {
        batch: 1,
        seq: 2048,
        rank,
        nf4: false,
        checkpointing: true,
        offload: false,
        dtype_bytes: 2,
        fused_attention: false,
        head_chunk_bytes: retort_model::memory::GPU_HEAD_CHUNK_BYTES,
        mlp_chunk_bytes: retort_model::model::MLP_CHUNK_BYTES,
        cpu: false,
        dropout: false,
        autocast: true,
    }
}

pub fn run(ui: &Ui, cmd: InspectCommand) -> anyhow::Result<Exit> {
    match cmd {
        InspectCommand::Gguf { file, full } => gguf(ui, &file, full),
        InspectCommand::Model { model, seq_len, batch, rank } => {
            let cfg = ModelConfig::load(&model).map_err(|e| CliError::input(e.to_string()))?;
            let dtype = Checkpoint::open(&model)
                .ok()
                .and_then(|c| c.dominant_dtype())
                .map(|d| d.name().to_string())
                .or_else(|| cfg.torch_dtype.clone())
                .unwrap_or_else(|| "unknown".into());
            let params = cfg.parameter_count();
            let shapes = [("LoRA (bf16 base)", false), ("QLoRA (NF4 base)", true)];
            let estimates: Vec<(&str, retort_model::memory::MemoryEstimate)> = shapes
                .iter()
                .map(|(name, nf4)| {
                    (*name, estimate(&cfg, TrainShape { batch, seq: seq_len, nf4: *nf4, ..gpu_shape(rank) }))
                })
                .collect();
            // The longest single row that fits common GPU memory sizes, with the
            // checkpointed layer inputs in host memory (`train.offload_checkpoints`).
            let budgets = [24u64, 48, 80];
            let longest: Vec<(&str, Vec<usize>)> = shapes
                .iter()
                .map(|(name, nf4)| {
                    let shape = TrainShape { batch: 1, offload: true, nf4: *nf4, ..gpu_shape(rank) };
                    let per_budget = budgets
                        .iter()
                        .map(|g| retort_model::memory::longest_context(&cfg, shape, (*g << 30) as f64))
                        .collect();
                    (*name, per_budget)
                })
                .collect();
            if ui.json {
                let v = serde_json::json!({
                    "architecture": cfg.arch.hf_name(),
                    "parameters": params,
                    "dtype": dtype,
                    "layers": cfg.num_layers,
                    "hidden_size": cfg.hidden_size,
                    "heads": cfg.num_heads,
                    "kv_heads": cfg.num_kv_heads,
                    "vocab_size": cfg.vocab_size,
                    "context": cfg.max_position_embeddings,
                    "lora_targets": retort_hf::names::peft_targets(&cfg),
                    "training_memory": estimates.iter().map(|(n, e)| serde_json::json!({
                        "method": n, "seq_len": seq_len, "batch": batch, "rank": rank,
                        "weights": e.weights, "adapters": e.adapters, "activations": e.activations,
                        "logits": e.logits, "total": e.total(),
                    })).collect::<Vec<_>>(),
                    "longest_context": longest.iter().map(|(n, l)| serde_json::json!({
                        "method": n, "batch": 1, "rank": rank, "offload_checkpoints": true,
                        "tokens_by_gib": budgets.iter().zip(l).map(|(g, t)| (g.to_string(), serde_json::json!(*t))).collect::<serde_json::Map<_, _>>(),
                    })).collect::<Vec<_>>(),
                });
                ui.stdout_line(&v.to_string());
                return Ok(Exit::Ok);
            }
            let mut out = String::new();
            out.push_str(&format!(
                "architecture   {} (gguf: {})\n",
                cfg.arch.hf_name(),
                cfg.arch.gguf_arch()
            ));
            out.push_str(&format!("parameters     {} ({:.2}B)\n", params, params as f64 / 1e9));
            out.push_str(&format!("dtype          {dtype}\n"));
            out.push_str(&format!(
                "shape          {} layers, hidden {}, MLP {}, {} heads ({} key/value) of {}\n",
                cfg.num_layers,
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim
            ));
            out.push_str(&format!("vocabulary     {}\n", cfg.vocab_size));
            out.push_str(&format!("context        {} tokens\n", cfg.max_position_embeddings));
            out.push_str(&format!("LoRA targets   {}\n", retort_hf::names::peft_targets(&cfg).join(", ")));
            out.push_str(&format!(
                "\nestimated training memory, micro-batch {batch} x {seq_len} tokens, rank {rank} on all linear layers,\nactivation checkpointing on:\n"
            ));
            for (name, e) in &estimates {
                out.push_str(&format!(
                    "  {name:<18} {:>10}  (weights {}, adapters+AdamW {}, activations {}, logits {})\n",
                    gib(e.total()),
                    gib(e.weights),
                    gib(e.adapters),
                    gib(e.activations),
                    gib(e.logits)
                ));
            }
            out.push_str(
                "\nlongest context that fits (estimate), micro-batch 1, checkpointing with layer inputs in host memory:\n",
            );
            for (name, l) in &longest {
                let cells: Vec<String> = budgets
                    .iter()
                    .zip(l)
                    .map(|(g, t)| match *t {
                        t if t >= retort_model::memory::LONGEST_CONTEXT_CAP => {
                            format!("{g} GiB: over 4M tokens")
                        }
                        t => format!("{g} GiB: {t:>7} tokens"),
                    })
                    .collect();
                out.push_str(&format!("  {name:<18} {}\n", cells.join("   ")));
            }
            ui.stdout_line(out.trim_end());
            Ok(Exit::Ok)
        }
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

fn gguf(ui: &Ui, file: &Path, full: bool) -> anyhow::Result<Exit> {
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
