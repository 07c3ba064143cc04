//! GGUF v3: the file format of llama.cpp and Ollama. [`write`] streams files, [`read`] opens them
//! (memory-mapped, validated) for retort's own checks, `retort inspect gguf` and evaluation.

pub mod read;
pub mod types;
pub mod write;

pub use read::{GgufFile, GgufTensor};
pub use types::{GgmlType, Value, ValueType};
pub use write::{GgufHeader, GgufWriter, TensorInfo};
