//! PEFT adapter directories, as `peft` writes and reads them: `adapter_config.json` and
//! `adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight`,
//! `.lora_B.weight` and, for DoRA, `.lora_magnitude_vector`.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{DType, Tensor, TensorData};
use retort_hf::Checkpoint;
use retort_model::Transformer;
use retort_model::burn;
use retort_model::lora::Lora;
use serde::{Deserialize, Serialize};

use crate::inject::{LoraError, Trainable};

const PREFIX: &str = "base_model.model.";

/// A tensor's values (f32) and shape.
type Values = (Vec<f32>, Vec<usize>);

/// The fields of `adapter_config.json` retort reads and writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// `CAUSAL_LM`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub lora_alpha: f64,
    /// Dropout.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Target module names (or `all-linear`, or a regex string).
    pub target_modules: serde_json::Value,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA.
    #[serde(default)]
    pub use_dora: bool,
    /// Per-module rank overrides.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Modules trained fully besides the adapters (retort refuses them).
    #[serde(default)]
    pub modules_to_save: Option<serde_json::Value>,
    /// The base model.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Everything else PEFT writes, kept as is.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl AdapterConfig {
    /// A config for adapters of one rank and alpha on the given targets.
    pub fn new(
        r: usize,
        alpha: f64,
        dropout: f64,
        targets: &[&str],
        rslora: bool,
        dora: bool,
        base: &str,
    ) -> Self {
        let mut other = BTreeMap::new();
        for (k, v) in [
            ("bias", serde_json::json!("none")),
            ("fan_in_fan_out", serde_json::json!(false)),
            ("inference_mode", serde_json::json!(true)),
            ("init_lora_weights", serde_json::json!(true)),
            ("layers_to_transform", serde_json::Value::Null),
            ("layers_pattern", serde_json::Value::Null),
            ("revision", serde_json::Value::Null),
        ] {
            other.insert(k.to_string(), v);
        }
        AdapterConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: serde_json::json!(targets),
            use_rslora: rslora,
            use_dora: dora,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            modules_to_save: None,
            base_model_name_or_path: Some(base.to_string()),
            other,
        }
    }

    /// The scale of the adapter on `path`, with PEFT's per-module patterns (a pattern matches when the
    /// module path ends with it).
    pub fn scale_for(&self, path: &str, rank: usize) -> f64 {
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| path.ends_with(k.as_str()))
            .map_or(self.lora_alpha, |(_, a)| *a);
        if self.use_rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 }
    }
}

fn bad(path: &Path, message: impl Into<String>) -> LoraError {
    LoraError::Adapter { path: path.to_path_buf(), message: message.into() }
}

/// Reads a PEFT adapter directory and puts its adapters on `model` (trainable, f32, on the model's
/// device). Every tensor of the file must land on a projection of the model with the right shape.
pub fn load_adapter(model: Transformer, dir: &Path) -> Result<(Transformer, AdapterConfig), LoraError> {
    let cfg_path = dir.join("adapter_config.json");
    let text =
        std::fs::read_to_string(&cfg_path).map_err(|e| bad(&cfg_path, format!("cannot read it: {e}")))?;
    let cfg: AdapterConfig =
        serde_json::from_str(&text).map_err(|e| bad(&cfg_path, format!("line {}: {e}", e.line())))?;
    if cfg.peft_type != "LORA" {
        return Err(bad(&cfg_path, format!("peft_type is `{}`; retort loads LORA adapters", cfg.peft_type)));
    }
    if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_null()) {
        return Err(bad(
            &cfg_path,
            "it trains whole modules (`modules_to_save`), which retort does not support",
        ));
    }
    let weights = dir.join("adapter_model.safetensors");
    let ckpt =
        Checkpoint::open_files(std::slice::from_ref(&weights)).map_err(|e| bad(&weights, e.to_string()))?;
    let mut used = std::collections::HashSet::new();
    let mut error = None;
    let model = model.map_linears(&mut |site, mut lin| {
        let key = |suffix: &str| format!("{PREFIX}{}.{suffix}", site.path);
        let read = |name: &str| -> Result<Option<Values>, LoraError> {
            match ckpt.get(name) {
                None => Ok(None),
                Some(v) => Ok(Some((v.to_f32().map_err(|e| bad(&weights, e.to_string()))?, v.shape.to_vec()))),
            }
        };
        let (ka, kb, km) = (key("lora_A.weight"), key("lora_B.weight"), key("lora_magnitude_vector"));
        let result = (|| -> Result<(), LoraError> {
            let (Some((a, sa)), Some((b, sb))) = (read(&ka)?, read(&kb)?) else { return Ok(()) };
            let (inp, out) = (lin.in_features(), lin.out_features());
            let r = sa.first().copied().unwrap_or(0);
            if sa != [r, inp] || sb != [out, r] {
                return Err(bad(&weights, format!(
                    "`{ka}` is {sa:?} and `{kb}` is {sb:?}; the model's `{}` needs [r, {inp}] and [{out}, r] (an adapter for another base model?)",
                    site.path
                )));
            }
            let device = lin.weight.device();
            let t2 = |v: Vec<f32>, s: [usize; 2]| Tensor::<2>::from_data(TensorData::new(v, s), (&device, DType::F32)).pipe_trainable();
            let magnitude = match read(&km)? {
                Some((m, sm)) if sm == [out] => {
                    Some(Param::from_tensor(Tensor::<1>::from_data(TensorData::new(m, [out]), (&device, DType::F32)).pipe_trainable()))
                }
                Some((_, sm)) => return Err(bad(&weights, format!("`{km}` is {sm:?}; expected [{out}]"))),
                None if cfg.use_dora => return Err(bad(&weights, format!("use_dora is set but `{km}` is missing"))),
                None => None,
            };
            used.extend([ka.clone(), kb.clone()]);
            if magnitude.is_some() {
                used.insert(km.clone());
            }
            lin.lora = Some(Lora {
                a: Param::from_tensor(t2(a, [r, inp])),
                b: Param::from_tensor(t2(b, [out, r])),
                magnitude,
                scale: cfg.scale_for(&site.path, r),
                dropout: cfg.lora_dropout,
                autocast: false,
            });
            Ok(())
        })();
        if let Err(e) = result {
            error.get_or_insert(e);
        }
        lin
    });
    if let Some(e) = error {
        return Err(e);
    }
    let unused: Vec<&str> = ckpt.names().filter(|n| !used.contains(*n)).collect();
    if let Some(first) = unused.first() {
        let hint = if first.contains("embed_tokens") || first.contains("lm_head") {
            " (adapters on embeddings or the LM head are not supported)"
        } else {
            " (an adapter for another architecture?)"
        };
        return Err(bad(
            &weights,
            format!("{} tensors match no projection of the model, e.g. `{first}`{hint}", unused.len()),
        ));
    }
    if used.is_empty() {
        return Err(bad(&weights, "it holds no LoRA tensors"));
    }
    Ok((model, cfg))
}

/// Writes the model's adapters as a PEFT directory (atomically, file by file).
pub fn save_adapter(model: &Transformer, cfg: &AdapterConfig, dir: &Path) -> Result<(), LoraError> {
    std::fs::create_dir_all(dir).map_err(|e| LoraError::Io { path: dir.to_path_buf(), source: e })?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut failed = None;
    model.visit_linears(&mut |site, lin| {
        let Some(l) = &lin.lora else { return };
        let mut push = |suffix: &str, t: Tensor<2>| {
            let shape = t.dims().to_vec();
            match t.cast(DType::F32).into_data().try_into_vec::<f32>() {
                Ok(v) => tensors.push((
                    format!("{PREFIX}{}.{suffix}", site.path),
                    shape,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )),
                Err(e) => failed = Some(format!("{e:?}")),
            }
        };
        push("lora_A.weight", l.a.val().inner());
        push("lora_B.weight", l.b.val().inner());
        if let Some(m) = &l.magnitude {
            let m = m.val().inner();
            let n = m.dims()[0];
            push("lora_magnitude_vector", m.reshape([n, 1]));
            if let Some(last) = tensors.last_mut() {
                last.1 = vec![n];
            }
        }
    });
    if let Some(e) = failed {
        return Err(bad(dir, format!("cannot read adapter weights: {e}")));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| bad(dir, e.to_string()))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| bad(dir, e.to_string()))?;
    let write = |name: &str, b: &[u8]| {
        let p = dir.join(name);
        retort_io::write_atomic(&p, b, true).map_err(|e| LoraError::Io { path: p, source: e })
    };
    write("adapter_model.safetensors", &bytes)?;
    let json = serde_json::to_vec_pretty(cfg).map_err(|e| bad(dir, e.to_string()))?;
    write("adapter_config.json", &json)
}
