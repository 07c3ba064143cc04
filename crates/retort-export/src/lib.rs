//! Serving formats for retort models, written natively and checked by reading them back.
//!
//! - [`merge`]: a PEFT LoRA adapter (LoRA, rsLoRA, DoRA) merged into its base as PEFT's
//!   `merge_and_unload` does, one tensor at a time, written as a Hugging Face directory by
//!   [`safetensors_out`].
//! - [`gguf`]: the GGUF v3 writer and reader; [`convert`] turns a Hugging Face model (merged or not)
//!   into llama.cpp's tensor names, metadata and tokenizer; [`quant`] holds the quantizers, bit-exact
//!   with ggml's reference, and llama.cpp's per-tensor mixes (`Q4_K_M`, ...).
//! - [`adapter`]: PEFT adapters read, checked against the base, and re-exported for vLLM (one global
//!   scale) or as GGUF LoRA adapters for llama.cpp's `--lora`.
//! - [`ollama`]: a Modelfile whose template is translated from the model's chat template.
//! - [`lint`]: every output read back and checked before it is reported as done.
//! - [`job`]: one export run: which outputs, from which base and adapter, to which directory.
//!
//! It does no training and runs no model: tensors are raw `f32` slices, and nothing needs a GPU or a
//! tensor framework. It reads models through `retort-hf` and writes every file through
//! `retort-io`'s temp-file-then-rename discipline, so a failed export never leaves a file that looks
//! complete.

pub mod adapter;
pub mod convert;
pub mod error;
pub mod gguf;
pub mod job;
pub mod lint;
pub mod merge;
pub mod ollama;
pub mod output;
pub mod quant;
pub mod safetensors_out;
pub mod tokenizer;

pub use error::{ExportError, Result};
pub use job::{Format, Job, Report, Written, run, run_with};
pub use merge::{Model, OutDtype};
pub use quant::mix::FileType;
