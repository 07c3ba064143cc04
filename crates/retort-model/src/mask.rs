//! Attention masks: causal, plus padding (left-padded batches), packed segments (several examples in
//! one row, no attention across them) and sliding windows, as one additive f32 tensor per layer kind.
//!
//! A masked score gets `f32::MIN`, as transformers masks, so a fully masked row (a padding query) stays
//! finite and averages every value as transformers' does. On the CPU, any other masked score gets
//! `-inf`: the probabilities are the same bits (`exp` of either, minus a finite row maximum, is exactly
//! 0), but an `exp` of a huge finite negative number takes libm's underflow path, 2.6% of a CPU training
//! step in burn's fused attention (`-inf` is a fast special case). GPUs keep `f32::MIN`: their `exp` has
//! no such path, and WGSL and Metal's fast math may assume that no value is infinite.

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
        let inf_where_possible = crate::device::is_cpu(device);
        let mut data = vec![0f32; b * q * k];
        for r in 0..b {
            for qi in 0..q {
                let qk = qi + offset;
                let seg = self.segments[r * k + qk];
                let row = &mut data[(r * q + qi) * k..(r * q + qi + 1) * k];
                let mut any_visible = false;
                for (ki, v) in row.iter_mut().enumerate() {
                    let visible = ki <= qk
                        && self.key_valid[r * k + ki]
                        && self.segments[r * k + ki] == seg
                        && window.is_none_or(|w| ki + w > qk);
                    if visible {
                        any_visible = true;
                    } else {
                        *v = f32::MIN;
                    }
                }
                if any_visible && inf_where_possible {
                    row.iter_mut().filter(|v| **v == f32::MIN).for_each(|v| *v = f32::NEG_INFINITY);
                }
            }
        }
        Tensor::<5>::from_data(TensorData::new(data, [b, 1, 1, q, k]), (device, DType::F32))
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;
    use burn::tensor::activation::softmax;

    use super::*;

    /// On the CPU, padding queries keep `f32::MIN` rows and every other masked score is `-inf`; the
    /// softmax is the same, bit for bit, as with transformers' all-`f32::MIN` mask.
    #[test]
    fn masked_scores_are_neg_inf_except_in_fully_masked_rows() {
        let device = Device::flex();
        // Row 0: one left-padding key; row 1: none. Causal, 4 queries over 4 keys.
        let spec = MaskSpec {
            batch: 2,
            q_len: 4,
            k_len: 4,
            key_valid: vec![false, true, true, true, true, true, true, true],
            segments: vec![0; 8],
        };
        let mask = spec.build(None, &device);
        let m = mask.to_data().try_to_vec::<f32>().unwrap();
        // Row 0, query 0 sees only the padding key: fully masked.
        assert!(m[..4].iter().all(|&v| v == f32::MIN), "{:?}", &m[..4]);
        // Row 0, query 1 sees key 1 only.
        assert_eq!(&m[4..8], &[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]);
        // Row 1, query 3 sees everything.
        assert!(m[28..32].iter().all(|&v| v == 0.0));

        let transformers = Tensor::<5>::from_data(
            TensorData::new(
                m.iter().map(|&v| if v == 0.0 { 0.0 } else { f32::MIN }).collect(),
                [2, 1, 1, 4, 4],
            ),
            &device,
        );
        let scores = Tensor::<5>::random([2, 1, 1, 4, 4], Distribution::Normal(0.0, 3.0), &device);
        let ours = softmax(scores.clone() + mask, 4).to_data().try_to_vec::<f32>().unwrap();
        let theirs = softmax(scores + transformers, 4).to_data().try_to_vec::<f32>().unwrap();
        assert_eq!(
            ours.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            theirs.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(ours[..4].iter().all(|&p| p == 0.25), "a padding query averages: {:?}", &ours[..4]);
    }
}
