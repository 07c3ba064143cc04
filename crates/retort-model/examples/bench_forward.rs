//! Forward-pass timings for `scripts/bench_forward.sh`: prefill (batch 4 x 512) and decode (batches 1
//! and 8) of a model directory on the CPU, printed as one JSON object. Not a test: timings vary.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::time::Instant;

use retort_model::burn::tensor::{DType, Device};
use retort_model::{Batch, GenerateOptions, Precision, Sampling, Transformer, generate};

#[global_allocator]
static ALLOC: retort_model::alloc::TensorAlloc =
    retort_model::alloc::TensorAlloc::new(retort_model::alloc::DEFAULT_BUDGET);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    retort_model::alloc::tune_for_tensors();
    ALLOC.set_caching(true);
    let dir = std::env::args().nth(1).ok_or("usage: bench_forward MODEL_DIR")?;
    let device = Device::flex();
    let (model, _) = Transformer::load(std::path::Path::new(&dir), Precision::F32, &device)?;
    let vocab = model.config.vocab_size as u32;
    let prompt = |seed: u32, len: usize| -> Vec<u32> {
        (0..len as u32).map(|i| (i * 7919 + seed * 104729) % vocab).collect()
    };

    // Prefill: 4 x 512, logits of every position, as a training forward would compute.
    let batch = Batch::left_padded(&(0..4).map(|s| prompt(s, 512)).collect::<Vec<_>>(), 0);
    let run = || {
        let l = model.forward(&batch, None);
        let _ = l.cast(DType::F32).into_data();
    };
    run(); // warm-up
    let reps = 3;
    let t = Instant::now();
    for _ in 0..reps {
        run();
    }
    let prefill_s = t.elapsed().as_secs_f64() / reps as f64;

    let decode = |rows: usize| -> Result<f64, Box<dyn std::error::Error>> {
        let prompts: Vec<Vec<u32>> = (0..rows as u32).map(|s| prompt(s, 32)).collect();
        let new = 64;
        let opts = GenerateOptions { max_new_tokens: new, sampling: Sampling::greedy(), eos: vec![], pad: 0 };
        let _ =
            generate(&model, &prompts, &GenerateOptions { max_new_tokens: 4, ..opts.clone() }, |_, _| {})?;
        // Time decode steps only: total minus a prefill-plus-one-token run.
        let t = Instant::now();
        let _ =
            generate(&model, &prompts, &GenerateOptions { max_new_tokens: 1, ..opts.clone() }, |_, _| {})?;
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = generate(&model, &prompts, &opts, |_, _| {})?;
        let total = t.elapsed().as_secs_f64();
        Ok((rows * (new - 1)) as f64 / (total - prefill))
    };
    let d1 = decode(1)?;
    let d8 = decode(8)?;
    println!(
        "{}",
        serde_json::json!({
            "prefill_tokens_per_s": (4.0 * 512.0) / prefill_s,
            "decode_b1_tokens_per_s": d1,
            "decode_b8_tokens_per_s": d8,
            "parameters": model.config.parameter_count(),
        })
    );
    Ok(())
}
