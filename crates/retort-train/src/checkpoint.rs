//! Resumable checkpoints: `<train dir>/step-NNNNNN/` holds the adapter as PEFT writes it
//! (`adapter/`), the AdamW moments by parameter name (`optimizer.safetensors`, f32, exact) and
//! `state.json` (step, data cursor, counters, the fingerprint of what was trained). A checkpoint is built
//! in a hidden temporary directory and renamed into place, so one that exists is complete; the oldest
//! are deleted only after a newer one is in place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use retort_model::Transformer;
use retort_model::burn::tensor::{DType, Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::optim::{AdamW, AdamWConfig, Moments};

/// Version of the checkpoint layout; a checkpoint of another version is not resumed.
pub const FORMAT: u32 = 1;

/// Everything about a run that is not a tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// [`FORMAT`].
    pub format: u32,
    /// retort's version that wrote it.
    pub retort: String,
    /// Optimizer steps done (applied or skipped).
    pub step: u64,
    /// Steps of the whole run.
    pub total_steps: u64,
    /// Epoch of the next micro-batch (0-based).
    pub epoch: u64,
    /// Micro-batches of that epoch already consumed.
    pub cursor: u64,
    /// Seed from which data order and dropout derive (dropout of step `s` reseeds from `seed` and `s`).
    pub seed: u64,
    /// Steps skipped for a non-finite loss or gradient, in all.
    pub skipped_steps: u64,
    /// Consecutive skipped steps at the time of the checkpoint.
    pub bad_streak: u32,
    /// Label tokens trained on so far.
    pub label_tokens: u64,
    /// Tokens (all, with padding excluded) seen so far.
    pub tokens: u64,
    /// Seconds of training so far, over all sessions.
    pub elapsed_s: f64,
    /// Lowest validation loss so far, and its step.
    #[serde(default)]
    pub best_val: Option<(u64, f64)>,
    /// The loss scaler of a base in f16 ([`crate::scaler`]); none otherwise.
    #[serde(default)]
    pub loss_scale: Option<crate::scaler::LossScaler>,
    /// Steps skipped because the loss-scaled gradients overflowed (counted in `skipped_steps` too).
    #[serde(default)]
    pub overflow_steps: u64,
    /// What the run trains, component by component; a resume requires every value to be equal.
    pub fingerprint: BTreeMap<String, String>,
}

/// A checkpoint that could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file operation failed.
    #[error("checkpoint `{}`: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The content is not what this version writes.
    #[error("checkpoint `{}`: {message}", path.display())]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The adapter files.
    #[error(transparent)]
    Adapter(#[from] retort_lora::LoraError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

fn bad(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Bad { path: path.to_path_buf(), message: message.into() }
}

/// The directory name of the checkpoint after `step` steps.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// The completed checkpoints under `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            e.path().join("state.json").is_file().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

fn f32_bytes(t: Tensor<1>) -> Result<Vec<u8>, String> {
    let v: Vec<f32> = t.cast(DType::F32).into_data().try_into_vec::<f32>().map_err(|e| format!("{e:?}"))?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// Writes the optimizer moments as `exp_avg.<name>` and `exp_avg_sq.<name>` (torch's names), with the
/// step count and hyperparameters in the metadata.
fn optimizer_bytes(opt: &AdamW, path: &Path) -> Result<Vec<u8>, CheckpointError> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, m) in &opt.state {
        let n = m.m.dims()[0];
        tensors.push((format!("exp_avg.{name}"), vec![n], f32_bytes(m.m.clone()).map_err(|e| bad(path, e))?));
        tensors.push((
            format!("exp_avg_sq.{name}"),
            vec![n],
            f32_bytes(m.v.clone()).map_err(|e| bad(path, e))?,
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| bad(path, e.to_string()))?;
    let c = opt.config;
    let meta: std::collections::HashMap<String, String> = [
        ("step", opt.step.to_string()),
        ("beta1", c.beta1.to_string()),
        ("beta2", c.beta2.to_string()),
        ("eps", c.eps.to_string()),
        ("weight_decay", c.weight_decay.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    safetensors::serialize(views, Some(meta)).map_err(|e| bad(path, e.to_string()))
}

/// Reads optimizer moments back onto `device` (the device of the adapter weights, without autodiff).
fn read_optimizer(path: &Path, config: AdamWConfig, device: &Device) -> Result<AdamW, CheckpointError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(path, e.to_string()))?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| bad(path, "no `step` in the metadata"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(path, e.to_string()))?;
    let mut halves: BTreeMap<String, (Option<Tensor<1>>, Option<Tensor<1>>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 1 {
            return Err(bad(path, format!("tensor `{name}` is not a 1-D f32 tensor")));
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let n = values.len();
        let t = Tensor::<1>::from_data(TensorData::new(values, [n]), (device, DType::F32));
        if let Some(p) = name.strip_prefix("exp_avg_sq.") {
            halves.entry(p.to_string()).or_default().1 = Some(t);
        } else if let Some(p) = name.strip_prefix("exp_avg.") {
            halves.entry(p.to_string()).or_default().0 = Some(t);
        } else {
            return Err(bad(path, format!("unexpected tensor `{name}`")));
        }
    }
    let mut opt = AdamW::new(config);
    opt.step = step;
    for (name, pair) in halves {
        let (Some(m), Some(v)) = pair else {
            return Err(bad(path, format!("`{name}` lacks one of its two moments")));
        };
        opt.state.insert(name, Moments { m, v });
    }
    Ok(opt)
}

/// Writes the checkpoint of `state.step` under `dir` and deletes all but the newest `keep_last`
/// (never fewer than one). Returns its path.
pub fn save(
    dir: &Path,
    model: &Transformer,
    adapter: &retort_lora::AdapterConfig,
    opt: &AdamW,
    state: &TrainState,
    keep_last: u32,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = dir_name(state.step);
    let tmp = dir.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    retort_lora::save_adapter(model, adapter, &tmp.join("adapter"))?;
    let opt_path = tmp.join("optimizer.safetensors");
    let bytes = optimizer_bytes(opt, &opt_path)?;
    retort_io::write_atomic(&opt_path, &bytes, true).map_err(io(&opt_path))?;
    let state_path = tmp.join("state.json");
    let json = serde_json::to_vec_pretty(state).map_err(|e| bad(&state_path, e.to_string()))?;
    retort_io::write_atomic(&state_path, &json, true).map_err(io(&state_path))?;
    let target = dir.join(&name);
    if target.exists() {
        // Only a run restarted from an older checkpoint gets here: the newer one is stale.
        std::fs::remove_dir_all(&target).map_err(io(&target))?;
    }
    std::fs::rename(&tmp, &target).map_err(io(&target))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    let all = list(dir);
    let keep = keep_last.max(1) as usize;
    if all.len() > keep {
        for (_, old) in &all[..all.len() - keep] {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(target)
}

/// Deletes temporary directories left by a run killed while writing a checkpoint.
pub fn clean_partial(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".step-") && name.contains(".partial-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Reads a checkpoint's state without touching tensors.
pub fn read_state(ckpt: &Path) -> Result<TrainState, CheckpointError> {
    let path = ckpt.join("state.json");
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let state: TrainState = serde_json::from_slice(&bytes).map_err(|e| bad(&path, e.to_string()))?;
    if state.format != FORMAT {
        return Err(bad(
            &path,
            format!("written in checkpoint format {} and this retort reads format {FORMAT}", state.format),
        ));
    }
    Ok(state)
}

/// Restores a checkpoint onto `base` (the frozen model without adapters): the adapters, trainable, and
/// the optimizer with its moments.
pub fn load(
    ckpt: &Path,
    base: Transformer,
    config: AdamWConfig,
) -> Result<(Transformer, retort_lora::AdapterConfig, AdamW, TrainState), CheckpointError> {
    let state = read_state(ckpt)?;
    let (model, adapter) = retort_lora::load_adapter(base, &ckpt.join("adapter"))?;
    let device = model.device();
    let inner = if device.is_autodiff() { Tensor::<1>::zeros([1], &device).inner().device() } else { device };
    let opt = read_optimizer(&ckpt.join("optimizer.safetensors"), config, &inner)?;
    let applied = state.step.checked_sub(state.skipped_steps);
    if applied != Some(opt.step) {
        return Err(bad(
            &ckpt.join("optimizer.safetensors"),
            format!(
                "the optimizer made {} updates but state.json counts {} steps of which {} were skipped",
                opt.step, state.step, state.skipped_steps
            ),
        ));
    }
    Ok((model, adapter, opt, state))
}

/// The differences between a checkpoint's fingerprint and the current one, as
/// `(component, was, now)`.
pub fn fingerprint_diff(
    was: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
) -> Vec<(String, String, String)> {
    let mut keys: Vec<&String> = was.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (a, b) = (was.get(k), now.get(k));
            (a != b).then(|| {
                let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(absent)".into());
                (k.clone(), show(a), show(b))
            })
        })
        .collect()
}
