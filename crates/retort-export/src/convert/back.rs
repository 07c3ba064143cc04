//! A GGUF file written for a Hugging Face model, read back as that model's tensors: each tensor found
//! under its llama.cpp name, dequantized to f32, and the converter's changes undone (the Q/K row
//! permutation, Gemma's `1 + w` norms), so that the values are what the shipped file makes llama.cpp
//! compute with. `retort eval` builds a model from them to score the exported file itself.
//!
//! Computed tensors (`rope_freqs`, `rope_factors_*`) are not read back: the model recomputes them from
//! its config, as the export did.

use std::path::Path;

use retort_hf::{ModelConfig, TensorSpec};

use super::{Transform, transform_of, unpermute_rows};
use crate::error::{ExportError, Result};
use crate::gguf::GgufFile;

/// An opened GGUF model file checked against a model config: every tensor the config needs is present
/// with the right shape.
#[derive(Debug)]
pub struct GgufWeights {
    file: GgufFile,
    cfg: ModelConfig,
}

impl GgufWeights {
    /// Opens `path` for the model of `cfg` (the config of the model it was exported from). Names every
    /// missing or misshapen tensor at once.
    pub fn open(path: &Path, cfg: &ModelConfig) -> Result<GgufWeights> {
        let file = GgufFile::open(path)?;
        let want = cfg.arch.gguf_arch();
        let mismatch = |problem: String| ExportError::GgufMismatch {
            path: path.to_path_buf(),
            problem,
            hint: "export the GGUF again from this base model (`retort export`), or point at the file \
                   exported from it"
                .into(),
        };
        match file.architecture() {
            Some(a) if a == want => {}
            found => {
                return Err(mismatch(format!(
                    "its architecture is {}, the model's config.json needs `{want}`",
                    found.map_or("not stated".into(), |a| format!("`{a}`"))
                )));
            }
        }
        let mut problems = Vec::new();
        for spec in retort_hf::names::tensors(cfg) {
            match file.tensor(&spec.gguf_name) {
                None => problems.push(format!("`{}` (for `{}`) is missing", spec.gguf_name, spec.name)),
                Some(t) if t.shape != spec.shape => problems.push(format!(
                    "`{}` has shape {:?}, `{}` needs {:?}",
                    spec.gguf_name, t.shape, spec.name, spec.shape
                )),
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            return Err(mismatch(problems.join("; ")));
        }
        Ok(GgufWeights { file, cfg: cfg.clone() })
    }

    /// The file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The f32 values of the model tensor `spec` (one of `retort_hf::names::tensors` of the config),
    /// in Hugging Face layout.
    pub fn values(&self, spec: &TensorSpec) -> Result<Vec<f32>> {
        let t = self.file.tensor(&spec.gguf_name).ok_or_else(|| ExportError::GgufMismatch {
            path: self.file.path().to_path_buf(),
            problem: format!("`{}` (for `{}`) is missing", spec.gguf_name, spec.name),
            hint: "export the GGUF again".into(),
        })?;
        let w = self.file.to_f32(t)?;
        Ok(match transform_of(&self.cfg, spec.role) {
            Transform::None => w,
            Transform::Permute(n) => {
                let cols = spec.shape[1..].iter().product::<usize>().max(1);
                unpermute_rows(&w, spec.shape[0], cols, n)
            }
            Transform::PlusOne => w.into_iter().map(|x| x - 1.0).collect(),
        })
    }
}
