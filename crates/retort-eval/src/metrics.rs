//! Scores of answers against references, each in [0, 1], and percentile-bootstrap 95% intervals.
//!
//! Every metric is a mean of per-example values except macro-F1, which is computed over the whole
//! (resampled) set. Definitions:
//! - exact match: byte equality after trimming surrounding whitespace (chat models end answers in a
//!   newline or not at will);
//! - normalized exact match: equality after lowercasing, trimming and collapsing whitespace runs;
//! - label accuracy: the normalized answer equals the normalized reference label; an answer outside the
//!   label set is wrong;
//! - macro-F1: F1 per label of the label set (answers outside it count as a miss for the reference's
//!   label), averaged over labels that occur in the references or the answers;
//! - field accuracy: the fraction of the reference's leaf fields (dotted paths through objects and
//!   arrays) whose values the answer has equal; an answer that is not JSON scores 0;
//! - schema validity: the answer parses as JSON and matches the schema;
//! - ROUGE-L: F-measure (beta = 1) of the longest common subsequence of whitespace tokens;
//! - chrF: character n-gram F-score, n = 1..6 averaged, beta = 2, whitespace removed (sacrebleu's
//!   default chrF), in [0, 1].

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

/// Lowercase, trim, collapse whitespace.
pub fn normalize(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// Exact match after trimming.
pub fn exact_match(answer: &str, reference: &str) -> f64 {
    f64::from(u8::from(answer.trim() == reference.trim()))
}

/// Normalized exact match.
pub fn normalized_exact_match(answer: &str, reference: &str) -> f64 {
    f64::from(u8::from(normalize(answer) == normalize(reference)))
}

/// The label an answer names, if it is one of `labels` (normalized comparison).
pub fn label_of<'a>(answer: &str, labels: &'a [String]) -> Option<&'a str> {
    let a = normalize(answer);
    labels.iter().find(|l| normalize(l) == a).map(String::as_str)
}

/// Label accuracy of one answer.
pub fn label_accuracy(answer: &str, reference: &str, labels: &[String]) -> f64 {
    match (label_of(answer, labels), label_of(reference, labels)) {
        (Some(a), Some(r)) => f64::from(u8::from(a == r)),
        _ => 0.0,
    }
}

/// Macro-F1 over `pairs` of (answer label, reference label); `None` is "not a label".
pub fn macro_f1(pairs: &[(Option<&str>, Option<&str>)]) -> f64 {
    let mut tp: BTreeMap<&str, f64> = BTreeMap::new();
    let mut fp: BTreeMap<&str, f64> = BTreeMap::new();
    let mut fnn: BTreeMap<&str, f64> = BTreeMap::new();
    for (a, r) in pairs {
        match (a, r) {
            (Some(a), Some(r)) if a == r => *tp.entry(a).or_default() += 1.0,
            _ => {
                if let Some(a) = a {
                    *fp.entry(a).or_default() += 1.0;
                }
                if let Some(r) = r {
                    *fnn.entry(r).or_default() += 1.0;
                }
            }
        }
    }
    let mut labels: Vec<&str> = tp.keys().chain(fp.keys()).chain(fnn.keys()).copied().collect();
    labels.sort_unstable();
    labels.dedup();
    if labels.is_empty() {
        return 0.0;
    }
    let f1 = |l: &str| {
        let (t, p, n) = (
            tp.get(l).copied().unwrap_or(0.0),
            fp.get(l).copied().unwrap_or(0.0),
            fnn.get(l).copied().unwrap_or(0.0),
        );
        if t == 0.0 { 0.0 } else { 2.0 * t / (2.0 * t + p + n) }
    };
    labels.iter().map(|l| f1(l)).sum::<f64>() / labels.len() as f64
}

fn leaves(v: &Value, path: String, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                leaves(x, if path.is_empty() { k.clone() } else { format!("{path}.{k}") }, out);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for (i, x) in a.iter().enumerate() {
                leaves(x, format!("{path}[{i}]"), out);
            }
        }
        other => out.push((path, other.clone())),
    }
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for part in path.split('.') {
        let (key, idx) = match part.find('[') {
            Some(i) => (&part[..i], Some(&part[i..])),
            None => (part, None),
        };
        if !key.is_empty() {
            cur = cur.get(key)?;
        }
        if let Some(mut rest) = idx {
            while let Some(end) = rest.find(']') {
                let n: usize = rest.get(1..end)?.parse().ok()?;
                cur = cur.get(n)?;
                rest = &rest[end + 1..];
            }
        }
    }
    Some(cur)
}

/// Strips a Markdown code fence around JSON, as models often add one.
pub fn strip_fence(s: &str) -> &str {
    let t = s.trim();
    let Some(inner) = t.strip_prefix("```") else { return t };
    let inner = inner.strip_suffix("```").unwrap_or(inner);
    let inner = inner.strip_prefix("json").unwrap_or(inner);
    inner.trim()
}

/// Field accuracy of one answer against a JSON reference.
pub fn field_accuracy(answer: &str, reference: &str) -> f64 {
    let Ok(r) = serde_json::from_str::<Value>(strip_fence(reference)) else { return 0.0 };
    let Ok(a) = serde_json::from_str::<Value>(strip_fence(answer)) else { return 0.0 };
    let mut fields = Vec::new();
    leaves(&r, String::new(), &mut fields);
    if fields.is_empty() {
        return f64::from(u8::from(a == r));
    }
    let hit =
        fields.iter().filter(|(p, v)| if p.is_empty() { a == *v } else { lookup(&a, p) == Some(v) }).count();
    hit as f64 / fields.len() as f64
}

/// Schema validity of one answer.
pub fn schema_validity(answer: &str, schema: Option<&Value>) -> f64 {
    let Ok(a) = serde_json::from_str::<Value>(strip_fence(answer)) else { return 0.0 };
    match schema {
        Some(s) => f64::from(u8::from(retort_distill::validate_json_schema(s, &a).is_ok())),
        None => 1.0,
    }
}

/// ROUGE-L F1 over whitespace tokens.
pub fn rouge_l(answer: &str, reference: &str) -> f64 {
    let a: Vec<&str> = answer.split_whitespace().collect();
    let r: Vec<&str> = reference.split_whitespace().collect();
    if a.is_empty() || r.is_empty() {
        return f64::from(u8::from(a.is_empty() && r.is_empty()));
    }
    let mut prev = vec![0usize; r.len() + 1];
    for x in &a {
        let mut cur = vec![0usize; r.len() + 1];
        for (j, y) in r.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { cur[j].max(prev[j + 1]) };
        }
        prev = cur;
    }
    let lcs = prev[r.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (p, rc) = (lcs / a.len() as f64, lcs / r.len() as f64);
    2.0 * p * rc / (p + rc)
}

fn ngrams(chars: &[char], n: usize) -> HashMap<&[char], f64> {
    let mut m = HashMap::new();
    if chars.len() >= n {
        for w in chars.windows(n) {
            *m.entry(w).or_default() += 1.0;
        }
    }
    m
}

/// chrF (n = 1..6, beta = 2), in [0, 1].
pub fn chrf(answer: &str, reference: &str) -> f64 {
    let a: Vec<char> = answer.chars().filter(|c| !c.is_whitespace()).collect();
    let r: Vec<char> = reference.chars().filter(|c| !c.is_whitespace()).collect();
    let beta2 = 4.0;
    let (mut psum, mut rsum, mut n_eff) = (0.0, 0.0, 0.0);
    for n in 1..=6 {
        let (ha, hr) = (ngrams(&a, n), ngrams(&r, n));
        let (ta, tr): (f64, f64) = (ha.values().sum(), hr.values().sum());
        if ta == 0.0 || tr == 0.0 {
            continue;
        }
        let common: f64 = ha.iter().map(|(g, c)| c.min(*hr.get(g).unwrap_or(&0.0))).sum();
        psum += common / ta;
        rsum += common / tr;
        n_eff += 1.0;
    }
    if n_eff == 0.0 {
        return f64::from(u8::from(a == r));
    }
    let (p, rc) = (psum / n_eff, rsum / n_eff);
    if p + rc == 0.0 { 0.0 } else { (1.0 + beta2) * p * rc / (beta2 * p + rc) }
}

/// A splitmix64 step: the bootstrap's deterministic random source.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Percentile-bootstrap 95% interval of `stat` over `n` examples: `resamples` draws of n indices with
/// replacement, seeded. Returns (low, high); with no examples, (0, 0).
pub fn bootstrap(n: usize, resamples: u32, seed: u64, stat: &dyn Fn(&[usize]) -> f64) -> (f64, f64) {
    if n == 0 || resamples == 0 {
        let all: Vec<usize> = (0..n).collect();
        let s = if n == 0 { 0.0 } else { stat(&all) };
        return (s, s);
    }
    let mut state = seed;
    let mut stats: Vec<f64> = (0..resamples)
        .map(|_| {
            let idx: Vec<usize> = (0..n).map(|_| (next(&mut state) % n as u64) as usize).collect();
            stat(&idx)
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    let q = |p: f64| {
        let pos = p * (stats.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        stats[lo] + (stats[hi] - stats[lo]) * (pos - lo as f64)
    };
    (q(0.025), q(0.975))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn labels() -> Vec<String> {
        ["billing", "bug", "other"].iter().map(ToString::to_string).collect()
    }

    #[test]
    fn matches() {
        assert_eq!(exact_match("bug\n", "bug"), 1.0);
        assert_eq!(exact_match("Bug", "bug"), 0.0);
        assert_eq!(normalized_exact_match("  Bug  REPORT ", "bug report"), 1.0);
        assert_eq!(label_accuracy("Billing", "billing", &labels()), 1.0);
        assert_eq!(label_accuracy("billing.", "billing", &labels()), 0.0);
        assert_eq!(label_accuracy("refund", "refund", &labels()), 0.0, "outside the label set");
    }

    #[test]
    fn macro_f1_by_hand() {
        // refs: b b g o ; answers: b g g x  (b=billing g=bug o=other, x = not a label)
        // billing: tp1 fp0 fn1 -> 2/3 ; bug: tp1 fp1 fn0 -> 2/3 ; other: tp0 -> 0. mean = 4/9.
        let pairs = [
            (Some("billing"), Some("billing")),
            (Some("bug"), Some("billing")),
            (Some("bug"), Some("bug")),
            (None, Some("other")),
        ];
        assert!((macro_f1(&pairs) - 4.0 / 9.0).abs() < 1e-12);
        assert_eq!(macro_f1(&[(Some("bug"), Some("bug"))]), 1.0);
        assert_eq!(macro_f1(&[]), 0.0);
    }

    #[test]
    fn fields_and_schema() {
        let r = r#"{"vendor": "ACME", "total": 12.5, "items": [{"sku": "a"}, {"sku": "b"}]}"#;
        assert_eq!(field_accuracy(r, r), 1.0);
        let a = r#"```json
{"vendor": "ACME", "total": 13, "items": [{"sku": "a"}]}
```"#;
        // vendor ok, total wrong, items[0].sku ok, items[1].sku missing: 2/4.
        assert!((field_accuracy(a, r) - 0.5).abs() < 1e-12);
        assert_eq!(field_accuracy("not json", r), 0.0);
        let schema = serde_json::json!({"type": "object", "required": ["vendor"], "properties": {"vendor": {"type": "string"}}});
        assert_eq!(schema_validity(r, Some(&schema)), 1.0);
        assert_eq!(schema_validity(r#"{"total": 1}"#, Some(&schema)), 0.0);
        assert_eq!(schema_validity("{", None), 0.0);
    }

    #[test]
    fn rouge_l_by_hand() {
        // LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5; P = R = 5/6.
        assert!((rouge_l("the cat sat on the mat", "the cat is on the mat") - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(rouge_l("a b", "c d"), 0.0);
        assert_eq!(rouge_l("", ""), 1.0);
    }

    #[test]
    fn chrf_by_hand() {
        assert!((chrf("abc", "abc") - 1.0).abs() < 1e-12);
        assert_eq!(chrf("abc", "xyz"), 0.0);
        // "ab" vs "abc": n=1: common 2, P = 1, R = 2/3; n=2: common 1, P = 1, R = 1/2; n>=3: the
        // answer has none, skipped. P = 1, R = 7/12; F2 = 5 P R / (4 P + R).
        let (p, r) = (1.0, 7.0 / 12.0);
        assert!((chrf("ab", "abc") - 5.0 * p * r / (4.0 * p + r)).abs() < 1e-12);
    }

    #[test]
    fn bootstrap_covers_the_mean_of_a_known_distribution() {
        // 400 Bernoulli(0.7) outcomes: the 95% interval has half-width about 1.96 * sqrt(.21 / 400) = 0.045.
        let xs: Vec<f64> = (0..400).map(|i| if i % 10 < 7 { 1.0 } else { 0.0 }).collect();
        let mean = |idx: &[usize]| idx.iter().map(|&i| xs[i]).sum::<f64>() / idx.len() as f64;
        let (lo, hi) = bootstrap(xs.len(), 2000, 1, &mean);
        assert!(lo < 0.7 && 0.7 < hi, "({lo}, {hi})");
        let half = (hi - lo) / 2.0;
        assert!((half - 0.045).abs() < 0.008, "half-width {half}");
        // Deterministic for a seed; a constant sample has a zero-width interval.
        assert_eq!(bootstrap(xs.len(), 200, 5, &mean), bootstrap(xs.len(), 200, 5, &mean));
        let ones = |idx: &[usize]| idx.len() as f64 / idx.len() as f64;
        assert_eq!(bootstrap(10, 100, 3, &ones), (1.0, 1.0));
    }
}
