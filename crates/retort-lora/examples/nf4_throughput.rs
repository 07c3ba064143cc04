//! NF4 quantization and dequantization throughput on a 100M-value tensor (a 7B model's largest layers
//! are 50-100M values), in GB/s of f32 input, with double quantization at blocksize 64.
//!
//!     cargo run --release -p retort-lora --example nf4_throughput [-- VALUES [THREADS]]
//!
//! THREADS defaults to rayon's choice (all cores). Each measurement is the best of three runs.
#![allow(clippy::print_stdout)] // a benchmark reports on stdout

use std::time::Instant;

use half::bf16;
use retort_lora::nf4;

/// Deterministic weight-like values: a sum of uniforms (close to normal), std about 0.02.
fn weights(n: usize) -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n).map(|_| (uniform() + uniform() + uniform() + uniform() - 2.0) * 0.035).collect()
}

fn best_of_three(mut f: impl FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(100_000_000), |a| a.parse())?;
    if let Some(threads) = args.next() {
        rayon::ThreadPoolBuilder::new().num_threads(threads.parse()?).build_global()?;
    }
    let values = weights(n);
    let halves: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    let f32_gb = (n * 4) as f64 / 1e9;
    println!("{n} values ({f32_gb:.2} GB as f32), {} threads", rayon::current_num_threads());

    let mut q = nf4::quantize(&values, &[n], 64, true)?;
    let t = best_of_three(|| {
        if let Ok(fresh) = nf4::quantize(&values, &[n], 64, true) {
            q = fresh;
        }
    });
    println!("quantize f32  (double quant): {:7.3} s  {:6.2} GB/s of f32 input", t, f32_gb / t);
    let t = best_of_three(|| {
        let _ = nf4::quantize(&values, &[n], 64, false);
    });
    println!("quantize f32  (plain absmax): {:7.3} s  {:6.2} GB/s of f32 input", t, f32_gb / t);
    let t = best_of_three(|| {
        let _ = nf4::quantize_bf16(&halves, &[n], 64, true);
    });
    println!("quantize bf16 (double quant): {:7.3} s  {:6.2} GB/s of f32-equivalent input", t, f32_gb / t);

    let mut out = vec![0.0f32; n];
    let t = best_of_three(|| {
        let _ = q.dequantize_into(&mut out);
    });
    println!("dequantize to f32:            {:7.3} s  {:6.2} GB/s of f32 output", t, f32_gb / t);
    println!("{:.4} bits per parameter", q.bits_per_parameter());
    Ok(())
}
