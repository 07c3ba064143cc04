//! `x W^T` on the CPU for a base held in bf16: retort's projection (`dense::project`, which takes
//! [`retort_model::gemm_bf16`]'s AVX512-BF16 kernel where the CPU has one) against burn's bf16 matmul
//! (which converts both operands to f32 on one thread) and against the f32 projection of the same
//! values, on the 125M training benchmark's shapes (2,048 tokens) and a Llama-3.2-1B MLP. Not a test:
//! timings vary with the machine.
//!
//!     cargo run --release -p retort-model --example bench_gemm_bf16 -- [REPS]
//!
//! Prints one JSON line per shape, then the totals and their ratios.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::time::Instant;

use retort_model::burn::tensor::{DType, Device, Distribution, Tensor};

fn timed(reps: usize, f: impl Fn() -> Tensor<2>) -> f64 {
    drop(f());
    let t = Instant::now();
    for _ in 0..reps {
        drop(f());
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reps: usize = std::env::args().nth(1).map_or(Ok(5), |a| a.parse())?;
    let device = Device::flex();
    // (name, tokens, in, out)
    let shapes: [(&str, usize, usize, usize); 6] = [
        ("q_proj 125M", 2048, 768, 768),
        ("gate_proj 125M", 2048, 768, 2048),
        ("down_proj 125M", 2048, 2048, 768),
        ("lm_head chunk 125M", 256, 768, 32000),
        ("gate_proj 1B", 2048, 2048, 8192),
        ("down_proj 1B", 2048, 8192, 2048),
    ];
    let (mut ours, mut burns, mut f32s) = (0.0, 0.0, 0.0);
    for (name, m, k, n) in shapes {
        let x32 = Tensor::<2>::random([m, k], Distribution::Uniform(-1.0, 1.0), &device);
        let w32 = Tensor::<2>::random([n, k], Distribution::Uniform(-0.05, 0.05), &device);
        let (x, w) = (x32.clone().cast(DType::BF16), w32.clone().cast(DType::BF16));
        let project = |x: &Tensor<2>, w: &Tensor<2>| {
            retort_model::dense::project(x, w).unwrap_or_else(|| x.clone().matmul(w.clone().transpose()))
        };
        if retort_model::dense::project(&x, &w).is_none()
            || retort_model::dense::project(&x32, &w32).is_none()
        {
            return Err("dense::project declined these operands".into());
        }
        let t_ours = timed(reps, || project(&x, &w));
        let t_burn = timed(reps, || x.clone().matmul(w.clone().transpose()));
        let t_f32 = timed(reps, || project(&x32, &w32));
        let gflop = 2.0 * (m * k * n) as f64 / 1e9;
        println!(
            "{{\"shape\":\"{name}\",\"m\":{m},\"k\":{k},\"n\":{n},\"bf16_gflops\":{:.1},\
             \"burn_bf16_gflops\":{:.1},\"f32_gflops\":{:.1}}}",
            gflop / t_ours,
            gflop / t_burn,
            gflop / t_f32
        );
        (ours, burns, f32s) = (ours + t_ours, burns + t_burn, f32s + t_f32);
    }
    println!(
        "native AVX512-BF16: {}; total {ours:.3} s, burn's bf16 matmul {burns:.3} s ({:.2}x), \
         f32 {f32s:.3} s ({:.2}x)",
        retort_model::gemm_bf16::native(),
        burns / ours,
        f32s / ours
    );
    Ok(())
}
