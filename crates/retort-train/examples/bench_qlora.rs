//! Training step time with a dense base (LoRA) and an NF4 base (QLoRA) on the CPU, same adapters, same
//! data. Not a test: timings vary with the machine.
//!
//!     cargo run --release -p retort-train --example bench_qlora -- [MODEL_DIR|tiny] [ROWS] [LEN] [STEPS]
//!
//! Without MODEL_DIR the built-in tiny Llama is used. Prints one JSON line per base and the ratio.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::path::PathBuf;
use std::time::Instant;

use retort_model::burn::tensor::Device;
use retort_model::{Batch, Precision, Transformer};
use retort_recipe::schema::lora::{Target, Variant};
use retort_train::{AdamW, AdamWConfig, MicroBatch, train_step};

fn micro(rows: usize, len: usize, vocab: u32) -> MicroBatch {
    let ids: Vec<u32> = (0..(rows * len) as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    // Equal-length rows: nothing is padded, positions run 0..len in every row.
    let seqs: Vec<Vec<u32>> = ids.chunks(len).map(<[u32]>::to_vec).collect();
    MicroBatch { labels: ids.iter().map(|&t| i64::from(t)).collect(), batch: Batch::left_padded(&seqs, 0) }
}

#[global_allocator]
static ALLOC: retort_model::alloc::TensorAlloc =
    retort_model::alloc::TensorAlloc::new(retort_model::alloc::DEFAULT_BUDGET);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    retort_model::alloc::tune_for_tensors();
    ALLOC.set_caching(true);
    let mut args = std::env::args().skip(1);
    let tmp = std::env::temp_dir().join(format!("bench-qlora-{}", std::process::id()));
    let dir = match args.next().filter(|a| a != "tiny") {
        Some(d) => PathBuf::from(d),
        None => retort_model::builtin::materialize("tiny-llama", &tmp)?,
    };
    let rows: usize = args.next().map_or(Ok(4), |a| a.parse())?;
    let len: usize = args.next().map_or(Ok(256), |a| a.parse())?;
    let steps: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    let device = Device::flex().autodiff();
    let spec = retort_lora::AdapterSpec {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        targets: vec![Target::AllLinear],
        variant: Variant::Lora,
    };
    let mut times = Vec::new();
    for nf4 in [false, true] {
        let t = Instant::now();
        let base = if nf4 {
            retort_lora::qlora::load_quantized(&dir, Precision::F32, &device, true)?.0
        } else {
            Transformer::load(&dir, Precision::F32, &device)?.0
        };
        let load_s = t.elapsed().as_secs_f64();
        let vocab = base.config.vocab_size as u32;
        let mut model = retort_lora::attach(base, &spec, 0)?;
        let mut opt = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
        let mb = [micro(rows, len, vocab)];
        // One warm-up step, then the best of `steps`.
        let mut best = f64::INFINITY;
        for s in 0..=steps {
            let t = Instant::now();
            let (next, _) = train_step(model, &mut opt, &mb, 1e-4, 1.0, s as u64);
            model = next;
            if s > 0 {
                best = best.min(t.elapsed().as_secs_f64());
            }
        }
        let base = if nf4 { "nf4" } else { "none" };
        println!(
            "{{\"quantize\": \"{base}\", \"load_s\": {load_s:.3}, \"step_s\": {best:.4}, \"tokens_per_s\": {:.1}}}",
            (rows * len) as f64 / best
        );
        times.push(best);
    }
    println!("{{\"nf4_over_none\": {:.3}}}", times[1] / times[0]);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
