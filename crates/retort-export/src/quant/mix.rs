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
