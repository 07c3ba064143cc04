//! What loading a checkpoint against a model's tensor table found.

use std::fmt;

use crate::names::TensorSpec;
use crate::weights::Checkpoint;

/// A tensor whose shape differs from the model's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The key.
    pub name: String,
    /// What the model needs.
    pub expected: Vec<usize>,
    /// What the checkpoint has.
    pub found: Vec<usize>,
}

/// Applied, missing, unused and wrongly shaped tensors, with "did you mean" for missing ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Tensors found with the right shape.
    pub applied: Vec<String>,
    /// Tensors the model needs that the checkpoint lacks, with the closest unused name if any.
    pub missing: Vec<(String, Option<String>)>,
    /// Tensors in the checkpoint the model does not use.
    pub unused: Vec<String>,
    /// Tensors with the wrong shape.
    pub mismatched: Vec<Mismatch>,
}

fn suggest<'a>(missing: &str, unused: &'a [String]) -> Option<&'a String> {
    // A different prefix (`language_model.model.` vs `model.`) is the common case: match by suffix.
    let tail = missing.split_once('.').map_or(missing, |(_, t)| t);
    unused.iter().find(|u| u.ends_with(tail)).or_else(|| {
        unused
            .iter()
            .map(|u| (strsim::jaro_winkler(missing, u), u))
            .filter(|(s, _)| *s > 0.93)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, u)| u)
    })
}

impl LoadReport {
    /// Compares a checkpoint with the tensors a model needs.
    pub fn check(specs: &[TensorSpec], ckpt: &Checkpoint) -> LoadReport {
        let mut r = LoadReport::default();
        let mut needed = std::collections::HashSet::new();
        let mut missing = Vec::new();
        for s in specs {
            needed.insert(s.name.as_str());
            match ckpt.info(&s.name) {
                None => missing.push(s.name.clone()),
                Some(info) if info.shape != s.shape => r.mismatched.push(Mismatch {
                    name: s.name.clone(),
                    expected: s.shape.clone(),
                    found: info.shape.clone(),
                }),
                Some(_) => r.applied.push(s.name.clone()),
            }
        }
        r.unused = ckpt.names().filter(|n| !needed.contains(n)).map(str::to_string).collect();
        r.missing = missing
            .into_iter()
            .map(|m| {
                let s = suggest(&m, &r.unused).cloned();
                (m, s)
            })
            .collect();
        r
    }

    /// True when every needed tensor is present with the right shape.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.mismatched.is_empty()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} applied, {} missing, {} with the wrong shape, {} unused",
            self.applied.len(),
            self.missing.len(),
            self.mismatched.len(),
            self.unused.len()
        )?;
        for (m, s) in self.missing.iter().take(20) {
            match s {
                Some(s) => writeln!(f, "  missing `{m}` (did you mean `{s}`?)")?,
                None => writeln!(f, "  missing `{m}`")?,
            }
        }
        for m in self.mismatched.iter().take(20) {
            writeln!(f, "  `{}` has shape {:?}; the model needs {:?}", m.name, m.found, m.expected)?;
        }
        for u in self.unused.iter().take(10) {
            writeln!(f, "  unused `{u}`")?;
        }
        if self.unused.len() > 10 {
            writeln!(f, "  ... and {} more unused", self.unused.len() - 10)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::tensors;
    use crate::weights::tests::write_f32;

    #[test]
    fn reports_missing_unused_and_mismatched_with_suggestions() {
        let cfg = crate::ModelConfig::parse(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"num_key_value_heads":1,"vocab_size":3,"tie_word_embeddings":true}"#,
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let specs = tensors(&cfg);
        let dir = tempfile::tempdir().unwrap();
        let mut ts: Vec<(String, Vec<usize>, Vec<f32>)> = specs
            .iter()
            .filter(|s| s.name != "model.norm.weight" && s.name != "model.embed_tokens.weight")
            .map(|s| (s.name.clone(), s.shape.clone(), vec![0.0; s.numel()]))
            .collect();
        // Wrong shape, a prefixed copy of a missing tensor, and an extra tensor.
        ts.retain(|t| t.0 != "model.layers.0.mlp.down_proj.weight");
        ts.push(("model.layers.0.mlp.down_proj.weight".into(), vec![8, 4], vec![0.0; 32]));
        ts.push(("language_model.model.embed_tokens.weight".into(), vec![3, 4], vec![0.0; 12]));
        ts.push(("rotary_emb.inv_freq".into(), vec![1], vec![0.0]));
        let refs: Vec<(&str, Vec<usize>, Vec<f32>)> =
            ts.iter().map(|(n, s, v)| (n.as_str(), s.clone(), v.clone())).collect();
        write_f32(&dir.path().join("model.safetensors"), &refs);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let r = LoadReport::check(&specs, &ckpt);
        assert!(!r.is_complete());
        assert_eq!(r.applied.len(), specs.len() - 3);
        assert_eq!(
            r.missing,
            [
                (
                    "model.embed_tokens.weight".to_string(),
                    Some("language_model.model.embed_tokens.weight".to_string())
                ),
                ("model.norm.weight".to_string(), None),
            ]
        );
        assert_eq!(
            r.mismatched,
            [Mismatch {
                name: "model.layers.0.mlp.down_proj.weight".into(),
                expected: vec![4, 8],
                found: vec![8, 4]
            }]
        );
        assert_eq!(r.unused, ["language_model.model.embed_tokens.weight", "rotary_emb.inv_freq"]);
        let text = r.to_string();
        assert!(text.contains("did you mean `language_model.model.embed_tokens.weight`?"), "{text}");
        assert!(text.contains("has shape [8, 4]; the model needs [4, 8]"), "{text}");
    }
}
