//! SwiGLU's `silu(gate) * up` on the CPU (f32) as one operation, forward and backward.
//!
//! burn computes `silu(g) * u` as `g * sigmoid(g)` and a product, and autodiff keeps `g`, `sigmoid(g)`,
//! `silu(g)` and `u` for the backward: four `[tokens, intermediate]` tensors per layer, the largest
//! activations of a Llama layer. Recorded as one operation it keeps `g` and `u` only, and the backward
//! computes `d u = d silu(g)` and `d g = d u s (1 + g (1 - s))` with `s = sigmoid(g)` recomputed. The
//! exponentials are [`crate::cpu_attention`]'s vectorized polynomial, 16 or 8 lanes at a time, where
//! burn's element-wise kernels call the C library's `expf` per element.

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::cpu_attention::{Isa, exp, isa};
use crate::host::Host;
use crate::recorded::Ad;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `sigmoid(x)`, through `e^{-|x|}` so the exponential never overflows.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = exp(-x.abs());
    let num = if x >= 0.0 { 1.0 } else { e };
    num / (1.0 + e)
}

#[inline(always)]
fn forward_generic(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g * sigmoid(g) * u;
    }
}

#[inline(always)]
fn backward_generic(g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for ((((dg, du), &g), &u), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(d) {
        let s = sigmoid(g);
        *du = d * g * s;
        *dg = d * u * s * (1.0 + g * (1.0 - s));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn forward_avx512(g: &[f32], u: &[f32], out: &mut [f32]) {
    forward_generic(g, u, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_avx2(g: &[f32], u: &[f32], out: &mut [f32]) {
    forward_generic(g, u, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn backward_avx512(g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
    backward_generic(g, u, d, dg, du);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn backward_avx2(g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
    backward_generic(g, u, d, dg, du);
}

/// `silu(g) * u`, element-wise over slices of one length.
pub fn forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len(), "gate and up differ in length");
    let mut out = vec![0f32; g.len()];
    let isa = isa();
    out.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(u.par_chunks(CHUNK)).for_each(|((o, g), u)| {
        match isa {
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code, reason = "the CPU was checked for the feature by isa()")]
            // SAFETY: AVX-512F is available.
            Isa::Avx512 => unsafe { forward_avx512(g, u, o) },
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code, reason = "the CPU was checked for the features by isa()")]
            // SAFETY: AVX2 and FMA are available.
            Isa::Avx2 => unsafe { forward_avx2(g, u, o) },
            _ => forward_generic(g, u, o),
        }
    });
    out
}

/// The gradients of `g` and `u` of [`forward`] given the gradient `d` of its output.
pub fn backward(g: &[f32], u: &[f32], d: &[f32]) -> [Vec<f32>; 2] {
    assert!(g.len() == u.len() && u.len() == d.len(), "gate, up and gradient differ in length");
    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
    let isa = isa();
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(d.par_chunks(CHUNK)))
        .for_each(|((dg, du), ((g, u), d))| match isa {
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code, reason = "the CPU was checked for the feature by isa()")]
            // SAFETY: AVX-512F is available.
            Isa::Avx512 => unsafe { backward_avx512(g, u, d, dg, du) },
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code, reason = "the CPU was checked for the features by isa()")]
            // SAFETY: AVX2 and FMA are available.
            Isa::Avx2 => unsafe { backward_avx2(g, u, d, dg, du) },
            _ => backward_generic(g, u, d, dg, du),
        });
    [dg, du]
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    /// Gate and up.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_g, node_u] = ops.parents;
        let d = grads.consume::<Flex>(&ops.node);
        let (g, u) = ops.state;
        let dims = g.layout().shape().dims::<3>();
        let (g, u, d) = (Host::of::<3>(g), Host::of::<3>(u), Host::of::<3>(d));
        let [dg, du] = backward(g.values(), u.values(), d.values());
        for (node, grad) in [(node_g, dg), (node_u, du)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(grad, dims)));
            }
        }
    }
}

fn run(g: &FlexTensor, u: &FlexTensor) -> FlexTensor {
    let dims = g.layout().shape().dims::<3>();
    let (gh, uh) = (Host::of::<3>(g.clone()), Host::of::<3>(u.clone()));
    FlexTensor::from_data(TensorData::new(forward(gh.values(), uh.values()), dims))
}

/// `silu(gate) * up` for `[batch, seq, intermediate]` tensors, recorded as one operation under autodiff.
/// `None` unless both are f32 on the CPU with the same shape; the caller then uses burn's operations.
pub fn swiglu(gate: &Tensor<3>, up: &Tensor<3>) -> Option<Tensor<3>> {
    if gate.dtype() != DType::F32 || up.dtype() != DType::F32 || !crate::device::is_cpu(&gate.device()) {
        return None;
    }
    if gate.dims() != up.dims() {
        return None;
    }
    if !gate.is_autodiff() {
        let g = gate.clone().try_into_primitive::<Flex>().ok()?;
        let u = up.clone().try_into_primitive::<Flex>().ok()?;
        return Some(Tensor::from_primitive::<Flex>(run(&g, &u)));
    }
    let (gp, gn) = gate.clone().try_into_primitive::<Ad>().ok()?.into_parts();
    let (up_, un) = up.clone().try_into_primitive::<Ad>().ok()?.into_parts();
    let out = run(&gp, &up_);
    let recorded = match SwigluBackward.prepare::<NoCheckpointing>([gn, un]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((gp, up_), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Some(Tensor::from_primitive::<Ad>(recorded))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;
    use burn::tensor::Device;
    use burn::tensor::Distribution;
    use burn::tensor::activation::silu;

    fn values(t: Tensor<3>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn matches_burns_silu_product_and_its_gradients() {
        let device = Device::flex().autodiff();
        // More elements than one parallel chunk, not a multiple of the vector width; values out to
        // where the sigmoid saturates, plus the extremes.
        let dims = [2, 3, CHUNK / 3 + 7];
        let g0 = Tensor::<3>::random(dims, Distribution::Normal(0.0, 6.0), &device);
        let u0 = Tensor::<3>::random(dims, Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<3>::random(dims, Distribution::Normal(0.0, 1.0), &device);
        let run = |ours: bool| {
            let (g, u) = (g0.clone().require_grad(), u0.clone().require_grad());
            let out = if ours { swiglu(&g, &u).unwrap() } else { silu(g.clone()) * u.clone() };
            let grads = (out.clone() * w.clone()).sum().backward();
            (values(out.inner()), values(g.grad(&grads).unwrap()), values(u.grad(&grads).unwrap()))
        };
        let (ours, theirs) = (run(true), run(false));
        for (what, a, e) in
            [("out", &ours.0, &theirs.0), ("dg", &ours.1, &theirs.1), ("du", &ours.2, &theirs.2)]
        {
            for (i, (x, y)) in a.iter().zip(e.iter()).enumerate() {
                assert!((x - y).abs() <= 1e-6 + 2e-6 * y.abs(), "{what}[{i}]: {x} vs {y}");
            }
        }
        // Without autodiff: the same values.
        let plain = swiglu(&g0.clone().inner(), &u0.clone().inner()).unwrap();
        assert_eq!(values(plain), ours.0);
    }

    #[test]
    fn sigmoid_saturates_without_overflow_and_passes_nan() {
        for x in
            [-200.0f32, -88.0, -20.0, -1.0, 0.0, 1.0, 20.0, 88.0, 200.0, f32::INFINITY, f32::NEG_INFINITY]
        {
            let expected = 1.0 / (1.0 + f64::from(-x).exp());
            assert!((f64::from(sigmoid(x)) - expected).abs() <= 1e-7 * expected.max(1e-30), "sigmoid({x})");
        }
        assert!(sigmoid(f32::NAN).is_nan());
    }

    #[test]
    fn declines_other_dtypes_and_shapes() {
        let device = Device::flex();
        let x = Tensor::<3>::zeros([1, 2, 3], &device);
        assert!(swiglu(&x.clone().cast(DType::F16), &x.clone().cast(DType::F16)).is_none());
        assert!(swiglu(&x, &Tensor::<3>::zeros([1, 2, 4], &device)).is_none());
    }
}
