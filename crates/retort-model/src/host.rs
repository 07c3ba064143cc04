//! A CPU tensor's values as a slice, for kernels written over slices.

use burn::backend::Flex;
use burn::tensor::Tensor;
use burn_flex::FlexTensor;

/// A rank-`D` f32 tensor's values, row-major: borrowed from its storage when contiguous, else copied.
pub(crate) enum Host {
    Tensor(FlexTensor),
    Copy(Vec<f32>),
}

impl Host {
    /// The values of `t`, an f32 tensor of rank `D`.
    pub(crate) fn of<const D: usize>(t: FlexTensor) -> Self {
        if crate::gemv::contiguous(&t).is_some() {
            return Host::Tensor(t);
        }
        let data = Tensor::<D>::from_primitive::<Flex>(t).into_data().convert::<f32>();
        Host::Copy(data.try_into_vec::<f32>().unwrap_or_default())
    }

    /// The values.
    pub(crate) fn values(&self) -> &[f32] {
        match self {
            Host::Tensor(t) => crate::gemv::contiguous(t).unwrap_or(&[]),
            Host::Copy(v) => v,
        }
    }
}
