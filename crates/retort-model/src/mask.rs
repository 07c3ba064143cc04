//! Attention masks: causal, plus padding (left-padded batches), packed segments (several examples in
//! one row, no attention across them) and sliding windows, per layer kind: the keys each query can see,
//! blocks of the additive mask built on the device from the segments, and the whole additive f32
//! tensor where a kernel reads it.
//!
//! A masked score gets `f32::MIN`, not `-inf`, as transformers does, so a fully masked row (a padding
//! query) stays finite.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::sync::Arc;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

/// Which keys each query may see, described on the host.
#[derive(Debug, Clone)]
pub struct MaskSpec {
    /// Rows.
    pub batch: usize,
    /// Queries per row.
    pub q_len: usize,
    /// Keys per row (queries are the last `q_len` of them).
    pub k_len: usize,
    /// `[batch * k_len]`: false for padding keys.
    pub key_valid: Vec<bool>,
    /// `[batch * k_len]`: segment of each key (packing); queries use the last `q_len` entries.
    pub segments: Vec<u32>,
}

impl MaskSpec {
    /// The mask of layers with the given sliding window, on `device`: the keys each query position can
    /// see and what a block of scores needs to be masked ([`Mask::block`]). The whole additive tensor
    /// is built only when asked for ([`Mask::values`]).
    pub fn build(&self, window: Option<usize>, device: &Device) -> Mask {
        let (b, q, k) = (self.batch, self.q_len, self.k_len);
        let offset = k - q;
        // Query `qk` sees key `ki` when `ki <= qk`, the key is valid, in the query's segment and within
        // the window: in one scan over each row's keys, the first and last valid key of each segment
        // so far bound what a query can see.
        let mut spans: Vec<Option<(usize, usize)>> = vec![Some((k, 0)); q];
        let mut seen: HashMap<u32, (usize, usize)> = HashMap::new();
        for r in 0..b {
            seen.clear();
            for qk in 0..k {
                let seg = self.segments[r * k + qk];
                if self.key_valid[r * k + qk] {
                    seen.entry(seg).and_modify(|e| e.1 = qk).or_insert((qk, qk));
                }
                if qk < offset {
                    continue;
                }
                let qi = qk - offset;
                let visible = seen.get(&seg).and_then(|&(first, last)| {
                    let lo = window.map_or(first, |w| first.max((qk + 1).saturating_sub(w)));
                    (lo <= last).then_some((lo, last + 1))
                });
                spans[qi] = match (spans[qi], visible) {
                    (Some((lo, hi)), Some((l, h))) => Some((lo.min(l), hi.max(h))),
                    _ => None,
                };
            }
        }
        // A query no key is visible to (padding) softmaxes over every key, as the full mask gives it.
        let spans = spans.into_iter().map(|s| s.unwrap_or((0, k))).collect();
        let ints =
            |v: Vec<i64>, cols: usize| Tensor::<2, Int>::from_data(TensorData::new(v, [b, cols]), device);
        let code_q: Vec<i64> =
            (0..b).flat_map(|r| (offset..k).map(move |qk| i64::from(self.segments[r * k + qk]))).collect();
        let code_k: Vec<i64> =
            (0..b * k).map(|i| if self.key_valid[i] { i64::from(self.segments[i]) } else { -1 }).collect();
        Mask {
            spans: KeySpans { spans, keys: k },
            code_q: ints(code_q, q),
            code_k: ints(code_k, k),
            offset,
            window,
            spec: Arc::new(self.clone()),
            values: OnceCell::new(),
        }
    }

    /// The additive mask `[batch, 1, 1, q_len, k_len]`.
    fn values(&self, window: Option<usize>, device: &Device) -> Tensor<5> {
        let (b, q, k) = (self.batch, self.q_len, self.k_len);
        let offset = k - q;
        let mut data = vec![0f32; b * q * k];
        for r in 0..b {
            for qi in 0..q {
                let qk = qi + offset;
                let seg = self.segments[r * k + qk];
                let row = &mut data[(r * q + qi) * k..(r * q + qi + 1) * k];
                for (ki, v) in row.iter_mut().enumerate() {
                    let visible = ki <= qk
                        && self.key_valid[r * k + ki]
                        && self.segments[r * k + ki] == seg
                        && window.is_none_or(|w| ki + w > qk);
                    if !visible {
                        *v = f32::MIN;
                    }
                }
            }
        }
        Tensor::<5>::from_data(TensorData::new(data, [b, 1, 1, q, k]), (device, DType::F32))
    }
}

/// The attention mask of one kind of layer over one batch.
#[derive(Debug, Clone)]
pub struct Mask {
    /// The keys worth computing scores for, per query position.
    pub spans: KeySpans,
    /// `[batch, q_len]`: each query's segment.
    code_q: Tensor<2, Int>,
    /// `[batch, k_len]`: each key's segment, -1 for padding (which no query's segment equals).
    code_k: Tensor<2, Int>,
    /// Keys before the first query (cached positions).
    offset: usize,
    window: Option<usize>,
    spec: Arc<MaskSpec>,
    values: OnceCell<Tensor<5>>,
}

impl Mask {
    /// The additive mask `[batch, 1, 1, q_len, k_len]` (broadcast over kv-head groups and heads): 0 for
    /// a visible key, `f32::MIN` otherwise. Built on the first call, on the device the mask was built
    /// for (`batch x q_len x k_len` f32: what blockwise attention does without).
    pub fn values(&self) -> Tensor<5> {
        self.values.get_or_init(|| self.spec.values(self.window, &self.code_q.device())).clone()
    }

    /// The same mask with its segment codes passed through `f` (to a backend's plain device, for an
    /// operation's backward, without scanning the batch again); `None` when `f` declines. The whole
    /// additive tensor, if built, is not carried over.
    pub(crate) fn map_codes(&self, f: impl Fn(&Tensor<2, Int>) -> Option<Tensor<2, Int>>) -> Option<Mask> {
        Some(Mask {
            spans: self.spans.clone(),
            code_q: f(&self.code_q)?,
            code_k: f(&self.code_k)?,
            offset: self.offset,
            window: self.window,
            spec: Arc::clone(&self.spec),
            values: OnceCell::new(),
        })
    }

    /// The additive mask of queries `q0 .. q0 + n` over keys `k0 .. k1`, `[batch, 1, 1, n, k1 - k0]`:
    /// that block of [`Mask::values`], built on the device from the segments alone.
    pub fn block(&self, q0: usize, n: usize, k0: usize, k1: usize) -> Tensor<5> {
        let b = self.spec.batch;
        let tk = k1 - k0;
        let device = self.code_q.device();
        let cq = self.code_q.clone().narrow(1, q0, n).reshape([b, n, 1]).expand([b, n, tk]);
        let ck = self.code_k.clone().narrow(1, k0, tk).reshape([b, 1, tk]).expand([b, n, tk]);
        let first = (q0 + self.offset) as i64;
        let qpos =
            Tensor::<1, Int>::arange(first..first + n as i64, &device).reshape([1, n, 1]).expand([b, n, tk]);
        let kpos =
            Tensor::<1, Int>::arange(k0 as i64..k1 as i64, &device).reshape([1, 1, tk]).expand([b, n, tk]);
        let mut visible = cq.equal(ck).bool_and(kpos.clone().lower_equal(qpos.clone()));
        if let Some(w) = self.window {
            visible = visible.bool_and(kpos.add_scalar(w as i64).greater(qpos));
        }
        Tensor::<3>::zeros([b, n, tk], (&device, DType::F32))
            .mask_fill(visible.bool_not(), f32::MIN)
            .reshape([b, 1, 1, n, tk])
    }
}

/// For each query position, the keys `[lo, hi)` outside which every row of the batch masks every key
/// (the whole range for a query that sees no key at all, so that its softmax is the full mask's).
/// Lets blockwise attention skip key blocks the mask hides: the future under a causal mask, earlier
/// examples of a packed row, keys outside a sliding window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpans {
    spans: Vec<(usize, usize)>,
    keys: usize,
}

impl KeySpans {
    /// Every key for each of `queries` positions.
    pub fn full(queries: usize, keys: usize) -> KeySpans {
        KeySpans { spans: vec![(0, keys); queries], keys }
    }

    /// Query positions described.
    pub fn queries(&self) -> usize {
        self.spans.len()
    }

    /// The keys that queries `start .. start + n` can see, widened to multiples of `align` (within the
    /// keys there are), so that the shapes of blocks repeat from step to step on GPUs.
    pub fn block(&self, start: usize, n: usize, align: usize) -> (usize, usize) {
        let (lo, hi) = self.spans[start..start + n]
            .iter()
            .fold((self.keys, 0), |(lo, hi), &(l, h)| (lo.min(l), hi.max(h)));
        let align = align.max(1);
        let lo = lo / align * align;
        let hi = hi.div_ceil(align).saturating_mul(align).min(self.keys);
        if lo >= hi { (0, self.keys) } else { (lo, hi) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block of the mask built from the segments equals that block of the whole additive
    /// mask, and each query's span holds exactly its visible keys (the whole range for a query that
    /// sees none): packed rows with a reused segment id, right and left padding, cached positions
    /// before the queries, with and without a sliding window.
    #[test]
    fn blocks_and_spans_agree_with_the_whole_mask() {
        let device = Device::flex();
        let (b, q, k) = (3, 23, 29);
        let offset = k - q;
        let segments: Vec<u32> = (0..b * k)
            .map(|i| match (i / k, i % k) {
                (0, c) => u32::from(c >= 11) + u32::from(c >= 20) * 2, // 0, 1, then 3
                (1, c) => u32::from((9..17).contains(&c)),             // 0, 1, then 0 again
                (_, _) => 5,
            })
            .collect();
        // Row 1 ends in padding; row 2 starts with it (a left-padded generation batch).
        let key_valid: Vec<bool> = (0..b * k)
            .map(|i| match (i / k, i % k) {
                (1, c) => c < 25,
                (2, c) => c >= 4,
                _ => true,
            })
            .collect();
        let spec = MaskSpec { batch: b, q_len: q, k_len: k, key_valid, segments };
        for window in [None, Some(5)] {
            let mask = spec.build(window, &device);
            let whole = mask.values().into_data().try_to_vec::<f32>().unwrap();
            for qi in 0..q {
                let visible: Vec<usize> = (0..b)
                    .flat_map(|r| (0..k).map(move |ki| (r, ki)))
                    .filter(|&(r, ki)| whole[(r * q + qi) * k + ki] == 0.0)
                    .map(|(_, ki)| ki)
                    .collect();
                let any_blind = (0..b).any(|r| (0..k).all(|ki| whole[(r * q + qi) * k + ki] != 0.0));
                let want = if any_blind {
                    (0, k)
                } else {
                    (*visible.iter().min().unwrap(), visible.iter().max().unwrap() + 1)
                };
                assert_eq!(mask.spans.block(qi, 1, 1), want, "query {} window {window:?}", qi + offset);
            }
            for (q0, n, k0, k1) in [(0, q, 0, k), (3, 7, 2, 19), (22, 1, 28, 29), (10, 13, 0, 8)] {
                let block = mask.block(q0, n, k0, k1).into_data().try_to_vec::<f32>().unwrap();
                let want: Vec<f32> = (0..b)
                    .flat_map(|r| (q0..q0 + n).flat_map(move |qi| (k0..k1).map(move |ki| (r, qi, ki))))
                    .map(|(r, qi, ki)| whole[(r * q + qi) * k + ki])
                    .collect();
                assert_eq!(block, want, "block {q0}+{n} x {k0}..{k1} window {window:?}");
            }
        }
    }
}
