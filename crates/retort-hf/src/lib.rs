//! Hugging Face model directories, read without a tensor framework.
//!
//! - [`config`]: `config.json` parsed verbatim, then validated into a [`ModelConfig`] whose errors name
//!   the field; a registry keyed by `architectures[0]`.
//! - [`names`]: one table per family of every tensor the model has: its HF key, shape, role, the PEFT
//!   target name of adaptable linears, and its llama.cpp GGUF name. The burn loader, the adapter merger
//!   and the GGUF writer all read this one table.
//! - [`weights`]: safetensors checkpoints, single-file or sharded, memory-mapped, with zero-copy views.
//! - [`hub`]: downloads from the Hugging Face hub into its standard cache layout (resumable, verified).
//! - [`report`]: what a load found: applied, missing, unused, wrong shape (with "did you mean").
//!
//! It knows nothing about running models; `retort-model` builds burn modules from what it reads, and
//! `retort-export` streams tensors from it.

pub mod config;
pub mod hub;
pub mod names;
pub mod report;
pub mod weights;

pub use config::{Activation, Arch, ConfigError, LayerAttention, ModelConfig, RopeScaling};
pub use hub::{Hub, HubError};
pub use names::{Role, TensorSpec};
pub use report::LoadReport;
pub use weights::{Checkpoint, Dtype, TensorView, WeightsError};
