//! Attention masks: causal, plus padding (left-padded batches), packed segments (several examples in
//! one row, no attention across them) and sliding windows, as one additive f32 tensor per layer kind.
//!
//! A masked score gets `f32::MIN`, not `-inf`, as transformers does, so a fully masked row (a padding
//! query) stays finite.

use burn::tensor::{DType, Device, Tensor, TensorData};

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
    /// The additive mask `[batch, 1, 1, q_len, k_len]` (broadcast over kv-head groups and heads) for
    /// layers with the given sliding window.
    pub fn build(&self, window: Option<usize>, device: &Device) -> Tensor<5> {
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
