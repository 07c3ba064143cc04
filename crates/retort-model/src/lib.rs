//! Transformer families on burn, computing what `transformers` computes.
//!
//! Llama, Mistral, Qwen2/2.5, Qwen3, Phi-3/3.5/4 and Gemma 2/3 share one implementation built from
//! shared blocks (attention with grouped-query heads, RoPE with the published scaling types, RMSNorm,
//! gated MLP); each family differs only by its validated config (`retort_hf::ModelConfig`). Weights are
//! read from Hugging Face safetensors directories straight onto a burn device.
//!
//! Parity with transformers 5.23 is tested on tiny random models of every family
//! (`tests/fixtures`, made by `scripts/make_model_fixtures.py`).

pub mod alloc;
pub mod attention;
pub mod attention_grad;
pub mod attention_mem;
pub mod batch;
pub mod builtin;
pub mod cpu_attention;
#[cfg(feature = "gpu-kernels")]
pub mod cube;
pub mod dense;
pub mod device;
pub mod dtype;
pub mod error;
pub mod gemm_bf16;
pub mod gemv;
pub mod generate;
mod host;
pub mod linear;
mod load;
pub mod lora;
pub mod mask;
pub mod memory;
pub mod mlp;
pub mod model;
pub mod nf4;
pub mod norm;
pub mod norm_cpu;
mod recorded;
pub mod rope;
pub mod rope_cpu;
pub mod swiglu;
pub mod walk;
pub mod xent;

pub use batch::Batch;
pub use burn;
pub use dtype::Precision;
pub use error::ModelError;
pub use generate::{GenerateOptions, Generated, Sampling, generate};
pub use load::{Fetch, Quantizer};
// Linked for its AVX-512 kernels (see the workspace Cargo.toml); burn's CPU backend calls it.
use gemm as _;
pub use model::{KvCache, LayerInputs, Transformer};
