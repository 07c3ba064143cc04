//! A first-order estimate of device memory for LoRA and QLoRA training, for `retort inspect model`.
//! It counts what dominates on a single GPU: frozen weights, adapter weights with gradients and AdamW
//! state, activations kept for the backward pass, and the logits. It is an estimate (allocator
//! overhead and temporary buffers are not modelled); `retort train --plan` will calibrate it against
//! measured peaks.

use retort_hf::ModelConfig;

/// Bytes by category.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MemoryEstimate {
    /// Frozen base weights.
    pub weights: f64,
    /// LoRA weights, gradients and AdamW moments (f32).
    pub adapters: f64,
    /// Activations kept for the backward pass.
    pub activations: f64,
    /// Logits and their gradient (f32), the peak at the end of the forward.
    pub logits: f64,
}

impl MemoryEstimate {
    /// Everything.
    pub fn total(&self) -> f64 {
        self.weights + self.adapters + self.activations + self.logits
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
}

/// Estimates peak training memory of a model.
pub fn estimate(c: &ModelConfig, s: TrainShape) -> MemoryEstimate {
    let specs = retort_hf::names::tensors(c);
    let mut linear = 0f64;
    let mut other = 0f64;
    let mut adapter_params = 0f64;
    for t in &specs {
        let n = t.numel() as f64;
        if t.peft_target.is_some() {
            linear += n;
            let (out, inp) = (t.shape[0] as f64, t.shape[1] as f64);
            adapter_params += s.rank as f64 * (out + inp);
        } else {
            other += n;
        }
    }
    // NF4: 4 bits per weight plus double-quantized scales (~0.127 bits); other tensors stay 16-bit.
    let weights = if s.nf4 { linear * 4.127 / 8.0 + other * 2.0 } else { (linear + other) * 2.0 };
    // f32 weight, gradient and two AdamW moments.
    let adapters = adapter_params * 16.0;
    let tokens = (s.batch * s.seq) as f64;
    let h = c.hidden_size as f64;
    let ff = c.intermediate_size as f64;
    let heads = c.num_heads as f64;
    let q = (c.num_heads * c.head_dim) as f64;
    let kv = (c.num_kv_heads * c.head_dim) as f64;
    // One layer's saved tensors (bf16): norms, q/k/v, attention output, MLP gate/up/act, plus the f32
    // attention probabilities of eager attention.
    let per_layer = tokens * (4.0 * h + q + 2.0 * kv + q + 3.0 * ff) * 2.0
        + s.batch as f64 * heads * (s.seq as f64).powi(2) * 4.0;
    let activations = if s.checkpointing {
        c.num_layers as f64 * tokens * h * 2.0 + per_layer
    } else {
        c.num_layers as f64 * per_layer
    };
    let logits = tokens * c.vocab_size as f64 * 4.0 * 2.0;
    MemoryEstimate { weights, adapters, activations, logits }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_is_about_a_quarter_of_bf16_weights_and_checkpointing_saves_activations() {
        let c = ModelConfig::parse(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,
            "num_attention_heads":32,"num_key_value_heads":8,"vocab_size":128256}"#,
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let shape = TrainShape { batch: 1, seq: 2048, rank: 16, nf4: false, checkpointing: true };
        let bf16 = estimate(&c, shape);
        let nf4 = estimate(&c, TrainShape { nf4: true, ..shape });
        // 8B in bf16 is ~16 GB of weights; NF4 linears bring it near 5 GB (embeddings stay 16-bit).
        assert!((bf16.weights / 1e9 - 16.06).abs() < 0.1, "{}", bf16.weights / 1e9);
        assert!(nf4.weights / 1e9 > 4.5 && nf4.weights / 1e9 < 6.0, "{}", nf4.weights / 1e9);
        let full = estimate(&c, TrainShape { checkpointing: false, ..shape });
        assert!(full.activations > 5.0 * bf16.activations);
    }
}
