//! The decoder: embedding, layers, final norm, LM head. One implementation for every family; each
//! family's differences come from its [`ModelConfig`] (see `retort_hf::config`).
//!
//! Mirrors transformers' `modeling_llama.py`, `modeling_mistral.py`, `modeling_qwen2.py`,
//! `modeling_qwen3.py`, `modeling_phi3.py`, `modeling_gemma2.py` and `modeling_gemma3.py` (v5.23).

use std::collections::HashMap;
use std::ops::Range;

use burn::module::{Module, Param};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use retort_hf::{LayerAttention, ModelConfig};

use crate::attention::{Attention, LayerCache};
use crate::batch::Batch;
use crate::linear::Linear;
use crate::mask::{Mask, MaskSpec};
use crate::mlp::Mlp;
use crate::norm::RmsNorm;
use crate::rope::Rope;

/// One decoder layer.
#[derive(Module, Debug)]
pub struct Layer {
    /// Norm before attention.
    pub attn_norm: RmsNorm,
    /// Attention.
    pub attn: Attention,
    /// Norm after attention (Gemma 2/3).
    pub post_attn_norm: Option<RmsNorm>,
    /// Norm before the MLP.
    pub ffn_norm: RmsNorm,
    /// MLP.
    pub mlp: Mlp,
    /// Norm after the MLP (Gemma 2/3).
    pub post_ffn_norm: Option<RmsNorm>,
    /// Sliding window of this layer, if any.
    pub window: Option<usize>,
    /// Uses the local (sliding-layer) RoPE (Gemma 3).
    pub local_rope: bool,
}

impl Layer {
    /// The attention half of the layer, `x + post_norm(attention(norm(x)))`.
    fn attn_half(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: &Mask,
        cache: Option<&mut Option<LayerCache>>,
        train: bool,
    ) -> Tensor<3> {
        let mut h = self.attn.forward(self.attn_norm.forward(x.clone()), cos, sin, mask, cache, train);
        if let Some(n) = &self.post_attn_norm {
            h = n.forward(h);
        }
        x + h
    }

    /// The MLP half of the layer, `x + post_norm(mlp(norm(x)))`: position-wise, so any split of the
    /// positions gives the same values.
    fn mlp_half(&self, x: Tensor<3>, train: bool) -> Tensor<3> {
        let mut h = self.mlp.forward(self.ffn_norm.forward(x.clone()), train);
        if let Some(n) = &self.post_ffn_norm {
            h = n.forward(h);
        }
        x + h
    }

    /// [`Layer::mlp_half`] over `[rows, len, hidden]`, the flattened positions split into `chunks`.
    fn mlp_half_chunked(&self, x: Tensor<3>, chunks: &[Range<usize>], train: bool) -> Tensor<3> {
        if chunks.len() <= 1 {
            return self.mlp_half(x, train);
        }
        let [b, s, h] = x.dims();
        let flat = x.reshape([1, b * s, h]);
        let parts = chunks.iter().map(|r| self.mlp_half(flat.clone().narrow(1, r.start, r.len()), train));
        Tensor::cat(parts.collect(), 1).reshape([b, s, h])
    }
}

/// How many bytes of one `[positions, intermediate]` tensor of the MLP a layer computes at once
/// ([`mlp_chunks`]). The MLP's intermediate tensors are the widest of a layer: 2.2 GB each for 78k
/// tokens of an 8B model in bf16, four or five of them kept for the backward. Split into chunks of
/// positions, the forward holds one chunk's, and training's recomputation
/// (`Transformer::checkpoint_layers`) differentiates a chunk at a time. 4 x 2048 tokens of that
/// model (224 MiB) run whole, as do all CPU shapes of the benchmarks.
pub const MLP_CHUNK_BYTES: usize = 256 << 20;

/// The ranges of `tokens` flattened positions an MLP of width `intermediate` in `dtype_bytes` runs
/// at once: one range when its `[tokens, intermediate]` tensor is at most `chunk_bytes`, else
/// near-equal ranges, rounded up to a multiple of 64 positions where they are longer than that (so
/// that GPU kernels see few distinct shapes), the last shorter.
pub fn mlp_chunks(
    tokens: usize,
    intermediate: usize,
    dtype_bytes: usize,
    chunk_bytes: usize,
) -> Vec<Range<usize>> {
    let bytes = tokens * intermediate.max(1) * dtype_bytes;
    if bytes <= chunk_bytes || tokens <= 1 {
        return std::iter::once(0..tokens).collect();
    }
    let per = tokens.div_ceil(bytes.div_ceil(chunk_bytes.max(1)));
    let per = if per > 64 { per.div_ceil(64) * 64 } else { per };
    (0..tokens).step_by(per).map(|start| start..(start + per).min(tokens)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlp_chunks_cover_the_positions_within_the_budget() {
        // 8B in bf16: 4 x 2048 tokens run whole; 78k tokens in chunks of a multiple of 64 positions.
        // One chunk covering `tokens` positions (clippy will not have a one-range literal).
        let whole =
            |c: Vec<Range<usize>>, tokens: usize| c.len() == 1 && c[0].start == 0 && c[0].end == tokens;
        assert!(whole(mlp_chunks(8192, 14336, 2, MLP_CHUNK_BYTES), 8192));
        let c = mlp_chunks(78_000, 14336, 2, MLP_CHUNK_BYTES);
        assert_eq!(c.len(), 9);
        assert!(c[..8].iter().all(|r| r.len() == 8704 && r.len() * 14336 * 2 <= MLP_CHUNK_BYTES));
        assert_eq!(c[8], 69_632..78_000);
        // Short chunks are not rounded up; every position lies in exactly one chunk.
        let c = mlp_chunks(28, 10, 4, 10 * 10 * 4);
        assert_eq!(c, vec![0..10, 10..20, 20..28]);
        assert!(whole(mlp_chunks(1, 10, 4, 1), 1));
    }
}

/// Keys and values of every layer for the positions generated so far, plus which of them are padding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<LayerCache>>,
    /// Rows.
    pub(crate) rows: usize,
    /// Positions cached per row.
    pub(crate) len: usize,
    /// `[rows * len]`: false for padding.
    pub(crate) valid: Vec<bool>,
    /// `[rows * len]`: packed-example ids.
    pub(crate) segments: Vec<u32>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Positions cached per row.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward pass.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A causal language model.
#[derive(Module, Debug)]
pub struct Transformer {
    /// Token embedding, `[vocab, hidden]`.
    pub embed: Param<Tensor<2>>,
    /// Decoder layers.
    pub layers: Vec<Layer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Output projection; `None` when tied to the embedding.
    pub lm_head: Option<Linear>,
    /// The validated config.
    #[module(skip)]
    pub config: ModelConfig,
    /// Training recomputes each layer's forward in the backward pass instead of keeping its
    /// activations (transformers' gradient checkpointing, one layer at a time); read by retort-train.
    #[module(skip)]
    pub checkpoint_layers: bool,
    /// Bytes of one MLP intermediate tensor computed at once ([`MLP_CHUNK_BYTES`] by default; see
    /// [`mlp_chunks`]).
    #[module(skip)]
    pub mlp_chunk_bytes: usize,
    /// With `checkpoint_layers`, each layer's saved input waits in host memory instead of on the
    /// device (Unsloth's offloaded gradient checkpointing): the device holds one of them at a time;
    /// read by retort-train.
    #[module(skip)]
    pub offload_checkpoints: bool,
}

/// Rotary tables and attention masks that every layer of one pass over a batch shares.
#[derive(Debug, Clone)]
pub struct LayerInputs {
    cos: Tensor<4>,
    sin: Tensor<4>,
    local: Option<(Tensor<4>, Tensor<4>)>,
    masks: HashMap<Option<usize>, Mask>,
}

impl Transformer {
    /// Global (full-attention) RoPE.
    pub fn rope(&self) -> Rope {
        let c = &self.config;
        Rope {
            theta: c.rope_theta,
            scaling: c.rope_scaling.clone(),
            rotary_dim: c.rotary_dim,
            max_position_embeddings: c.max_position_embeddings,
        }
    }

    /// RoPE of sliding-window layers, when it differs (Gemma 3).
    pub fn local_rope(&self) -> Option<Rope> {
        let c = &self.config;
        c.rope_local_theta.map(|theta| Rope {
            theta,
            scaling: c.rope_local_scaling.clone(),
            rotary_dim: c.rotary_dim,
            max_position_embeddings: c.max_position_embeddings,
        })
    }

    /// The device the weights are on.
    pub fn device(&self) -> Device {
        self.embed.val().device()
    }

    /// The dtype of the activations (that of the weights).
    pub fn dtype(&self) -> DType {
        self.embed.val().dtype()
    }

    /// Hidden states after the final norm, `[rows, len, hidden]` (inference: no dropout).
    pub fn hidden(&self, batch: &Batch, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.hidden_mode(batch, cache, false)
    }

    /// Hidden states for training (adapter dropout on).
    pub fn hidden_train(&self, batch: &Batch) -> Tensor<3> {
        self.hidden_mode(batch, None, true)
    }

    /// Token embeddings of the batch, scaled as the family scales them, `[rows, len, hidden]`.
    pub fn embed_tokens(&self, batch: &Batch) -> Tensor<3> {
        let device = self.device();
        let dtype = self.dtype();
        let ids: Vec<i64> = batch.ids.iter().map(|&i| i64::from(i)).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch.rows, batch.len]), &device);
        let x = burn::tensor::module::embedding(self.embed.val(), ids);
        if !self.config.scale_embeddings {
            return x;
        }
        // transformers multiplies by sqrt(hidden) cast to the weights' dtype.
        let s = (self.config.hidden_size as f64).sqrt();
        let s = match dtype {
            DType::BF16 => half::bf16::from_f64(s).to_f64(),
            DType::F16 => half::f16::from_f64(s).to_f64(),
            _ => s,
        };
        x.mul_scalar(s)
    }

    fn layer_inputs(&self, batch: &Batch, spec: &MaskSpec) -> LayerInputs {
        let device = self.device();
        let dtype = self.dtype();
        let (rows, len) = (batch.rows, batch.len);
        let mut masks = HashMap::new();
        for layer in &self.layers {
            masks.entry(layer.window).or_insert_with(|| spec.build(layer.window, &device));
        }
        let (cos, sin) = self.rope().cos_sin(&batch.positions, rows, len, &device, dtype);
        let local = self.local_rope().map(|r| r.cos_sin(&batch.positions, rows, len, &device, dtype));
        LayerInputs { cos, sin, local, masks }
    }

    /// What the layers of a training pass over `batch` (no cache) share.
    pub fn train_inputs(&self, batch: &Batch) -> LayerInputs {
        let spec = MaskSpec {
            batch: batch.rows,
            q_len: batch.len,
            k_len: batch.len,
            key_valid: batch.valid.clone(),
            segments: batch.segments.clone(),
        };
        self.layer_inputs(batch, &spec)
    }

    /// Attention half of layer `i` (see [`Layer::attn_half`]) with the pass's rotary tables and mask.
    fn attention_half(
        &self,
        i: usize,
        x: Tensor<3>,
        inputs: &LayerInputs,
        cache: Option<&mut Option<LayerCache>>,
        train: bool,
    ) -> Tensor<3> {
        let layer = &self.layers[i];
        let mask = &inputs.masks[&layer.window];
        let (c, s) = match (&inputs.local, layer.local_rope) {
            (Some((lc, ls)), true) => (lc, ls),
            _ => (&inputs.cos, &inputs.sin),
        };
        layer.attn_half(x, c, s, mask, cache, train)
    }

    fn run_layer(
        &self,
        i: usize,
        x: Tensor<3>,
        inputs: &LayerInputs,
        cache: Option<&mut Option<LayerCache>>,
        train: bool,
    ) -> Tensor<3> {
        let [b, len, _] = x.dims();
        let x = self.attention_half(i, x, inputs, cache, train);
        self.layers[i].mlp_half_chunked(x, &self.mlp_chunks(b * len), train)
    }

    /// Layer `i` of a training pass (adapter dropout on) over hidden states `[rows, len, hidden]`.
    pub fn layer_train(&self, i: usize, x: Tensor<3>, inputs: &LayerInputs) -> Tensor<3> {
        self.run_layer(i, x, inputs, None, true)
    }

    /// The attention half of layer `i` of a training pass: [`Transformer::layer_train`] is this, then
    /// [`Transformer::layer_mlp_train`] over each of [`Transformer::mlp_chunks`] of its positions.
    pub fn layer_attention_train(&self, i: usize, x: Tensor<3>, inputs: &LayerInputs) -> Tensor<3> {
        self.attention_half(i, x, inputs, None, true)
    }

    /// The MLP half of layer `i` of a training pass over hidden states `[rows, len, hidden]`, whole
    /// (the caller splits the positions).
    pub fn layer_mlp_train(&self, i: usize, x: Tensor<3>) -> Tensor<3> {
        self.layers[i].mlp_half(x, true)
    }

    /// The ranges of a pass's `tokens` (flattened) positions that each layer's MLP runs at once.
    pub fn mlp_chunks(&self, tokens: usize) -> Vec<Range<usize>> {
        let c = &self.config;
        mlp_chunks(tokens, c.intermediate_size, self.dtype().size(), self.mlp_chunk_bytes)
    }

    /// The final norm, applied to the last layer's output.
    pub fn final_norm(&self, x: Tensor<3>) -> Tensor<3> {
        self.norm.forward(x)
    }

    fn hidden_mode(&self, batch: &Batch, mut cache: Option<&mut KvCache>, train: bool) -> Tensor<3> {
        let (rows, len) = (batch.rows, batch.len);
        let mut x = self.embed_tokens(batch);

        // Keys visible to this pass: the cached ones, then this pass's.
        let (past, mut valid, mut segments) = match cache.as_deref() {
            Some(c) if c.len > 0 => (c.len, c.valid.clone(), c.segments.clone()),
            _ => (0, Vec::new(), Vec::new()),
        };
        let k_len = past + len;
        let mut key_valid = Vec::with_capacity(rows * k_len);
        let mut key_segments = Vec::with_capacity(rows * k_len);
        for r in 0..rows {
            if past > 0 {
                key_valid.extend_from_slice(&valid[r * past..(r + 1) * past]);
                key_segments.extend_from_slice(&segments[r * past..(r + 1) * past]);
            }
            key_valid.extend_from_slice(&batch.valid[r * len..(r + 1) * len]);
            key_segments.extend_from_slice(&batch.segments[r * len..(r + 1) * len]);
        }
        let spec = MaskSpec { batch: rows, q_len: len, k_len, key_valid, segments: key_segments };
        let inputs = self.layer_inputs(batch, &spec);

        if let Some(c) = cache.as_deref_mut()
            && c.layers.len() != self.layers.len()
        {
            c.layers = vec![None; self.layers.len()];
        }
        for i in 0..self.layers.len() {
            let slot = cache.as_deref_mut().map(|kv| &mut kv.layers[i]);
            x = self.run_layer(i, x, &inputs, slot, train);
        }
        if let Some(c) = cache {
            // Append this pass's rows to the cached padding and segment records.
            let mut nv = Vec::with_capacity(rows * k_len);
            let mut ns = Vec::with_capacity(rows * k_len);
            for r in 0..rows {
                if past > 0 {
                    nv.extend_from_slice(&valid[r * past..(r + 1) * past]);
                    ns.extend_from_slice(&segments[r * past..(r + 1) * past]);
                }
                nv.extend_from_slice(&batch.valid[r * len..(r + 1) * len]);
                ns.extend_from_slice(&batch.segments[r * len..(r + 1) * len]);
            }
            valid = nv;
            segments = ns;
            c.rows = rows;
            c.len = k_len;
            c.valid = valid;
            c.segments = segments;
        }
        self.final_norm(x)
    }

    /// Logits of the vocabulary for hidden states `[rows, len, hidden]`, soft-capped when the family
    /// does that.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden, false),
            None => {
                let [b, s, h] = hidden.dims();
                let w = self.embed.val();
                let v = w.dims()[0];
                crate::linear::project(&hidden.reshape([b * s, h]), &w).reshape([b, s, v])
            }
        };
        match self.config.final_logit_softcap {
            Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
            None => logits,
        }
    }

    /// Logits for every position of the batch, `[rows, len, vocab]`.
    pub fn forward(&self, batch: &Batch, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.logits(self.hidden(batch, cache))
    }
}

/// The attention span of each layer, as layer fields.
pub(crate) fn layer_window(l: &LayerAttention) -> Option<usize> {
    match l {
        LayerAttention::Full => None,
        LayerAttention::Sliding { window } => Some(*window),
    }
}
