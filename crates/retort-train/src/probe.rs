//! Step time for `retort train --plan`, measured rather than modelled.
//!
//! A step's time depends on far more than its FLOPs: on the CPU backend matmuls are about a third of
//! it, the rest per-operation costs that no FLOP count predicts, and GPUs differ again. So the plan
//! times real training steps, on the chosen device and dtype, of the recipe's exact shape (micro-batch
//! x `max_seq_len`, its adapters, NF4 or not, checkpointing or not), on two stand-ins for the base
//! with random weights: one decoder layer and two. Their difference is one layer's cost; the one-layer
//! step holds everything else (embedding, LM head and loss, the optimizer's fixed part). A step of the
//! real model is then `one + (layers - 1) x (two - one)` per micro-batch, times the accumulation.
//! Nothing is read from the checkpoint and nothing is written.

use std::time::Instant;

use retort_hf::ModelConfig;
use retort_model::burn::tensor::Device;
use retort_model::linear::Weight;
use retort_model::{Batch, ModelError, Precision, Transformer};
use serde::Serialize;

use crate::optim::{AdamW, AdamWConfig};
use crate::run::TrainError;
use crate::step::{MicroBatch, train_step};

/// What the probe measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepTime {
    /// Predicted seconds per optimizer step of the real model.
    pub seconds_per_step: f64,
    /// Measured seconds of one micro-batch on the one-layer model.
    pub one_layer_s: f64,
    /// Measured seconds per extra decoder layer.
    pub per_layer_s: f64,
}

/// The shape to time.
#[derive(Debug, Clone, Copy)]
pub struct ProbeShape {
    /// Rows per micro-batch.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Micro-batches per optimizer step.
    pub accum: usize,
    /// Activation checkpointing.
    pub checkpointing: bool,
    /// Checkpointed layer inputs in host memory (`Transformer::offload_checkpoints`).
    pub offload: bool,
    /// NF4 base projections (QLoRA), with the absmax double-quantized when set.
    pub nf4: Option<bool>,
    /// Adapter products in the base's dtype (`Lora::autocast`).
    pub autocast: bool,
}

/// [`measure`] for a recipe's training shape (micro-batches of `max_seq_len` tokens, as packing fills
/// them) on the base's config; `device` is the plain device the run would use.
pub fn for_recipe(
    recipe: &retort_recipe::Recipe,
    config: &ModelConfig,
    checkpointing: bool,
    offload: bool,
    autocast: bool,
    precision: Precision,
    device: &Device,
) -> Result<StepTime, TrainError> {
    let t = &recipe.train;
    let shape = ProbeShape {
        batch: t.micro_batch_size as usize,
        // As the run pads rows on GPUs.
        seq: crate::run::padded_max_len(t.max_seq_len as usize, !retort_model::device::is_cpu(device)),
        accum: t.grad_accum as usize,
        checkpointing,
        offload,
        nf4: (recipe.base.quantize == retort_recipe::schema::project::Quantize::Nf4)
            .then_some(recipe.base.double_quant),
        autocast,
    };
    let spec = retort_lora::AdapterSpec::from_recipe(&recipe.lora);
    measure(config, &spec, shape, precision, &device.clone().autodiff())
}

/// Times steps of one- and two-layer stand-ins of `config` on `device` (an autodiff device) with the
/// adapters of `lora`, and predicts the real model's step.
pub fn measure(
    config: &ModelConfig,
    lora: &retort_lora::AdapterSpec,
    shape: ProbeShape,
    precision: Precision,
    device: &Device,
) -> Result<StepTime, TrainError> {
    let layers = config.num_layers.max(1);
    let one = time_step(config, 1, lora, shape, precision, device)?;
    let per_layer = if layers > 1 {
        let two = time_step(config, 2, lora, shape, precision, device)?;
        // Timing noise can make the difference tiny or negative on small models; a layer never
        // costs nothing.
        (two - one).max(two * 0.02)
    } else {
        0.0
    };
    let micro = one + (layers - 1) as f64 * per_layer;
    Ok(StepTime {
        seconds_per_step: micro * shape.accum.max(1) as f64,
        one_layer_s: one,
        per_layer_s: per_layer,
    })
}

/// Seconds of one training step (one micro-batch) of a `layers`-layer stand-in, after one untimed
/// step (first-use costs: kernels, allocator pools).
fn time_step(
    config: &ModelConfig,
    layers: usize,
    lora: &retort_lora::AdapterSpec,
    shape: ProbeShape,
    precision: Precision,
    device: &Device,
) -> Result<f64, TrainError> {
    let model = stand_in(config, layers, shape.nf4, precision, device)?;
    let mut model = retort_lora::attach(model, lora, 0)?.with_lora_autocast(shape.autocast);
    model.checkpoint_layers = shape.checkpointing;
    model.offload_checkpoints = shape.offload;
    let vocab = config.vocab_size as u64;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let rows: Vec<Vec<u32>> = (0..shape.batch.max(1))
        .map(|_| (0..shape.seq.max(2)).map(|_| (next(&mut state) % vocab) as u32).collect())
        .collect();
    let batch = Batch::left_padded(&rows, 0);
    let mb = MicroBatch { labels: batch.ids.iter().map(|&x| i64::from(x)).collect(), batch };
    let micro = std::slice::from_ref(&mb);
    let mut opt = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
    let (mut model, _) = train_step(model, &mut opt, micro, 1e-4, 1.0, 0);
    // The faster of two: a stray pause in either (the OS, another process) would be multiplied by the
    // number of layers.
    let mut best = f64::INFINITY;
    for _ in 0..2 {
        let t = Instant::now();
        (model, _) = train_step(model, &mut opt, micro, 1e-4, 1.0, 0);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// A `layers`-layer model of `config`'s shapes with small random weights.
fn stand_in(
    config: &ModelConfig,
    layers: usize,
    nf4: Option<bool>,
    precision: Precision,
    device: &Device,
) -> Result<Transformer, TrainError> {
    let mut c = config.clone();
    c.num_layers = layers.min(config.num_layers.max(1));
    c.layers.truncate(c.num_layers);
    let specs = retort_hf::names::tensors(&c);
    let fetch = |spec: &retort_hf::TensorSpec| -> Result<Vec<f32>, ModelError> {
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ spec.numel() as u64;
        Ok((0..spec.numel())
            .map(|_| ((next(&mut state) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04)
            .collect())
    };
    let model = Transformer::from_tensors(&c, &specs, precision, device, &fetch)?;
    let Some(double_quant) = nf4 else { return Ok(model) };
    // QLoRA: the projections in NF4, as `load_quantized` would leave them.
    let dtype = precision.dtype();
    let mut failed = None;
    let model = model.map_linears(&mut |site, mut lin| {
        let Weight::Dense(w) = &lin.weight else { return lin };
        let dims = w.val().dims();
        let values = w.val().into_data().convert::<f32>().try_to_vec::<f32>().unwrap_or_default();
        match retort_lora::nf4::quantize(&values, &dims, retort_lora::nf4::DEFAULT_BLOCKSIZE, double_quant)
            .map_err(|e| e.to_string())
            .and_then(|q| retort_lora::qlora::to_device(&q, dtype, device).map_err(|e| e.to_string()))
        {
            Ok(q) => lin.weight = Weight::Nf4(q),
            Err(e) => failed = Some(format!("{}: {e}", site.path)),
        }
        lin
    });
    match failed {
        Some(e) => {
            Err(TrainError::Model(ModelError::Input(format!("cannot build the step-time probe: {e}"))))
        }
        None => Ok(model),
    }
}

/// xorshift64*: cheap, deterministic values for random weights and token ids.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;
    use retort_recipe::schema::lora::{Target, Variant};

    #[test]
    fn qlora_stand_ins_have_the_asked_layers_in_nf4_and_train() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = retort_model::builtin::materialize("tiny-llama", &tmp.path().join("m")).unwrap();
        let config = ModelConfig::load(&dir).unwrap();
        assert!(config.num_layers > 2, "the probe must stand in for a deeper model");
        let device = Device::flex().autodiff();
        let model = stand_in(&config, 2, Some(true), Precision::F32, &device).unwrap();
        assert_eq!((model.layers.len(), model.config.num_layers), (2, 2));
        let mut projections = 0;
        let _ = model.map_linears(&mut |site, lin| {
            assert!(matches!(lin.weight, Weight::Nf4(_)), "{} is not NF4", site.path);
            projections += 1;
            lin
        });
        assert_eq!(projections, 2 * 7, "q, k, v, o, gate, up, down of two layers");

        let lora = retort_lora::AdapterSpec {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec![Target::AllLinear],
            variant: Variant::Lora,
        };
        let shape = ProbeShape {
            batch: 2,
            seq: 16,
            accum: 3,
            checkpointing: true,
            offload: false,
            nf4: Some(true),
            autocast: false,
        };
        let t = measure(&config, &lora, shape, Precision::F32, &device).unwrap();
        assert!(t.one_layer_s > 0.0 && t.per_layer_s > 0.0, "{t:?}");
        // The prediction is the one-layer step plus the other layers, for every micro-batch.
        let micro = t.one_layer_s + (config.num_layers - 1) as f64 * t.per_layer_s;
        assert!((t.seconds_per_step - 3.0 * micro).abs() <= 1e-12 * micro, "{t:?}");
    }
}
