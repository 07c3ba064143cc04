//! Building a [`Transformer`] from a Hugging Face directory: every tensor is read from the memory-mapped
//! safetensors file and created on the target device in the target dtype, one at a time (no full f32
//! copy of the model in RAM). The load is checked against the family's tensor table first; missing or
//! misshapen tensors are an error that names them.
//!
//! QLoRA: [`Transformer::load_quantized`] hands each adaptable projection's checkpoint tensor (still
//! the mapped bytes) to a quantizer, which returns its NF4 form; the dense tensor is never built, on
//! the host or the device, so peak memory is one projection's packed codes beyond the quantized model.
//! The quantizer is a callback because the quantizer itself lives in `retort-lora`, which depends on
//! this crate. Embeddings, norms, biases and the LM head stay in the model's dtype, as PEFT and
//! bitsandbytes leave them.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{DType, Device, Tensor, TensorData};
use retort_hf::{Checkpoint, Dtype, LoadReport, ModelConfig, Role, TensorSpec, TensorView};

use crate::attention::{Attention, Qkv, SeparateQkv};
use crate::dtype::Precision;
use crate::error::ModelError;
use crate::linear::Linear;
use crate::mlp::{GateUp, Mlp, SeparateGateUp};
use crate::model::{Layer, Transformer, layer_window};
use crate::nf4::Nf4Weight;
use crate::norm::RmsNorm;

/// Turns an adaptable projection's checkpoint tensor into its NF4 form on the device, for a model
/// computing in the given dtype.
pub type Quantizer<'a> = &'a dyn Fn(&TensorView<'_>, DType, &Device) -> Result<Nf4Weight, ModelError>;

/// The f32 values of a model tensor, for models whose weights do not come from safetensors (a GGUF
/// file read back, for one).
pub type Fetch<'a> = &'a dyn Fn(&TensorSpec) -> Result<Vec<f32>, ModelError>;

enum Source<'a> {
    Checkpoint(&'a Checkpoint),
    Fetch(Fetch<'a>),
}

struct Reader<'a> {
    source: Source<'a>,
    by_role: HashMap<(Option<usize>, Role), &'a TensorSpec>,
    device: &'a Device,
    dtype: DType,
    quantize: Option<Quantizer<'a>>,
}

impl Reader<'_> {
    fn spec(&self, layer: Option<usize>, role: Role) -> Result<&TensorSpec, ModelError> {
        self.by_role
            .get(&(layer, role))
            .copied()
            .ok_or_else(|| ModelError::Input(format!("the model has no {role:?} tensor for layer {layer:?}")))
    }

    fn view(&self, layer: Option<usize>, role: Role) -> Result<TensorView<'_>, ModelError> {
        let spec = self.spec(layer, role)?;
        let Source::Checkpoint(ckpt) = self.source else {
            return Err(ModelError::Input(format!("tensor `{}` has no safetensors view", spec.name)));
        };
        ckpt.get(&spec.name).ok_or_else(|| ModelError::Input(format!("tensor `{}` is missing", spec.name)))
    }

    fn tensor<const D: usize>(&self, layer: Option<usize>, role: Role) -> Result<Tensor<D>, ModelError> {
        if let Source::Fetch(fetch) = self.source {
            let spec = self.spec(layer, role)?;
            let values = fetch(spec)?;
            if values.len() != spec.numel() {
                return Err(ModelError::Input(format!(
                    "tensor `{}` has {} values, its shape {:?} needs {}",
                    spec.name,
                    values.len(),
                    spec.shape,
                    spec.numel()
                )));
            }
            let t = Tensor::<D>::from_data(
                TensorData::new(values, spec.shape.clone()),
                (self.device, DType::F32),
            );
            return Ok(if self.dtype == DType::F32 { t } else { t.cast(self.dtype) });
        }
        let view = self.view(layer, role)?;
        let src = match view.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::Other(d) => {
                return Err(retort_hf::WeightsError::UnsupportedDtype {
                    path: view.path.to_path_buf(),
                    tensor: view.name.to_string(),
                    dtype: d.clone(),
                }
                .into());
            }
        };
        let data = TensorData::from_bytes_vec(view.data.to_vec(), view.shape.to_vec(), src);
        let t = Tensor::<D>::from_data(data, (self.device, src));
        Ok(if src == self.dtype { t } else { t.cast(self.dtype) })
    }

    fn has(&self, layer: Option<usize>, role: Role) -> bool {
        self.by_role.contains_key(&(layer, role))
    }

    fn linear(&self, layer: usize, weight: Role, bias: Role) -> Result<Linear, ModelError> {
        let b = if self.has(Some(layer), bias) { Some(self.tensor::<1>(Some(layer), bias)?) } else { None };
        match self.quantize {
            Some(q) => Ok(Linear::nf4(q(&self.view(Some(layer), weight)?, self.dtype, self.device)?, b)),
            None => Ok(Linear::new(self.tensor::<2>(Some(layer), weight)?, b)),
        }
    }

    fn norm(&self, layer: Option<usize>, role: Role, cfg: &ModelConfig) -> Result<RmsNorm, ModelError> {
        let w = self.tensor::<1>(layer, role)?;
        Ok(RmsNorm {
            weight: Param::from_tensor(w).set_require_grad(false),
            eps: cfg.rms_norm_eps,
            plus_one: cfg.norm_plus_one,
        })
    }
}

impl Transformer {
    /// Loads `dir` (config.json + safetensors) onto `device` in `precision`.
    pub fn load(
        dir: &Path,
        precision: Precision,
        device: &Device,
    ) -> Result<(Transformer, LoadReport), ModelError> {
        Transformer::load_with(dir, precision, device, None)
    }

    /// [`Transformer::load`] with every adaptable projection quantized by `quantize` as it is read
    /// (QLoRA; see the module documentation).
    pub fn load_quantized(
        dir: &Path,
        precision: Precision,
        device: &Device,
        quantize: Quantizer<'_>,
    ) -> Result<(Transformer, LoadReport), ModelError> {
        Transformer::load_with(dir, precision, device, Some(quantize))
    }

    fn load_with(
        dir: &Path,
        precision: Precision,
        device: &Device,
        quantize: Option<Quantizer<'_>>,
    ) -> Result<(Transformer, LoadReport), ModelError> {
        let config = ModelConfig::load(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let specs = retort_hf::names::tensors(&config);
        let report = LoadReport::check(&specs, &ckpt);
        if !report.is_complete() {
            return Err(ModelError::Incomplete { dir: dir.to_path_buf(), report });
        }
        let model =
            Transformer::build(&config, Source::Checkpoint(&ckpt), &specs, precision, device, quantize)?;
        Ok((model, report))
    }

    /// Builds the model from an opened checkpoint that passed [`LoadReport::check`].
    pub fn from_checkpoint(
        config: &ModelConfig,
        ckpt: &Checkpoint,
        specs: &[TensorSpec],
        precision: Precision,
        device: &Device,
    ) -> Result<Transformer, ModelError> {
        Transformer::build(config, Source::Checkpoint(ckpt), specs, precision, device, None)
    }

    /// Builds the model of `config` from the f32 values `fetch` gives for each tensor of `specs`
    /// (`retort_hf::names::tensors(config)`), cast to `precision` on `device`.
    pub fn from_tensors(
        config: &ModelConfig,
        specs: &[TensorSpec],
        precision: Precision,
        device: &Device,
        fetch: Fetch<'_>,
    ) -> Result<Transformer, ModelError> {
        Transformer::build(config, Source::Fetch(fetch), specs, precision, device, None)
    }

    fn build(
        config: &ModelConfig,
        source: Source<'_>,
        specs: &[TensorSpec],
        precision: Precision,
        device: &Device,
        quantize: Option<Quantizer<'_>>,
    ) -> Result<Transformer, ModelError> {
        let by_role = specs.iter().map(|s| ((s.layer, s.role), s)).collect();
        let r = Reader { source, by_role, device, dtype: precision.dtype(), quantize };
        let c = config;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let l = Some(i);
            let qkv = if c.fused_projections {
                Qkv::Fused(r.linear(i, Role::Qkv, Role::QBias)?)
            } else {
                Qkv::Separate(SeparateQkv {
                    q: r.linear(i, Role::Q, Role::QBias)?,
                    k: r.linear(i, Role::K, Role::KBias)?,
                    v: r.linear(i, Role::V, Role::VBias)?,
                })
            };
            let (q_norm, k_norm) = if c.qk_norm {
                (Some(r.norm(l, Role::QNorm, c)?), Some(r.norm(l, Role::KNorm, c)?))
            } else {
                (None, None)
            };
            let attn = Attention {
                qkv,
                o: r.linear(i, Role::O, Role::OBias)?,
                q_norm,
                k_norm,
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                scale: c.attn_scale,
                softcap: c.attn_logit_softcap,
            };
            let gate_up = if c.fused_projections {
                GateUp::Fused(r.linear(i, Role::GateUp, Role::UpBias)?)
            } else {
                GateUp::Separate(SeparateGateUp {
                    gate: r.linear(i, Role::Gate, Role::GateBias)?,
                    up: r.linear(i, Role::Up, Role::UpBias)?,
                })
            };
            let mlp =
                Mlp { gate_up, down: r.linear(i, Role::Down, Role::DownBias)?, activation: c.activation };
            let window = layer_window(&c.layers[i]);
            layers.push(Layer {
                attn_norm: r.norm(l, Role::AttnNorm, c)?,
                attn,
                post_attn_norm: if c.sandwich_norms { Some(r.norm(l, Role::PostAttnNorm, c)?) } else { None },
                ffn_norm: r.norm(l, Role::FfnNorm, c)?,
                mlp,
                post_ffn_norm: if c.sandwich_norms { Some(r.norm(l, Role::PostFfnNorm, c)?) } else { None },
                window,
                local_rope: window.is_some() && c.rope_local_theta.is_some(),
            });
        }
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(Linear::new(r.tensor::<2>(None, Role::LmHead)?, None))
        };
        Ok(Transformer {
            embed: Param::from_tensor(r.tensor::<2>(None, Role::Embed)?).set_require_grad(false),
            layers,
            norm: r.norm(None, Role::FinalNorm, c)?,
            lm_head,
            config: c.clone(),
            checkpoint_layers: false,
            mlp_chunk_bytes: crate::model::MLP_CHUNK_BYTES,
            offload_checkpoints: false,
        })
    }
}
