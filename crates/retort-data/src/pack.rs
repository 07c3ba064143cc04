//! Examples into training rows: too-long handling, a seeded shuffle, packing, and right-padded
//! batches.
//!
//! Packing fills each row greedily, in shuffled order, with whole examples up to `max_len` tokens.
//! Positions restart at 0 for every example and `segments` number the examples of a row from 1
//! (0 is padding), so the model can keep attention inside each example. The first label of every
//! example is [`IGNORE`]: nothing inside the example predicts its first token, and after the
//! trainer's shift this keeps the last token of one packed example from being trained to predict
//! the first token of the next.

use std::fmt;

use retort_recipe::schema::train::TooLong;
use serde::Serialize;

use crate::labels::{Example, IGNORE};
use crate::report::Tally;

/// One training sequence: one example, or several packed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Labels, not shifted; [`IGNORE`] where no loss.
    pub labels: Vec<i64>,
    /// Position of each token inside its example (restarts at 0 per example).
    pub positions: Vec<usize>,
    /// Which example of the row each token belongs to, from 1.
    pub segments: Vec<u32>,
}

impl Row {
    /// Tokens in the row.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the row has no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// What building rows did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PackReport {
    /// Examples given.
    pub examples_in: usize,
    /// Examples cut to `max_len` tokens and kept.
    pub truncated: Tally,
    /// Examples longer than `max_len` left out (`too_long = "drop"`).
    pub dropped_too_long: Tally,
    /// Examples left out because no token carried loss (after truncation, or from the start).
    pub dropped_no_labels: Tally,
    /// Examples in the rows.
    pub examples_out: usize,
    /// Rows built.
    pub rows: usize,
    /// Tokens in the rows.
    pub tokens: usize,
    /// Tokens that carry loss.
    pub label_tokens: usize,
    /// The length rows are filled to.
    pub max_len: usize,
    /// Tokens over row capacity (`rows * max_len`): 1.0 when every row is full.
    pub efficiency: f64,
}

impl fmt::Display for PackReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} examples -> {} rows of up to {} tokens ({:.1}% full), {} tokens, {} with loss",
            self.examples_out,
            self.rows,
            self.max_len,
            self.efficiency * 100.0,
            self.tokens,
            self.label_tokens
        )?;
        if self.truncated.count > 0 {
            write!(f, "\ntruncated to {} tokens: {}", self.max_len, self.truncated)?;
        }
        if self.dropped_too_long.count > 0 {
            write!(f, "\ndropped, longer than {} tokens: {}", self.max_len, self.dropped_too_long)?;
        }
        if self.dropped_no_labels.count > 0 {
            write!(f, "\ndropped, no token to learn: {}", self.dropped_no_labels)?;
        }
        Ok(())
    }
}

/// SplitMix64 (Steele, Lea and Flood 2014): a tiny generator written out here so that the data order
/// for a seed never changes with a dependency's version.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`), by Lemire's multiply-shift (the bias is below 2^-40 for any
    /// dataset size).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// Shuffles in place with Fisher-Yates driven by [`SplitMix64`]; the same seed always gives the same
/// order. The trainer can reshuffle rows per epoch with `seed + epoch`.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for i in (1..items.len()).rev() {
        let j = rng.below(i + 1);
        items.swap(i, j);
    }
}

/// Shuffles the examples by `seed`, applies `too_long`, and builds rows of at most `max_len` tokens:
/// packed greedily when `packing`, else one example per row.
pub fn build_rows(
    mut examples: Vec<Example>,
    max_len: usize,
    too_long: TooLong,
    packing: bool,
    seed: u64,
) -> (Vec<Row>, PackReport) {
    let mut report = PackReport { examples_in: examples.len(), max_len, ..PackReport::default() };
    shuffle(&mut examples, seed);
    let mut rows: Vec<Row> = Vec::new();
    let mut current =
        Row { ids: Vec::new(), labels: Vec::new(), positions: Vec::new(), segments: Vec::new() };
    let mut segment = 0u32;
    for mut ex in examples {
        if ex.ids.len() > max_len {
            match too_long {
                TooLong::Drop => {
                    report.dropped_too_long.add(ex.line);
                    continue;
                }
                TooLong::Truncate => {
                    ex.ids.truncate(max_len);
                    ex.labels.truncate(max_len);
                    report.truncated.add(ex.line);
                }
            }
        }
        if let Some(first) = ex.labels.first_mut() {
            *first = IGNORE;
        }
        let n = ex.ids.len();
        if ex.labels.iter().all(|&l| l == IGNORE) {
            report.dropped_no_labels.add(ex.line);
            continue;
        }
        if !current.is_empty() && (!packing || current.len() + n > max_len) {
            rows.push(std::mem::replace(
                &mut current,
                Row { ids: Vec::new(), labels: Vec::new(), positions: Vec::new(), segments: Vec::new() },
            ));
            segment = 0;
        }
        segment += 1;
        current.ids.extend_from_slice(&ex.ids);
        current.labels.extend_from_slice(&ex.labels);
        current.positions.extend(0..n);
        current.segments.extend(std::iter::repeat_n(segment, n));
        report.examples_out += 1;
        report.tokens += n;
        report.label_tokens += ex.labels.iter().filter(|&&l| l != IGNORE).count();
    }
    if !current.is_empty() {
        rows.push(current);
    }
    report.rows = rows.len();
    let capacity = rows.len() * max_len;
    report.efficiency = if capacity == 0 { 0.0 } else { report.tokens as f64 / capacity as f64 };
    (rows, report)
}

/// Rows as one right-padded batch, row-major (`rows x len`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainBatch {
    /// Number of rows.
    pub rows: usize,
    /// Length of every row: the longest row's.
    pub len: usize,
    /// Token ids; `pad_id` in padding.
    pub ids: Vec<u32>,
    /// Positions inside each example; 0 in padding.
    pub positions: Vec<usize>,
    /// False in padding.
    pub valid: Vec<bool>,
    /// Example number inside the row, from 1; 0 in padding.
    pub segments: Vec<u32>,
    /// Labels, not shifted; [`IGNORE`] in padding.
    pub labels: Vec<i64>,
}

impl TrainBatch {
    /// Tokens that carry loss after the trainer's one-token shift (a label at position 0 of a row
    /// has nothing before it to predict it).
    pub fn label_tokens(&self) -> usize {
        if self.len == 0 {
            return 0;
        }
        self.labels.chunks(self.len).map(|row| row.iter().skip(1).filter(|&&l| l != IGNORE).count()).sum()
    }
}

/// Pads rows on the right to the longest one.
pub fn collate(rows: &[Row], pad_id: u32) -> TrainBatch {
    collate_to(rows, pad_id, 1)
}

/// Pads rows on the right to the longest one, rounded up to a multiple of `multiple` (as
/// `pad_to_multiple_of` in transformers' collators): GPU kernels are compiled and tuned per shape, and a
/// length that varies by a token from one micro-batch to the next keeps asking for new ones. The padding
/// is invalid (masked from attention) and carries no labels.
pub fn collate_to(rows: &[Row], pad_id: u32, multiple: usize) -> TrainBatch {
    let len = rows.iter().map(Row::len).max().unwrap_or(0).next_multiple_of(multiple.max(1));
    let total = rows.len() * len;
    let mut b = TrainBatch {
        rows: rows.len(),
        len,
        ids: Vec::with_capacity(total),
        positions: Vec::with_capacity(total),
        valid: Vec::with_capacity(total),
        segments: Vec::with_capacity(total),
        labels: Vec::with_capacity(total),
    };
    for row in rows {
        let pad = len - row.len();
        b.ids.extend(row.ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
        b.positions.extend(row.positions.iter().copied().chain(std::iter::repeat_n(0, pad)));
        b.valid.extend(std::iter::repeat_n(true, row.len()).chain(std::iter::repeat_n(false, pad)));
        b.segments.extend(row.segments.iter().copied().chain(std::iter::repeat_n(0, pad)));
        b.labels.extend(row.labels.iter().copied().chain(std::iter::repeat_n(IGNORE, pad)));
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collate_to_pads_to_a_multiple_with_masked_unlabelled_tokens() {
        let row = |n: usize| Row {
            ids: (1..=n as u32).collect(),
            positions: (0..n).collect(),
            segments: vec![1; n],
            labels: (0..n as i64).collect(),
        };
        let rows = [row(70), row(5)];
        let exact = collate(&rows, 0);
        assert_eq!(exact.len, 70);
        let b = collate_to(&rows, 9, 64);
        assert_eq!((b.rows, b.len), (2, 128));
        for r in 0..2 {
            let n = rows[r].len();
            let at = |v: &[bool]| v[r * 128..(r + 1) * 128].iter().filter(|&&x| x).count();
            assert_eq!(at(&b.valid), n);
            assert!(b.labels[r * 128 + n..(r + 1) * 128].iter().all(|&l| l == IGNORE));
            assert!(b.ids[r * 128 + n..(r + 1) * 128].iter().all(|&t| t == 9));
            assert_eq!(&b.ids[r * 128..r * 128 + n], &rows[r].ids[..]);
        }
        assert_eq!(b.label_tokens(), exact.label_tokens());
        assert_eq!(collate_to(&[row(128)], 0, 64).len, 128, "a multiple already");
    }

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // First outputs for seed 1234567 from the reference C implementation (Vigna).
        let mut r = SplitMix64::new(1234567);
        let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(got, [6457827717110365317, 3203168211198807973, 9817491932198370423]);
    }

    #[test]
    fn shuffle_is_a_permutation_and_uses_every_position() {
        let mut v: Vec<u32> = (0..100).collect();
        shuffle(&mut v, 7);
        let mut sorted = v.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(v, sorted);
        let mut empty: Vec<u32> = Vec::new();
        shuffle(&mut empty, 7);
    }
}
