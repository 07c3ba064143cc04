//! Text measures shared by the filters: normalisation, word n-grams, MinHash with LSH for
//! near-duplicates, and distinct-n for diversity.

use std::collections::{HashMap, HashSet};

use retort_teacher::splitmix;

/// Lowercased words (runs of letters and digits).
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

/// The text reduced for exact-duplicate checks: lowercase words joined by single spaces.
pub fn normalize(text: &str) -> String {
    words(text).join(" ")
}

/// FNV-1a, a stable 64-bit hash (std's hasher is randomly seeded per process).
pub fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Hashes of the word n-grams of `text` (one n-gram of all words when there are fewer than `n`).
pub fn ngram_hashes(text: &str, n: usize) -> HashSet<u64> {
    let w = words(text);
    let n = n.max(1);
    if w.is_empty() {
        return HashSet::new();
    }
    if w.len() < n {
        return std::iter::once(fnv(w.join(" ").as_bytes())).collect();
    }
    w.windows(n).map(|g| fnv(g.join(" ").as_bytes())).collect()
}

/// Word n-grams of exactly `n` words (none when the text is shorter): the decontamination unit,
/// where a short text must not match by being short.
pub fn strict_ngram_hashes(text: &str, n: usize) -> HashSet<u64> {
    let w = words(text);
    if n == 0 || w.len() < n {
        return HashSet::new();
    }
    w.windows(n).map(|g| fnv(g.join(" ").as_bytes())).collect()
}

/// MinHash signatures with banded LSH: finds pairs whose estimated Jaccard similarity of word
/// shingles reaches a threshold.
#[derive(Debug)]
pub struct NearDup {
    shingle: usize,
    num_perm: usize,
    bands: usize,
    rows: usize,
    threshold: f64,
    signatures: Vec<Vec<u64>>,
    buckets: Vec<HashMap<u64, Vec<usize>>>,
}

impl NearDup {
    /// An empty index. Bands and rows are chosen so the LSH S-curve's midpoint, `(1/b)^(1/r)`, is
    /// closest to the threshold.
    pub fn new(threshold: f64, shingle: u32, num_perm: u32) -> NearDup {
        let num_perm = num_perm.max(2) as usize;
        let mut best = (1, num_perm, f64::INFINITY);
        for rows in 1..=num_perm {
            if !num_perm.is_multiple_of(rows) {
                continue;
            }
            let bands = num_perm / rows;
            let mid = (1.0 / bands as f64).powf(1.0 / rows as f64);
            // Prefer a midpoint slightly below the threshold: candidates are verified anyway, so a
            // false candidate costs a comparison while a missed pair is a duplicate kept.
            let score = (mid - (threshold - 0.05)).abs();
            if score < best.2 {
                best = (bands, rows, score);
            }
        }
        NearDup {
            shingle: shingle.max(1) as usize,
            num_perm,
            bands: best.0,
            rows: best.1,
            threshold,
            signatures: Vec::new(),
            buckets: vec![HashMap::new(); best.0],
        }
    }

    /// The MinHash signature of a text.
    pub fn signature(&self, text: &str) -> Vec<u64> {
        let shingles = ngram_hashes(text, self.shingle);
        (0..self.num_perm)
            .map(|i| {
                let seed = splitmix(i as u64 + 1);
                shingles.iter().map(|h| splitmix(h ^ seed)).min().unwrap_or(u64::MAX)
            })
            .collect()
    }

    /// Estimated Jaccard similarity of two signatures.
    pub fn similarity(a: &[u64], b: &[u64]) -> f64 {
        if a.is_empty() {
            return 0.0;
        }
        a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
    }

    /// The first indexed text that is a near-duplicate of `text` (its index and similarity).
    pub fn query(&self, sig: &[u64]) -> Option<(usize, f64)> {
        let mut best: Option<(usize, f64)> = None;
        let mut seen = HashSet::new();
        for (b, bucket) in self.buckets.iter().enumerate() {
            let band = &sig[b * self.rows..(b + 1) * self.rows];
            if let Some(ids) = bucket.get(&band_hash(band)) {
                for &id in ids {
                    if seen.insert(id) {
                        let s = Self::similarity(sig, &self.signatures[id]);
                        if s >= self.threshold && best.is_none_or(|(bi, _)| id < bi) {
                            best = Some((id, s));
                        }
                    }
                }
            }
        }
        best
    }

    /// Adds a signature; returns its index.
    pub fn insert(&mut self, sig: Vec<u64>) -> usize {
        let id = self.signatures.len();
        for b in 0..self.bands {
            let h = band_hash(&sig[b * self.rows..(b + 1) * self.rows]);
            self.buckets[b].entry(h).or_default().push(id);
        }
        self.signatures.push(sig);
        id
    }
}

fn band_hash(band: &[u64]) -> u64 {
    band.iter().fold(0x517c_c1b7_2722_0a95_u64, |h, x| splitmix(h ^ x))
}

/// distinct-n: unique word n-grams over all n-grams in the texts (1 is fully diverse).
pub fn distinct_n<'a>(texts: impl IntoIterator<Item = &'a str>, n: usize) -> f64 {
    let mut total = 0usize;
    let mut unique = HashSet::new();
    for t in texts {
        let w = words(t);
        if w.len() < n {
            continue;
        }
        for g in w.windows(n) {
            total += 1;
            unique.insert(fnv(g.join(" ").as_bytes()));
        }
    }
    if total == 0 { 0.0 } else { unique.len() as f64 / total as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_ignores_case_and_punctuation() {
        assert_eq!(normalize("Hello,  WORLD!\n"), "hello world");
        assert_eq!(words("l'été 2024"), ["l", "été", "2024"]);
    }

    #[test]
    fn near_duplicates_are_found_and_different_texts_are_not() {
        let mut nd = NearDup::new(0.8, 3, 128);
        let a = "the quick brown fox jumps over the lazy dog near the river bank today and tomorrow";
        let b = "the quick brown fox jumps over the lazy dog near the river bank today and tomorrow!";
        let c = "an entirely different sentence about invoices payments refunds and billing cycles";
        let ia = nd.insert(nd.signature(a));
        assert_eq!(nd.query(&nd.signature(b)).map(|x| x.0), Some(ia));
        assert_eq!(nd.query(&nd.signature(c)), None);
        let one_word_changed =
            "the quick brown fox jumps over the lazy dog near the river bank today and yesterday";
        let s = NearDup::similarity(&nd.signature(a), &nd.signature(one_word_changed));
        assert!(s > 0.7 && s < 1.0, "{s}");
    }

    #[test]
    fn distinct_n_measures_repetition() {
        assert_eq!(distinct_n(["a b c", "d e f"], 1), 1.0);
        assert_eq!(distinct_n(["a b", "a b"], 2), 0.5);
        assert_eq!(distinct_n(["a"], 2), 0.0);
    }

    #[test]
    fn strict_ngrams_need_n_words() {
        assert!(strict_ngram_hashes("one two", 3).is_empty());
        assert_eq!(strict_ngram_hashes("one two three four", 3).len(), 2);
        assert_eq!(ngram_hashes("one two", 3).len(), 1);
    }
}
