//! Choosing where models run: `auto` takes CUDA, then wgpu, then the CPU, and says which; explicit
//! choices fail clearly when the build or the machine lacks them.

use burn::tensor::{DType, Device};
use retort_recipe::types::Device as Choice;

use crate::dtype::Precision;
use crate::error::ModelError;

/// A device and how to describe it to people.
#[derive(Debug, Clone)]
pub struct Selected {
    /// The burn device.
    pub device: Device,
    /// `cpu`, `cuda:0`, `wgpu:0`.
    pub name: String,
    /// True for GPUs.
    pub gpu: bool,
}

impl Selected {
    /// The precision `auto` means here: bf16 on GPUs that support it (else f16), f32 on the CPU.
    pub fn auto_precision(&self) -> Precision {
        if !self.gpu {
            Precision::F32
        } else if self.device.supports_dtype(DType::BF16) {
            Precision::Bf16
        } else {
            Precision::F16
        }
    }
}

/// True when `device` (with or without autodiff) is the CPU backend.
pub fn is_cpu(device: &Device) -> bool {
    *device == Device::flex()
}

fn cpu() -> Selected {
    Selected { device: Device::flex(), name: "cpu".into(), gpu: false }
}

/// Lists devices of one backend; a driver that fails to load counts as no device.
#[allow(unused_variables)]
fn enumerate(kind: &str) -> Vec<Device> {
    let probe = std::panic::catch_unwind(|| -> Vec<Device> {
        match kind {
            #[cfg(feature = "cuda")]
            "cuda" => {
                Device::enumerate(burn::tensor::DeviceFilter::new().with(burn::tensor::DeviceType::Cuda))
                    .into_vec()
            }
            #[cfg(feature = "wgpu")]
            "wgpu" => {
                Device::enumerate(burn::tensor::DeviceFilter::new().with(burn::tensor::DeviceType::Wgpu))
                    .into_vec()
            }
            _ => Vec::new(),
        }
    });
    probe.unwrap_or_default()
}

fn built(kind: &str) -> bool {
    (kind != "cuda" || cfg!(feature = "cuda")) && (kind != "wgpu" || cfg!(feature = "wgpu"))
}

fn explicit(kind: &str, index: u32) -> Result<Selected, ModelError> {
    if !built(kind) {
        return Err(ModelError::Input(format!(
            "this retort was built without {kind} support; rebuild with `cargo build --release --features {kind}`, \
             or use `--device cpu`"
        )));
    }
    let devices = enumerate(kind);
    match devices.into_iter().nth(index as usize) {
        Some(device) => Ok(Selected { device, name: format!("{kind}:{index}"), gpu: true }),
        None => Err(ModelError::Input(format!("no {kind} device number {index} on this machine"))),
    }
}

/// Resolves a device choice.
pub fn select(choice: Choice) -> Result<Selected, ModelError> {
    match choice {
        Choice::Cpu => Ok(cpu()),
        Choice::Cuda(i) => explicit("cuda", i),
        Choice::Wgpu(i) => explicit("wgpu", i),
        Choice::Auto => {
            for kind in ["cuda", "wgpu"] {
                if built(kind)
                    && let Some(device) = enumerate(kind).into_iter().next()
                {
                    return Ok(Selected { device, name: format!("{kind}:0"), gpu: true });
                }
            }
            Ok(cpu())
        }
    }
}

/// The device named by the environment variable `var` (`cpu` when it is unset or empty; otherwise
/// anything `train.device` accepts: `wgpu`, `cuda:1`, `auto`). The parity suites run on it, so one test
/// binary checks the CPU and, with `RETORT_TEST_DEVICE=wgpu`, the GPU code path (CI: lavapipe).
pub fn from_env(var: &str) -> Result<Selected, ModelError> {
    let value = std::env::var(var).unwrap_or_default();
    if value.trim().is_empty() {
        return Ok(cpu());
    }
    let choice: Choice =
        value.parse().map_err(|e| ModelError::Input(format!("environment variable {var}={value:?}: {e}")))?;
    select(choice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_there_and_missing_backends_say_how_to_get_them() {
        let s = select(Choice::Cpu).unwrap();
        assert_eq!((s.name.as_str(), s.gpu, s.auto_precision()), ("cpu", false, Precision::F32));
        if !cfg!(feature = "cuda") {
            let e = select(Choice::Cuda(0)).unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        // auto never fails: without a GPU it is the CPU.
        let a = select(Choice::Auto).unwrap();
        assert!(a.gpu || a.name == "cpu");
    }

    #[test]
    fn the_environment_names_the_test_device() {
        // A variable name no one sets: unset means the CPU.
        assert_eq!(from_env("RETORT_TEST_DEVICE_UNSET_IN_THIS_TEST").unwrap().name, "cpu");
    }
}
