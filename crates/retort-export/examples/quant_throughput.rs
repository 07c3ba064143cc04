//! Quantization throughput alone (no reading, writing or checks), for `scripts/bench_export.sh`:
//! every 2-D tensor of a safetensors file, converted to f32 first, then quantized to each type.
//!
//!     cargo run --release -p retort-export --example quant_throughput -- model.safetensors
//!
//! Prints one line per type: `TYPE seconds`.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)] // a benchmark tool

use std::path::PathBuf;
use std::time::Instant;

use retort_export::gguf::GgmlType;
use retort_export::quant;
use retort_hf::Checkpoint;

fn main() {
    let path = PathBuf::from(std::env::args().nth(1).expect("usage: quant_throughput FILE.safetensors"));
    let ckpt = Checkpoint::open_files(&[path]).expect("a safetensors file");
    let tensors: Vec<Vec<f32>> = ckpt
        .names()
        .filter_map(|n| ckpt.get(n))
        .filter(|v| v.shape.len() == 2 && v.shape[1] % 256 == 0)
        .map(|v| quant::view_to_f32(&v).unwrap())
        .collect();
    for ty in [GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q4_0] {
        let t = Instant::now();
        let mut bytes = 0usize;
        for x in &tensors {
            bytes += quant::quantize(ty, x).unwrap().len();
        }
        println!("{} {:.3} {bytes}", ty.name(), t.elapsed().as_secs_f64());
    }
}
