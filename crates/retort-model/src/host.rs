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

    /// The values of `t`, an f32 tensor of any rank from 1 to 6.
    pub(crate) fn of_any(t: FlexTensor) -> Self {
        match t.layout().shape().num_dims() {
            1 => Host::of::<1>(t),
            2 => Host::of::<2>(t),
            3 => Host::of::<3>(t),
            4 => Host::of::<4>(t),
            5 => Host::of::<5>(t),
            _ => Host::of::<6>(t),
        }
    }

    /// The values.
    pub(crate) fn values(&self) -> &[f32] {
        match self {
            Host::Tensor(t) => crate::gemv::contiguous(t).unwrap_or(&[]),
            Host::Copy(v) => v,
        }
    }
}
