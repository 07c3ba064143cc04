//! The configs transformers 5 writes (`rope_parameters`, per-layer-type RoPE, `layer_types`) parse into
//! the same family behaviour as the transformers 4 form. The fixtures are the model-parity fixtures
//! made by `scripts/make_model_fixtures.py`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::Path;

use retort_hf::{Arch, LayerAttention, ModelConfig, RopeScaling};

fn load(name: &str) -> ModelConfig {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../retort-model/tests/fixtures").join(name);
    ModelConfig::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn transformers5_configs_parse_with_their_quirks() {
    let llama = load("llama");
    assert_eq!(llama.arch, Arch::Llama);
    assert_eq!(llama.rope_theta, 10_000.0);
    assert!(
        matches!(llama.rope_scaling, RopeScaling::Llama3 { factor, original_max_position_embeddings: 32, .. } if factor == 8.0)
    );
    assert!(!llama.tie_word_embeddings);

    let tied = load("llama-tied");
    assert!(tied.tie_word_embeddings && tied.qkv_bias && tied.o_bias);
    assert_eq!(tied.rope_scaling, RopeScaling::Linear { factor: 2.0 });

    let mistral = load("mistral");
    assert!(mistral.layers.iter().all(|l| *l == LayerAttention::Sliding { window: 5 }));

    let qwen2 = load("qwen2");
    assert!(qwen2.qkv_bias && !qwen2.o_bias && qwen2.tie_word_embeddings);
    assert_eq!(qwen2.rope_theta, 1_000_000.0);
    assert!(
        matches!(qwen2.rope_scaling, RopeScaling::Yarn { factor, original_max_position_embeddings: 64, .. } if factor == 4.0)
    );
    assert!(qwen2.layers.iter().all(|l| *l == LayerAttention::Full));

    let qwen3 = load("qwen3");
    assert!(qwen3.qk_norm && !qwen3.qkv_bias);
    assert_eq!((qwen3.head_dim, qwen3.rotary_dim), (32, 32));

    let phi3 = load("phi3");
    assert!(phi3.fused_projections);
    assert_eq!((phi3.head_dim, phi3.rotary_dim), (16, 8));
    assert!(
        matches!(&phi3.rope_scaling, RopeScaling::LongRope { short_factor, original_max_position_embeddings: 64, .. } if short_factor == &[1.0, 1.2, 2.0, 4.0])
    );
    assert!(phi3.layers.iter().all(|l| *l == LayerAttention::Sliding { window: 7 }));

    let gemma2 = load("gemma2");
    assert_eq!(gemma2.layers, [LayerAttention::Sliding { window: 4 }, LayerAttention::Full]);
    assert_eq!((gemma2.attn_logit_softcap, gemma2.final_logit_softcap), (Some(5.0), Some(3.0)));
    assert!((gemma2.attn_scale - 24f64.powf(-0.5)).abs() < 1e-12);

    let gemma3 = load("gemma3");
    assert_eq!(
        gemma3.layers,
        [LayerAttention::Sliding { window: 4 }, LayerAttention::Sliding { window: 4 }, LayerAttention::Full]
    );
    assert_eq!(gemma3.rope_theta, 1_000_000.0);
    assert_eq!(gemma3.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    assert_eq!(gemma3.rope_local_theta, Some(10_000.0));
    assert_eq!(gemma3.rope_local_scaling, RopeScaling::None);
    assert!(gemma3.qk_norm && gemma3.norm_plus_one);
}
