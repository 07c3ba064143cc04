//! NF4 dequantization of real projection shapes: the path `Nf4Weight::dequantize` takes on the device
//! (the CPU's direct pass, the GPU kernel of `retort_model::cube`) against burn's tensor operations
//! (`dequantize_reference`). Not a test: timings vary with the machine.
//!
//!     cargo run --release -p retort-model --example bench_nf4 [--features vulkan] -- [DEVICE] [DTYPE] [REPS]
//!
//! DEVICE is `cpu` (default), `wgpu:0`, `cuda:0`; DTYPE `f32` (default), `bf16` or `f16`. The shapes
//! are Llama-3.1-8B's (q/o 4096 x 4096, k/v 1024 x 4096, gate/up 14336 x 4096, down 4096 x 14336),
//! double-quantized absmax, blocks of 64. Prints one JSON line per shape and the total ratio.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::time::Instant;

use retort_model::burn::tensor::{DType, Device, Tensor};
use retort_model::nf4::{HostNf4, HostScales, Nf4Weight};

fn timed(reps: usize, device: &Device, f: impl Fn() -> Tensor<2>) -> f64 {
    // One untimed call: compilation, autotuning, first allocations.
    drop(f());
    device.sync().ok();
    let t = Instant::now();
    for _ in 0..reps {
        drop(f());
    }
    device.sync().ok();
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let choice: retort_recipe::types::Device = args
        .next()
        .map_or(Ok(retort_recipe::types::Device::Cpu), |d| d.parse())
        .map_err(|e| format!("device: {e:?}"))?;
    let dtype = match args.next().as_deref() {
        None | Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(other) => return Err(format!("dtype {other}: use f32, bf16 or f16").into()),
    };
    let reps: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    let selected = retort_model::device::select(choice)?;
    let device = selected.device.clone();
    let shapes: [(&str, [usize; 2]); 4] = [
        ("q_proj", [4096, 4096]),
        ("k_proj", [1024, 4096]),
        ("gate_proj", [14336, 4096]),
        ("down_proj", [4096, 14336]),
    ];
    let book: [f32; 16] = std::array::from_fn(|i| (i as f32 - 7.5) / 7.5);
    let dq_book: [f32; 256] = std::array::from_fn(|i| (i as f32 - 127.5) / 127.5);
    let (mut fast_total, mut ops_total) = (0.0, 0.0);
    for (name, shape) in shapes {
        let numel = shape[0] * shape[1];
        let blocks = numel.div_ceil(64);
        let codes: Vec<u8> = (0..numel / 2).map(|i| ((i * 2_654_435_761usize) >> 7) as u8).collect();
        let dq_codes: Vec<u8> = (0..blocks).map(|i| ((i * 40_503) >> 3) as u8).collect();
        let dq_scales = vec![0.02f32; blocks.div_ceil(256)];
        let host = HostNf4 {
            shape,
            blocksize: 64,
            codes: &codes,
            scales: HostScales::Double {
                codes: &dq_codes,
                scales: &dq_scales,
                offset: 0.05,
                code_book: &dq_book,
            },
            code_book: &book,
        };
        let w = Nf4Weight::new(host, dtype, &device)?;
        let fast = timed(reps, &device, || w.dequantize());
        let ops = timed(reps, &device, || w.dequantize_reference());
        fast_total += fast;
        ops_total += ops;
        // Bytes a dequantization must move at least: the packed codes in, the dense weight out.
        let bytes = numel as f64 * (0.5 + dtype.size() as f64);
        println!(
            "{}",
            serde_json::json!({
                "shape": name, "rows": shape[0], "cols": shape[1], "device": selected.name,
                "dtype": format!("{dtype:?}"), "fast_ms": fast * 1e3, "ops_ms": ops * 1e3,
                "fast_gb_s": bytes / fast / 1e9, "speedup": ops / fast,
            })
        );
    }
    println!(
        "{}",
        serde_json::json!({"total_fast_ms": fast_total * 1e3, "total_ops_ms": ops_total * 1e3, "speedup": ops_total / fast_total})
    );
    Ok(())
}
