//! QLoRA against LoRA on the same numbers: a base with NF4 projections computes the logits, adapter
//! gradients and optimizer steps of a dense base whose projections hold the dequantized values (the host
//! reference's, `Nf4Tensor::dequantize`), and training never changes the packed codes or scales.
//!
//! Tolerance: none. On the CPU the in-graph dequantization is bit-exact (`retort-lora`'s
//! `tests/qlora.rs`), so both models multiply the same f32 weights with the same kernels; any difference
//! would be a bug in how the NF4 weight is wired into the layer. (On a GPU the fused kernels may order
//! sums differently between the two graphs; there a relative 1e-5 would be the bound.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::{Path, PathBuf};

use retort_hf::Checkpoint;
use retort_lora::nf4::quantize_tensor;
use retort_model::burn::tensor::{DType, Device, Tensor, TensorData};
use retort_model::linear::{Linear, Weight};
use retort_model::nf4::Nf4Scales;
use retort_model::{Batch, Precision, Transformer};
use retort_recipe::schema::lora::{Target, Variant};
use retort_train::{AdamW, AdamWConfig, MicroBatch, train_step};

fn base(tmp: &Path) -> PathBuf {
    retort_model::builtin::materialize("tiny-llama", &tmp.join("base")).unwrap()
}

/// The base with NF4 projections.
fn quantized(dir: &Path, device: &Device, double: bool) -> Transformer {
    retort_lora::qlora::load_quantized(dir, Precision::F32, device, double).unwrap().0
}

/// The dense base with each projection replaced by the host reference's dequantized NF4 values.
fn dequantized(dir: &Path, device: &Device, double: bool) -> Transformer {
    let ckpt = Checkpoint::open(dir).unwrap();
    let dense = Transformer::load(dir, Precision::F32, device).unwrap().0;
    dense.map_linears(&mut |site, lin| {
        let view = ckpt.get(&format!("{}.weight", site.path)).unwrap();
        let q = quantize_tensor(&view, 64, double).unwrap();
        let w =
            Tensor::<2>::from_data(TensorData::new(q.dequantize(), q.shape().to_vec()), (device, DType::F32));
        Linear::new(w, lin.bias.map(|b| b.val()))
    })
}

fn rows() -> Vec<(Vec<u32>, Vec<i64>)> {
    (0..3u32)
        .map(|r| {
            let ids: Vec<u32> = (0..12).map(|i| (r * 37 + i * 11 + 3) % 256).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i >= 3 + r as usize { i64::from(t) } else { -100 })
                .collect();
            (ids, labels)
        })
        .collect()
}

fn micro() -> MicroBatch {
    let rows = rows();
    // Equal-length rows: nothing is padded, positions run 0..len in every row.
    let ids: Vec<Vec<u32>> = rows.iter().map(|r| r.0.clone()).collect();
    MicroBatch { batch: Batch::left_padded(&ids, 0), labels: rows.iter().flat_map(|r| r.1.clone()).collect() }
}

fn logits(m: &Transformer) -> Vec<f32> {
    m.forward(&micro().batch, None).cast(DType::F32).into_data().try_into_vec().unwrap()
}

fn opt() -> AdamW {
    AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 })
}

fn attach(m: Transformer, variant: Variant) -> Transformer {
    let spec = retort_lora::AdapterSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: vec![Target::AllLinear],
        variant,
    };
    retort_lora::attach(m, &spec, 3).unwrap()
}

/// Every packed part of every NF4 projection, as bytes.
fn packed(m: &Transformer) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    m.visit_linears(&mut |_, lin| {
        let Weight::Nf4(w) = &lin.weight else { panic!("not NF4") };
        out.push(w.codes.clone().into_data().as_bytes().to_vec());
        match &w.scales {
            Nf4Scales::Plain(a) => out.push(a.clone().into_data().as_bytes().to_vec()),
            Nf4Scales::Double(d) => {
                out.push(d.codes.clone().into_data().as_bytes().to_vec());
                out.push(d.scales.clone().into_data().as_bytes().to_vec());
                out.push(d.offset.to_le_bytes().to_vec());
            }
        }
    });
    out
}

#[test]
fn nf4_logits_equal_the_dense_model_with_dequantized_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = base(tmp.path());
    let device = Device::flex();
    for double in [true, false] {
        let q = logits(&quantized(&dir, &device, double));
        let d = logits(&dequantized(&dir, &device, double));
        assert!(q.iter().all(|v| v.is_finite()));
        assert_eq!(q, d, "double quant {double}");
        // And quantization did something: the logits moved from the dense base's.
        let dense = logits(&Transformer::load(&dir, Precision::F32, &device).unwrap().0);
        assert_ne!(q, dense);
    }
}

#[test]
fn adapter_gradients_and_steps_through_nf4_equal_the_dequantized_dense_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = base(tmp.path());
    let device = Device::flex().autodiff();
    for variant in [Variant::Lora, Variant::Dora] {
        let q = attach(quantized(&dir, &device, true), variant);
        let d = attach(dequantized(&dir, &device, true), variant);
        let before = packed(&q);
        // B starts at zero (A's gradient with it); a step on each makes every gradient non-trivial.
        let (mut oq, mut od) = (opt(), opt());
        let (q, sq) = train_step(q, &mut oq, &[micro()], 1e-2, 1.0, 5);
        let (d, sd) = train_step(d, &mut od, &[micro()], 1e-2, 1.0, 5);
        assert!(sq.applied && sd.applied);
        assert_eq!((sq.loss, sq.grad_norm), (sd.loss, sd.grad_norm), "{variant:?}: first step");
        let (lq, nq, gq) = retort_train::step::gradients(&q, &[micro()], 6);
        let (ld, nd, gd) = retort_train::step::gradients(&d, &[micro()], 6);
        assert_eq!((lq, nq), (ld, nd));
        assert_eq!(gq.keys().collect::<Vec<_>>(), gd.keys().collect::<Vec<_>>());
        assert_eq!(gq.len(), 4 * 7 * if variant == Variant::Dora { 3 } else { 2 }, "every adapter weight");
        for (name, g) in &gq {
            let a: Vec<f32> = g.clone().into_data().try_into_vec().unwrap();
            let b: Vec<f32> = gd[name].clone().into_data().try_into_vec().unwrap();
            assert!(a.iter().any(|v| *v != 0.0), "{variant:?}: `{name}` has a zero gradient");
            assert_eq!(a, b, "{variant:?}: gradient of `{name}`");
        }
        // Two more steps: the packed base is untouched (frozen, and never given a gradient).
        let (q, _) = train_step(q, &mut oq, &[micro()], 1e-2, 1.0, 7);
        let (q, _) = train_step(q, &mut oq, &[micro()], 1e-2, 1.0, 8);
        assert!(packed(&q) == before, "{variant:?}: the NF4 codes or scales changed");
    }
}
