//! Visiting and rebuilding every linear projection of a model by its Hugging Face module path
//! (`model.layers.3.self_attn.q_proj`) and PEFT target name (`q_proj`): what adapter injection, adapter
//! saving and merging need, without knowing the family.

use crate::attention::Qkv;
use crate::linear::Linear;
use crate::mlp::GateUp;
use crate::model::Transformer;

/// A projection's place in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSite {
    /// HF module path (the safetensors key without `.weight`).
    pub path: String,
    /// PEFT `target_modules` name.
    pub target: &'static str,
    /// Decoder layer.
    pub layer: usize,
}

fn site(layer: usize, group: &str, target: &'static str) -> LinearSite {
    LinearSite { path: format!("model.layers.{layer}.{group}.{target}"), target, layer }
}

impl Transformer {
    /// Calls `f` on every adaptable projection, in the order of the checkpoint's tensor table. The LM
    /// head is not visited: retort never adapts it.
    pub fn visit_linears(&self, f: &mut dyn FnMut(&LinearSite, &Linear)) {
        for (i, l) in self.layers.iter().enumerate() {
            match &l.attn.qkv {
                Qkv::Separate(p) => {
                    f(&site(i, "self_attn", "q_proj"), &p.q);
                    f(&site(i, "self_attn", "k_proj"), &p.k);
                    f(&site(i, "self_attn", "v_proj"), &p.v);
                }
                Qkv::Fused(qkv) => f(&site(i, "self_attn", "qkv_proj"), qkv),
            }
            f(&site(i, "self_attn", "o_proj"), &l.attn.o);
            match &l.mlp.gate_up {
                GateUp::Separate(p) => {
                    f(&site(i, "mlp", "gate_proj"), &p.gate);
                    f(&site(i, "mlp", "up_proj"), &p.up);
                }
                GateUp::Fused(gu) => f(&site(i, "mlp", "gate_up_proj"), gu),
            }
            f(&site(i, "mlp", "down_proj"), &l.mlp.down);
        }
    }

    /// Sets [`crate::lora::Lora::autocast`] on every adapter.
    pub fn with_lora_autocast(self, on: bool) -> Transformer {
        self.map_linears(&mut |_, mut lin| {
            if let Some(l) = lin.lora.as_mut() {
                l.autocast = on;
            }
            lin
        })
    }

    /// Rebuilds every adaptable projection through `f` (same order as [`Transformer::visit_linears`]).
    pub fn map_linears(mut self, f: &mut dyn FnMut(&LinearSite, Linear) -> Linear) -> Transformer {
        self.layers = std::mem::take(&mut self.layers)
            .into_iter()
            .enumerate()
            .map(|(i, mut l)| {
                l.attn.qkv = match l.attn.qkv {
                    Qkv::Separate(mut p) => {
                        p.q = f(&site(i, "self_attn", "q_proj"), p.q);
                        p.k = f(&site(i, "self_attn", "k_proj"), p.k);
                        p.v = f(&site(i, "self_attn", "v_proj"), p.v);
                        Qkv::Separate(p)
                    }
                    Qkv::Fused(qkv) => Qkv::Fused(f(&site(i, "self_attn", "qkv_proj"), qkv)),
                };
                l.attn.o = f(&site(i, "self_attn", "o_proj"), l.attn.o);
                l.mlp.gate_up = match l.mlp.gate_up {
                    GateUp::Separate(mut p) => {
                        p.gate = f(&site(i, "mlp", "gate_proj"), p.gate);
                        p.up = f(&site(i, "mlp", "up_proj"), p.up);
                        GateUp::Separate(p)
                    }
                    GateUp::Fused(gu) => GateUp::Fused(f(&site(i, "mlp", "gate_up_proj"), gu)),
                };
                l.mlp.down = f(&site(i, "mlp", "down_proj"), l.mlp.down);
                l
            })
            .collect();
        self
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sites_match_the_checkpoint_table() {
        // Every visited path is a linear weight of the table, in table order.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for name in ["llama", "phi3"] {
            let (m, _) = crate::Transformer::load(
                &dir.join(name),
                crate::Precision::F32,
                &burn::tensor::Device::flex(),
            )
            .unwrap();
            let table: Vec<String> = retort_hf::names::tensors(&m.config)
                .into_iter()
                .filter(|t| t.peft_target.is_some())
                .map(|t| t.module_path().to_string())
                .collect();
            let mut seen = Vec::new();
            m.visit_linears(&mut |s, l| {
                seen.push(s.path.clone());
                assert!(l.lora.is_none());
            });
            assert_eq!(seen, table, "{name}");
        }
    }
}
