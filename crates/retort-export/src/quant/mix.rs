//! llama.cpp file types (`Q4_K_M`, `Q8_0`, `F16`, ...) and the per-tensor type each one picks.
//!
//! The rules are those of `llama_tensor_get_type` in llama.cpp's `src/llama-quant.cpp` (without an
//! importance matrix, without overrides) for the architectures retort exports; 1-D tensors, norms and
//! biases stay F32 as `convert_hf_to_gguf.py` writes them. Counters (`i_attention_wv`, ffn_down's layer)
//! advance in llama.cpp's tensor order, so [`TypePlanner::choose`] must see tensors in that order:
//! [`llama_order`] sorts names the same way.

use std::cmp::Ordering;

use crate::error::ExportError;
use crate::gguf::types::GgmlType;

/// A GGUF file type: one tensor type for everything, or a llama.cpp mix.
#[allow(non_camel_case_types, missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q6_K,
    Q5_K_M,
    Q5_1,
    Q5_0,
    Q4_K_M,
    Q4_1,
    Q4_0,
}

impl FileType {
    /// Every file type retort writes.
    pub const ALL: [FileType; 11] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q8_0,
        FileType::Q6_K,
        FileType::Q5_K_M,
        FileType::Q5_1,
        FileType::Q5_0,
        FileType::Q4_K_M,
        FileType::Q4_1,
        FileType::Q4_0,
    ];

    /// The name in file names and messages (`Q4_K_M`).
    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "F32",
            FileType::F16 => "F16",
            FileType::BF16 => "BF16",
            FileType::Q8_0 => "Q8_0",
            FileType::Q6_K => "Q6_K",
            FileType::Q5_K_M => "Q5_K_M",
            FileType::Q5_1 => "Q5_1",
            FileType::Q5_0 => "Q5_0",
            FileType::Q4_K_M => "Q4_K_M",
            FileType::Q4_1 => "Q4_1",
            FileType::Q4_0 => "Q4_0",
        }
    }

    /// Parses a name, any case (`q4_k_m`, `Q8_0`).
    pub fn parse(s: &str) -> Result<FileType, ExportError> {
        FileType::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s.trim())).ok_or_else(|| {
            ExportError::UnknownQuantType {
                found: s.to_string(),
                valid: FileType::ALL.iter().map(|t| t.name()).collect(),
            }
        })
    }

    /// llama.cpp's `llama_ftype` number, written as `general.file_type`.
    pub fn llama_ftype(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q4_K_M => 15,
            FileType::Q5_K_M => 17,
            FileType::Q6_K => 18,
            FileType::BF16 => 32,
        }
    }

    /// The type most tensors get.
    pub fn default_type(self) -> GgmlType {
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q6_K => GgmlType::Q6_K,
            FileType::Q5_K_M => GgmlType::Q5_K,
            FileType::Q5_1 => GgmlType::Q5_1,
            FileType::Q5_0 => GgmlType::Q5_0,
            FileType::Q4_K_M => GgmlType::Q4_K,
            FileType::Q4_1 => GgmlType::Q4_1,
            FileType::Q4_0 => GgmlType::Q4_0,
        }
    }

    /// True for the types `llama-quantize` makes (the others come straight from the converter).
    pub fn is_quantized_mix(self) -> bool {
        !matches!(self, FileType::F32 | FileType::F16 | FileType::BF16 | FileType::Q8_0)
    }
}

/// The layer of a `blk.N.` tensor.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// llama.cpp's tensor order (`weight_name_comparer`): tensors outside blocks first, then block by
/// block, by name within each.
pub fn llama_order(a: &str, b: &str) -> Ordering {
    let la = layer_of(a).map_or(-1, |l| l as i64);
    let lb = layer_of(b).map_or(-1, |l| l as i64);
    la.cmp(&lb).then_with(|| a.cmp(b))
}

/// What the planner needs to know about the model.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    /// `general.architecture`.
    pub arch: &'static str,
    /// Decoder layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
}

/// Picks each tensor's type for one file type, in llama.cpp's order.
#[derive(Debug, Clone)]
pub struct TypePlanner {
    ftype: FileType,
    facts: ModelFacts,
    has_output: bool,
    n_attention_wv: usize,
    i_attention_wv: usize,
    i_ffn_down: usize,
}

impl TypePlanner {
    /// A planner for the given tensor names (all of the file's tensors).
    pub fn new(ftype: FileType, facts: ModelFacts, names: &[&str]) -> TypePlanner {
        TypePlanner {
            ftype,
            has_output: names.contains(&"output.weight"),
            n_attention_wv: names
                .iter()
                .filter(|n| n.contains("attn_v.weight") || n.contains("attn_qkv.weight"))
                .count(),
            facts,
            i_attention_wv: 0,
            i_ffn_down: 0,
        }
    }

    /// The type for the next tensor (call in [`llama_order`]); `shape` is in PyTorch order.
    pub fn choose(&mut self, name: &str, shape: &[usize]) -> GgmlType {
        let is_weight = name.ends_with(".weight");
        // The converter keeps 1-D tensors, norms and non-weights (biases) in F32; llama-quantize leaves
        // them alone.
        if shape.len() < 2 || name.ends_with("_norm.weight") || !is_weight {
            return GgmlType::F32;
        }
        let ncols = shape.last().copied().unwrap_or(0);
        let default = self.ftype.default_type();
        if !self.ftype.is_quantized_mix() {
            if default == GgmlType::Q8_0 && ncols % 32 != 0 {
                // gguf-py cannot quantize the row; the converter falls back to F16.
                return GgmlType::F16;
            }
            return default;
        }
        let ty = self.mix_type(name, default, ncols);
        fallback(ty, ncols)
    }

    fn mix_type(&mut self, name: &str, default: GgmlType, ncols: usize) -> GgmlType {
        let ft = self.ftype;
        let is_embd = name == "token_embd.weight";
        // The output projection, or the embedding when it doubles as the output (tied).
        if name == "output.weight" || (!self.has_output && is_embd) {
            return if !ncols.is_multiple_of(default.block_size()) {
                GgmlType::Q8_0
            } else if default != GgmlType::Q8_0 {
                GgmlType::Q6_K
            } else {
                default
            };
        }
        if is_embd {
            return default;
        }
        if name.contains("attn_qkv.weight") || name.contains("attn_v.weight") {
            let mut t = default;
            if matches!(ft, FileType::Q4_K_M | FileType::Q5_K_M)
                && use_more_bits(self.i_attention_wv, self.n_attention_wv)
            {
                t = GgmlType::Q6_K;
            }
            // llama.cpp's LLM_TYPE_70B: 8 heads share attn_v, so it gets more bits cheaply.
            let f = &self.facts;
            let seventy_b =
                f.n_layers == 80 && (f.arch == "qwen2" || (f.arch == "llama" && f.n_heads != f.n_kv_heads));
            if seventy_b && matches!(t, GgmlType::Q3_K | GgmlType::Q4_K) {
                t = GgmlType::Q5_K;
            }
            self.i_attention_wv += 1;
            return t;
        }
        if name.contains("ffn_down") {
            let mut t = default;
            if matches!(ft, FileType::Q4_K_M | FileType::Q5_K_M)
                && use_more_bits(self.i_ffn_down, self.facts.n_layers)
            {
                t = GgmlType::Q6_K;
            }
            self.i_ffn_down += 1;
            return t;
        }
        // attn_q/k/output, ffn_gate/up: no rule for these file types.
        default
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third in between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// llama.cpp's `tensor_type_fallback`: rows that are not whole 256-blocks get a 32-block type, and rows
/// that are not whole 32-blocks get F16.
fn fallback(ty: GgmlType, ncols: usize) -> GgmlType {
    if ncols.is_multiple_of(ty.block_size()) {
        return ty;
    }
    let r = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if !ncols.is_multiple_of(r.block_size()) { GgmlType::F16 } else { r }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n_layers: usize, output: bool) -> Vec<String> {
        let mut v = vec!["token_embd.weight".to_string(), "output_norm.weight".to_string()];
        if output {
            v.push("output.weight".into());
        }
        for i in 0..n_layers {
            for t in [
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
                "attn_norm",
                "ffn_norm",
            ] {
                v.push(format!("blk.{i}.{t}.weight"));
            }
        }
        v.sort_by(|a, b| llama_order(a, b));
        v
    }

    /// Types for every tensor of a llama-shaped model with 4096-wide rows.
    fn plan(ft: FileType, n_layers: usize, output: bool, heads: (usize, usize)) -> Vec<(String, GgmlType)> {
        let names = names(n_layers, output);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let facts = ModelFacts { arch: "llama", n_layers, n_heads: heads.0, n_kv_heads: heads.1 };
        let mut p = TypePlanner::new(ft, facts, &refs);
        names
            .iter()
            .map(|n| {
                let shape = if n.contains("norm") { vec![4096] } else { vec![4096, 4096] };
                (n.clone(), p.choose(n, &shape))
            })
            .collect()
    }

    fn ty(plan: &[(String, GgmlType)], name: &str) -> GgmlType {
        plan.iter().find(|(n, _)| n == name).map(|(_, t)| *t).unwrap_or(GgmlType::I8)
    }

    #[test]
    fn q4_k_m_upgrades_attn_v_and_ffn_down_on_llama_cpp_layers() {
        let p = plan(FileType::Q4_K_M, 32, true, (32, 8));
        // use_more_bits for 32 layers: the first and last 4, and every third from layer 6.
        let more = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31];
        for i in 0..32 {
            let want = if more.contains(&i) { GgmlType::Q6_K } else { GgmlType::Q4_K };
            assert_eq!(ty(&p, &format!("blk.{i}.attn_v.weight")), want, "attn_v {i}");
            assert_eq!(ty(&p, &format!("blk.{i}.ffn_down.weight")), want, "ffn_down {i}");
            assert_eq!(ty(&p, &format!("blk.{i}.attn_q.weight")), GgmlType::Q4_K);
            assert_eq!(ty(&p, &format!("blk.{i}.attn_norm.weight")), GgmlType::F32);
        }
        assert_eq!(ty(&p, "output.weight"), GgmlType::Q6_K);
        assert_eq!(ty(&p, "token_embd.weight"), GgmlType::Q4_K);
        // Tied: the embedding is the output and gets its type.
        let p = plan(FileType::Q4_K_M, 32, false, (32, 8));
        assert_eq!(ty(&p, "token_embd.weight"), GgmlType::Q6_K);
    }

    #[test]
    fn other_mixes() {
        let p = plan(FileType::Q5_K_M, 32, true, (32, 8));
        assert_eq!(ty(&p, "blk.0.attn_v.weight"), GgmlType::Q6_K);
        assert_eq!(ty(&p, "blk.4.attn_v.weight"), GgmlType::Q5_K);
        assert_eq!(ty(&p, "blk.4.attn_k.weight"), GgmlType::Q5_K);
        let p = plan(FileType::Q6_K, 32, true, (32, 8));
        assert!(p.iter().all(|(n, t)| *t == if n.contains("norm") { GgmlType::F32 } else { GgmlType::Q6_K }));
        let p = plan(FileType::Q4_0, 32, true, (32, 8));
        assert_eq!(ty(&p, "output.weight"), GgmlType::Q6_K, "llama-quantize keeps the output at Q6_K");
        assert_eq!(ty(&p, "blk.0.attn_v.weight"), GgmlType::Q4_0);
        let p = plan(FileType::Q8_0, 32, false, (32, 8));
        assert_eq!(ty(&p, "token_embd.weight"), GgmlType::Q8_0);
        let p = plan(FileType::BF16, 2, true, (32, 8));
        assert_eq!(ty(&p, "output.weight"), GgmlType::BF16);
        // Llama 70B (80 layers, grouped-query attention): attn_v gets Q5_K where Q4_K_M gives Q4_K.
        let p = plan(FileType::Q4_K_M, 80, true, (64, 8));
        assert_eq!(ty(&p, "blk.11.attn_v.weight"), GgmlType::Q5_K);
        assert_eq!(ty(&p, "blk.12.attn_v.weight"), GgmlType::Q6_K);
    }

    #[test]
    fn rows_that_are_not_whole_blocks_fall_back() {
        let names = ["blk.0.attn_v.weight", "blk.0.attn_q.weight", "output.weight", "blk.0.ffn_up.weight"];
        let facts = ModelFacts { arch: "llama", n_layers: 1, n_heads: 4, n_kv_heads: 4 };
        let mut p = TypePlanner::new(FileType::Q4_K_M, facts.clone(), &names);
        assert_eq!(p.choose("blk.0.attn_q.weight", &[64, 64]), GgmlType::Q5_0, "Q4_K -> Q5_0");
        assert_eq!(p.choose("blk.0.attn_v.weight", &[64, 64]), GgmlType::Q8_0, "Q6_K -> Q8_0");
        assert_eq!(p.choose("output.weight", &[100, 64]), GgmlType::Q8_0);
        assert_eq!(p.choose("blk.0.ffn_up.weight", &[64, 48]), GgmlType::F16, "48 is not a multiple of 32");
        let mut p = TypePlanner::new(FileType::Q5_K_M, facts.clone(), &names);
        assert_eq!(p.choose("blk.0.attn_q.weight", &[64, 64]), GgmlType::Q5_1, "Q5_K -> Q5_1");
        let mut p = TypePlanner::new(FileType::Q8_0, facts, &names);
        assert_eq!(p.choose("blk.0.ffn_up.weight", &[64, 48]), GgmlType::F16);
        assert_eq!(p.choose("blk.0.attn_q.bias", &[64]), GgmlType::F32);
        assert!(FileType::parse("Q4_K_M").is_ok() && FileType::parse("q4_k_s").is_err());
    }

    #[test]
    fn tensor_order_is_llama_cpp_s() {
        let mut v = vec![
            "blk.10.attn_q.weight",
            "blk.2.ffn_up.weight",
            "token_embd.weight",
            "blk.2.attn_k.weight",
            "output.weight",
        ];
        v.sort_by(|a, b| llama_order(a, b));
        assert_eq!(
            v,
            [
                "output.weight",
                "token_embd.weight",
                "blk.2.attn_k.weight",
                "blk.2.ffn_up.weight",
                "blk.10.attn_q.weight"
            ]
        );
    }
}
