//! Multi-head attention with grouped-query heads, as transformers' eager attention computes it: scores
//! scaled after the matmul, optional tanh soft-capping, an additive mask, softmax in f32.
//!
//! Grouped-query heads are computed without repeating keys and values: the query heads of one group
//! are laid out as extra query rows of that group's key/value head (`[b, kv_heads, rep, s, d]`), which
//! is the grouping transformers' `repeat_kv` implies (query head `i` uses key head `i / rep`).

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Tensor};

use crate::attention_mem::Blockwise;
use crate::linear::Linear;
use crate::mask::Mask;
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
        mask: &Mask,
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
        // The whole mask is built only if the CPU's kernel takes these tensors.
        let mask4 = || mask.values().reshape([b, 1, s, t]);
        let fused = fused(&q, &k, &v, mask4, (self.scale, self.softcap), FUSED_16BIT_MASK_BYTES);
        if let Some(out) = fused {
            // One pass per head over a cache-sized score buffer instead of a dozen passes over
            // `[b, heads, s, t]` tensors; recorded as one operation under autodiff (`attention_grad`).
            let out = nan_through(out, &q, &k).swap_dims(1, 2).reshape([b, s, h * d]);
            return self.o.forward(out, train);
        }
        // Elsewhere (GPUs; 16-bit bases on the CPU): blocks of query rows that skip the keys the mask
        // hides, recorded under autodiff as one operation that keeps no score-sized tensor for the
        // backward (`attention_mem`).
        let params = Blockwise { scale: self.scale, softcap: self.softcap, chunk_bytes: SCORE_CHUNK_BYTES };
        let out = match crate::attention_mem::recorded(&q, &k, &v, mask, params) {
            Some(out) => out,
            None => crate::attention_mem::forward(&q, &k, &v, mask, params).0,
        };
        let out = nan_through(out, &q, &k).swap_dims(1, 2).reshape([b, s, h * d]);
        self.o.forward(out, train)
    }
}

/// The CPU's fused attention ([`crate::attention_grad::fused`]) for q `[b, heads, s, d]` and k, v
/// `[b, kv_heads, t, d]`; in a 16-bit dtype q, k and v are widened to f32 for it (autodiff records the
/// casts) and the output rounded back, while the f32 mask it builds (`b x s x t x 4` bytes, kept in
/// training with the f32 copies) is at most `max_mask_bytes`: long rows keep to the blockwise form.
/// `None` off the CPU and where the kernel declines.
fn fused(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: impl FnOnce() -> Tensor<4>,
    (scale, softcap): (f64, Option<f64>),
    max_mask_bytes: usize,
) -> Option<Tensor<4>> {
    if q.dtype() == DType::F32 {
        return crate::attention_grad::fused(q, k, v, mask, scale, softcap);
    }
    let ([b, _, s, _], t) = (q.dims(), k.dims()[2]);
    if b * s * t * 4 > max_mask_bytes || !crate::device::is_cpu(&q.device()) {
        return None;
    }
    let wide = |t: &Tensor<4>| t.clone().cast(DType::F32);
    crate::attention_grad::fused(&wide(q), &wide(k), &wide(v), mask, scale, softcap)
        .map(|out| out.cast(q.dtype()))
}

/// Attention off the CPU's fused kernel ([`crate::attention_mem`], and the decomposed reference)
/// computes the f32 scores of at most this many bytes at once: a block of query rows at a time. GPU
/// APIs cap one buffer (wgpu on an H200 refused a 2 GiB one: the scores of 4 x 2048 tokens of a
/// 32-head 1B model), and a bounded block keeps the softmax's temporaries small.
pub const SCORE_CHUNK_BYTES: usize = 256 << 20;

/// The largest f32 mask (`batch x q_len x k_len x 4` bytes) for which attention over a 16-bit base
/// on the CPU widens q, k and v to f32 and takes the fused kernel: 4 x 2,048 or 1 x 4,096 tokens.
/// On the training benchmark's model (bf16 with autocast, 4 x 512) a step ran 1.73x faster than
/// through the blockwise form's bf16 matmuls and burn's scalar `exp` (217 to 376 tokens/s), at 2%
/// more peak memory.
pub const FUSED_16BIT_MASK_BYTES: usize = 64 << 20;

/// Attention of `q` (`[b, heads, s, d]`) over `k` and `v` (`[b, kv_heads, t, d]`) with the additive
/// `mask` (`[b, 1, 1, s, t]`), as transformers' eager attention computes it: `[b, heads, s, d]`, the
/// reference [`crate::attention_mem`] is tested against (differentiated by autodiff, it keeps every
/// block's probabilities for the backward). Query
/// rows go in blocks whose f32 scores take at most `chunk_bytes` (at least one row a block).
pub fn decomposed(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: &Tensor<5>,
    scale: f64,
    softcap: Option<f64>,
    chunk_bytes: usize,
) -> Tensor<4> {
    let [b, h, s, d] = q.dims();
    let [_, kvh, t, _] = k.dims();
    let rep = h / kvh;
    let dtype = q.dtype();
    // [b, kvh, rep, s, d] x [b, kvh, 1, d, t] -> [b, kvh, rep, s, t]
    let q = q.reshape([b, kvh, rep, s, d]);
    let kt = k.reshape([b, kvh, 1, t, d]).swap_dims(3, 4);
    let v5 = v.reshape([b, kvh, 1, t, d]);
    let rows = (chunk_bytes / (b * h * t * 4).max(1)).clamp(1, s.max(1));
    let block = |q: Tensor<5>, mask: Tensor<5>| {
        let mut scores = q.matmul(kt.clone()).mul_scalar(scale);
        if let Some(cap) = softcap {
            scores = scores.div_scalar(cap).tanh().mul_scalar(cap);
        }
        let scores = if dtype == DType::F32 { scores } else { scores.cast(DType::F32) };
        let probs = softmax(scores + mask, 4);
        let probs = if dtype == DType::F32 { probs } else { probs.cast(dtype) };
        probs.matmul(v5.clone()) // [b, kvh, rep, rows, d]
    };
    let out = if rows >= s {
        block(q, mask.clone())
    } else {
        let blocks = (0..s)
            .step_by(rows)
            .map(|start| {
                let n = rows.min(s - start);
                block(q.clone().narrow(3, start, n), mask.clone().narrow(3, start, n))
            })
            .collect();
        Tensor::cat(blocks, 3)
    };
    out.reshape([b, h, s, d])
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};

    use super::*;

    /// A causal `[b, 1, 1, s, s]` mask with row 1's first `padded` positions padded out (as `mask`
    /// builds it: a large negative).
    fn causal_mask(b: usize, s: usize, padded: usize, device: &burn::tensor::Device) -> Tensor<5> {
        let mut m = vec![0f32; b * s * s];
        for r in 0..b {
            for i in 0..s {
                for j in 0..s {
                    if j > i || (r == 1 && j < padded) {
                        m[(r * s + i) * s + j] = f32::MIN;
                    }
                }
            }
        }
        Tensor::<1>::from_floats(m.as_slice(), device).reshape([b, 1, 1, s, s])
    }

    /// Query blocks give what one pass gives, forward and backward, with GQA, soft-capping, a padded
    /// row and a block size that does not divide the sequence.
    #[test]
    fn query_blocks_match_one_pass() {
        let device = burn::tensor::Device::flex().autodiff();
        let (b, h, kvh, s, d) = (2, 4, 2, 7, 8);
        let rand = |dims: [usize; 4]| {
            Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), &device).require_grad()
        };
        let (q, k, v) = (rand([b, h, s, d]), rand([b, kvh, s, d]), rand([b, kvh, s, d]));
        let mask = causal_mask(b, s, 2, &device);
        let run = |chunk: usize| {
            let out = decomposed(q.clone(), k.clone(), v.clone(), &mask, 0.3, Some(5.0), chunk);
            // A fixed ramp weights the outputs, so every element has its own gradient.
            let ramp = Tensor::<1>::from_floats(
                (0..b * h * s * d).map(|i| ((i % 13) as f32) / 13.0).collect::<Vec<_>>().as_slice(),
                &device,
            )
            .reshape([b, h, s, d]);
            let grads = (out.clone() * ramp).sum().backward();
            let g = |t: &Tensor<4>| t.grad(&grads).unwrap().into_data().try_to_vec::<f32>().unwrap();
            (out.inner().into_data().try_to_vec::<f32>().unwrap(), g(&q), g(&k), g(&v))
        };
        // One pass; 3 query rows a block (7 = 3 + 3 + 1); one row a block.
        let whole = run(usize::MAX / 2);
        for rows in [3, 1] {
            let part = run(rows * b * h * s * 4);
            for (name, a, e) in [
                ("out", &part.0, &whole.0),
                ("dq", &part.1, &whole.1),
                ("dk", &part.2, &whole.2),
                ("dv", &part.3, &whole.3),
            ] {
                let diff = a.iter().zip(e).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(diff <= 1e-5, "{rows} rows a block: {name} differs by {diff}");
            }
        }
    }

    /// A bf16 q, k, v on the CPU take the fused kernel in f32: output and gradients in bf16, within a
    /// bf16 rounding of the decomposed form's f32 values from the same inputs (GQA, causal, one padded
    /// row, soft-capping). Past `max_mask_bytes` it declines, for the blockwise form.
    #[test]
    fn bf16_on_the_cpu_takes_the_fused_kernel_in_f32() {
        let device = burn::tensor::Device::flex().autodiff();
        let (b, h, kvh, s, d) = (2, 4, 2, 9, 8);
        let rand = |dims: [usize; 4]| {
            Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), &device).cast(DType::BF16)
        };
        let (q0, k0, v0) = (rand([b, h, s, d]), rand([b, kvh, s, d]), rand([b, kvh, s, d]));
        let mask = causal_mask(b, s, 3, &device);
        let ramp = Tensor::<1>::from_floats(
            (0..b * h * s * d).map(|i| ((i % 11) as f32) / 11.0).collect::<Vec<_>>().as_slice(),
            &device,
        )
        .reshape([b, h, s, d]);
        let f32s = |t: Tensor<4>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        let run = |dtype: DType, ours: bool| {
            let [q, k, v] = [&q0, &k0, &v0].map(|t| t.clone().cast(dtype).require_grad());
            let out = if ours {
                let mask4 = || mask.clone().reshape([b, 1, s, s]);
                fused(&q, &k, &v, mask4, (0.3, Some(5.0)), usize::MAX).unwrap()
            } else {
                decomposed(q.clone(), k.clone(), v.clone(), &mask, 0.3, Some(5.0), usize::MAX / 2)
            };
            assert_eq!(out.dtype(), dtype);
            let grads = (out.clone().cast(DType::F32) * ramp.clone()).sum().backward();
            let g = |t: &Tensor<4>| {
                let g = t.grad(&grads).unwrap();
                assert_eq!(g.dtype(), dtype);
                f32s(g)
            };
            [f32s(out.inner()), g(&q), g(&k), g(&v)]
        };
        let (ours, want) = (run(DType::BF16, true), run(DType::F32, false));
        for (name, a, e) in
            ["out", "dq", "dk", "dv"].iter().zip(&ours).zip(&want).map(|((n, a), e)| (n, a, e))
        {
            let scale = e.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (i, (a, e)) in a.iter().zip(e).enumerate() {
                // One bf16 rounding of the value, and of the upstream gradient's cast, plus f32 noise.
                assert!((a - e).abs() <= e.abs() / 64.0 + scale * 1e-3, "{name}[{i}]: {a} vs {e}");
            }
        }
        let mask4 = || mask.clone().reshape([b, 1, s, s]);
        assert!(fused(&q0, &k0, &v0, mask4, (0.3, None), b * s * s * 4 - 1).is_none());
    }
}
