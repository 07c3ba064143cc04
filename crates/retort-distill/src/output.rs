//! Kept examples as dataset rows, the deterministic split, and crash-safe writing.

use std::io::Write;
use std::path::Path;

use retort_io::AtomicFile;
use retort_recipe::schema::distill::{DatasetFormat, Split};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::DistillError;
use crate::text::NearDup;

/// One kept example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The system prompt.
    pub system: String,
    /// The user message (the rendered prompt).
    pub user: String,
    /// The teacher's answer, as trained on.
    pub assistant: String,
    /// Where it came from: teacher, request hash, input id, filter scores.
    pub provenance: Value,
}

impl Example {
    /// The row in a dataset format (`auto` writes the canonical messages format).
    pub fn row(&self, format: DatasetFormat) -> Value {
        let mut row = match format {
            DatasetFormat::Messages | DatasetFormat::Auto => {
                let mut messages = Vec::new();
                if !self.system.is_empty() {
                    messages.push(json!({"role": "system", "content": self.system}));
                }
                messages.push(json!({"role": "user", "content": self.user}));
                messages.push(json!({"role": "assistant", "content": self.assistant}));
                json!({"messages": messages})
            }
            DatasetFormat::Sharegpt => {
                let mut conv = Vec::new();
                if !self.system.is_empty() {
                    conv.push(json!({"from": "system", "value": self.system}));
                }
                conv.push(json!({"from": "human", "value": self.user}));
                conv.push(json!({"from": "gpt", "value": self.assistant}));
                json!({"conversations": conv})
            }
            DatasetFormat::Alpaca => {
                json!({"instruction": self.system, "input": self.user, "output": self.assistant})
            }
            DatasetFormat::PromptCompletion => json!({"prompt": self.user, "completion": self.assistant}),
        };
        row["provenance"] = self.provenance.clone();
        row
    }
}

/// A stable pseudo-random order key from the seed and a name.
fn order_key(seed: u64, name: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(name.as_bytes());
    h.finalize().into()
}

/// Splits examples into (train, val, test) indices. Near-duplicates (MinHash over the user message,
/// at `threshold`) form one group and never straddle two splits; groups are shuffled by `seed`
/// and dealt to test, then val, then train, so the counts follow the fractions.
pub fn split(examples: &[Example], fractions: &Split, seed: u64, threshold: f64) -> [Vec<usize>; 3] {
    let n = examples.len();
    // Union-find over near-duplicate pairs.
    let mut parent: Vec<usize> = (0..n).collect();
    fn find(p: &mut [usize], mut x: usize) -> usize {
        while p[x] != x {
            p[x] = p[p[x]];
            x = p[x];
        }
        x
    }
    let mut nd = NearDup::new(threshold, 5, 64);
    for (i, e) in examples.iter().enumerate() {
        let sig = nd.signature(&e.user);
        if let Some((j, _)) = nd.query(&sig) {
            let (a, b) = (find(&mut parent, i), find(&mut parent, j));
            parent[a] = b;
        }
        nd.insert(sig);
    }
    let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = std::collections::BTreeMap::new();
    for i in 0..n {
        let r = find(&mut parent, i);
        groups.entry(r).or_default().push(i);
    }
    let mut groups: Vec<Vec<usize>> = groups.into_values().collect();
    let name = |g: &Vec<usize>| {
        examples[g[0]].provenance["request"].as_str().unwrap_or("").to_string() + &examples[g[0]].user
    };
    groups.sort_by_cached_key(|g| order_key(seed, &name(g)));
    let want_test = (n as f64 * fractions.test).round() as usize;
    let want_val = (n as f64 * fractions.val).round() as usize;
    let mut out: [Vec<usize>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for g in groups {
        let slot = if out[2].len() < want_test {
            2
        } else if out[1].len() < want_val {
            1
        } else {
            0
        };
        out[slot].extend(g);
    }
    for s in &mut out {
        s.sort_unstable();
    }
    out
}

/// Writes JSON lines to `path` atomically.
pub fn write_jsonl<'a>(path: &Path, rows: impl IntoIterator<Item = &'a Value>) -> Result<(), DistillError> {
    let werr = |source| DistillError::Write { path: path.to_path_buf(), source };
    let mut f = AtomicFile::create(path).map_err(werr)?;
    for r in rows {
        let mut line = serde_json::to_vec(r).map_err(|e| werr(std::io::Error::other(e)))?;
        line.push(b'\n');
        f.write_all(&line).map_err(werr)?;
    }
    f.commit().map_err(werr)
}

/// Writes pretty JSON to `path` atomically.
pub fn write_json(path: &Path, v: &Value) -> Result<(), DistillError> {
    let werr = |source| DistillError::Write { path: path.to_path_buf(), source };
    let mut text = serde_json::to_vec_pretty(v).map_err(|e| werr(std::io::Error::other(e)))?;
    text.push(b'\n');
    retort_io::write_atomic(path, &text, true).map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(user: &str) -> Example {
        Example {
            system: "s".into(),
            user: user.into(),
            assistant: "a".into(),
            provenance: json!({"request": user}),
        }
    }

    #[test]
    fn rows_in_every_format_carry_provenance() {
        let e = ex("u");
        assert_eq!(e.row(DatasetFormat::Messages)["messages"][2]["content"], "a");
        assert_eq!(e.row(DatasetFormat::Sharegpt)["conversations"][1]["from"], "human");
        assert_eq!(e.row(DatasetFormat::Alpaca)["instruction"], "s");
        assert_eq!(e.row(DatasetFormat::PromptCompletion)["completion"], "a");
        for f in [DatasetFormat::Messages, DatasetFormat::Alpaca] {
            assert_eq!(e.row(f)["provenance"]["request"], "u");
        }
    }

    #[test]
    fn splits_follow_the_fractions_are_deterministic_and_keep_near_duplicates_together() {
        let mut examples: Vec<Example> = (0..100)
            .map(|i| ex(&format!("ticket number {i} about a totally unique subject {}", i * 7919)))
            .collect();
        let dup = "my invoice for march shows the wrong amount and i want a refund for the difference please";
        examples.push(ex(dup));
        examples.push(ex(&format!("{dup}!")));
        let f = Split { train: 0.8, val: 0.1, test: 0.1 };
        let [train, val, test] = split(&examples, &f, 42, 0.85);
        assert_eq!(train.len() + val.len() + test.len(), 102);
        assert!(
            (9..=12).contains(&test.len()) && (9..=12).contains(&val.len()),
            "{} {}",
            test.len(),
            val.len()
        );
        let together = [&train, &val, &test].iter().any(|s| s.contains(&100) && s.contains(&101));
        assert!(together, "near-duplicates share a split");
        assert_eq!(split(&examples, &f, 42, 0.85), [train, val, test]);
        assert_ne!(split(&examples, &f, 7, 0.85)[2], split(&examples, &f, 42, 0.85)[2]);
    }
}
