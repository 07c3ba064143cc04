//! The training loss: token cross-entropy over label tokens only. Logits at position `t` predict the
//! token at `t + 1`; labels of -100 carry no loss. Only the positions that have a label go through the
//! LM head, so completion-only training never computes (or stores) logits for prompt tokens.

use retort_model::Transformer;
use retort_model::burn::tensor::activation::log_softmax;
use retort_model::burn::tensor::{DType, Int, Tensor, TensorData};
use retort_model::memory::head_chunk_bytes;

/// No loss for this label.
pub const IGNORE: i64 = -100;

/// Positions (row-major over `[rows, len]`) whose next token is a label, with that label.
pub fn label_positions(labels: &[i64], rows: usize, len: usize) -> (Vec<i64>, Vec<i64>) {
    let mut pos = Vec::new();
    let mut tgt = Vec::new();
    for r in 0..rows {
        for t in 0..len.saturating_sub(1) {
            let l = labels[r * len + t + 1];
            if l != IGNORE {
                pos.push((r * len + t) as i64);
                tgt.push(l);
            }
        }
    }
    (pos, tgt)
}

/// The label positions and their labels (see [`label_positions`]) in chunks whose f32 logits take at
/// most `chunk_bytes` for a vocabulary of `vocab` (at least one position a chunk).
pub fn label_chunks(
    labels: &[i64],
    rows: usize,
    len: usize,
    vocab: usize,
    chunk_bytes: usize,
) -> Vec<(Vec<i64>, Vec<i64>)> {
    let (pos, tgt) = label_positions(labels, rows, len);
    let chunk = (chunk_bytes / (vocab * 4)).max(1);
    pos.chunks(chunk).zip(tgt.chunks(chunk)).map(|(p, t)| (p.to_vec(), t.to_vec())).collect()
}

/// Sum of the negative log-likelihoods of the label tokens (a `[1]` tensor, f32) given the final
/// hidden states `[rows, len, hidden]`, the logits computed one chunk of positions at a time
/// ([`head_chunk_bytes`] of the device). Returns `None` when the batch has no label tokens.
pub fn nll_sum(model: &Transformer, hidden: Tensor<3>, labels: &[i64]) -> Option<Tensor<1>> {
    let [rows, len, h] = hidden.dims();
    let device = hidden.device();
    let flat = hidden.reshape([rows * len, h]);
    label_chunks(labels, rows, len, model.config.vocab_size, head_chunk_bytes(&device))
        .into_iter()
        .map(|(pos, tgt)| {
            let n = pos.len();
            let pos = Tensor::<1, Int>::from_data(TensorData::new(pos, [n]), &device);
            nll_of(model, flat.clone().select(0, pos).reshape([1, n, h]), tgt)
        })
        .reduce(|a, b| a + b)
}

/// Sum of the negative log-likelihoods of `targets` given the final hidden states of the positions
/// that predict them, `[1, targets, hidden]`.
pub fn nll_of(model: &Transformer, selected: Tensor<3>, targets: Vec<i64>) -> Tensor<1> {
    let n = targets.len();
    let device = selected.device();
    let logits = model.logits(selected).reshape([n, model.config.vocab_size]);
    let logits = if logits.dtype() == DType::F32 { logits } else { logits.cast(DType::F32) };
    // One operation on the CPU (`retort_model::xent`), else burn's log-softmax.
    if let Some(nll) = retort_model::xent::nll_sum(&logits, &targets) {
        return nll;
    }
    let logp = log_softmax(logits, 1);
    let tgt = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
    logp.gather(1, tgt).sum().neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_shift_by_one() {
        // Row 0: labels on tokens 2 and 3 -> predicted from positions 1 and 2.
        let labels = [IGNORE, IGNORE, 7, 8, IGNORE, IGNORE, IGNORE, 9];
        let (pos, tgt) = label_positions(&labels, 2, 4);
        assert_eq!(pos, [1, 2, 6]);
        assert_eq!(tgt, [7, 8, 9]);
    }
}
