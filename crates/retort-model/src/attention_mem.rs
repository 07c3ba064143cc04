//! Memory-efficient attention for training where the CPU's fused kernel does not run (GPUs, and 16-bit
//! bases on the CPU): burn's tensor operations a block of query rows at a time, recorded under
//! autodiff as one operation that keeps only its inputs, its output and two f32 statistics per query
//! row, and recomputes each block's probabilities in the backward (the memory plan of FlashAttention,
//! Dao et al. 2022, from ordinary matmuls and element-wise operations instead of one kernel).
//!
//! Recorded by autodiff, [`crate::attention::decomposed`] keeps the f32 probabilities of every layer,
//! `[b, heads, s, t]`: for 4 x 2048 tokens of a 32-head model 2 GiB a layer, so long contexts cannot fit
//! however the rest is checkpointed. Here a layer keeps `[b, heads, s]` f32 beyond q, k, v and the
//! output, and the scores of one block exist at a time, in the forward and in the backward.
//!
//! Blocks also skip the keys the mask hides from all their queries ([`KeySpans`]): the future of a
//! causal mask (about half the products of a long row), earlier examples of a packed row, keys beyond
//! a sliding window. Spans are widened to multiples of [`KEY_ALIGN`] so that block shapes, and the GPU
//! kernels tuned for them, repeat from step to step.
//!
//! The forward rounds as the decomposed form does (scores in the compute dtype, softmax in f32, the
//! probabilities cast back before the product with the values); the backward computes in f32 what
//! autodiff of the decomposed form computes through its casts, so gradients agree to rounding. Tests
//! compare both with the decomposed form differentiated by autodiff.

use burn::tensor::{DType, Tensor};

use crate::mask::{KeySpans, Mask};

/// Key spans are widened to multiples of this many keys (see the module documentation); rows padded
/// to multiples of 64 on GPUs keep every span a multiple too.
pub const KEY_ALIGN: usize = 64;

/// At most this many query rows a block, however small the scores: more blocks skip more of a causal
/// mask's hidden keys, fewer launch fewer kernels.
pub const MAX_BLOCK_ROWS: usize = 512;

/// The attention's constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Blockwise {
    /// Score multiplier.
    pub scale: f64,
    /// Soft-cap of the scores (Gemma 2).
    pub softcap: Option<f64>,
    /// Bytes of f32 scores a block may take (at least one query row a block).
    pub chunk_bytes: usize,
}

/// One block: query rows `q0 .. q0 + n` against keys `k0 .. k1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    q0: usize,
    n: usize,
    k0: usize,
    k1: usize,
}

/// Query rows a block of `s` rows over `t` keys for `b x heads` heads takes.
pub fn block_rows(b: usize, heads: usize, s: usize, t: usize, chunk_bytes: usize) -> usize {
    (chunk_bytes / (b * heads * t * 4).max(1)).clamp(1, MAX_BLOCK_ROWS).min(s.max(1))
}

/// The blocks of `s` query rows over `t` keys for `b x heads` heads. Each starts with the rows whose
/// scores fit `chunk_bytes` over all `t` keys ([`block_rows`]) and doubles them while the scores over
/// the keys the wider block can see still fit: under a causal mask the early blocks see few keys, and
/// in rows packed with short examples every block does, so fewer, taller blocks run (fewer kernel
/// launches on a GPU). Doubling keeps the block heights to a few distinct values, for kernel reuse.
fn blocks(spans: &KeySpans, b: usize, heads: usize, s: usize, t: usize, chunk_bytes: usize) -> Vec<Block> {
    let rows = block_rows(b, heads, s, t, chunk_bytes);
    let with_spans = spans.queries() == s;
    let span = |q0: usize, n: usize| if with_spans { spans.block(q0, n, KEY_ALIGN) } else { (0, t) };
    let mut out = Vec::new();
    let mut q0 = 0;
    while q0 < s {
        let mut n = rows.min(s - q0);
        let (mut k0, mut k1) = span(q0, n);
        loop {
            let m = (n * 2).min(MAX_BLOCK_ROWS).min(s - q0);
            if !with_spans || m == n {
                break;
            }
            let (a, z) = span(q0, m);
            if b * heads * m * (z - a) * 4 > chunk_bytes {
                break;
            }
            (n, k0, k1) = (m, a, z);
        }
        out.push(Block { q0, n, k0, k1 });
        q0 += n;
    }
    out
}

/// Inputs in the grouped layout of [`crate::attention`]: q `[b, kvh, rep, s, d]`, k and v
/// `[b, kvh, 1, t, d]`.
struct Grouped<'a> {
    q: Tensor<5>,
    k: Tensor<5>,
    v: Tensor<5>,
    mask: &'a Mask,
}

impl Grouped<'_> {
    fn new<'a>(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, mask: &'a Mask) -> Grouped<'a> {
        let [b, h, s, d] = q.dims();
        let [_, kvh, t, _] = k.dims();
        Grouped {
            q: q.clone().reshape([b, kvh, h / kvh, s, d]),
            k: k.clone().reshape([b, kvh, 1, t, d]),
            v: v.clone().reshape([b, kvh, 1, t, d]),
            mask,
        }
    }

    /// The block's f32 scores with the mask added, and `tanh` of the scaled scores when soft-capped
    /// (their derivative), `[b, kvh, rep, n, k1 - k0]`.
    fn scores(&self, blk: Block, p: Blockwise) -> (Tensor<5>, Option<Tensor<5>>) {
        let q = self.q.clone().narrow(3, blk.q0, blk.n);
        let k = self.k.clone().narrow(3, blk.k0, blk.k1 - blk.k0);
        let mut s = q.matmul(k.swap_dims(3, 4)).mul_scalar(p.scale);
        let mut tanh = None;
        if let Some(cap) = p.softcap {
            let th = s.div_scalar(cap).tanh();
            s = th.clone().mul_scalar(cap);
            tanh = Some(th);
        }
        let s = if s.dtype() == DType::F32 { s } else { s.cast(DType::F32) };
        (s + self.mask.block(blk.q0, blk.n, blk.k0, blk.k1), tanh)
    }
}

/// Attention of q `[b, heads, s, d]` over k and v `[b, kv_heads, t, d]` under `mask`: the output
/// `[b, heads, s, d]` (q's dtype) and, per query row, the f32 maximum of its masked scores and the sum
/// of their exponentials after subtracting it, `[b, kv_heads, rep, s, 2]`. (Not their log-sum-exp: for
/// a query that sees no key every score is `f32::MIN` and the maximum absorbs `log(sum)`.) Not
/// recorded by autodiff: see [`recorded`] for training.
pub fn forward(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: &Mask,
    p: Blockwise,
) -> (Tensor<4>, Tensor<5>) {
    let [b, h, s, d] = q.dims();
    let t = k.dims()[2];
    let dtype = q.dtype();
    let g = Grouped::new(q, k, v, mask);
    let (mut outs, mut stats) = (Vec::new(), Vec::new());
    for blk in blocks(&mask.spans, b, h, s, t, p.chunk_bytes) {
        let (scores, _) = g.scores(blk, p);
        // burn's softmax, its maximum and sum kept.
        let max = scores.clone().max_dim(4);
        let e = (scores - max.clone()).exp();
        let sum = e.clone().sum_dim(4);
        let probs = e / sum.clone();
        let probs = if dtype == DType::F32 { probs } else { probs.cast(dtype) };
        outs.push(probs.matmul(g.v.clone().narrow(3, blk.k0, blk.k1 - blk.k0)));
        stats.push(Tensor::cat(vec![max, sum], 4));
    }
    (Tensor::cat(outs, 3).reshape([b, h, s, d]), Tensor::cat(stats, 3))
}

/// The gradients of q, k and v (each in its own dtype) given the output's gradient `d_out`, from what
/// [`forward`] returned.
#[allow(clippy::too_many_arguments, reason = "the inputs, outputs and constants of one attention")]
pub fn backward(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: &Mask,
    out: &Tensor<4>,
    stats: &Tensor<5>,
    d_out: &Tensor<4>,
    p: Blockwise,
) -> [Tensor<4>; 3] {
    let [b, h, s, d] = q.dims();
    let [_, kvh, t, _] = k.dims();
    let rep = h / kvh;
    let dtype = q.dtype();
    let device = q.device();
    let f32_of = |x: Tensor<5>| if x.dtype() == DType::F32 { x } else { x.cast(DType::F32) };
    let in_dtype = |x: Tensor<5>| if dtype == DType::F32 { x } else { x.cast(dtype) };
    let g = Grouped::new(q, k, v, mask);
    let d_out = d_out.clone().reshape([b, kvh, rep, s, d]);
    // `sum_j P_ij dP_ij = sum_c dO_ic O_ic`, per query row.
    let delta = (f32_of(d_out.clone()) * f32_of(out.clone().reshape([b, kvh, rep, s, d]))).sum_dim(4);
    let mut dk = Tensor::<5>::zeros([b, kvh, 1, t, d], (&device, DType::F32));
    let mut dv = Tensor::<5>::zeros([b, kvh, 1, t, d], (&device, DType::F32));
    let mut dq = Vec::new();
    for blk in blocks(&mask.spans, b, h, s, t, p.chunk_bytes) {
        let (scores, tanh) = g.scores(blk, p);
        let st = stats.clone().narrow(3, blk.q0, blk.n);
        let probs = (scores - st.clone().narrow(4, 0, 1)).exp() / st.narrow(4, 1, 1);
        let keys = blk.k1 - blk.k0;
        let d_o = d_out.clone().narrow(3, blk.q0, blk.n);
        let (kb, vb) = (g.k.clone().narrow(3, blk.k0, keys), g.v.clone().narrow(3, blk.k0, keys));
        let range = [0..b, 0..kvh, 0..1, blk.k0..blk.k1, 0..d];
        // dV = P^T dO, summed over the query heads of a group.
        let dv_blk = f32_of(in_dtype(probs.clone()).swap_dims(3, 4).matmul(d_o.clone()).sum_dim(2));
        dv = dv.clone().slice_assign(range.clone(), dv.slice(range.clone()) + dv_blk);
        // dS = P (dP - delta), through the soft-cap, times the scale.
        let dp = f32_of(d_o.matmul(vb.swap_dims(3, 4)));
        let mut ds = probs * (dp - delta.clone().narrow(3, blk.q0, blk.n));
        if let Some(th) = tanh {
            let th = f32_of(th);
            ds = ds * (th.clone() * th).neg().add_scalar(1.0);
        }
        let ds = in_dtype(ds.mul_scalar(p.scale));
        dq.push(ds.clone().matmul(kb));
        let qb = g.q.clone().narrow(3, blk.q0, blk.n);
        let dk_blk = f32_of(ds.swap_dims(3, 4).matmul(qb).sum_dim(2));
        dk = dk.clone().slice_assign(range.clone(), dk.slice(range) + dk_blk);
    }
    let dq = Tensor::cat(dq, 3).reshape([b, h, s, d]);
    let back = |x: Tensor<5>| {
        let x = x.reshape([b, kvh, t, d]);
        if dtype == DType::F32 { x } else { x.cast(dtype) }
    };
    [dq, back(dk), back(dv)]
}

/// Attention under autodiff as one recorded operation whose backward is [`backward`] (see the module
/// documentation); the mask is a constant. `None` without autodiff (call [`forward`]) or on a backend
/// this is not built for.
pub fn recorded(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, mask: &Mask, p: Blockwise) -> Option<Tensor<4>> {
    if !q.is_autodiff() {
        return None;
    }
    if let Some(out) = flex::record(q, k, v, mask, p) {
        return Some(out);
    }
    #[cfg(feature = "gpu-kernels")]
    if let Some(out) = cube::record(q, k, v, mask, p) {
        return Some(out);
    }
    None
}

/// The recording for one concrete backend (burn's conversions to a backend's primitives are not
/// generic over backends).
macro_rules! recorder {
    ($module:ident, $backend:ty) => {
        mod $module {
            use burn::tensor::Tensor;
            use burn_autodiff::Autodiff;
            use burn_autodiff::checkpoint::base::Checkpointer;
            use burn_autodiff::checkpoint::strategy::NoCheckpointing;
            use burn_autodiff::grads::Gradients;
            use burn_autodiff::ops::{Backward, Ops, OpsKind};

            use super::{Blockwise, backward, forward};
            use crate::mask::Mask;

            type Plain = $backend;
            type Ad = Autodiff<Plain>;

            /// What the backward needs: the plain (untracked) inputs and outputs.
            #[derive(Debug, Clone)]
            pub(super) struct Kept {
                q: Tensor<4>,
                k: Tensor<4>,
                v: Tensor<4>,
                mask: Mask,
                out: Tensor<4>,
                stats: Tensor<5>,
                p: Blockwise,
            }

            #[derive(Debug)]
            pub(super) struct BlockwiseBackward;

            impl Backward<Plain, 3> for BlockwiseBackward {
                type State = Box<Kept>;

                fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                    let d_out = Tensor::<4>::from_primitive::<Plain>(grads.consume::<Plain>(&ops.node));
                    let s = ops.state;
                    let dqkv = backward(&s.q, &s.k, &s.v, &s.mask, &s.out, &s.stats, &d_out, s.p);
                    for (node, grad) in ops.parents.into_iter().zip(dqkv) {
                        if let (Some(node), Ok(grad)) = (node, grad.try_into_primitive::<Plain>()) {
                            grads.register::<Plain>(node.id, grad);
                        }
                    }
                }
            }

            pub(super) fn record(
                q: &Tensor<4>,
                k: &Tensor<4>,
                v: &Tensor<4>,
                mask: &Mask,
                p: Blockwise,
            ) -> Option<Tensor<4>> {
                let (qp, nq) = q.clone().try_into_primitive::<Ad>().ok()?.into_parts();
                let (kp, nk) = k.clone().try_into_primitive::<Ad>().ok()?.into_parts();
                let (vp, nv) = v.clone().try_into_primitive::<Ad>().ok()?.into_parts();
                let (q, k, v) = (
                    Tensor::<4>::from_primitive::<Plain>(qp),
                    Tensor::<4>::from_primitive::<Plain>(kp),
                    Tensor::<4>::from_primitive::<Plain>(vp),
                );
                // The mask is a constant: its segment codes as the plain backend's tensors.
                let mask = mask.map_codes(|c| {
                    let p = match c.clone().try_into_primitive::<Ad>() {
                        Ok(p) => p,
                        Err(_) => c.clone().try_into_primitive::<Plain>().ok()?,
                    };
                    Some(Tensor::from_primitive::<Plain>(p))
                })?;
                let (out, stats) = forward(&q, &k, &v, &mask, p);
                let out_p = out.clone().try_into_primitive::<Plain>().ok()?;
                let recorded = match BlockwiseBackward
                    .prepare::<NoCheckpointing>([nq, nk, nv])
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => {
                        prep.finish(Box::new(Kept { q, k, v, mask, out, stats, p }), out_p)
                    }
                    OpsKind::UnTracked(prep) => prep.finish(out_p),
                };
                Some(Tensor::from_primitive::<Ad>(recorded))
            }
        }
    };
}

recorder!(flex, burn::backend::Flex);
#[cfg(feature = "gpu-kernels")]
recorder!(cube, burn_cubecl::Cube);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::MaskSpec;

    #[test]
    fn blocks_skip_hidden_keys_in_aligned_spans() {
        let device = burn::tensor::Device::flex();
        // One row, 256 causal positions, two packed examples: 0..100 and 100..256.
        let spec = MaskSpec {
            batch: 1,
            q_len: 256,
            k_len: 256,
            key_valid: vec![true; 256],
            segments: (0..256).map(|i| u32::from(i >= 100)).collect(),
        };
        let mask = spec.build(None, &device);
        // 64 rows a block over all keys: 1 x 1 head x 64 rows x 256 keys x 4 bytes. The first 128 rows see
        // only 128 keys, so they take one block of the same bytes; the next 64 rows see the second
        // example's keys, 64..192 aligned, and 128 rows from there would see 192 keys: too many.
        let got = blocks(&mask.spans, 1, 1, 256, 256, 64 * 256 * 4);
        let want = [(0, 128, 0, 128), (128, 64, 64, 192), (192, 64, 64, 256)];
        let got: Vec<_> = got.iter().map(|b| (b.q0, b.n, b.k0, b.k1)).collect();
        assert_eq!(got, want);
        // A padding query (no key visible) widens its block to every key.
        let mut spec = spec;
        spec.key_valid[255] = false;
        spec.segments[255] = 2;
        let mask = spec.build(None, &device);
        assert_eq!(mask.spans.block(192, 64, KEY_ALIGN), (0, 256));
        assert_eq!(mask.spans.block(128, 64, KEY_ALIGN), (64, 192));
    }
}
