//! One optimizer step: forward and backward over the micro-batches of the step, gradients summed, the
//! loss normalised by the label tokens of the whole step (so micro-batch 1 x accumulation 4 equals
//! micro-batch 4 x accumulation 1), clipped by global norm, then AdamW on every adapter weight.

use std::collections::BTreeMap;

use retort_model::burn::module::{Module as _, Param};
use retort_model::burn::tensor::{GradientCheckpointingStrategy, Gradients, Int, Tensor, TensorData};
use retort_model::{Batch, Transformer};

use crate::loss::{label_chunks, label_positions, nll_of};
use crate::optim::{AdamW, clip};
use crate::scaler::{LossScaler, Verdict};

/// A micro-batch: the model input and its labels (`[rows * len]`, -100 for none).
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// Tokens, positions, padding and segments.
    pub batch: Batch,
    /// Labels, row-major, not shifted.
    pub labels: Vec<i64>,
}

impl MicroBatch {
    /// Label tokens that carry loss (after the one-token shift).
    pub fn label_tokens(&self) -> usize {
        label_positions(&self.labels, self.batch.rows, self.batch.len).0.len()
    }
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss per label token over the step.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Label tokens of the step.
    pub label_tokens: usize,
    /// False when the loss or gradient was not finite: the adapters were left untouched.
    pub applied: bool,
    /// Skipped because the loss-scaled gradients overflowed ([`crate::scaler`]); the scale was halved.
    /// Such a skip is part of how loss scaling works, not a sign of a diverging run.
    pub overflow: bool,
}

/// The names of a projection's adapter weights (the PEFT keys without `base_model.model.`).
pub fn param_names(path: &str) -> [String; 3] {
    [
        format!("{path}.lora_A.weight"),
        format!("{path}.lora_B.weight"),
        format!("{path}.lora_magnitude_vector"),
    ]
}

/// Serialises use of the backend's process-wide random source (see [`gradients`]).
static DROPOUT_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Loss and summed gradients of a step's micro-batches, by parameter name (flattened, on the inner
/// device). The loss of each micro-batch is divided by the label tokens of the whole step.
pub fn gradients(
    model: &Transformer,
    micro: &[MicroBatch],
    seed: u64,
) -> (f64, usize, BTreeMap<String, Tensor<1>>) {
    gradients_scaled(model, micro, seed, 1.0)
}

/// [`gradients`] of the loss multiplied by `scale` (loss scaling, [`crate::scaler`]); the loss returned
/// is not scaled, the gradients are.
pub fn gradients_scaled(
    model: &Transformer,
    micro: &[MicroBatch],
    seed: u64,
    scale: f64,
) -> (f64, usize, BTreeMap<String, Tensor<1>>) {
    gradients_inner(model, micro, seed, head_chunk_bytes(&model.device()), scale)
}

/// [`gradients`] with the LM head's logits computed `head_chunk_bytes` (f32) at a time: at least one
/// label position per chunk.
pub fn gradients_with_head_chunk(
    model: &Transformer,
    micro: &[MicroBatch],
    seed: u64,
    head_chunk_bytes: usize,
) -> (f64, usize, BTreeMap<String, Tensor<1>>) {
    gradients_inner(model, micro, seed, head_chunk_bytes, 1.0)
}

fn gradients_inner(
    model: &Transformer,
    micro: &[MicroBatch],
    seed: u64,
    head_chunk_bytes: usize,
    scale: f64,
) -> (f64, usize, BTreeMap<String, Tensor<1>>) {
    let total: usize = micro.iter().map(MicroBatch::label_tokens).sum();
    let mut grads: BTreeMap<String, Tensor<1>> = BTreeMap::new();
    let mut loss_sum = 0f64;
    if total == 0 {
        return (0.0, 0, grads);
    }
    for (i, mb) in micro.iter().enumerate() {
        let mb_seed = seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        let value = if model.checkpoint_layers {
            layer_by_layer(model, mb, total, mb_seed, head_chunk_bytes, scale, &mut grads)
        } else {
            // burn's random source is one per process, not per device or thread: hold it while
            // seeding and drawing this micro-batch's dropout masks (all drawn in the forward), or two
            // trainings in one process (tests, a service) interleave their draws and neither is
            // reproducible.
            let hidden = {
                let _rng = DROPOUT_RNG.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                model.device().seed(mb_seed);
                model.hidden_train(&mb.batch)
            };
            let Some((value, upstream)) = head_in_chunks(
                model,
                hidden.clone().inner(),
                false,
                &mb.labels,
                (total, scale),
                head_chunk_bytes,
                &mut grads,
            ) else {
                continue;
            };
            let g = (hidden * onto_graph(model, upstream)).sum().backward();
            collect(model, &g, &mut grads);
            Some(value)
        };
        loss_sum += value.unwrap_or(0.0);
    }
    (loss_sum, total, grads)
}

/// Adds the adapter gradients of `g` to `grads`.
fn collect(model: &Transformer, g: &Gradients, grads: &mut BTreeMap<String, Tensor<1>>) {
    model.visit_linears(&mut |site, lin| {
        let Some(l) = &lin.lora else { return };
        let [na, nb, nm] = param_names(&site.path);
        let mut add = |name: String, grad: Option<Tensor<1>>| {
            if let Some(grad) = grad {
                let grad = grad.inner();
                let acc = match grads.remove(&name) {
                    Some(prev) => prev + grad,
                    None => grad,
                };
                grads.insert(name, acc);
            }
        };
        add(na, l.a.val().grad(g).map(|t| t.reshape([-1])));
        add(nb, l.b.val().grad(g).map(|t| t.reshape([-1])));
        if let Some(m) = &l.magnitude {
            add(nm, m.val().grad(g));
        }
    });
}

/// One micro-batch with each layer recomputed in the backward pass (`Transformer::checkpoint_layers`),
/// as transformers' gradient checkpointing does: a forward without autodiff keeps only each layer's
/// input; the loss head runs on the last layer's output and gives its gradient `g`; then, from the
/// last layer down, the layer runs again from its saved input under autodiff and `sum(y * g)` is
/// differentiated, which yields that layer's adapter gradients and the gradient of its input, the
/// next `g`. Peak memory is every layer's input (on the device, or in host memory with
/// `Transformer::offload_checkpoints`) plus one layer's graph; where the layer's MLP runs in chunks of
/// positions ([`Transformer::mlp_chunks`]: long sequences), its attention half's graph plus one
/// chunk's MLP graph. Dropout masks are drawn from a seed per layer, so both passes of a layer draw the
/// same ones. Returns the micro-batch's loss, or `None` when it has no label tokens.
fn layer_by_layer(
    model: &Transformer,
    mb: &MicroBatch,
    total: usize,
    seed: u64,
    head_chunk_bytes: usize,
    scale: f64,
    grads: &mut BTreeMap<String, Tensor<1>>,
) -> Option<f64> {
    let layers = model.config.num_layers;
    let device = model.device();
    let layer_seed = |i: usize| seed.wrapping_mul(0x9e37_79b9).wrapping_add(i as u64 + 1);
    let frozen = model.valid();
    let plain_inputs = frozen.train_inputs(&mb.batch);
    let mut x = frozen.embed_tokens(&mb.batch);
    let mut saved = Vec::with_capacity(layers);
    for i in 0..layers {
        let input = x.clone();
        {
            let _rng = DROPOUT_RNG.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            device.seed(layer_seed(i));
            x = frozen.layer_train(i, x, &plain_inputs);
        }
        // Read back after the layer is queued, so that a GPU has the next work waiting.
        saved.push(Saved::keep(input, model.offload_checkpoints));
    }
    drop(plain_inputs);
    // The loss head: final norm, LM head, cross-entropy.
    let (value, mut upstream) =
        head_in_chunks(model, x, true, &mb.labels, (total, scale), head_chunk_bytes, grads)?;

    let inputs = model.train_inputs(&mb.batch);
    let chunks = model.mlp_chunks(mb.batch.rows * mb.batch.len);
    for i in (0..layers).rev() {
        let input = onto_graph(model, saved.pop()?.restore(&frozen.device())).require_grad();
        // The layer's draws must repeat the forward's, in its order: attention, then the MLP's chunks.
        let _rng = DROPOUT_RNG.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        device.seed(layer_seed(i));
        let g = if chunks.len() <= 1 {
            let y = model.layer_train(i, input.clone(), &inputs);
            (y * onto_graph(model, upstream)).sum().backward()
        } else {
            // The attention half's graph stays while the MLP's chunks are differentiated one by one.
            let h = model.layer_attention_train(i, input.clone(), &inputs);
            let gh = mlp_backward_in_chunks(model, i, h.clone().inner(), upstream, &chunks, grads)?;
            (h * onto_graph(model, gh)).sum().backward()
        };
        collect(model, &g, grads);
        upstream = input.grad(&g)?.inner();
    }
    Some(value)
}

/// A layer input kept for the backward pass: on the device, or in host memory
/// ([`Transformer::offload_checkpoints`]).
enum Saved {
    Device(Tensor<3>),
    Host(TensorData),
}

impl Saved {
    fn keep(x: Tensor<3>, offload: bool) -> Saved {
        if offload { Saved::Host(x.into_data()) } else { Saved::Device(x) }
    }

    /// The tensor on `device` (the inner backend's), in the dtype it was saved in.
    fn restore(self, device: &retort_model::burn::tensor::Device) -> Tensor<3> {
        match self {
            Saved::Device(x) => x,
            Saved::Host(data) => {
                let dtype = data.dtype();
                Tensor::from_data(data, (device, dtype))
            }
        }
    }
}

/// The MLP half of layer `i` over the attention half's output `h` (inner backend), a chunk of
/// positions at a time, each chunk differentiated on its own against its rows of `upstream` (the
/// gradient of the layer's output): only one chunk's MLP graph exists at once. Adds the MLP's adapter
/// gradients to `grads`; returns the gradient with respect to `h`.
fn mlp_backward_in_chunks(
    model: &Transformer,
    i: usize,
    h: Tensor<3>,
    upstream: Tensor<3>,
    chunks: &[std::ops::Range<usize>],
    grads: &mut BTreeMap<String, Tensor<1>>,
) -> Option<Tensor<3>> {
    let [b, s, d] = h.dims();
    let (h, upstream) = (h.reshape([1, b * s, d]), upstream.reshape([1, b * s, d]));
    let mut parts = Vec::with_capacity(chunks.len());
    for r in chunks {
        let hc = onto_graph(model, h.clone().narrow(1, r.start, r.len())).require_grad();
        let y = model.layer_mlp_train(i, hc.clone());
        let g = (y * onto_graph(model, upstream.clone().narrow(1, r.start, r.len()))).sum().backward();
        collect(model, &g, grads);
        parts.push(hc.grad(&g)?.inner());
    }
    Some(Tensor::cat(parts, 1).reshape([b, s, d]))
}

/// A tensor of the inner backend back on the model's autodiff device, untracked, with the model's
/// gradient-checkpointing strategy.
fn onto_graph<const D: usize>(model: &Transformer, t: Tensor<D>) -> Tensor<D> {
    with_strategy(t, model.embed.val().gradient_checkpointing_strategy())
}

/// A tensor of the inner backend on the autodiff device with `strategy`: `from_inner` alone gives the
/// default (none), and burn refuses to combine tensors of two strategies, so a checkpointed device's
/// tensors must all carry its strategy.
fn with_strategy<const D: usize>(
    inner: Tensor<D>,
    strategy: Option<GradientCheckpointingStrategy>,
) -> Tensor<D> {
    let t = Tensor::from_inner(inner);
    match strategy {
        Some(s) => t.with_gradient_checkpointing_strategy(s),
        None => t,
    }
}

pub use retort_model::memory::{HEAD_CHUNK_BYTES, head_chunk_bytes};

/// The loss head over hidden states `x` (`[rows, len, hidden]`, inner backend; the final norm applied
/// first when `norm`), a chunk of label positions at a time, each chunk differentiated on its own:
/// only one chunk's logits and log-softmax exist at once instead of every label position's (for a
/// 32k vocabulary and 2,048 label tokens, 32 MiB instead of 0.75 GiB). Adds the LM head's adapter
/// gradients to `grads`; returns the loss (divided by `total`) and its gradient with respect to `x`,
/// both of the loss multiplied by `scale` (the value returned is not).
fn head_in_chunks(
    model: &Transformer,
    x: Tensor<3>,
    norm: bool,
    labels: &[i64],
    (total, scale): (usize, f64),
    chunk_bytes: usize,
    grads: &mut BTreeMap<String, Tensor<1>>,
) -> Option<(f64, Tensor<3>)> {
    let [rows, len, h] = x.dims();
    let chunks = label_chunks(labels, rows, len, model.config.vocab_size, chunk_bytes);
    let x = onto_graph(model, x).require_grad();
    let device = x.device();
    // The loss is summed on the device and read once: a read per chunk would wait on a GPU each time.
    let mut value: Option<Tensor<1>> = None;
    let mut upstream: Option<Tensor<3>> = None;
    for (p, t) in chunks {
        let n = p.len();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(p, [n]), &device);
        let selected = x.clone().reshape([rows * len, h]).select(0, idx).reshape([1, n, h]);
        let selected = if norm { model.final_norm(selected) } else { selected };
        let loss = nll_of(model, selected, t).div_scalar(total as f64);
        let detached = loss.clone().inner();
        value = Some(match value {
            Some(v) => v + detached,
            None => detached,
        });
        let g = if scale == 1.0 { loss.backward() } else { loss.mul_scalar(scale).backward() };
        collect(model, &g, grads);
        let gx = x.grad(&g)?.inner();
        upstream = Some(match upstream {
            Some(u) => u + gx,
            None => gx,
        });
    }
    let value = f64::from(value?.into_scalar::<f32>());
    Some((value, upstream?))
}

/// Applies AdamW to every adapter weight that has a gradient.
pub fn apply(
    model: Transformer,
    opt: &mut AdamW,
    grads: &BTreeMap<String, Tensor<1>>,
    lr: f64,
) -> Transformer {
    opt.begin_step();
    let update2 = |name: &str, p: Param<Tensor<2>>, opt: &mut AdamW| -> Param<Tensor<2>> {
        let Some(g) = grads.get(name) else { return p };
        let (id, t, mapper) = p.consume();
        let shape = t.dims();
        let strategy = t.gradient_checkpointing_strategy();
        let flat = t.inner().reshape([-1]);
        let new = opt.update(name, flat, g.clone(), lr).reshape(shape);
        Param::from_mapped_value(id, with_strategy(new, strategy).require_grad(), mapper)
    };
    let update1 = |name: &str, p: Param<Tensor<1>>, opt: &mut AdamW| -> Param<Tensor<1>> {
        let Some(g) = grads.get(name) else { return p };
        let (id, t, mapper) = p.consume();
        let strategy = t.gradient_checkpointing_strategy();
        let new = opt.update(name, t.inner(), g.clone(), lr);
        Param::from_mapped_value(id, with_strategy(new, strategy).require_grad(), mapper)
    };
    model.map_linears(&mut |site, mut lin| {
        if let Some(mut l) = lin.lora.take() {
            let [na, nb, nm] = param_names(&site.path);
            l.a = update2(&na, l.a, opt);
            l.b = update2(&nb, l.b, opt);
            l.magnitude = l.magnitude.map(|m| update1(&nm, m, opt));
            lin.lora = Some(l);
        }
        lin
    })
}

/// Runs the step. `model` must live on an autodiff device with trainable adapters. `seed` makes
/// adapter dropout deterministic (each micro-batch reseeds the device from it), so a resumed run
/// repeats the same computation. A step whose loss or gradient is not finite changes nothing.
pub fn train_step(
    model: Transformer,
    opt: &mut AdamW,
    micro: &[MicroBatch],
    lr: f64,
    max_grad_norm: f64,
    seed: u64,
) -> (Transformer, StepStats) {
    step_with(model, opt, micro, (lr, max_grad_norm), seed, None)
}

/// [`train_step`] with dynamic loss scaling (a base in f16, [`crate::scaler`]): the backward pass
/// runs on the loss times `scaler.scale`, the gradients are divided by it before clipping, and a step
/// whose gradients overflow is skipped with `overflow` set while the scale backs off.
pub fn train_step_scaled(
    model: Transformer,
    opt: &mut AdamW,
    micro: &[MicroBatch],
    lr: f64,
    max_grad_norm: f64,
    seed: u64,
    scaler: &mut LossScaler,
) -> (Transformer, StepStats) {
    step_with(model, opt, micro, (lr, max_grad_norm), seed, Some(scaler))
}

fn step_with(
    model: Transformer,
    opt: &mut AdamW,
    micro: &[MicroBatch],
    (lr, max_grad_norm): (f64, f64),
    seed: u64,
    scaler: Option<&mut LossScaler>,
) -> (Transformer, StepStats) {
    let scale = scaler.as_ref().map_or(1.0, |s| s.scale);
    let (loss, total, mut grads) = gradients_scaled(&model, micro, seed, scale);
    let skipped = |loss, grad_norm, overflow| StepStats {
        loss,
        grad_norm,
        label_tokens: total,
        applied: false,
        overflow,
    };
    if total == 0 {
        return (model, skipped(0.0, 0.0, false));
    }
    if scale != 1.0 {
        for g in grads.values_mut() {
            *g = g.clone().div_scalar(scale);
        }
    }
    let grad_norm = clip(&mut grads, max_grad_norm);
    // A non-finite loss comes from the forward pass, which no scale changes.
    if !loss.is_finite() {
        return (model, skipped(loss, grad_norm, false));
    }
    match scaler.map(|s| s.update(grad_norm.is_finite())) {
        Some(Verdict::Overflow) => return (model, skipped(loss, grad_norm, true)),
        Some(Verdict::NonFinite) => return (model, skipped(loss, grad_norm, false)),
        Some(Verdict::Apply) => {}
        None if !grad_norm.is_finite() => return (model, skipped(loss, grad_norm, false)),
        None => {}
    }
    let model = apply(model, opt, &grads, lr);
    (model, StepStats { loss, grad_norm, label_tokens: total, applied: true, overflow: false })
}
