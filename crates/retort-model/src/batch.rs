//! What one forward pass reads: token ids with their positions, which tokens are padding, and which
//! packed example each token belongs to. Built on the host; the model turns it into tensors.

/// A `[rows, len]` grid of tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Number of rows.
    pub rows: usize,
    /// Tokens per row.
    pub len: usize,
    /// Token ids, row-major.
    pub ids: Vec<u32>,
    /// Position of each token within its own example (RoPE), row-major.
    pub positions: Vec<usize>,
    /// False for padding tokens, row-major.
    pub valid: Vec<bool>,
    /// Which packed example each token belongs to, row-major; attention never crosses examples.
    pub segments: Vec<u32>,
}

impl Batch {
    /// One sequence.
    pub fn single(ids: &[u32]) -> Batch {
        Batch {
            rows: 1,
            len: ids.len(),
            ids: ids.to_vec(),
            positions: (0..ids.len()).collect(),
            valid: vec![true; ids.len()],
            segments: vec![0; ids.len()],
        }
    }

    /// Several sequences, left-padded with `pad` to the longest; positions count real tokens only (as
    /// transformers' `generate` does), so each row computes what it would alone.
    pub fn left_padded(seqs: &[Vec<u32>], pad: u32) -> Batch {
        let len = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut b = Batch {
            rows: seqs.len(),
            len,
            ids: Vec::new(),
            positions: Vec::new(),
            valid: Vec::new(),
            segments: Vec::new(),
        };
        for s in seqs {
            let padding = len - s.len();
            b.ids.extend(std::iter::repeat_n(pad, padding).chain(s.iter().copied()));
            b.positions.extend(std::iter::repeat_n(0, padding).chain(0..s.len()));
            b.valid.extend(std::iter::repeat_n(false, padding).chain(std::iter::repeat_n(true, s.len())));
            b.segments.extend(std::iter::repeat_n(0, len));
        }
        b
    }

    /// Several sequences packed into one row: positions restart at every example and attention stays
    /// inside each example.
    pub fn packed(seqs: &[Vec<u32>]) -> Batch {
        let mut b = Batch {
            rows: 1,
            len: 0,
            ids: Vec::new(),
            positions: Vec::new(),
            valid: Vec::new(),
            segments: Vec::new(),
        };
        for (i, s) in seqs.iter().enumerate() {
            b.ids.extend_from_slice(s);
            b.positions.extend(0..s.len());
            b.valid.extend(std::iter::repeat_n(true, s.len()));
            b.segments.extend(std::iter::repeat_n(i as u32, s.len()));
        }
        b.len = b.ids.len();
        b
    }

    /// Rows with explicit position ids; a position that does not follow its predecessor starts a new
    /// packed example (the rule transformers uses to detect packing).
    pub fn with_positions(rows: usize, len: usize, ids: Vec<u32>, positions: Vec<usize>) -> Batch {
        let mut segments = Vec::with_capacity(ids.len());
        for r in 0..rows {
            let mut seg = 0u32;
            for i in 0..len {
                if i > 0 && positions[r * len + i] != positions[r * len + i - 1] + 1 {
                    seg += 1;
                }
                segments.push(seg);
            }
        }
        Batch { rows, len, valid: vec![true; ids.len()], ids, positions, segments }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padding_counts_positions_from_the_first_real_token() {
        let b = Batch::left_padded(&[vec![5, 6, 7], vec![9]], 0);
        assert_eq!(b.ids, [5, 6, 7, 0, 0, 9]);
        assert_eq!(b.positions, [0, 1, 2, 0, 0, 0]);
        assert_eq!(b.valid, [true, true, true, false, false, true]);
    }

    #[test]
    fn packing_restarts_positions_and_segments() {
        let b = Batch::packed(&[vec![1, 2], vec![3, 4, 5]]);
        assert_eq!(b.positions, [0, 1, 0, 1, 2]);
        assert_eq!(b.segments, [0, 0, 1, 1, 1]);
        assert_eq!(Batch::with_positions(1, 5, b.ids.clone(), b.positions.clone()).segments, b.segments);
    }
}
