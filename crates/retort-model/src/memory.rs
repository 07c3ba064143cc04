//! A first-order estimate of peak memory for LoRA and QLoRA training, for `retort train --plan` and
//! `retort inspect model`. It counts what dominates: frozen weights, adapter weights with gradients and
//! AdamW state, the tensors autodiff keeps for the backward pass (as retort's forward records them),
//! and the logits. Allocator overhead and short-lived temporaries are not modelled, so it reads a
//! little low: on the 125M-parameter benchmark of `scripts/bench_train.sh` (f32 on the CPU, no
//! checkpointing) it is within 10% of the measured peak resident set.

use retort_hf::ModelConfig;

use crate::attention::SCORE_CHUNK_BYTES;

/// Training computes the LM head's f32 logits this many bytes at a time (a chunk of label positions)
/// on the CPU: a chunk's logits, log-softmax and gradient stay near the caches.
pub const HEAD_CHUNK_BYTES: usize = 32 << 20;

/// The same on a GPU. Each chunk reads the whole LM head weight forward and backward (0.5 GiB for a
/// 128k-vocabulary bf16 head of width 2048) in a matmul of a chunk's positions: at 32 MiB that is 65
/// positions, a thin matmul and 250 weight reads per 8k-token micro-batch; at 512 MiB, 16 reads of
/// 1,046 positions for 1.5 GiB of f32 logits, log-softmax and gradient at once.
pub const GPU_HEAD_CHUNK_BYTES: usize = 512 << 20;

/// The LM-head chunk for training on `device`: [`HEAD_CHUNK_BYTES`] on the CPU,
/// [`GPU_HEAD_CHUNK_BYTES`] elsewhere.
pub fn head_chunk_bytes(device: &burn::tensor::Device) -> usize {
    if crate::device::is_cpu(device) { HEAD_CHUNK_BYTES } else { GPU_HEAD_CHUNK_BYTES }
}

/// Bytes by category.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MemoryEstimate {
    /// Frozen base weights.
    pub weights: f64,
    /// LoRA weights, gradients and AdamW moments (f32).
    pub adapters: f64,
    /// Activations kept for the backward pass.
    pub activations: f64,
    /// Logits, log-softmax and gradient (f32) of one chunk of label positions.
    pub logits: f64,
    /// What the process holds before any tensor, on the CPU ([`CPU_PROCESS_BYTES`]); 0 on a GPU.
    pub process: f64,
}

impl MemoryEstimate {
    /// Everything.
    pub fn total(&self) -> f64 {
        self.weights + self.adapters + self.activations + self.logits + self.process
    }
}

/// What is being trained.
#[derive(Debug, Clone, Copy)]
pub struct TrainShape {
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// LoRA rank on every linear layer.
    pub rank: usize,
    /// NF4 base (QLoRA) instead of 16-bit.
    pub nf4: bool,
    /// Activation checkpointing (keep only each layer's input).
    pub checkpointing: bool,
    /// With checkpointing, the layer inputs wait in host memory (`Transformer::offload_checkpoints`):
    /// the device holds one at a time.
    pub offload: bool,
    /// Bytes per value of the base weights and activations: 4 for f32 (the CPU), 2 for bf16/f16.
    pub dtype_bytes: usize,
    /// Attention recorded as one operation (`attention_grad`: f32 on the CPU), which keeps no
    /// statistics between forward and backward, instead of the blockwise form (`attention_mem`); SiLU
    /// models' SwiGLU then is one operation too (`swiglu`), which keeps two fewer tensors.
    pub fused_attention: bool,
    /// Bytes of f32 logits computed at once ([`head_chunk_bytes`] of the device).
    pub head_chunk_bytes: usize,
    /// Bytes of one MLP intermediate tensor computed at once (`Transformer::mlp_chunk_bytes`,
    /// [`MLP_CHUNK_BYTES`] unless changed).
    pub mlp_chunk_bytes: usize,
    /// Training on the CPU, where the peak is the process's resident memory, its own included.
    pub cpu: bool,
    /// LoRA dropout is on: each adapter keeps its own dropout mask and masked input for the backward.
    pub dropout: bool,
    /// The adapters' products run in the base's dtype ([`crate::lora::Lora::autocast`]). Off, with a
    /// 16-bit base, each adapter casts its input to f32 and keeps that copy for the backward.
    pub autocast: bool,
}

/// Resident memory of a retort process before it loads a model: code, thread stacks, allocator arenas.
/// `bench_train` on Linux holds 0.11 GiB more than its weights right after loading them.
pub const CPU_PROCESS_BYTES: f64 = 100.0 * (1 << 20) as f64;

/// Estimates peak training memory of a model.
pub fn estimate(c: &ModelConfig, s: TrainShape) -> MemoryEstimate {
    let specs = retort_hf::names::tensors(c);
    let mut linear = 0f64;
    let mut other = 0f64;
    let mut adapter_params = 0f64;
    // Adapters, and the sum of their input widths, over all layers.
    let (mut adapters, mut adapter_inputs) = (0f64, 0f64);
    for t in &specs {
        let n = t.numel() as f64;
        if t.peft_target.is_some() {
            linear += n;
            let (out, inp) = (t.shape[0] as f64, t.shape[1] as f64);
            adapter_params += s.rank as f64 * (out + inp);
            adapters += 1.0;
            adapter_inputs += inp;
        } else {
            other += n;
        }
    }
    let b = s.dtype_bytes as f64;
    // NF4: 4 bits per weight plus double-quantized scales (~0.127 bits); other tensors stay in `dtype`.
    let weights = if s.nf4 { linear * 4.127 / 8.0 + other * b } else { (linear + other) * b };
    let layers = c.num_layers.max(1) as f64;
    let (adapters_per_layer, adapter_inputs_per_layer) = (adapters / layers, adapter_inputs / layers);
    // f32 weight, gradient and two AdamW moments.
    let adapters = adapter_params * 16.0;
    let tokens = (s.batch * s.seq) as f64;
    let h = c.hidden_size as f64;
    let ff = c.intermediate_size as f64;
    let heads = c.num_heads as f64;
    let q = (c.num_heads * c.head_dim) as f64;
    let kv = (c.num_kv_heads * c.head_dim) as f64;
    // What one layer's backward needs, in `dtype`: each of the two norms keeps its input, the
    // normalised values and its output (the projections' input), or only input and output where the
    // norm is one recorded operation (`norm_cpu`, with the CPU's fused attention); attention keeps q and
    // k after RoPE, v and its output (o_proj's input); the gated MLP keeps gate, its sigmoid, the
    // activation, up and their product (down_proj's input), or only gate, up and product where SwiGLU
    // is one recorded operation (`swiglu`, with the CPU's fused attention). In f32 whatever the dtype:
    // the softmax statistics of blockwise attention (`attention_mem`). Each adapter keeps its
    // scaled `x A^T`, in the dtype its products run in (f32 unless autocast).
    //
    // The projections' inputs counted above (the norms' outputs, attention's output and the MLP's
    // product) are kept only because the adapters read them, and only when the adapters run in the
    // base's dtype. Otherwise each adapter keeps its own f32 copy of its input instead; with dropout,
    // its own mask and masked input, except where the projection and its adapter are one operation
    // (`dense::project_lora`, with the CPU's fused attention), which keeps the shared input and its
    // mask as bits.
    // Attention elsewhere (`attention_mem`) keeps two f32 statistics per query row and head.
    let kept_scores = if s.fused_attention { 0.0 } else { tokens * heads * 8.0 };
    let mlp_kept = if s.fused_attention && c.activation == retort_hf::Activation::Silu { 3.0 } else { 5.0 };
    let norm_kept = if s.fused_attention { 4.0 } else { 6.0 };
    let adapter_b = if s.autocast { b } else { 4.0 };
    let projection_inputs = tokens * (2.0 * h + q + ff) * b;
    let adapter_inputs = tokens * adapter_inputs_per_layer * adapter_b;
    let inputs_instead = if s.dropout && s.fused_attention {
        tokens * adapter_inputs_per_layer / 8.0
    } else if s.dropout {
        2.0 * adapter_inputs - projection_inputs
    } else if adapter_b != b {
        adapter_inputs - projection_inputs
    } else {
        0.0
    };
    let per_layer = tokens * (norm_kept * h + 2.0 * q + 2.0 * kv + mlp_kept * ff) * b
        + kept_scores
        + tokens * adapters_per_layer * s.rank as f64 * adapter_b
        + inputs_instead;
    // Plus, during the backward pass, one layer's worth of gradients of those tensors (and, with
    // checkpointing, the one layer recomputed at a time). Where the MLP runs in chunks of positions
    // (`model::mlp_chunks`), checkpointing differentiates one chunk's MLP at a time while the
    // attention half's graph waits, then the attention half with the MLP's gradient (`tokens x h`)
    // beside it; the MLP's share of a layer is taken as its share of the 16-bit tensors kept.
    let chunk =
        crate::model::mlp_chunks(s.batch * s.seq, c.intermediate_size, s.dtype_bytes, s.mlp_chunk_bytes)
            .first()
            .map_or(0, |r| r.len()) as f64;
    let recomputed = if chunk < tokens {
        let mlp_share =
            (norm_kept / 2.0 * h + mlp_kept * ff) / (norm_kept * h + 2.0 * q + 2.0 * kv + mlp_kept * ff);
        let attention = per_layer * (1.0 - mlp_share);
        let mlp_chunk = per_layer * mlp_share * chunk / tokens;
        (attention + 2.0 * mlp_chunk).max(2.0 * attention) + tokens * h * b
    } else {
        2.0 * per_layer
    };
    let saved_inputs = if s.offload { 1.0 } else { c.num_layers as f64 };
    // Beside the recomputed layer: the gradients of its output and of its input (`tokens x h` each),
    // which matter at long contexts (1.2 GB each for 145k tokens of width 4096 in bf16).
    let residual_grads = 2.0 * tokens * h * b;
    let activations = if s.checkpointing {
        saved_inputs * tokens * h * b + recomputed + residual_grads
    } else {
        (c.num_layers + 1) as f64 * per_layer
    };
    // The fused attention's backward (`cpu_attention`) recomputes probabilities a block of query rows
    // at a time and holds, for one layer, each query head's f32 key and value gradients before they
    // are summed onto the key/value heads.
    let head_grads = 2.0 * tokens * q * 4.0;
    // `attention_mem`'s backward holds one block's f32 scores about four times over (scores,
    // probabilities, their gradient, and 16-bit copies) and f32 key and value gradients of one layer.
    let rows = crate::attention_mem::block_rows(s.batch, c.num_heads, s.seq, s.seq, SCORE_CHUNK_BYTES);
    let block = (s.batch * c.num_heads * rows * s.seq) as f64 * 4.0;
    let blockwise = 4.0 * block + 2.0 * tokens * kv * 4.0;
    let activations = activations + if s.fused_attention { head_grads } else { blockwise };
    // f32 logits, their log-softmax (kept) and its gradient, for one chunk of label positions; the
    // CPU's cross-entropy (`xent`, with the fused attention) keeps no log-softmax.
    let kept = if s.fused_attention { 2.0 } else { 3.0 };
    let logits = (tokens * c.vocab_size as f64 * 4.0).min(s.head_chunk_bytes as f64) * kept;
    let process = if s.cpu { CPU_PROCESS_BYTES } else { 0.0 };
    MemoryEstimate { weights, adapters, activations, logits, process }
}

/// The most [`longest_context`] reports: 4M tokens, less 64.
pub const LONGEST_CONTEXT_CAP: usize = ((1 << 16) - 1) * 64;

/// The longest row (`shape.seq`, a multiple of 64 tokens) whose estimated peak is at most `budget`
/// bytes, up to [`LONGEST_CONTEXT_CAP`]; 0 when not even 64 tokens fit.
pub fn longest_context(c: &ModelConfig, shape: TrainShape, budget: f64) -> usize {
    let fits = |seq: usize| estimate(c, TrainShape { seq, ..shape }).total() <= budget;
    if !fits(64) {
        return 0;
    }
    // In units of 64 tokens: `lo` fits, `hi` does not (or is the limit).
    let (mut lo, mut hi) = (1usize, 1usize << 16);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid * 64) { lo = mid } else { hi = mid }
    }
    lo * 64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MLP_CHUNK_BYTES;

    #[test]
    fn nf4_is_about_a_quarter_of_bf16_weights_and_checkpointing_saves_activations() {
        let c = ModelConfig::parse(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,
            "num_attention_heads":32,"num_key_value_heads":8,"vocab_size":128256}"#,
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let shape = TrainShape {
            batch: 1,
            seq: 2048,
            rank: 16,
            nf4: false,
            checkpointing: true,
            offload: false,
            dtype_bytes: 2,
            fused_attention: false,
            head_chunk_bytes: GPU_HEAD_CHUNK_BYTES,
            mlp_chunk_bytes: MLP_CHUNK_BYTES,
            cpu: false,
            dropout: false,
            autocast: true,
        };
        let bf16 = estimate(&c, shape);
        let nf4 = estimate(&c, TrainShape { nf4: true, ..shape });
        // 8B in bf16 is ~16 GB of weights; NF4 linears bring it near 5 GB (embeddings stay 16-bit).
        assert!((bf16.weights / 1e9 - 16.06).abs() < 0.1, "{}", bf16.weights / 1e9);
        assert!(nf4.weights / 1e9 > 4.5 && nf4.weights / 1e9 < 6.0, "{}", nf4.weights / 1e9);
        let full = estimate(&c, TrainShape { checkpointing: false, ..shape });
        assert!(full.activations > 5.0 * bf16.activations);
        // Blockwise attention keeps two f32 per query row and head of each layer, and its backward one
        // block of 512 query rows' f32 scores four times over plus one layer's f32 key and value
        // gradients: no score-sized tensor per layer.
        let stats = 33.0 * 2048.0 * 32.0 * 8.0;
        let blockwise = 4.0 * 32.0 * 512.0 * 2048.0 * 4.0 + 2.0 * 2048.0 * 1024.0 * 4.0;
        // f32 doubles the weights and everything but those f32 parts.
        let f32 = estimate(&c, TrainShape { dtype_bytes: 4, checkpointing: false, ..shape });
        assert_eq!(f32.weights, 2.0 * full.weights);
        let f32_only = |e: &MemoryEstimate| e.activations - stats - blockwise;
        assert!((f32_only(&f32) / f32_only(&full) - 2.0).abs() < 1e-9);
        // Adapters in f32 over a bf16 base: per layer, an f32 copy of each adapter's input (q, k, v, gate
        // and up read 4096 wide, o 4096, down 14336) and f32 instead of bf16 `x A^T` (7 x 16 wide), less
        // the bf16 inputs of the projections no adapter keeps now (two norms' outputs, attention's
        // output and the MLP's product: 3 x 4096 + 14336).
        let inputs = 6.0 * 4096.0 + 14336.0;
        let projection_inputs = 3.0 * 4096.0 + 14336.0;
        let upcast = estimate(&c, TrainShape { autocast: false, checkpointing: false, ..shape });
        let extra = 33.0 * 2048.0 * (inputs * 4.0 + 7.0 * 16.0 * 2.0 - projection_inputs * 2.0);
        assert!((upcast.activations - full.activations - extra).abs() < 1.0);
        // Autocast makes no difference to an f32 base.
        let f32_upcast =
            estimate(&c, TrainShape { dtype_bytes: 4, autocast: false, checkpointing: false, ..shape });
        assert_eq!(f32_upcast.activations, f32.activations);
        // Dropout keeps a mask and the masked input per adapter, in the adapters' dtype, instead.
        let dropout = estimate(&c, TrainShape { dropout: true, checkpointing: false, ..shape });
        let extra = 33.0 * 2048.0 * (2.0 * inputs - projection_inputs) * 2.0;
        assert!((dropout.activations - full.activations - extra).abs() < 1.0);
        // Fused attention (the CPU's) keeps no statistics, and its backward holds one layer's per-head
        // key and value gradients (2 x 2048 tokens x 32 heads x 128, f32) instead.
        let fused = estimate(&c, TrainShape { fused_attention: true, checkpointing: false, ..shape });
        let head_grads = 2.0 * 2048.0 * 32.0 * 128.0 * 4.0;
        // And SwiGLU as one operation keeps gate, up and product, not also the sigmoid and SiLU
        // (2 x 2048 tokens x 14336, bf16).
        let swiglu = 33.0 * 2.0 * 2048.0 * 14336.0 * 2.0;
        // And the two RMSNorms as one operation each keep input and output, not the normalised values
        // (2 x 2048 tokens x 4096, bf16).
        let norms = 33.0 * 2.0 * 2048.0 * 4096.0 * 2.0;
        assert!(
            (full.activations - fused.activations - (stats + blockwise - head_grads + swiglu + norms)).abs()
                < 1.0
        );
        // Offloaded checkpoints: one layer input on the device instead of 32.
        let offloaded = estimate(&c, TrainShape { offload: true, ..shape });
        // (The recomputed layer's output and input gradients stay with offloading.)
        let inputs32 = 31.0 * 2048.0 * 4096.0 * 2.0;
        assert!((bf16.activations - offloaded.activations - inputs32).abs() < 1.0);
        // Unsloth's long-context claim: 8B QLoRA, 78k tokens on 24 GB. The MLP then runs in 9 chunks of
        // positions, so one layer's recomputation holds the attention half's graph and one chunk's
        // MLP; with the layer inputs offloaded it fits. Kept on the device they alone are 20 GB.
        let long = TrainShape { seq: 78_000, nf4: true, offload: true, ..shape };
        let e = estimate(&c, long);
        assert!(e.total() / 1e9 > 18.5 && e.total() / 1e9 < 20.0, "{e:?}");
        let kept = estimate(&c, TrainShape { offload: false, ..long });
        assert!(kept.total() > 24e9, "{kept:?}");
        // The longest row that fits 24 GiB: past 78k with offloading, well short of it without.
        let budget = 24.0 * (1u64 << 30) as f64;
        let longest = longest_context(&c, long, budget);
        assert!(longest > 78_000 && longest.is_multiple_of(64), "{longest}");
        assert!(estimate(&c, TrainShape { seq: longest, ..long }).total() <= budget);
        assert!(estimate(&c, TrainShape { seq: longest + 64, ..long }).total() > budget);
        let on_device = longest_context(&c, TrainShape { offload: false, ..long }, budget);
        assert!(on_device > 20_000 && on_device < 50_000, "{on_device}");
        assert_eq!(longest_context(&c, long, 1e9), 0, "the NF4 weights alone are 5.7 GB");
        assert!((kept.activations - e.activations - 31.0 * 78_000.0 * 4096.0 * 2.0).abs() < 1.0);
        // Without the chunks the layer's whole graph, twice over: 33 GB.
        let per_layer = 78_000.0 * (6.0 * 4096.0 + 2.0 * 4096.0 + 2.0 * 1024.0 + 5.0 * 14336.0) * 2.0;
        assert!(e.activations < 2.0 * per_layer / 2.5, "{} vs {}", e.activations, 2.0 * per_layer);
        // Where the adapter is recorded with its projection (the CPU), only the mask's bits.
        let fused_dropout =
            estimate(&c, TrainShape { dropout: true, fused_attention: true, checkpointing: false, ..shape });
        let bits = 33.0 * 2048.0 * inputs / 8.0;
        assert!((fused_dropout.activations - fused.activations - bits).abs() < 1.0);
    }
}
