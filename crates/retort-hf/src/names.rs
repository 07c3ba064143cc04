//! Every tensor of a model, by its Hugging Face safetensors key: shape, role, the PEFT target name of
//! adaptable linears, and llama.cpp's GGUF name. One function serves every family; families differ
//! only through [`ModelConfig`] fields.
//!
//! GGUF names follow llama.cpp's `gguf-py/gguf/tensor_mapping.py`. Quirks that change tensor data on
//! the way to GGUF (the Q/K row permutation of the llama architecture, Gemma's `1 + w` norms) are on
//! [`crate::Arch`] and flagged per tensor here.

use crate::config::ModelConfig;

/// What a tensor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Token embedding, `[vocab, hidden]`.
    Embed,
    /// Output projection to the vocabulary, `[vocab, hidden]` (absent when tied).
    LmHead,
    /// Final RMSNorm.
    FinalNorm,
    /// RMSNorm before attention.
    AttnNorm,
    /// RMSNorm after attention (Gemma 2/3), before the residual add.
    PostAttnNorm,
    /// RMSNorm before the MLP (`post_attention_layernorm` in Llama-style models).
    FfnNorm,
    /// RMSNorm after the MLP (Gemma 2/3).
    PostFfnNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Fused query/key/value projection (Phi-3).
    Qkv,
    /// Attention output projection.
    O,
    /// Query bias.
    QBias,
    /// Key bias.
    KBias,
    /// Value bias.
    VBias,
    /// Output-projection bias.
    OBias,
    /// Per-head RMSNorm of queries (Qwen3, Gemma 3).
    QNorm,
    /// Per-head RMSNorm of keys.
    KNorm,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// Fused gate/up projection (Phi-3), gate rows first.
    GateUp,
    /// MLP down projection.
    Down,
    /// Gate bias.
    GateBias,
    /// Up bias.
    UpBias,
    /// Down bias.
    DownBias,
}

impl Role {
    /// True for RMSNorm weights.
    pub fn is_norm(self) -> bool {
        matches!(
            self,
            Role::FinalNorm
                | Role::AttnNorm
                | Role::PostAttnNorm
                | Role::FfnNorm
                | Role::PostFfnNorm
                | Role::QNorm
                | Role::KNorm
        )
    }
}

/// One tensor of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The safetensors key, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape in PyTorch order (`[out, in]` for linear weights).
    pub shape: Vec<usize>,
    /// What it is.
    pub role: Role,
    /// The decoder layer, for per-layer tensors.
    pub layer: Option<usize>,
    /// For weights of linears LoRA can adapt: the PEFT module name (`q_proj`, `gate_up_proj`, ...). The
    /// module path PEFT uses is the key without its `.weight` suffix.
    pub peft_target: Option<&'static str>,
    /// llama.cpp's name for it in a GGUF file.
    pub gguf_name: String,
}

impl TensorSpec {
    /// The module path (the key without `.weight` / `.bias`), as PEFT names adapted modules.
    pub fn module_path(&self) -> &str {
        self.name.strip_suffix(".weight").or_else(|| self.name.strip_suffix(".bias")).unwrap_or(&self.name)
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

fn spec(name: String, shape: Vec<usize>, role: Role, layer: Option<usize>, gguf: String) -> TensorSpec {
    TensorSpec { name, shape, role, layer, peft_target: None, gguf_name: gguf }
}

fn linear(
    name: String,
    shape: Vec<usize>,
    role: Role,
    layer: usize,
    target: &'static str,
    gguf: String,
) -> TensorSpec {
    TensorSpec { name, shape, role, layer: Some(layer), peft_target: Some(target), gguf_name: gguf }
}

/// Every tensor the model's checkpoint must contain, in the order transformers defines them.
pub fn tensors(c: &ModelConfig) -> Vec<TensorSpec> {
    let h = c.hidden_size;
    let ff = c.intermediate_size;
    let q_out = c.num_heads * c.head_dim;
    let kv_out = c.num_kv_heads * c.head_dim;
    let mut out = vec![spec(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, h],
        Role::Embed,
        None,
        "token_embd.weight".into(),
    )];
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let g = format!("blk.{i}");
        out.push(spec(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            Role::AttnNorm,
            Some(i),
            format!("{g}.attn_norm.weight"),
        ));
        if c.fused_projections {
            out.push(linear(
                format!("{p}.self_attn.qkv_proj.weight"),
                vec![q_out + 2 * kv_out, h],
                Role::Qkv,
                i,
                "qkv_proj",
                format!("{g}.attn_qkv.weight"),
            ));
        } else {
            out.push(linear(
                format!("{p}.self_attn.q_proj.weight"),
                vec![q_out, h],
                Role::Q,
                i,
                "q_proj",
                format!("{g}.attn_q.weight"),
            ));
            out.push(linear(
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv_out, h],
                Role::K,
                i,
                "k_proj",
                format!("{g}.attn_k.weight"),
            ));
            out.push(linear(
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv_out, h],
                Role::V,
                i,
                "v_proj",
                format!("{g}.attn_v.weight"),
            ));
            if c.qkv_bias {
                out.push(spec(
                    format!("{p}.self_attn.q_proj.bias"),
                    vec![q_out],
                    Role::QBias,
                    Some(i),
                    format!("{g}.attn_q.bias"),
                ));
                out.push(spec(
                    format!("{p}.self_attn.k_proj.bias"),
                    vec![kv_out],
                    Role::KBias,
                    Some(i),
                    format!("{g}.attn_k.bias"),
                ));
                out.push(spec(
                    format!("{p}.self_attn.v_proj.bias"),
                    vec![kv_out],
                    Role::VBias,
                    Some(i),
                    format!("{g}.attn_v.bias"),
                ));
            }
        }
        out.push(linear(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q_out],
            Role::O,
            i,
            "o_proj",
            format!("{g}.attn_output.weight"),
        ));
        if c.o_bias {
            out.push(spec(
                format!("{p}.self_attn.o_proj.bias"),
                vec![h],
                Role::OBias,
                Some(i),
                format!("{g}.attn_output.bias"),
            ));
        }
        if c.qk_norm {
            out.push(spec(
                format!("{p}.self_attn.q_norm.weight"),
                vec![c.head_dim],
                Role::QNorm,
                Some(i),
                format!("{g}.attn_q_norm.weight"),
            ));
            out.push(spec(
                format!("{p}.self_attn.k_norm.weight"),
                vec![c.head_dim],
                Role::KNorm,
                Some(i),
                format!("{g}.attn_k_norm.weight"),
            ));
        }
        if c.sandwich_norms {
            out.push(spec(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                Role::PostAttnNorm,
                Some(i),
                format!("{g}.post_attention_norm.weight"),
            ));
            out.push(spec(
                format!("{p}.pre_feedforward_layernorm.weight"),
                vec![h],
                Role::FfnNorm,
                Some(i),
                format!("{g}.ffn_norm.weight"),
            ));
            out.push(spec(
                format!("{p}.post_feedforward_layernorm.weight"),
                vec![h],
                Role::PostFfnNorm,
                Some(i),
                format!("{g}.post_ffw_norm.weight"),
            ));
        } else {
            out.push(spec(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                Role::FfnNorm,
                Some(i),
                format!("{g}.ffn_norm.weight"),
            ));
        }
        if c.fused_projections {
            out.push(linear(
                format!("{p}.mlp.gate_up_proj.weight"),
                vec![2 * ff, h],
                Role::GateUp,
                i,
                "gate_up_proj",
                format!("{g}.ffn_up.weight"),
            ));
        } else {
            out.push(linear(
                format!("{p}.mlp.gate_proj.weight"),
                vec![ff, h],
                Role::Gate,
                i,
                "gate_proj",
                format!("{g}.ffn_gate.weight"),
            ));
            out.push(linear(
                format!("{p}.mlp.up_proj.weight"),
                vec![ff, h],
                Role::Up,
                i,
                "up_proj",
                format!("{g}.ffn_up.weight"),
            ));
        }
        out.push(linear(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, ff],
            Role::Down,
            i,
            "down_proj",
            format!("{g}.ffn_down.weight"),
        ));
        if c.mlp_bias && !c.fused_projections {
            out.push(spec(
                format!("{p}.mlp.gate_proj.bias"),
                vec![ff],
                Role::GateBias,
                Some(i),
                format!("{g}.ffn_gate.bias"),
            ));
            out.push(spec(
                format!("{p}.mlp.up_proj.bias"),
                vec![ff],
                Role::UpBias,
                Some(i),
                format!("{g}.ffn_up.bias"),
            ));
            out.push(spec(
                format!("{p}.mlp.down_proj.bias"),
                vec![h],
                Role::DownBias,
                Some(i),
                format!("{g}.ffn_down.bias"),
            ));
        }
    }
    out.push(spec("model.norm.weight".into(), vec![h], Role::FinalNorm, None, "output_norm.weight".into()));
    if !c.tie_word_embeddings {
        out.push(spec(
            "lm_head.weight".into(),
            vec![c.vocab_size, h],
            Role::LmHead,
            None,
            "output.weight".into(),
        ));
    }
    out
}

/// The PEFT target names this model has (for `all-linear` and for messages listing valid targets).
pub fn peft_targets(c: &ModelConfig) -> Vec<&'static str> {
    let mut seen = Vec::new();
    for t in tensors(c) {
        if let Some(n) = t.peft_target
            && !seen.contains(&n)
        {
            seen.push(n);
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(json: &str) -> ModelConfig {
        ModelConfig::parse(json, Path::new("config.json")).unwrap()
    }

    #[test]
    fn llama_names_and_tied_head() {
        let c = cfg(r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,"tie_word_embeddings":true}"#);
        let t = tensors(&c);
        let names: Vec<&str> = t.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), 1 + 2 * 9 + 1);
        assert!(!names.contains(&"lm_head.weight"));
        let k = t.iter().find(|s| s.name == "model.layers.1.self_attn.k_proj.weight").unwrap();
        assert_eq!(
            (k.shape.as_slice(), k.gguf_name.as_str(), k.peft_target),
            (&[32, 64][..], "blk.1.attn_k.weight", Some("k_proj"))
        );
        assert_eq!(k.module_path(), "model.layers.1.self_attn.k_proj");
        assert_eq!(
            peft_targets(&c),
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        );
    }

    #[test]
    fn phi3_fused_names() {
        let c = cfg(r#"{"architectures":["Phi3ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100}"#);
        let t = tensors(&c);
        let qkv = t.iter().find(|s| s.role == Role::Qkv).unwrap();
        assert_eq!(qkv.shape, [16 * 4 + 2 * 16 * 2, 64]);
        assert_eq!(qkv.gguf_name, "blk.0.attn_qkv.weight");
        let gu = t.iter().find(|s| s.role == Role::GateUp).unwrap();
        assert_eq!((gu.shape.as_slice(), gu.gguf_name.as_str()), (&[256, 64][..], "blk.0.ffn_up.weight"));
        assert_eq!(peft_targets(&c), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]);
        assert!(t.iter().any(|s| s.name == "lm_head.weight"));
    }

    #[test]
    fn gemma2_sandwich_norm_names_match_llama_cpp() {
        let c = cfg(
            r#"{"architectures":["Gemma2ForCausalLM"],"hidden_size":64,"intermediate_size":128,"head_dim":16,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,"sliding_window":8}"#,
        );
        let gguf: Vec<String> = tensors(&c).into_iter().map(|s| s.gguf_name).collect();
        // The names llama.cpp's converter writes for gemma-2-2b-it (shared/assets/ollama/convert-testdata).
        for n in [
            "token_embd.weight",
            "output_norm.weight",
            "blk.0.attn_norm.weight",
            "blk.0.attn_q.weight",
            "blk.0.attn_k.weight",
            "blk.0.attn_v.weight",
            "blk.0.attn_output.weight",
            "blk.0.post_attention_norm.weight",
            "blk.0.ffn_norm.weight",
            "blk.0.ffn_gate.weight",
            "blk.0.ffn_up.weight",
            "blk.0.ffn_down.weight",
            "blk.0.post_ffw_norm.weight",
        ] {
            assert!(gguf.iter().any(|g| g == n), "missing {n}");
        }
        assert_eq!(gguf.len(), 13, "{gguf:?}");
    }

    #[test]
    fn qwen3_has_qk_norm_and_no_bias() {
        let c = cfg(
            r#"{"architectures":["Qwen3ForCausalLM"],"hidden_size":64,"intermediate_size":128,"head_dim":32,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100}"#,
        );
        let t = tensors(&c);
        assert!(t.iter().any(|s| s.name == "model.layers.0.self_attn.q_norm.weight" && s.shape == [32]));
        assert!(!t.iter().any(|s| s.role == Role::QBias));
        let q = t.iter().find(|s| s.role == Role::Q).unwrap();
        assert_eq!(q.shape, [4 * 32, 64], "head_dim may differ from hidden/heads");
    }
}
