//! LoRA and QLoRA building blocks for `retort train`.
//!
//! For now this crate holds [`nf4`]: the 4-bit NormalFloat quantization QLoRA keeps its frozen base in,
//! bit-exact with bitsandbytes (the packed codes, the per-block absmax and its double quantization),
//! on plain `Vec`s in bitsandbytes' layout so a tensor framework can take them to a device as they are.
//! The LoRA wrappers and the burn-side dequantization build on it; this crate does not train anything
//! by itself and has no tensor framework in its NF4 code.

pub mod nf4;

pub use nf4::{
    Absmax, DoubleQuant, Nf4Error, Nf4Tensor, quantize, quantize_bf16, quantize_f16, quantize_tensor,
};
