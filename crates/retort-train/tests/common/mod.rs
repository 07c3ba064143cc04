//! Set-up shared by the precision tests: the fixture Llama with identical adapters, a batch with many
//! label tokens, and gradient comparisons.

#![allow(dead_code, reason = "each test file uses its own part")]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use retort_model::burn::tensor::{Device, Tensor};
use retort_model::{Batch, Precision, Transformer};
use retort_recipe::schema::lora::{Target, Variant};
use retort_train::MicroBatch;

/// The fixture Llama of the model parity tests.
pub fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../retort-model/tests/fixtures/llama")
}

/// The fixture Llama in `precision` with identical adapters; B is set non-zero (PEFT starts it at
/// zero) so that A has gradients too.
pub fn model(precision: Precision) -> Transformer {
    model_of(precision, Variant::Lora)
}

/// [`model`] with adapters of `variant`.
pub fn model_of(precision: Precision, variant: Variant) -> Transformer {
    let device = Device::flex().autodiff();
    let m = Transformer::load(&base(), precision, &device).unwrap().0;
    let spec = retort_lora::AdapterSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec![Target::AllLinear],
        variant,
    };
    let m = retort_lora::attach(m, &spec, 3).unwrap();
    // B: a fixed ramp of small values, the same in both models.
    m.map_linears(&mut |_, mut lin| {
        if let Some(l) = &mut lin.lora {
            let (id, t, mapper) = l.b.clone().consume();
            let [o, r] = t.dims();
            let ramp: Vec<f32> = (0..o * r).map(|i| 0.05 * (((i * 7) % 11) as f32 / 11.0 - 0.5)).collect();
            let b = Tensor::<1>::from_floats(ramp.as_slice(), &t.device()).reshape([o, r]);
            l.b = retort_model::burn::module::Param::from_mapped_value(id, b.require_grad(), mapper);
        }
        lin
    })
}

/// Many label tokens, so the mean loss's gradients are small: 8 rows of 24 tokens, loss on all but
/// the first of each.
pub fn micro() -> MicroBatch {
    let ids: Vec<Vec<u32>> =
        (0..8u32).map(|r| (0..24).map(|i| (r * 37 + i * 11 + 5) % 256).collect()).collect();
    let labels = ids.iter().flat_map(|row| row.iter().map(|&t| i64::from(t))).collect();
    MicroBatch { batch: Batch::left_padded(&ids, 0), labels }
}

/// All gradients in one vector, each value divided by `divide`.
pub fn flat(grads: &BTreeMap<String, Tensor<1>>, divide: f64) -> Vec<f64> {
    grads
        .values()
        .flat_map(|g| g.clone().into_data().convert::<f32>().try_into_vec::<f32>().unwrap())
        .map(|v| f64::from(v) / divide)
        .collect()
}

/// `||a - reference|| / ||reference||`.
pub fn relative_error(a: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(a.len(), reference.len());
    let diff: f64 = a.iter().zip(reference).map(|(x, y)| (x - y).powi(2)).sum();
    let norm: f64 = reference.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}
