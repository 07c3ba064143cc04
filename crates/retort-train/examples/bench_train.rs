//! LoRA training throughput for `scripts/bench_train.sh` (CPU) and `scripts/bench_gpu.sh`: a model
//! directory, LoRA r=16 alpha=32 on every linear layer (dropout 0), AdamW lr 1e-4, clipping at 1.0,
//! `warmup` untimed and `steps` timed optimizer steps of one fixed batch. Prints one JSON object. Not a
//! test: timings vary.
//!
//!   bench_train MODEL_DIR BATCH_JSON WARMUP STEPS [--profile] [--checkpointing] [--offload]
//!               [--device cpu|wgpu:N|cuda:N] [--precision f32|bf16|f16] [--nf4] [--autocast]
//!               [--dropout P] [--no-probe] [--mlp-chunk-mib N]
//!
//! `--profile` adds one more step taken apart: forward to the loss, backward (gradients minus forward),
//! and clipping plus AdamW. `--checkpointing` recomputes each layer in the backward pass; `--offload`
//! then keeps the layer inputs in host memory (`train.offload_checkpoints`). `--device`
//! defaults to the CPU and `--precision` (of the frozen base; adapters and optimizer state stay f32) to
//! f32. `--nf4` quantizes the base's projections to NF4 with double quantization (QLoRA).
//! `--dropout` sets LoRA dropout (default 0, as the PEFT peer runs).
//! `--autocast` runs the adapters' products in the base's 16-bit dtype (`train.autocast`).
//! `--no-probe` skips timing the plan's stand-in steps after the run. `--mlp-chunk-mib N` runs each
//! layer's MLP on chunks of positions of at most N MiB per intermediate tensor (default 256).

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(
    clippy::print_stderr,
    reason = "progress goes to stderr, so a run cut short still says how far it got"
)]

use std::path::Path;
use std::time::Instant;

use retort_model::memory::{TrainShape, estimate};
use retort_model::{Batch, Precision, Transformer};
use retort_recipe::schema::lora::{Target, Variant};
use retort_train::optim::clip;
use retort_train::step::{apply, gradients};
use retort_train::{AdamW, AdamWConfig, MicroBatch, train_step};

const LR: f64 = 1e-4;
const MAX_GRAD_NORM: f64 = 1.0;

/// Resets `VmHWM` to the current RSS (Linux >= 4.0), so a later read gives the peak of what came
/// between.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A line of `/proc/self/status` in bytes (`VmHWM`: peak resident set; `VmRSS`: now).
fn status_bytes(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn micro_batch(path: &Path) -> Result<MicroBatch, Box<dyn std::error::Error>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let rows: Vec<Vec<u32>> = serde_json::from_value(v["ids"].clone())?;
    let len = rows.first().map_or(0, Vec::len);
    if rows.is_empty() || rows.iter().any(|r| r.len() != len) {
        return Err("batch: `ids` must be equal-length rows".into());
    }
    // Equal-length rows: nothing is padded, positions run 0..len in every row.
    let batch = Batch::left_padded(&rows, 0);
    Ok(MicroBatch { labels: batch.ids.iter().map(|&x| i64::from(x)).collect(), batch })
}

#[global_allocator]
static ALLOC: retort_model::alloc::TensorAlloc =
    retort_model::alloc::TensorAlloc::new(retort_model::alloc::DEFAULT_BUDGET);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    retort_model::alloc::tune_for_tensors();
    // `RETORT_NO_ALLOC_CACHE=1`: no cache of freed large blocks (`retort_model::alloc`), to compare.
    ALLOC.set_caching(std::env::var_os("RETORT_NO_ALLOC_CACHE").is_none());
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: bench_train MODEL_DIR BATCH_JSON WARMUP STEPS [--profile] [--checkpointing]";
    let [_, dir, batch, warmup, steps, rest @ ..] = args.as_slice() else { return Err(usage.into()) };
    let (warmup, steps): (usize, usize) = (warmup.parse()?, steps.parse()?);
    let profile = rest.iter().any(|a| a == "--profile");
    let checkpointing = rest.iter().any(|a| a == "--checkpointing");
    // As `train.offload_checkpoints`: only with checkpointing.
    let offload = checkpointing && rest.iter().any(|a| a == "--offload");
    let nf4 = rest.iter().any(|a| a == "--nf4");
    let probe = !rest.iter().any(|a| a == "--no-probe");
    let value = |flag: &str| rest.iter().position(|a| a == flag).and_then(|i| rest.get(i + 1));
    let choice: retort_recipe::types::Device = value("--device")
        .map_or(Ok(retort_recipe::types::Device::Cpu), |d| d.parse())
        .map_err(|e| e.to_string())?;
    let precision = match value("--precision").map(String::as_str) {
        None | Some("f32") => Precision::F32,
        Some("bf16") => Precision::Bf16,
        Some("f16") => Precision::F16,
        Some(other) => return Err(format!("--precision {other}: use f32, bf16 or f16").into()),
    };
    let dropout: f64 = value("--dropout").map_or(Ok(0.0), |p| p.parse())?;
    // As `train.autocast`: nothing to do for an f32 base.
    let autocast = rest.iter().any(|a| a == "--autocast") && precision != Precision::F32;
    let selected = retort_model::device::select(choice)?;
    let plain = selected.device.clone();
    let device = plain.clone().autodiff();
    let t = Instant::now();
    let (model, _) = if nf4 {
        retort_lora::qlora::load_quantized(Path::new(dir), precision, &device, true)?
    } else {
        Transformer::load(Path::new(dir), precision, &device)?
    };
    let spec = retort_lora::AdapterSpec {
        r: 16,
        alpha: 32.0,
        dropout,
        targets: vec![Target::AllLinear],
        variant: Variant::Lora,
    };
    let mut model = retort_lora::attach(model, &spec, 0)?.with_lora_autocast(autocast);
    model.checkpoint_layers = checkpointing;
    model.offload_checkpoints = offload;
    // `--mlp-chunk-mib N`: the MLP's positions in chunks of N MiB per intermediate tensor.
    if let Some(mib) = value("--mlp-chunk-mib") {
        model.mlp_chunk_bytes = mib.parse::<usize>()? << 20;
    }
    let model_mlp_chunk_bytes = model.mlp_chunk_bytes;
    let load_s = t.elapsed().as_secs_f64();
    let rss_loaded = status_bytes("VmRSS:");
    let mb = micro_batch(Path::new(batch))?;
    let micro = std::slice::from_ref(&mb);
    let tokens = mb.batch.rows * mb.batch.len;

    let mut opt = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
    let mut losses = Vec::new();
    eprintln!("bench_train: loaded in {load_s:.1}s on {}", selected.name);
    let mut step = |model: Transformer, opt: &mut AdamW| {
        let t = Instant::now();
        let (model, stats) = train_step(model, opt, micro, LR, MAX_GRAD_NORM, 0);
        eprintln!(
            "bench_train: step {}: loss {:.5} in {:.2}s",
            losses.len(),
            stats.loss,
            t.elapsed().as_secs_f64()
        );
        losses.push(stats.loss);
        model
    };
    for _ in 0..warmup {
        model = step(model, &mut opt);
    }
    let t = Instant::now();
    for _ in 0..steps {
        model = step(model, &mut opt);
    }
    let timed_s = t.elapsed().as_secs_f64();
    let s_per_step = timed_s / steps.max(1) as f64;
    let peak_rss = status_bytes("VmHWM:"); // before `--profile` resets it
    let pool = plain.memory_pool_usage();

    let mut split = serde_json::Value::Null;
    if profile {
        // The same work as `train_step`, timed in parts; the forward is run once on its own first
        // (its peak and what it keeps for the backward are the forward's memory).
        let rss_before = status_bytes("VmRSS:");
        reset_peak();
        let t = Instant::now();
        let hidden = model.hidden_train(&mb.batch);
        let loss = retort_train::loss::nll_sum(&model, hidden, &mb.labels).ok_or("no label tokens")?;
        let _: f32 = loss.clone().into_scalar();
        let forward_s = t.elapsed().as_secs_f64();
        let (rss_forward, peak_forward) = (status_bytes("VmRSS:"), status_bytes("VmHWM:"));
        drop(loss);
        reset_peak();
        let t = Instant::now();
        let (_, _, mut grads) = gradients(&model, micro, 0);
        let grads_s = t.elapsed().as_secs_f64();
        let peak_step = status_bytes("VmHWM:");
        let t = Instant::now();
        clip(&mut grads, MAX_GRAD_NORM);
        model = apply(model, &mut opt, &grads, LR);
        let optimizer_s = t.elapsed().as_secs_f64();
        split = serde_json::json!({
            "forward_s": forward_s,
            "backward_s": grads_s - forward_s,
            "optimizer_s": optimizer_s,
            "rss_before_bytes": rss_before,
            "rss_after_forward_bytes": rss_forward,
            "peak_forward_bytes": peak_forward,
            "peak_forward_backward_bytes": peak_step,
        });
    }
    drop(model);

    let est = estimate(
        &retort_hf::ModelConfig::load(Path::new(dir))?,
        TrainShape {
            batch: mb.batch.rows,
            seq: mb.batch.len,
            rank: spec.r,
            nf4,
            checkpointing,
            offload: offload && selected.gpu,
            dtype_bytes: precision.dtype().size(),
            fused_attention: !selected.gpu && precision == Precision::F32,
            head_chunk_bytes: retort_model::memory::head_chunk_bytes(&plain),
            mlp_chunk_bytes: model_mlp_chunk_bytes,
            cpu: !selected.gpu,
            dropout: dropout > 0.0,
            autocast,
        },
    );
    // What `retort train --plan` would predict for this step (run after the timed steps, so its
    // stand-ins do not change the peak above).
    let step_time = if probe {
        Some(retort_train::probe::measure(
            &retort_hf::ModelConfig::load(Path::new(dir))?,
            &spec,
            retort_train::probe::ProbeShape {
                batch: mb.batch.rows,
                seq: mb.batch.len,
                accum: 1,
                checkpointing,
                offload,
                nf4: nf4.then_some(true),
                autocast,
            },
            precision,
            &device,
        )?)
    } else {
        None
    };
    println!(
        "{}",
        serde_json::json!({
            "impl": "retort",
            "device": selected.name,
            "precision": format!("{precision:?}").to_lowercase(),
            "nf4": nf4,
            "predicted_seconds_per_step": step_time.as_ref().map(|t| t.seconds_per_step),
            "predicted_step_time": step_time,
            "threads": std::env::var("RAYON_NUM_THREADS").ok(),
            "checkpointing": checkpointing,
            "autocast": autocast,
            "dropout": dropout,
            "tokens": tokens,
            "warmup": warmup,
            "steps": steps,
            "load_s": load_s,
            "seconds_per_step": s_per_step,
            "tokens_per_s": tokens as f64 / s_per_step,
            "peak_rss_bytes": peak_rss,
            "device_bytes_in_use": pool.as_ref().map(|p| p.bytes_in_use),
            "device_bytes_reserved": pool.as_ref().map(|p| p.bytes_reserved),
            "rss_after_load_bytes": rss_loaded,
            "predicted_bytes": est.total(),
            "predicted": est,
            "losses": losses,
            "profile": split,
        })
    );
    Ok(())
}
