//! LoRA building blocks on top of `retort-model`'s linear layer: which projections get adapters (PEFT
//! `target_modules` names, `all-linear`), how adapters are initialised (PEFT's: A Kaiming-uniform with
//! a = sqrt(5), B zeros, DoRA magnitude = row norms of W), and PEFT adapter directories
//! (`adapter_config.json` + `adapter_model.safetensors`) read and written so peft, vLLM and mistral.rs
//! load them.
//!
//! [`nf4`] is the 4-bit NormalFloat quantization QLoRA keeps its frozen base in, bit-exact with
//! bitsandbytes (the packed codes, the per-block absmax and its double quantization), on plain `Vec`s
//! in bitsandbytes' layout so a tensor framework can take them to a device as they are; [`qlora`] loads a
//! base with its projections quantized and puts them on the device, where `retort_model::nf4`
//! dequantizes them inside the forward.
//!
//! The adapter forward pass itself lives in `retort_model::lora`, because the model's projections
//! compute with it; training lives in `retort-train`.

pub mod inject;
pub mod nf4;
pub mod peft;
pub mod qlora;

pub use inject::{AdapterSpec, LoraError, attach};
pub use nf4::{
    Absmax, DoubleQuant, Nf4Error, Nf4Tensor, quantize, quantize_bf16, quantize_f16, quantize_tensor,
};
pub use peft::{AdapterConfig, load_adapter, save_adapter};
