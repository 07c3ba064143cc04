//! A Hugging Face model (merged or not) as a GGUF file llama.cpp loads: its tensors under llama.cpp's
//! names (from `retort_hf::names`), the data changes llama.cpp's converter makes (the llama
//! architecture's Q/K row permutation, Gemma's `1 + w` norms, generated `rope_freqs` /
//! `rope_factors_*` tensors), each tensor's type for the file type (see [`crate::quant::mix`]), the model
//! metadata ([`meta`]) and the tokenizer ([`crate::tokenizer`]).

pub mod back;
pub mod meta;

use std::io::Write;
use std::path::Path;

use retort_hf::{Arch, ModelConfig, Role, RopeScaling};
use serde_json::Value as Json;

use crate::error::{ExportError, Result};
use crate::gguf::{GgufHeader, GgufWriter, TensorInfo, Value};
use crate::merge::{Model, OutDtype};
use crate::output::Sink;
use crate::quant::mix::{FileType, ModelFacts, TypePlanner, llama_order};
use crate::quant::{self, float::round_f16};
use crate::tokenizer::Tokenizer;
use meta::Hparams;

/// Where a GGUF tensor's values come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A model tensor (by Hugging Face key), changed on the way.
    Model {
        /// The Hugging Face key.
        name: String,
        /// The change.
        transform: Transform,
    },
    /// Values computed from the config (`rope_freqs`, `rope_factors_*`).
    Computed(Vec<f32>),
}

/// A change llama.cpp's converter makes to a tensor's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// None.
    None,
    /// The llama architecture's rotary row permutation, with this many heads.
    Permute(usize),
    /// Gemma's RMSNorm weights stored as `1 + w`.
    PlusOne,
}

/// A GGUF model file to write: its header (metadata and tensor table) and each tensor's source.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Metadata and tensor table.
    pub header: GgufHeader,
    /// Sources, in table order.
    pub sources: Vec<Source>,
}

/// llama.cpp's `LlamaModel.permute`: within each head, interleave the two rotary halves of the rows.
pub fn permute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    move_rows(w, rows, cols, n_head, false)
}

/// The inverse of [`permute_rows`]: the rows of a llama.cpp Q/K tensor back in Hugging Face order.
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    move_rows(w, rows, cols, n_head, true)
}

/// Row `j * half + i` of each head (Hugging Face order) is row `i * 2 + j` in llama.cpp's order;
/// `inverse` moves rows the other way.
fn move_rows(w: &[f32], rows: usize, cols: usize, n_head: usize, inverse: bool) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let permuted = (h * 2 * half + i * 2 + j) * cols;
                let original = (h * 2 * half + j * half + i) * cols;
                let (dst, src) = if inverse { (original, permuted) } else { (permuted, original) };
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// Llama 3's `rope_freqs` as llama.cpp's converter computes them (in f32, as torch does).
pub fn llama3_rope_freqs(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } =
        cfg.rope_scaling
    else {
        return None;
    };
    let dim = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let old = original_max_position_embeddings as f32;
    let (lf, hf, factor) = (low_freq_factor as f32, high_freq_factor as f32, factor as f32);
    let low_wavelen = old / lf;
    let high_wavelen = old / hf;
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    Some(
        (0..dim)
            .step_by(2)
            .map(|i| {
                let freq = 1.0 / base.powf(i as f32 / dim as f32);
                let wavelen = two_pi / freq;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth = (old / wavelen - lf) / (hf - lf);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect(),
    )
}

/// The change llama.cpp's converter makes to the tensor of `role` in a model of `cfg`.
pub fn transform_of(cfg: &ModelConfig, role: Role) -> Transform {
    match role {
        Role::Q | Role::QBias if cfg.arch.gguf_permutes_qk() => Transform::Permute(cfg.num_heads),
        Role::K | Role::KBias if cfg.arch.gguf_permutes_qk() => Transform::Permute(cfg.num_kv_heads),
        r if r.is_norm() && cfg.arch.gguf_norms_plus_one() => Transform::PlusOne,
        _ => Transform::None,
    }
}

fn gguf_unsupported(reason: String) -> ExportError {
    ExportError::Unsupported {
        format: "gguf".into(),
        reason,
        hint: "export `merged` (safetensors) for this model, or open an issue for the architecture".into(),
    }
}

/// Plans the GGUF file of `model` with file type `ftype`.
pub fn plan(
    model: &Model,
    tok: &Tokenizer,
    ftype: FileType,
    name: &str,
    raw_config: &Json,
    generation: Option<&Json>,
) -> Result<Plan> {
    let cfg = &model.cfg;
    let hp = Hparams::new(raw_config);
    if cfg.rotary_dim != cfg.head_dim && cfg.arch != Arch::Phi3 {
        return Err(gguf_unsupported(format!(
            "{} with partial rotary embeddings ({} of {} dimensions) has no llama.cpp equivalent",
            cfg.arch.hf_name(),
            cfg.rotary_dim,
            cfg.head_dim
        )));
    }
    let mut h = GgufHeader::new();
    h.set("general.architecture", Value::str(cfg.arch.gguf_arch()));
    meta::write_general_keys(&mut h, name, generation, false);
    meta::write_model_keys(&mut h, cfg, &hp, ftype.llama_ftype());
    h.set("general.quantization_version", Value::U32(2));
    tok.write(&mut h);

    let mut tensors: Vec<(String, Vec<usize>, Source)> = Vec::new();
    if let Some(f) = llama3_rope_freqs(cfg).filter(|_| matches!(cfg.arch, Arch::Llama | Arch::Mistral)) {
        tensors.push(("rope_freqs.weight".into(), vec![f.len()], Source::Computed(f)));
    }
    if cfg.arch == Arch::Phi3
        && let RopeScaling::LongRope { short_factor, long_factor, .. } = &cfg.rope_scaling
    {
        let v = |x: &[f64]| x.iter().map(|&f| f as f32).collect::<Vec<f32>>();
        tensors.push((
            "rope_factors_long.weight".into(),
            vec![long_factor.len()],
            Source::Computed(v(long_factor)),
        ));
        tensors.push((
            "rope_factors_short.weight".into(),
            vec![short_factor.len()],
            Source::Computed(v(short_factor)),
        ));
    }
    for spec in &model.specs {
        let transform = transform_of(cfg, spec.role);
        if let Transform::Permute(n) = transform
            && !spec.shape[0].is_multiple_of(2 * n)
        {
            return Err(gguf_unsupported(format!(
                "`{}` has {} rows, not a multiple of 2 x {n} heads",
                spec.name, spec.shape[0]
            )));
        }
        tensors.push((
            spec.gguf_name.clone(),
            spec.shape.clone(),
            Source::Model { name: spec.name.clone(), transform },
        ));
    }
    tensors.sort_by(|a, b| llama_order(&a.0, &b.0));
    let names: Vec<&str> = tensors.iter().map(|t| t.0.as_str()).collect();
    let facts = ModelFacts {
        arch: cfg.arch.gguf_arch(),
        n_layers: cfg.num_layers,
        n_heads: cfg.num_heads,
        n_kv_heads: cfg.num_kv_heads,
    };
    let mut planner = TypePlanner::new(ftype, facts, &names);
    let mut sources = Vec::with_capacity(tensors.len());
    for (gname, shape, src) in tensors {
        let ty = planner.choose(&gname, &shape);
        h.add_tensor(TensorInfo { name: gname, shape, ty }).map_err(gguf_unsupported)?;
        sources.push(src);
    }
    Ok(Plan { header: h, sources })
}

/// The values of one planned tensor.
pub fn tensor_values(model: &Model, src: &Source, shape: &[usize]) -> Result<Vec<f32>> {
    match src {
        Source::Computed(v) => Ok(v.clone()),
        Source::Model { name, transform } => {
            let w = model.values(name)?;
            Ok(match transform {
                Transform::None => w,
                Transform::Permute(n) => {
                    let cols = if shape.len() > 1 { shape[1..].iter().product() } else { 1 };
                    permute_rows(&w, shape[0], cols, *n)
                }
                Transform::PlusOne => {
                    // llama.cpp adds 1 in the tensor's own precision: f16 stays f16, bf16 becomes f32.
                    let f16 = model.out_dtype(name)? == OutDtype::F16;
                    w.into_iter().map(|x| if f16 { round_f16(x + 1.0) } else { x + 1.0 }).collect()
                }
            })
        }
    }
}

/// Writes a planned GGUF file through `sink` (nothing appears under `path` unless it completes).
pub fn write(
    model: &Model,
    plan: Plan,
    path: &Path,
    sink: &dyn Sink,
    progress: &mut dyn FnMut(&str),
) -> Result<u64> {
    let werr = |e| ExportError::write(path, e);
    let size = plan.header.file_size();
    let file = sink.create(path).map_err(werr)?;
    let infos = plan.header.tensors().to_vec();
    let mut w = GgufWriter::start(file, plan.header).map_err(werr)?;
    let lint = |name: &str, reason: String| ExportError::Lint {
        path: path.to_path_buf(),
        problem: format!("tensor `{name}`: {reason}"),
    };
    for (info, src) in infos.iter().zip(&plan.sources) {
        progress(&info.name);
        // Unchanged stored tensors are encoded straight from their bytes (no f32 copy).
        let direct = match src {
            Source::Model { name, transform: Transform::None } => {
                model.unchanged_view(name).map(|v| (name, v))
            }
            _ => None,
        };
        let bytes = match direct {
            Some((name, view)) => {
                let (bytes, bad) = quant::quantize_view(info.ty, &view).map_err(|r| lint(&info.name, r))?;
                if bad > 0 {
                    return Err(ExportError::NonFinite {
                        tensor: name.clone(),
                        count: bad,
                        origin: Some(model.dir.clone()),
                    });
                }
                bytes
            }
            None => {
                let values = tensor_values(model, src, &info.shape)?;
                quant::quantize(info.ty, &values).map_err(|r| lint(&info.name, r))?
            }
        };
        w.write_tensor(&info.name, &bytes).map_err(werr)?;
    }
    let mut file = w.finish().map_err(werr)?;
    file.flush().map_err(werr)?;
    file.commit().map_err(werr)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_halves_per_head() {
        // 2 heads x 4 rows (halves of 2), 1 column: rows [0 1 2 3 | 4 5 6 7] -> [0 2 1 3 | 4 6 5 7].
        let w: Vec<f32> = (0..8).map(|x| x as f32).collect();
        assert_eq!(permute_rows(&w, 8, 1, 2), [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }

    #[test]
    fn unpermute_undoes_permute() {
        // 3 heads x 8 rows (halves of 4), 5 columns of distinct values.
        let w: Vec<f32> = (0..3 * 8 * 5).map(|x| x as f32).collect();
        let p = permute_rows(&w, 24, 5, 3);
        assert_ne!(p, w);
        assert_eq!(unpermute_rows(&p, 24, 5, 3), w);
    }
}
