//! Rows from examples: too-long examples truncated or dropped and counted, a seeded shuffle that is
//! the same for the same seed, packing that keeps examples apart (positions, segments, no loss
//! across a boundary), and right-padded batches.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use retort_data::labels::{Example, IGNORE};
use retort_data::pack::{Row, build_rows, collate};
use retort_recipe::schema::train::TooLong;

/// An example of `len` tokens from dataset line `line` (ids `line * 1000 + k`), labelled from token
/// `answer` on.
fn ex(line: usize, len: usize, answer: usize) -> Example {
    let ids: Vec<u32> = (0..len).map(|k| (line * 1000 + k) as u32).collect();
    let labels =
        ids.iter().enumerate().map(|(k, &id)| if k >= answer { i64::from(id) } else { IGNORE }).collect();
    Example { ids, labels, line }
}

/// The dataset line each segment of a row came from.
fn lines_of(row: &Row) -> Vec<usize> {
    let mut out = Vec::new();
    for (k, &s) in row.segments.iter().enumerate() {
        if k == 0 || s != row.segments[k - 1] {
            out.push(row.ids[k] as usize / 1000);
        }
    }
    out
}

#[test]
fn too_long_examples_are_truncated_or_dropped_and_counted() {
    let examples = || vec![ex(1, 10, 2), ex(2, 4, 1), ex(3, 12, 9), ex(4, 8, 5)];
    let (rows, report) = build_rows(examples(), 8, TooLong::Truncate, false, 0);
    // Line 1 is cut to 8 tokens and kept; line 3's answer starts after token 8, so it is left with
    // nothing to learn and is dropped, counted apart; line 4 fits exactly.
    assert_eq!((report.truncated.count, report.truncated.lines.len()), (2, 2));
    assert!(report.truncated.lines.contains(&1) && report.truncated.lines.contains(&3));
    assert_eq!(report.dropped_no_labels.lines, [3]);
    assert_eq!(report.dropped_too_long.count, 0);
    assert_eq!((report.examples_in, report.examples_out, report.rows), (4, 3, 3));
    assert!(rows.iter().all(|r| r.len() <= 8));
    let one = rows.iter().find(|r| lines_of(r) == [1]).unwrap();
    assert_eq!(one.ids, ex(1, 8, 0).ids);

    let (rows, report) = build_rows(examples(), 8, TooLong::Drop, false, 0);
    assert_eq!(report.dropped_too_long.count, 2);
    let mut dropped = report.dropped_too_long.lines.clone();
    dropped.sort_unstable();
    assert_eq!(dropped, [1, 3]);
    assert_eq!((report.truncated.count, report.dropped_no_labels.count, rows.len()), (0, 0, 2));
    let shown = report.to_string();
    assert!(shown.contains("dropped, longer than 8 tokens: 2 (lines"), "{shown}");
}

#[test]
fn the_first_token_of_an_example_is_never_a_target() {
    // Its only label is on token 0, which nothing inside the example predicts: nothing to learn.
    let (rows, report) = build_rows(vec![ex(1, 5, 0), ex(2, 5, 4), ex(3, 3, 0)], 16, TooLong::Drop, true, 0);
    assert_eq!(report.dropped_no_labels.count, 0);
    assert_eq!(report.label_tokens, 4 + 1 + 2);
    let (_, report) = build_rows(vec![ex(1, 1, 0)], 16, TooLong::Drop, true, 0);
    assert_eq!(report.dropped_no_labels.lines, [1]);
    assert_eq!(rows.len(), 1);
}

#[test]
fn packing_fills_rows_greedily_and_keeps_examples_apart() {
    let examples: Vec<Example> = (1..=30).map(|l| ex(l, 3 + l % 7, 2)).collect();
    let total: usize = examples.iter().map(|e| e.ids.len()).sum();
    let (rows, report) = build_rows(examples.clone(), 16, TooLong::Truncate, true, 42);
    assert!(rows.len() < 30 && rows.len() == report.rows);
    assert_eq!(report.tokens, total);
    assert_eq!(report.label_tokens, rows.iter().flat_map(|r| &r.labels).filter(|&&l| l != IGNORE).count());
    assert!((report.efficiency - total as f64 / (16 * rows.len()) as f64).abs() < 1e-12);
    let mut seen = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        assert!(row.len() <= 16);
        assert_eq!(
            [row.ids.len(), row.labels.len(), row.positions.len(), row.segments.len()],
            [row.len(); 4]
        );
        let mut start = 0;
        for (s, line) in lines_of(row).into_iter().enumerate() {
            let e = &examples[line - 1];
            let n = e.ids.len();
            // Whole examples, positions from 0, segments numbered from 1.
            assert_eq!(row.ids[start..start + n], e.ids[..]);
            assert_eq!(row.positions[start..start + n], (0..n).collect::<Vec<_>>()[..]);
            assert!(row.segments[start..start + n].iter().all(|&x| x == s as u32 + 1));
            // Labels as encoded, except the first token of each example, which is not a target.
            assert_eq!(row.labels[start], IGNORE);
            assert_eq!(row.labels[start + 1..start + n], e.labels[1..]);
            start += n;
            seen.push(line);
        }
        // Greedy: the next row's first example would not have fitted here.
        if let Some(next) = rows.get(r + 1) {
            assert!(row.len() + examples[lines_of(next)[0] - 1].ids.len() > 16);
        }
        // After the trainer's shift, no token predicts a token of another example.
        for t in 1..row.len() {
            if row.segments[t] != row.segments[t - 1] {
                assert_eq!(row.labels[t], IGNORE);
            }
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (1..=30).collect::<Vec<_>>(), "every example exactly once");
}

#[test]
fn without_packing_each_example_is_its_own_row() {
    let examples: Vec<Example> = (1..=5).map(|l| ex(l, 4, 1)).collect();
    let (rows, report) = build_rows(examples, 16, TooLong::Truncate, false, 1);
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|r| r.segments == [1; 4] && r.positions == [0, 1, 2, 3]));
    assert!((report.efficiency - 0.25).abs() < 1e-12);
}

#[test]
fn the_same_seed_gives_the_same_rows_and_another_seed_another_order() {
    let examples: Vec<Example> = (1..=50).map(|l| ex(l, 2 + l % 5, 1)).collect();
    let order = |seed| {
        let (rows, _) = build_rows(examples.clone(), 12, TooLong::Truncate, true, seed);
        (rows.iter().flat_map(lines_of).collect::<Vec<_>>(), rows)
    };
    let (a, rows_a) = order(7);
    let (b, rows_b) = order(7);
    assert_eq!(rows_a, rows_b);
    assert_eq!(a, b);
    assert_ne!(order(8).0, a);
    // Pinned: the order for a seed must never change with a dependency's version. The numbers come
    // from this Python reimplementation (SplitMix64, Fisher-Yates, `(next * n) >> 64`):
    //   M = 2**64; s = 7
    //   def nxt():
    //       global s; s = (s + 0x9E3779B97F4A7C15) % M; z = s
    //       z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M; z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M
    //       return z ^ (z >> 31)
    //   v = list(range(1, 51))
    //   for i in range(49, 0, -1): j = (nxt() * (i + 1)) >> 64; v[i], v[j] = v[j], v[i]
    //   print(v[:10])
    assert_eq!(a[..10], [42, 41, 8, 27, 37, 43, 49, 29, 16, 18]);
}

#[test]
fn collate_pads_on_the_right() {
    let (mut rows, _) = build_rows(vec![ex(1, 3, 1), ex(2, 5, 2)], 8, TooLong::Truncate, false, 0);
    rows.sort_by_key(Row::len);
    let b = collate(&rows, 99);
    assert_eq!((b.rows, b.len), (2, 5));
    assert_eq!(b.ids, [1000, 1001, 1002, 99, 99, 2000, 2001, 2002, 2003, 2004]);
    assert_eq!(b.positions, [0, 1, 2, 0, 0, 0, 1, 2, 3, 4]);
    assert_eq!(b.valid, [true, true, true, false, false, true, true, true, true, true]);
    assert_eq!(b.segments, [1, 1, 1, 0, 0, 1, 1, 1, 1, 1]);
    assert_eq!(b.labels, [IGNORE, 1001, 1002, IGNORE, IGNORE, IGNORE, IGNORE, 2002, 2003, 2004]);
    assert_eq!(b.label_tokens(), 5);
    let empty = collate(&[], 0);
    assert_eq!((empty.rows, empty.len, empty.ids.len()), (0, 0, 0));
}

#[test]
fn a_zero_length_limit_leaves_nothing_and_does_not_panic() {
    let (rows, report) = build_rows(vec![ex(1, 3, 1)], 0, TooLong::Truncate, true, 0);
    assert!(rows.is_empty());
    assert_eq!((report.truncated.count, report.dropped_no_labels.count, report.efficiency), (1, 1, 0.0));
}
