//! `train.autocast`: with a 16-bit base the adapters' products run in that dtype, as under
//! `torch.autocast`. The gradients still arrive in f32 and match the f32 adapter path to the base
//! dtype's precision; with an f32 base, or on DoRA, autocast changes nothing, to the bit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

mod common;

use common::{flat, micro, model, model_of, relative_error};
use retort_model::Precision;
use retort_model::burn::tensor::DType;
use retort_recipe::schema::lora::Variant;
use retort_train::step::gradients;

#[test]
fn autocast_gradients_are_f32_and_match_the_f32_adapter_path_to_bf16_precision() {
    let mb = vec![micro(); 4];
    let (l32, _, g32) = gradients(&model(Precision::F32), &mb, 0);
    let bf16 = model(Precision::Bf16);
    let (l_up, _, g_up) = gradients(&bf16, &mb, 0);
    let (l_auto, _, g_auto) = gradients(&bf16.with_lora_autocast(true), &mb, 0);
    assert!(g_auto.values().all(|g| g.dtype() == DType::F32), "adapter gradients stay f32");
    assert_eq!(g_auto.len(), g32.len());
    let reference = flat(&g32, 1.0);
    let (e_up, e_auto) =
        (relative_error(&flat(&g_up, 1.0), &reference), relative_error(&flat(&g_auto, 1.0), &reference));
    eprintln!(
        "loss f32 {l32}, bf16 {l_up}, bf16 autocast {l_auto}; gradient error {e_up:.2e} / {e_auto:.2e}"
    );
    // bf16 keeps 8 significant bits (3.9e-3 relative); the base's own bf16 rounding dominates both
    // paths' errors, and autocast's extra rounding of the rank-wide products adds a little.
    assert!((l_auto - l32).abs() < 1e-2 * l32, "autocast loss {l_auto} vs f32 {l32}");
    assert!(e_auto < 5e-2, "autocast gradients are off by {e_auto}");
    assert!(e_auto < 2.0 * e_up + 1e-2, "autocast {e_auto} vs f32 adapters {e_up}");
    assert_ne!(flat(&g_auto, 1.0), flat(&g_up, 1.0), "autocast ran the adapters in f32");
}

#[test]
fn autocast_changes_nothing_for_an_f32_base_or_for_dora() {
    let mb = vec![micro(); 2];
    for (precision, variant) in [(Precision::F32, Variant::Lora), (Precision::Bf16, Variant::Dora)] {
        let m = model_of(precision, variant);
        let (l, _, g) = gradients(&m, &mb, 0);
        let (la, _, ga) = gradients(&m.with_lora_autocast(true), &mb, 0);
        assert_eq!(l, la, "{precision:?} {variant:?}");
        assert_eq!(flat(&g, 1.0), flat(&ga, 1.0), "{precision:?} {variant:?}");
    }
}
