//! What the CPU kernels that autodiff records as one operation share: running on a tensor with or
//! without autodiff, and reading constants (masks, tables, frozen weights) under either.

use burn::backend::Flex;
use burn::tensor::Tensor;
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::ops::{Backward, OpsKind};
use burn_flex::FlexTensor;

/// The autodiff backend of the CPU (without burn's checkpointing strategies: under those the
/// conversion fails and the kernels decline).
pub(crate) type Ad = Autodiff<Flex>;

/// The CPU primitive of a tensor autodiff does not track (a constant), on a device with or without
/// autodiff. `None` off the CPU.
pub(crate) fn untracked<const D: usize>(t: &Tensor<D>) -> Option<FlexTensor> {
    match t.clone().try_into_primitive::<Ad>() {
        Ok(p) => Some(p.into_primitive()),
        Err(_) => t.clone().try_into_primitive::<Flex>().ok(),
    }
}

/// `compute` on the CPU primitive of `x`, which returns the result and what `op`'s backward needs;
/// under autodiff the result is recorded as one operation whose backward is `op` (the state is
/// dropped when nothing upstream needs a gradient). `None` when `x` is not a CPU tensor of the plain
/// autodiff backend, or `compute` declines.
pub(crate) fn unary<const D: usize, const E: usize, O: Backward<Flex, 1>>(
    x: &Tensor<D>,
    op: O,
    compute: impl FnOnce(&FlexTensor) -> Option<(FlexTensor, O::State)>,
) -> Option<Tensor<E>> {
    if !x.is_autodiff() {
        let xp = x.clone().try_into_primitive::<Flex>().ok()?;
        return Some(Tensor::from_primitive::<Flex>(compute(&xp)?.0));
    }
    let (xp, node) = x.clone().try_into_primitive::<Ad>().ok()?.into_parts();
    let (out, state) = compute(&xp)?;
    let recorded = match op.prepare::<NoCheckpointing>([node]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Some(Tensor::from_primitive::<Ad>(recorded))
}
