//! Text for retort models: tokenizers and chat templates, rendered exactly as transformers renders
//! them (byte for byte, tested against transformers on the real templates of Llama 3.x, Qwen2.5,
//! Qwen3, Phi-3.5, Gemma 2, Mistral Nemo and Devstral), and the training data built from them:
//! dataset files read into conversations ([`dataset`]), token ids with loss labels on the assistant
//! turns ([`labels`]), and packed, padded rows ([`pack`]); [`prepare()`] runs all three for one file.
//!
//! It does not run models (`retort-model`) and holds no tensors: rows are plain vectors the trainer
//! turns into tensors.

pub mod dataset;
mod formats;
pub mod labels;
pub mod pack;
pub mod prepare;
pub mod pyjson;
pub mod report;
pub mod template;
pub mod tokenizer;

pub use dataset::{Conversation, DataError, JsonlRows, Message, ReadReport, Role, RowError, read_jsonl};
pub use labels::{Example, ExampleError, IGNORE, encode};
pub use pack::{PackReport, Row, TrainBatch, build_rows, collate, collate_to, shuffle};
pub use prepare::{PrepareOptions, PrepareReport, prepare};
pub use report::{Reason, Skipped, Skips, Tally};
pub use template::{ChatTemplate, RenderOptions, TemplateError};
pub use tokenizer::{Tokenizer, TokenizerError};
