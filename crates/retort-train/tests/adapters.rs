//! Adapter behaviour around training: PEFT's logits with a saved adapter equal ours, our saved adapter
//! reloads to the same weights under PEFT's key names, gradient accumulation is exact, base weights
//! never change, a step with a non-finite loss changes nothing, and neither activation checkpointing
//! nor computing the LM head in chunks changes a step.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::{Path, PathBuf};

use retort_hf::Checkpoint;
use retort_model::burn::module::Module as _;
use retort_model::burn::tensor::{DType, Device};
use retort_model::{Batch, Precision, Transformer};
use retort_recipe::schema::lora::{Target, Variant};
use retort_train::{AdamW, AdamWConfig, MicroBatch, train_step};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../retort-model/tests/fixtures/llama")
}

fn load(device: &Device) -> Transformer {
    Transformer::load(&base(), Precision::F32, device).unwrap().0
}

fn opt() -> AdamW {
    AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 })
}

#[test]
fn peft_logits_with_the_saved_adapter_equal_ours() {
    for variant in ["lora", "rslora", "dora"] {
        let (m, cfg) =
            retort_lora::load_adapter(load(&Device::flex()), &fixtures().join(variant).join("initial"))
                .unwrap();
        assert_eq!((cfg.r, cfg.lora_alpha), (4, 8.0));
        let exp = Checkpoint::open_files(&[fixtures().join(variant).join("expected.safetensors")]).unwrap();
        let want = exp.get("logits_initial").unwrap().to_f32().unwrap();
        let ids = [1, 17, 45, 200, 3, 99, 150, 7, 64, 31, 255, 12];
        let got: Vec<f32> =
            m.forward(&Batch::single(&ids), None).cast(DType::F32).into_data().try_into_vec().unwrap();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() - 1e-4 * (1.0 + b.abs()))
            .fold(f32::MIN, f32::max);
        assert!(worst <= 0.0, "{variant}: logits with the adapter differ from PEFT's");
    }
}

#[test]
fn saved_adapters_reload_exactly_with_peft_names() {
    let (m, cfg) =
        retort_lora::load_adapter(load(&Device::flex()), &fixtures().join("dora").join("initial")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    retort_lora::save_adapter(&m, &cfg, dir.path()).unwrap();
    let ours = Checkpoint::open_files(&[dir.path().join("adapter_model.safetensors")]).unwrap();
    let theirs =
        Checkpoint::open_files(&[fixtures().join("dora/initial/adapter_model.safetensors")]).unwrap();
    assert_eq!(
        ours.names().collect::<Vec<_>>(),
        theirs.names().collect::<Vec<_>>(),
        "same keys as PEFT writes"
    );
    for n in theirs.names() {
        assert_eq!(ours.get(n).unwrap().to_f32().unwrap(), theirs.get(n).unwrap().to_f32().unwrap(), "{n}");
        assert_eq!(ours.get(n).unwrap().shape, theirs.get(n).unwrap().shape, "{n}");
    }
    let cfg2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg2["peft_type"], "LORA");
    assert_eq!(cfg2["use_dora"], true);
    // And it loads back.
    retort_lora::load_adapter(load(&Device::flex()), dir.path()).unwrap();
}

#[test]
fn an_adapter_for_another_base_is_refused_with_the_tensor_named() {
    let qwen3 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../retort-model/tests/fixtures/qwen3");
    let (m, _) = Transformer::load(&qwen3, Precision::F32, &Device::flex()).unwrap();
    let e = retort_lora::load_adapter(m, &fixtures().join("lora").join("initial")).unwrap_err().to_string();
    assert!(e.contains("lora_A.weight") && e.contains("another base model"), "{e}");
}

fn rows() -> Vec<(Vec<u32>, Vec<i64>)> {
    (0..4u32)
        .map(|r| {
            let ids: Vec<u32> = (0..10).map(|i| (r * 31 + i * 7 + 1) % 256).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i >= 4 + r as usize { i64::from(t) } else { -100 })
                .collect();
            (ids, labels)
        })
        .collect()
}

fn micro(rows: &[(Vec<u32>, Vec<i64>)]) -> MicroBatch {
    // Equal-length rows: nothing is padded, positions run 0..len in every row.
    let ids: Vec<Vec<u32>> = rows.iter().map(|r| r.0.clone()).collect();
    MicroBatch { batch: Batch::left_padded(&ids, 0), labels: rows.iter().flat_map(|r| r.1.clone()).collect() }
}

fn adapters(m: &Transformer) -> Vec<f32> {
    let mut out = Vec::new();
    m.visit_linears(&mut |_, l| {
        if let Some(l) = &l.lora {
            out.extend(l.a.val().inner().reshape([-1]).into_data().try_into_vec::<f32>().unwrap());
            out.extend(l.b.val().inner().reshape([-1]).into_data().try_into_vec::<f32>().unwrap());
        }
    });
    out
}

/// Every gradient of `b` within `rel` of the largest magnitude of the same gradient in `a`.
fn assert_close(a: &Grads, b: &Grads, rel: f32, what: &str) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}");
    for (name, x) in a {
        let x = x.clone().into_data().try_to_vec::<f32>().unwrap();
        let y = b[name].clone().into_data().try_to_vec::<f32>().unwrap();
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst <= rel * scale, "{what}: {name} differs by {worst} (scale {scale})");
    }
}

type Grads = std::collections::BTreeMap<String, retort_model::burn::tensor::Tensor<1>>;

fn fresh(seed: u64) -> Transformer {
    fresh_on(seed, &Device::flex().autodiff())
}

fn fresh_on(seed: u64, device: &Device) -> Transformer {
    with_dropout(seed, device, 0.0)
}

/// The fixture base with rank-4 LoRA on every linear layer, adapter dropout `dropout`.
fn with_dropout(seed: u64, device: &Device, dropout: f64) -> Transformer {
    let spec = retort_lora::AdapterSpec {
        r: 4,
        alpha: 8.0,
        dropout,
        targets: vec![Target::AllLinear],
        variant: Variant::Lora,
    };
    retort_lora::attach(load(device), &spec, seed).unwrap()
}

#[test]
fn activation_checkpointing_recomputes_the_same_steps() {
    // Updated adapters must keep the device's checkpointing strategy (burn refuses to mix two), and
    // recomputing activations, burn's way or a layer at a time, must not change what a step computes.
    let rows = rows();
    let run = |device: &Device, layers: bool| {
        let mut model = fresh_on(3, device);
        model.checkpoint_layers = layers;
        let mut opt = opt();
        let mut losses = Vec::new();
        for step in 0..3 {
            let (m, stats) = train_step(model, &mut opt, &[micro(&rows)], 1e-2, 1.0, step);
            assert!(stats.applied);
            losses.push(stats.loss);
            model = m;
        }
        (losses, adapters(&model))
    };
    let (plain_losses, plain) = run(&Device::flex().autodiff(), false);
    assert_eq!(plain_losses.len(), 3);
    for (name, device, layers) in [
        ("burn's strategy", Device::flex().autodiff().gradient_checkpointing(), false),
        ("layer by layer", Device::flex().autodiff(), true),
    ] {
        let (losses, ckpt) = run(&device, layers);
        for (a, b) in plain_losses.iter().zip(&losses) {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "{name}: {plain_losses:?} vs {losses:?}");
        }
        // Layer by layer runs the same operations again; burn's strategy runs on another autodiff
        // backend type, where the CPU's one-operation attention and SwiGLU decline and burn's
        // decomposed forms run instead, equal to f32 rounding: three steps at lr 1e-2 stay within 2e-6.
        let worst = plain.iter().zip(&ckpt).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let bound = if layers { 1e-6 } else { 2e-6 };
        assert!(worst < bound, "{name}: adapters differ by {worst}");
    }
}

#[test]
fn accumulation_of_one_row_four_times_equals_one_batch_of_four() {
    // The 2024 gradient-accumulation bug: averaging per micro-batch weights short rows up. Here the
    // rows have 6, 5, 4 and 3 label tokens; both ways must give the same step.
    let rows = rows();
    let (a, sa) = train_step(fresh(1), &mut opt(), &[micro(&rows)], 1e-2, 1.0, 0);
    let singles: Vec<MicroBatch> = rows.iter().map(|r| micro(std::slice::from_ref(r))).collect();
    let (b, sb) = train_step(fresh(1), &mut opt(), &singles, 1e-2, 1.0, 0);
    assert!((sa.loss - sb.loss).abs() < 1e-6, "{} vs {}", sa.loss, sb.loss);
    assert!((sa.grad_norm - sb.grad_norm).abs() < 1e-5 * sa.grad_norm);
    assert_eq!(sa.label_tokens, 18);
    let worst = adapters(&a).iter().zip(adapters(&b)).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-6, "adapters differ by {worst}");
}

#[test]
fn base_weights_never_change_and_bad_steps_change_nothing() {
    let base_weights = |m: &Transformer| -> Vec<f32> {
        let mut out: Vec<f32> = m.embed.val().inner().reshape([-1]).into_data().try_into_vec().unwrap();
        m.visit_linears(&mut |_, l| {
            out.extend(l.weight.val().inner().reshape([-1]).into_data().try_into_vec::<f32>().unwrap())
        });
        out
    };
    let m = fresh(2);
    let before = base_weights(&m);
    let mut o = opt();
    let (m, s) = train_step(m, &mut o, &[micro(&rows())], 1e-1, 1.0, 0);
    assert!(s.applied);
    assert_eq!(base_weights(&m), before, "frozen weights are bit-identical after a step");
    // Only adapter weights got gradients.
    let (_, _, grads) = retort_train::step::gradients(&m, &[micro(&rows())], 0);
    assert!(grads.keys().all(|k| k.contains(".lora_")), "{:?}", grads.keys().next());

    // A non-finite loss: the step is skipped and nothing moves.
    let ad_before = adapters(&m);
    let poisoned = m.map_linears(&mut |site, mut lin| {
        if site.layer == 0
            && site.target == "q_proj"
            && let Some(l) = &mut lin.lora
        {
            let (id, t, mapper) = l.b.clone().consume();
            let nan = t.inner().mul_scalar(f64::NAN);
            l.b = retort_model::burn::module::Param::from_mapped_value(
                id,
                retort_model::burn::tensor::Tensor::from_inner(nan).require_grad(),
                mapper,
            );
        }
        lin
    });
    let step_before = o.step;
    let (after, s) = train_step(poisoned, &mut o, &[micro(&rows())], 1e-1, 1.0, 0);
    assert!(!s.applied && !s.loss.is_finite());
    assert_eq!(o.step, step_before, "the optimizer did not step");
    let ad_after = adapters(&after);
    assert_eq!(ad_after.len(), ad_before.len());
    for (i, (x, y)) in ad_after.iter().zip(&ad_before).enumerate() {
        assert!(x == y || (x.is_nan()), "adapter value {i} changed on a skipped step");
    }
}

#[test]
fn the_lm_head_in_chunks_gives_the_gradients_of_one_pass() {
    // The fixture's 256-token vocabulary fits one chunk by default; three positions a chunk splits the
    // 18 label positions into six, with and without layer checkpointing.
    let rows = rows();
    let mb = [micro(&rows)];
    for layers in [false, true] {
        let mut m = fresh(5);
        m.checkpoint_layers = layers;
        let (l1, n1, g1) = retort_train::step::gradients(&m, &mb, 0);
        let (l6, n6, g6) = retort_train::step::gradients_with_head_chunk(&m, &mb, 0, 3 * 256 * 4);
        assert_eq!((n1, n6), (18, 18));
        assert!((l1 - l6).abs() <= 1e-6 * l1, "checkpointing {layers}: loss {l1} vs {l6}");
        assert!(!g1.is_empty());
        assert_close(&g1, &g6, 1e-5, &format!("checkpointing {layers}"));
    }
}

#[test]
fn the_mlp_in_chunks_and_offloaded_checkpoints_give_the_logits_and_gradients_of_one_pass() {
    // 4 rows of 10 tokens; a budget of 14 positions of the MLP's width splits the 40 flattened
    // positions into 14, 14 and 12, across row boundaries. Without checkpointing the chunks are
    // joined inside the graph; layer by layer each chunk's MLP is differentiated on its own.
    let rows = rows();
    let mb = [micro(&rows)];
    let whole = fresh(7);
    let budget = 14 * whole.config.intermediate_size * 4;
    assert_eq!(whole.mlp_chunks(40).len(), 1);
    let logits = |m: &Transformer| -> Vec<f32> {
        m.valid().forward(&mb[0].batch, None).into_data().try_into_vec().unwrap()
    };
    let mut split = fresh(7);
    split.mlp_chunk_bytes = budget;
    assert_eq!(split.mlp_chunks(40), vec![0..14, 14..28, 28..40]);
    let (a, b) = (logits(&whole), logits(&split));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-5, "logits differ by {worst}");
    for layers in [false, true] {
        let mut whole = fresh(7);
        whole.checkpoint_layers = layers;
        let mut split = fresh(7);
        split.checkpoint_layers = layers;
        split.mlp_chunk_bytes = budget;
        let (l1, _, g1) = retort_train::step::gradients(&whole, &mb, 0);
        let (l2, _, g2) = retort_train::step::gradients(&split, &mb, 0);
        assert!((l1 - l2).abs() <= 1e-6 * l1, "checkpointing {layers}: loss {l1} vs {l2}");
        if layers {
            // Layer inputs kept in host memory (here the CPU's own) come back bit for bit.
            split.offload_checkpoints = true;
            let (l3, _, g3) = retort_train::step::gradients(&split, &mb, 0);
            assert_eq!(l2.to_bits(), l3.to_bits());
            for (name, g) in &g2 {
                let a = g.clone().into_data().try_to_vec::<f32>().unwrap();
                assert_eq!(a, g3[name].clone().into_data().try_to_vec::<f32>().unwrap(), "offloaded: {name}");
            }
        }
        assert!(g1.keys().any(|k| k.contains("mlp.down_proj")));
        assert_close(&g1, &g2, 1e-5, &format!("checkpointing {layers}"));
    }
}

#[test]
fn checkpointed_gradients_with_dropout_and_mlp_chunks_are_the_loss_derivative() {
    // Layer by layer, the forward's dropout masks (attention's projections, then each MLP chunk's) must
    // be drawn again, in order, when a layer is recomputed, or the gradients belong to another function
    // than the loss. Central differences along the gradient, masks fixed by the seed, must give |g|^2:
    // within 3e-5 here, 0.87 when the MLP chunks draw other masks (dropout 0.5 makes masks matter).
    let rows = rows();
    let mb = [micro(&rows)];
    let base = with_dropout(11, &Device::flex().autodiff(), 0.5);
    // B starts at zero, which would leave A's gradient zero: one step first.
    let (mut m, _) = train_step(base, &mut opt(), &mb, 1e-2, 1.0, 0);
    m.checkpoint_layers = true;
    m.mlp_chunk_bytes = 14 * m.config.intermediate_size * 4;
    assert_eq!(m.mlp_chunks(40).len(), 3);
    let (loss, _, grads) = retort_train::step::gradients(&m, &mb, 5);
    let norm2: f64 = grads
        .values()
        .map(|g| {
            g.clone()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|x| f64::from(*x).powi(2))
                .sum::<f64>()
        })
        .sum();
    assert!(norm2 > 0.0);
    let eps = 1e-2 / norm2;
    let moved = |sign: f64| {
        let shifted = m.clone().map_linears(&mut |site, mut lin| {
            if let Some(l) = &mut lin.lora {
                let [na, nb, _] = retort_train::step::param_names(&site.path);
                for (p, name) in [(&mut l.a, na), (&mut l.b, nb)] {
                    let (id, t, mapper) = p.clone().consume();
                    let g = grads[&name].clone().reshape(t.dims());
                    let new = t.inner() + g.mul_scalar(sign * eps);
                    *p = retort_model::burn::module::Param::from_mapped_value(
                        id,
                        retort_model::burn::tensor::Tensor::from_inner(new).require_grad(),
                        mapper,
                    );
                }
            }
            lin
        });
        retort_train::step::gradients(&shifted, &mb, 5).0
    };
    let slope = (moved(1.0) - moved(-1.0)) / (2.0 * eps);
    assert!(loss.is_finite());
    assert!((slope / norm2 - 1.0).abs() < 1e-3, "directional derivative {slope} vs |g|^2 {norm2}");
}
