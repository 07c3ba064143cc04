//! Putting fresh adapters on the projections a recipe targets.

use burn::module::Param;
use burn::tensor::{DType, Tensor, TensorData};
use retort_model::Transformer;
use retort_model::burn;
use retort_model::lora::Lora;
use retort_recipe::schema::lora::{Target, Variant};

/// Makes an adapter tensor trainable when its device records gradients (training); on an inference
/// device it stays a plain tensor.
pub(crate) trait Trainable {
    fn pipe_trainable(self) -> Self;
}

impl<const D: usize> Trainable for Tensor<D> {
    fn pipe_trainable(self) -> Self {
        if self.is_autodiff() { self.require_grad() } else { self }
    }
}

/// Problems attaching or loading adapters.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A target the model does not have.
    #[error("the model has no `{target}` projection; its projections are {}", available.join(", "))]
    UnknownTarget {
        /// The requested target.
        target: String,
        /// What the model has.
        available: Vec<String>,
    },
    /// The rank exceeds a layer's dimensions.
    #[error("LoRA rank {rank} is larger than `{path}`'s smaller dimension ({dim}); use r <= {dim}")]
    RankTooLarge {
        /// Requested rank.
        rank: usize,
        /// The projection.
        path: String,
        /// Its smaller dimension.
        dim: usize,
    },
    /// An adapter directory that cannot be used.
    #[error("adapter `{}`: {message}", path.display())]
    Adapter {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Reading or writing failed.
    #[error("cannot write `{}`: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The adapter shape a recipe asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// Dropout on the adapter input.
    pub dropout: f64,
    /// Target names (`all-linear` or PEFT module names).
    pub targets: Vec<Target>,
    /// LoRA, rsLoRA or DoRA.
    pub variant: Variant,
}

impl AdapterSpec {
    /// From the recipe's `[lora]` section.
    pub fn from_recipe(l: &retort_recipe::schema::Lora) -> AdapterSpec {
        AdapterSpec {
            r: l.r as usize,
            alpha: l.alpha,
            dropout: l.dropout,
            targets: l.targets.clone(),
            variant: l.variant,
        }
    }

    /// The update scale: `alpha / r`, or `alpha / sqrt(r)` for rsLoRA.
    pub fn scale(&self) -> f64 {
        match self.variant {
            Variant::Rslora => self.alpha / (self.r as f64).sqrt(),
            Variant::Lora | Variant::Dora => self.alpha / self.r as f64,
        }
    }

    /// The PEFT target names this spec selects on a model.
    pub fn target_names(&self, model: &Transformer) -> Result<Vec<&'static str>, LoraError> {
        let available = retort_hf::names::peft_targets(&model.config);
        if self.targets.contains(&Target::AllLinear) {
            return Ok(available);
        }
        let mut out = Vec::new();
        for t in &self.targets {
            let name = target_name(*t);
            if !available.contains(&name) {
                return Err(LoraError::UnknownTarget {
                    target: name.to_string(),
                    available: available.iter().map(|s| s.to_string()).collect(),
                });
            }
            out.push(name);
        }
        Ok(out)
    }
}

/// The PEFT spelling of a recipe target.
pub fn target_name(t: Target) -> &'static str {
    match t {
        Target::AllLinear => "all-linear",
        Target::QProj => "q_proj",
        Target::KProj => "k_proj",
        Target::VProj => "v_proj",
        Target::OProj => "o_proj",
        Target::GateProj => "gate_proj",
        Target::UpProj => "up_proj",
        Target::DownProj => "down_proj",
        Target::QkvProj => "qkv_proj",
        Target::GateUpProj => "gate_up_proj",
    }
}

/// SplitMix64: a seeded generator whose output never changes with a dependency's version.
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 bits, exactly representable in f32.
    pub(crate) fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn seed_for(seed: u64, path: &str) -> u64 {
    // FNV-1a of the path mixed with the seed: each projection gets its own stream.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in path.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Attaches fresh trainable adapters to the targeted projections: A ~ U(-1/sqrt(in), 1/sqrt(in))
/// (PEFT's Kaiming-uniform with a = sqrt(5)), B = 0, and for DoRA a magnitude equal to the row norms of
/// W. Deterministic from `seed`. Adapters are f32 and live on the model's device.
pub fn attach(model: Transformer, spec: &AdapterSpec, seed: u64) -> Result<Transformer, LoraError> {
    let targets = spec.target_names(&model)?;
    // Check every rank before building anything.
    let mut too_large = None;
    model.visit_linears(&mut |site, lin| {
        let dim = lin.in_features().min(lin.out_features());
        if targets.contains(&site.target) && spec.r > dim && too_large.is_none() {
            too_large = Some(LoraError::RankTooLarge { rank: spec.r, path: site.path.clone(), dim });
        }
    });
    if let Some(e) = too_large {
        return Err(e);
    }
    let scale = spec.scale();
    Ok(model.map_linears(&mut |site, mut lin| {
        if !targets.contains(&site.target) {
            return lin;
        }
        let device = lin.weight.device();
        let (inp, out) = (lin.in_features(), lin.out_features());
        let bound = 1.0 / (inp as f32).sqrt();
        let mut rng = SplitMix(seed_for(seed, &site.path));
        let a: Vec<f32> = (0..spec.r * inp).map(|_| (rng.next_f32() * 2.0 - 1.0) * bound).collect();
        let a = Tensor::<2>::from_data(TensorData::new(a, [spec.r, inp]), (&device, DType::F32));
        let b = Tensor::<2>::zeros([out, spec.r], (&device, DType::F32));
        let magnitude = (spec.variant == Variant::Dora).then(|| {
            let w = lin.weight.val().cast(DType::F32).detach();
            Param::from_tensor(w.square().sum_dim(1).sqrt().reshape([out]).pipe_trainable())
        });
        lin.lora = Some(Lora {
            a: Param::from_tensor(a.pipe_trainable()),
            b: Param::from_tensor(b.pipe_trainable()),
            magnitude,
            scale,
            dropout: spec.dropout,
            autocast: false,
        });
        lin
    }))
}
