//! Multi-head attention with grouped-query heads, as transformers' eager attention computes it: scores
//! scaled after the matmul, optional tanh soft-capping, an additive mask, softmax in f32.
//!
//! Grouped-query heads are computed without repeating keys and values: the query heads of one group
//! are laid out as extra query rows of that group's key/value head (`[b, kv_heads, rep, s, d]`), which
//! is the grouping transformers' `repeat_kv` implies (query head `i` uses key head `i / rep`).

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Tensor};

use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::rope;

/// `q_proj`, `k_proj`, `v_proj`.
#[derive(Module, Debug)]
pub struct SeparateQkv {
    /// Query projection.
    pub q: Linear,
    /// Key projection.
    pub k: Linear,
    /// Value projection.
    pub v: Linear,
}

/// Query, key and value projections, separate or fused.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant, reason = "built once per layer; boxing would only add an indirection")]
pub enum Qkv {
    /// `q_proj`, `k_proj`, `v_proj`.
    Separate(SeparateQkv),
    /// Phi-3's `qkv_proj`: query rows, then key rows, then value rows.
    Fused(Linear),
}

/// Keys and values of earlier positions (generation).
#[derive(Debug, Clone)]
pub struct LayerCache {
    /// `[batch, kv_heads, past, head_dim]`.
    pub k: Tensor<4>,
    /// `[batch, kv_heads, past, head_dim]`.
    pub v: Tensor<4>,
}

/// One attention block.
#[derive(Module, Debug)]
pub struct Attention {
    /// Input projections.
    pub qkv: Qkv,
    /// Output projection.
    pub o: Linear,
    /// Per-head query norm (Qwen3, Gemma 3).
    pub q_norm: Option<RmsNorm>,
    /// Per-head key norm.
    pub k_norm: Option<RmsNorm>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Score multiplier.
    pub scale: f64,
    /// Soft-cap of the scores (Gemma 2).
    pub softcap: Option<f64>,
}

/// `out`, made NaN when `q` or `k` holds a NaN or infinity. burn's fused kernel skips NaN scores (a row
/// of them comes out as zeros), which would hide a diverged step from the guard that skips
/// non-finite losses; the decomposed form propagates them. Adds `0 x (sum q + sum k)`: exactly zero
/// for finite inputs, NaN otherwise, for a reduction over tensors `s / head_dim` times smaller than
/// the scores.
fn nan_through(out: Tensor<4>, q: &Tensor<4>, k: &Tensor<4>) -> Tensor<4> {
    let poison = (q.clone().sum() + k.clone().sum()).mul_scalar(0.0);
    out + poison.reshape([1, 1, 1, 1])
}

fn heads(x: Tensor<3>, n: usize, d: usize) -> Tensor<4> {
    let [b, s, _] = x.dims();
    x.reshape([b, s, n, d])
}

impl Attention {
    /// Attends over `x` (`[batch, seq, hidden]`) and, when given, the cached keys and values of earlier
    /// positions; appends this pass's keys and values to the cache. `mask` is `[batch, 1, 1, seq, keys]`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: &Tensor<5>,
        cache: Option<&mut Option<LayerCache>>,
        train: bool,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = match &self.qkv {
            Qkv::Separate(p) => {
                (p.q.forward(x.clone(), train), p.k.forward(x.clone(), train), p.v.forward(x, train))
            }
            Qkv::Fused(qkv) => {
                let all = qkv.forward(x, train);
                let q = all.clone().narrow(2, 0, h * d);
                let k = all.clone().narrow(2, h * d, kvh * d);
                let v = all.narrow(2, h * d + kvh * d, kvh * d);
                (q, k, v)
            }
        };
        let mut q = heads(q, h, d);
        let mut k = heads(k, kvh, d);
        if let Some(n) = &self.q_norm {
            q = n.forward(q);
        }
        if let Some(n) = &self.k_norm {
            k = n.forward(k);
        }
        let q = rope::apply(q.swap_dims(1, 2), cos, sin);
        let mut k = rope::apply(k.swap_dims(1, 2), cos, sin);
        let mut v = heads(v, kvh, d).swap_dims(1, 2);
        if let Some(slot) = cache {
            if let Some(prev) = slot.take() {
                k = Tensor::cat(vec![prev.k, k], 2);
                v = Tensor::cat(vec![prev.v, v], 2);
            }
            *slot = Some(LayerCache { k: k.clone(), v: v.clone() });
        }
        let t = k.dims()[2];
        let rep = h / kvh;
        let dtype = q.dtype();
        let mask4 = mask.clone().reshape([b, 1, s, t]);
        if let Some(out) = crate::attention_grad::fused(&q, &k, &v, &mask4, self.scale, self.softcap) {
            // One pass per head over a cache-sized score buffer instead of a dozen passes over
            // `[b, heads, s, t]` tensors; recorded as one operation under autodiff (`attention_grad`).
            let out = nan_through(out, &q, &k).swap_dims(1, 2).reshape([b, s, h * d]);
            return self.o.forward(out, train);
        }
        // [b, kvh, rep, s, d] x [b, kvh, 1, d, t] -> [b, kvh, rep, s, t]
        let q = q.reshape([b, kvh, rep, s, d]);
        let k5 = k.reshape([b, kvh, 1, t, d]);
        let v5 = v.reshape([b, kvh, 1, t, d]);
        let mut scores = q.matmul(k5.swap_dims(3, 4)).mul_scalar(self.scale);
        if let Some(cap) = self.softcap {
            scores = scores.div_scalar(cap).tanh().mul_scalar(cap);
        }
        let scores = if dtype == DType::F32 { scores } else { scores.cast(DType::F32) };
        let probs = softmax(scores + mask.clone(), 4);
        let probs = if dtype == DType::F32 { probs } else { probs.cast(dtype) };
        let out = probs.matmul(v5); // [b, kvh, rep, s, d]
        let out = out.reshape([b, h, s, d]).swap_dims(1, 2).reshape([b, s, h * d]);
        self.o.forward(out, train)
    }
}
