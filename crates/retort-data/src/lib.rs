//! Text for retort models: tokenizers and chat templates, rendered exactly as transformers renders
//! them (byte for byte, tested against transformers on the real templates of Llama 3.x, Qwen2.5,
//! Qwen3, Phi-3.5, Gemma 2, Mistral Nemo and Devstral).
//!
//! It does not run models (`retort-model`) and will hold the dataset formats, label masks and packing
//! of training data.

pub mod pyjson;
pub mod template;
pub mod tokenizer;

pub use template::{ChatTemplate, RenderOptions, TemplateError};
pub use tokenizer::{Tokenizer, TokenizerError};
