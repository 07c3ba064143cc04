//! Loss scaling for a base in f16: the scaled gradients, unscaled, are the f32 gradients to f16
//! precision where unscaled f16 gradients lose most of theirs to underflow; a scale that overflows
//! skips the step without touching the adapters and halves the scale.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

mod common;

use std::collections::BTreeMap;

use common::{flat, micro, model, relative_error};
use retort_model::{Precision, Transformer};
use retort_train::step::{gradients, gradients_scaled};
use retort_train::{AdamW, AdamWConfig, LossScaler, train_step, train_step_scaled};

#[test]
fn scaled_f16_gradients_match_f32_where_unscaled_ones_underflow() {
    // A step of 64 micro-batches: about 12,000 label tokens, as in a real step (8 x 2048 is 16,000), so
    // the gradients of the mean loss are of order 1e-6: f16's subnormal range, where it keeps few bits.
    // Measured: unscaled 1.3e-2 off, scaled 3.1e-3 (the f16 rounding of the activations themselves).
    let mb = vec![micro(); 64];
    let (l32, total, g32) = gradients(&model(Precision::F32), &mb, 0);
    let f16 = model(Precision::F16);
    let (l16, _, plain) = gradients(&f16, &mb, 0);
    let scale = retort_train::scaler::INITIAL_SCALE;
    let (ls, _, scaled) = gradients_scaled(&f16, &mb, 0, scale);
    assert!(total > 5000, "{total} label tokens");
    assert_eq!(l16, ls, "the loss reported is not scaled");
    assert!((l16 - l32).abs() < 1e-2 * l32, "f16 loss {l16} vs f32 {l32}");
    let reference = flat(&g32, 1.0);
    let (e_plain, e_scaled) =
        (relative_error(&flat(&plain, 1.0), &reference), relative_error(&flat(&scaled, scale), &reference));
    eprintln!("relative error of f16 gradients: unscaled {e_plain:.2e}, scaled {e_scaled:.2e}");
    // f16 carries 11 significant bits (4.9e-4); through a few layers and sums, about 1e-2 at most.
    assert!(e_scaled < 2e-2, "scaled f16 gradients are off by {e_scaled}");
    assert!(e_plain > 3.0 * e_scaled, "unscaled {e_plain} vs scaled {e_scaled}: nothing underflowed");
}

#[test]
fn an_overflowing_scale_skips_the_step_and_halves_the_scale() {
    let adapters = |m: &Transformer| {
        flat(
            &{
                let mut out = BTreeMap::new();
                m.visit_linears(&mut |site, l| {
                    if let Some(l) = &l.lora {
                        out.insert(format!("{}.a", site.path), l.a.val().inner().reshape([-1]));
                        out.insert(format!("{}.b", site.path), l.b.val().inner().reshape([-1]));
                    }
                });
                out
            },
            1.0,
        )
    };
    let opt = || AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
    let m = model(Precision::F16);
    let before = adapters(&m);
    let mut o = opt();
    // 2^40 times gradients of order 1e-5 exceeds f16's largest value, 65504.
    let mut scaler = LossScaler { scale: 2f64.powi(40), good_steps: 7 };
    let (m, s) = train_step_scaled(m, &mut o, &[micro()], 1e-2, 1.0, 0, &mut scaler);
    assert!(!s.applied && s.overflow && s.loss.is_finite(), "{s:?}");
    assert_eq!((scaler.scale, scaler.good_steps), (2f64.powi(39), 0));
    assert_eq!(o.step, 0, "the optimizer did not step");
    assert_eq!(adapters(&m), before, "adapters unchanged on an overflow");
    // At the default scale the step applies and counts a good step.
    let mut scaler = LossScaler::default();
    let (m, s) = train_step_scaled(m, &mut o, &[micro()], 1e-2, 1.0, 0, &mut scaler);
    assert!(s.applied && !s.overflow, "{s:?}");
    assert_eq!((scaler.scale, scaler.good_steps), (retort_train::scaler::INITIAL_SCALE, 1));
    assert_ne!(adapters(&m), before);
    // Without a scaler nothing is scaled and nothing counts as an overflow.
    let (_, s) = train_step(m, &mut o, &[micro()], 1e-2, 1.0, 1);
    assert!(s.applied && !s.overflow);
}
