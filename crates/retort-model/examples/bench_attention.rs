//! Training attention off the CPU's fused kernel: the blockwise operation of `retort_model::attention_mem`
//! against the decomposed form differentiated by autodiff (what training ran before it), forward and
//! backward of one layer's attention, causal, on the device named. Not a test: timings vary with the
//! machine.
//!
//!     cargo run --release -p retort-model --example bench_attention [--features vulkan] -- \
//!         [DEVICE] [DTYPE] [SEQ...]
//!
//! DEVICE is `cpu` (default), `wgpu:0`, `cuda:0`; DTYPE `f32` (default), `bf16` or `f16`; SEQ the row
//! lengths (default 1024 2048 4096). The heads are Llama-3.2-1B's (32 query heads, 8 key/value heads,
//! width 64), one row. Each variant runs in a child process of its own, so the CPU's peak resident
//! set is that variant's; on a GPU the device pool's bytes in use after the forward are reported (what
//! autodiff keeps for the backward). One JSON line per length and variant, then the ratios.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on stdout")]

use std::process::Command;
use std::time::Instant;

use retort_model::attention::{SCORE_CHUNK_BYTES, decomposed};
use retort_model::attention_mem::{Blockwise, recorded};
use retort_model::burn::tensor::{DType, Distribution, Tensor};
use retort_model::mask::MaskSpec;

const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 64;
const REPS: usize = 3;

fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// One variant at one length, in this process: seconds per forward + backward, and memory.
fn child(
    device: &str,
    dtype: &str,
    seq: usize,
    blockwise: bool,
) -> Result<String, Box<dyn std::error::Error>> {
    let choice: retort_recipe::types::Device = device.parse().map_err(|e| format!("device: {e:?}"))?;
    let dtype = match dtype {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => return Err(format!("dtype {other}: use f32, bf16 or f16").into()),
    };
    let selected = retort_model::device::select(choice)?;
    let plain = selected.device.clone();
    let device = plain.clone().autodiff();
    let spec =
        MaskSpec { batch: 1, q_len: seq, k_len: seq, key_valid: vec![true; seq], segments: vec![0; seq] };
    let mask = spec.build(None, &device);
    let rand = |h: usize| {
        Tensor::<4>::random([1, h, seq, HEAD_DIM], Distribution::Normal(0.0, 1.0), &device).cast(dtype)
    };
    let (q0, k0, v0) = (rand(HEADS), rand(KV_HEADS), rand(KV_HEADS));
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    let params = Blockwise { scale, softcap: None, chunk_bytes: SCORE_CHUNK_BYTES };
    let mut kept = None;
    let mut step = || -> Result<(), Box<dyn std::error::Error>> {
        let (q, k, v) = (q0.clone().require_grad(), k0.clone().require_grad(), v0.clone().require_grad());
        let out = if blockwise {
            recorded(&q, &k, &v, &mask, params).ok_or("no blockwise attention on this device")?
        } else {
            decomposed(q.clone(), k.clone(), v.clone(), &mask.values(), scale, None, SCORE_CHUNK_BYTES)
        };
        plain.sync().ok();
        kept = plain.memory_pool_usage().map(|p| p.bytes_in_use);
        let grads = out.sum().backward();
        for t in [&q, &k, &v] {
            drop(t.grad(&grads).ok_or("no gradient")?.into_data());
        }
        Ok(())
    };
    step()?; // compilation, autotuning, first allocations
    let t = Instant::now();
    for _ in 0..REPS {
        step()?;
    }
    let seconds = t.elapsed().as_secs_f64() / REPS as f64;
    Ok(serde_json::json!({
        "variant": if blockwise { "blockwise" } else { "decomposed" },
        "device": selected.name,
        "seq": seq,
        "seconds": seconds,
        "peak_rss_bytes": if selected.gpu { None } else { peak_rss() },
        "device_bytes_after_forward": kept,
    })
    .to_string())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let [_, device, dtype, seq, variant] = args.as_slice() else {
            return Err("child: bad arguments".into());
        };
        println!("{}", child(device, dtype, seq.parse()?, variant == "blockwise")?);
        return Ok(());
    }
    let device = args.first().cloned().unwrap_or_else(|| "cpu".into());
    let dtype = args.get(1).cloned().unwrap_or_else(|| "f32".into());
    let seqs: Vec<usize> = if args.len() > 2 {
        args[2..].iter().map(|s| s.parse()).collect::<Result<_, _>>()?
    } else {
        vec![1024, 2048, 4096]
    };
    let exe = std::env::current_exe()?;
    for seq in seqs {
        let mut results = Vec::new();
        for variant in ["decomposed", "blockwise"] {
            let out =
                Command::new(&exe).args(["--child", &device, &dtype, &seq.to_string(), variant]).output()?;
            if !out.status.success() {
                eprintln!("{variant} at {seq}: {}", String::from_utf8_lossy(&out.stderr).trim());
                results.push(None);
                continue;
            }
            let line = String::from_utf8(out.stdout)?;
            println!("{}", line.trim());
            results.push(Some(serde_json::from_str::<serde_json::Value>(&line)?));
        }
        if let [Some(d), Some(b)] = results.as_slice() {
            let ratio = |key: &str| match (d[key].as_f64(), b[key].as_f64()) {
                (Some(x), Some(y)) if y > 0.0 => format!("{:.2}x", x / y),
                _ => "-".into(),
            };
            println!(
                "seq {seq}: blockwise is {} faster; decomposed/blockwise peak RSS {}, device bytes kept {}",
                ratio("seconds"),
                ratio("peak_rss_bytes"),
                ratio("device_bytes_after_forward")
            );
        }
    }
    Ok(())
}
