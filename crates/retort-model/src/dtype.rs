//! The element types models compute in.

use burn::tensor::DType;

/// Precision of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit float: exact parity with the reference on the CPU.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16: what GPUs train in.
    Bf16,
}

impl Precision {
    /// The burn dtype.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }
}
