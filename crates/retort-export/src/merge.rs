//! The model to export: a base checkpoint, optionally with a PEFT adapter merged in, one tensor at a
//! time, as PEFT's `merge_and_unload` computes it:
//!
//! - LoRA / rsLoRA: `W + (B @ A) * s` in f32, `s = alpha / r` (or `alpha / sqrt(r)`), per-module rank
//!   and alpha from the patterns;
//! - DoRA: `m / ||W + ΔW||_row * (W + ΔW)`;
//! - embeddings: `W + (B @ A)^T * s`; `lora_bias`: `b + s * lora_B.bias`;
//! - `modules_to_save`: the saved tensor replaces the base's.
//!
//! Values are rounded to the output dtype (the base's, or `--dtype`) as they leave, so every output
//! (safetensors, GGUF) sees exactly the merged model's stored values. Memory: the mapped base and
//! adapter plus the tensor being produced.
//!
//! When the adapter changes `lm_head` of a model with tied embeddings, the output is untied (its own
//! `lm_head.weight`, `tie_word_embeddings: false`): PEFT's merge would write the change into the shared
//! matrix and silently change the input embeddings too, and a saved copy of `lm_head` would be dropped
//! by the tie on reload.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use retort_hf::{Checkpoint, Dtype, LoadReport, ModelConfig, Role, TensorSpec, names};

use crate::adapter::{Adapter, Module, ModuleKind};
use crate::error::{ExportError, Result};
use crate::quant::float::{round_bf16, round_f16};

/// The dtype of the merged model's floating-point tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl OutDtype {
    /// The safetensors dtype.
    pub fn dtype(self) -> Dtype {
        match self {
            OutDtype::F32 => Dtype::F32,
            OutDtype::F16 => Dtype::F16,
            OutDtype::BF16 => Dtype::BF16,
        }
    }

    fn from_dtype(d: &Dtype) -> Option<OutDtype> {
        match d {
            Dtype::F32 => Some(OutDtype::F32),
            Dtype::F16 => Some(OutDtype::F16),
            Dtype::BF16 => Some(OutDtype::BF16),
            Dtype::Other(_) => None,
        }
    }

    /// The `torch_dtype` spelling.
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::F16 => "float16",
            OutDtype::BF16 => "bfloat16",
        }
    }

    /// Rounds a value to this dtype (and back to f32, exactly).
    pub fn round(self, x: f32) -> f32 {
        match self {
            OutDtype::F32 => x,
            OutDtype::F16 => round_f16(x),
            OutDtype::BF16 => round_bf16(x),
        }
    }
}

/// A base model with an optional adapter, ready to hand out merged tensors.
pub struct Model {
    /// The base directory.
    pub dir: PathBuf,
    /// The output's config (untied when the adapter changes a tied `lm_head`).
    pub cfg: ModelConfig,
    /// The output's tensor table.
    pub specs: Vec<TensorSpec>,
    /// The base weights.
    pub base: Checkpoint,
    /// The adapter, if any.
    pub adapter: Option<Adapter>,
    /// Forced output dtype (`--dtype`); otherwise each tensor keeps the base's.
    pub dtype: Option<OutDtype>,
    /// True when the output unties `lm_head` from the embeddings.
    pub untied: bool,
    /// Base tensors that are not in the model's table (copied to the merged directory, not to GGUF).
    pub extra: Vec<String>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("dir", &self.dir)
            .field("arch", &self.cfg.arch)
            .field("adapter", &self.adapter)
            .finish()
    }
}

impl Model {
    /// Opens a base directory and an optional adapter directory and checks that they fit together.
    pub fn open(base_dir: &Path, adapter_dir: Option<&Path>, dtype: Option<OutDtype>) -> Result<Model> {
        let base_cfg = ModelConfig::load(base_dir)?;
        let base = Checkpoint::open(base_dir)?;
        let report = LoadReport::check(&names::tensors(&base_cfg), &base);
        if !report.is_complete() {
            return Err(ExportError::BaseIncomplete {
                dir: base_dir.to_path_buf(),
                report: report.to_string().trim_end().to_string(),
            });
        }
        for spec in names::tensors(&base_cfg) {
            if let Some(info) = base.info(&spec.name)
                && info.dtype.size() == 0
            {
                return Err(ExportError::Weights(retort_hf::WeightsError::UnsupportedDtype {
                    path: base_dir.to_path_buf(),
                    tensor: spec.name.clone(),
                    dtype: info.dtype.name().to_string(),
                }));
            }
        }
        let adapter = adapter_dir.map(Adapter::open).transpose()?;
        let mut cfg = base_cfg.clone();
        let untied = cfg.tie_word_embeddings && adapter.as_ref().is_some_and(Adapter::touches_lm_head);
        if untied {
            cfg.tie_word_embeddings = false;
        }
        let specs = names::tensors(&cfg);
        if let Some(a) = &adapter {
            a.check(&cfg, &specs, &base)?;
        }
        let extra =
            report.unused.iter().filter(|n| !(untied && n.as_str() == "lm_head.weight")).cloned().collect();
        Ok(Model { dir: base_dir.to_path_buf(), cfg, specs, base, adapter, dtype, untied, extra })
    }

    /// The output dtype of a tensor.
    pub fn out_dtype(&self, name: &str) -> Result<OutDtype> {
        if let Some(d) = self.dtype {
            return Ok(d);
        }
        let src = if self.base.info(name).is_none() && name == "lm_head.weight" {
            "model.embed_tokens.weight"
        } else {
            name
        };
        let info = self.base.info(src).ok_or_else(|| self.missing(name))?;
        OutDtype::from_dtype(&info.dtype).ok_or_else(|| {
            ExportError::Weights(retort_hf::WeightsError::UnsupportedDtype {
                path: self.dir.clone(),
                tensor: name.to_string(),
                dtype: info.dtype.name().to_string(),
            })
        })
    }

    /// The base's own dtype for a tensor (what the checkpoint stores).
    pub fn base_dtype(&self, name: &str) -> Option<Dtype> {
        self.base.info(name).map(|i| i.dtype.clone())
    }

    fn missing(&self, name: &str) -> ExportError {
        ExportError::BaseIncomplete { dir: self.dir.clone(), report: format!("tensor `{name}` is missing") }
    }

    /// The spec of a table tensor.
    pub fn spec(&self, name: &str) -> Option<&TensorSpec> {
        self.specs.iter().find(|s| s.name == name)
    }

    /// A tensor of the output model, merged and rounded to its output dtype.
    pub fn values(&self, name: &str) -> Result<Vec<f32>> {
        let mut w = self.base_values(name)?;
        let dt = self.out_dtype(name)?;
        // Unchanged values already in the output dtype need no rounding (the common case of a plain
        // conversion, or a tensor the adapter does not touch).
        let mut exact = self.base_dtype(name).is_some_and(|d| d == dt.dtype());
        if let Some(a) = &self.adapter {
            let module = name.strip_suffix(".weight").or_else(|| name.strip_suffix(".bias"));
            if a.replaced.contains_key(name) {
                exact = false;
            }
            if let Some(m) = module.and_then(|m| a.modules.get(m)) {
                exact = false;
                let shape = self.shape(name).ok_or_else(|| self.missing(name))?;
                if name.ends_with(".weight") {
                    merge_into(&mut w, &shape, a, m)?;
                } else if let Some(bk) = &m.bias {
                    let b = a.values(bk)?;
                    for (x, y) in w.iter_mut().zip(b) {
                        *x += y * m.scale;
                    }
                }
            }
        }
        let (bad, overflow) = w
            .par_chunks_mut(1 << 16)
            .map(|c| {
                let (mut n, mut big) = (0usize, 0usize);
                for x in c {
                    let before = x.is_finite();
                    if !exact {
                        *x = dt.round(*x);
                    }
                    n += usize::from(!x.is_finite());
                    big += usize::from(before && !x.is_finite());
                }
                (n, big)
            })
            .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        if overflow > 0 {
            return Err(ExportError::Unsupported {
                format: format!("merged {}", dt.torch_name()),
                reason: format!(
                    "{overflow} values of `{name}` are too large for {} (they would become infinity)",
                    dt.torch_name()
                ),
                hint: "export with `--dtype bf16` or `--dtype f32`".into(),
            });
        }
        if bad > 0 {
            let origin = if self.adapter.is_some() {
                self.adapter.as_ref().map(|a| a.dir.clone())
            } else {
                Some(self.dir.clone())
            };
            return Err(ExportError::NonFinite { tensor: name.to_string(), count: bad, origin });
        }
        Ok(w)
    }

    /// The stored tensor, when the output keeps it exactly (no adapter change, same dtype): writers can
    /// encode it straight from its bytes.
    pub fn unchanged_view(&self, name: &str) -> Option<retort_hf::TensorView<'_>> {
        if let Some(a) = &self.adapter {
            let module = name.strip_suffix(".weight").or_else(|| name.strip_suffix(".bias"));
            if a.replaced.contains_key(name) || module.is_some_and(|m| a.modules.contains_key(m)) {
                return None;
            }
        }
        let view = self.base.get(name)?;
        let dt = self.out_dtype(name).ok()?;
        (view.dtype == &dt.dtype()).then_some(view)
    }

    fn base_values(&self, name: &str) -> Result<Vec<f32>> {
        if let Some(a) = &self.adapter
            && let Some(key) = a.replaced.get(name)
        {
            return a.values(key);
        }
        let src = if self.untied && name == "lm_head.weight" && self.base.info(name).is_none() {
            "model.embed_tokens.weight"
        } else {
            name
        };
        let view = self.base.get(src).ok_or_else(|| self.missing(name))?;
        Ok(crate::quant::view_to_f32(&view)?)
    }

    /// The shape of an output tensor.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.spec(name).map(|s| s.shape.clone()).or_else(|| self.base.info(name).map(|i| i.shape.clone()))
    }

    /// The roles and names of the table, in model order.
    pub fn table(&self) -> impl Iterator<Item = (&str, Role)> {
        self.specs.iter().map(|s| (s.name.as_str(), s.role))
    }
}

/// `W += delta` for one adapted module (with DoRA's rescaling), rows in parallel.
fn merge_into(w: &mut [f32], shape: &[usize], a: &Adapter, m: &Module) -> Result<()> {
    let (rows, cols) = (shape[0], shape[1]);
    let av = a.values(&m.a)?;
    let bv = a.values(&m.b)?;
    let r = m.rank;
    let s = m.scale;
    let magnitude = m.magnitude.as_ref().map(|k| a.values(k)).transpose()?;
    w.par_chunks_mut(cols).enumerate().for_each(|(o, row)| {
        let mut acc = vec![0f32; cols];
        match m.kind {
            // (B @ A)[o, :] = sum_k B[o, k] A[k, :]
            ModuleKind::Linear => {
                for k in 0..r {
                    let b = bv[o * r + k];
                    for (x, &y) in acc.iter_mut().zip(&av[k * cols..(k + 1) * cols]) {
                        *x += b * y;
                    }
                }
            }
            // ((B @ A)^T)[v, :] = sum_k A[k, v] B[:, k]
            ModuleKind::Embedding => {
                let vocab = rows;
                for k in 0..r {
                    let a_kv = av[k * vocab + o];
                    for (h, x) in acc.iter_mut().enumerate() {
                        *x += bv[h * r + k] * a_kv;
                    }
                }
            }
        }
        for (x, d) in row.iter_mut().zip(&acc) {
            *x += d * s;
        }
        if let Some(mag) = &magnitude {
            // DoRA: the row norm of W + ΔW (f64 accumulation, stored as f32 as torch does).
            let norm = row.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt() as f32;
            let factor = mag[o] / norm;
            for x in row.iter_mut() {
                *x *= factor;
            }
        }
    });
    Ok(())
}
