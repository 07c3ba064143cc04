//! Vocabularies from `tokenizer.json`: GPT-2 style byte-level BPE (`tokenizer.ggml.model = gpt2`, with
//! merges and a pre-tokenizer name), and SentencePiece-derived byte-fallback BPE (`llama`).

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::error::{ExportError, Result};
use crate::tokenizer::{TokenType, Vocab, looks_special};

/// BPE pre-tokenizers llama.cpp implements, by the regex their `tokenizer.json` carries (the
/// "original regex from tokenizer.json" noted in llama.cpp's `llama-vocab.cpp`), and the
/// `tokenizer.ggml.pre` name that selects it.
const PRE_TOKENIZERS: &[(&str, &[&str])] = &[
    (
        "llama-bpe",
        &[
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
    ),
    (
        "qwen2",
        &[
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
    ),
    (
        "qwen35",
        &[
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
    ),
    (
        "tekken",
        &[
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
    ),
    (
        "gpt-4o",
        &[
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
    ),
    ("gpt-2", &[r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"]),
];

/// The split regexes of a `tokenizer.json` pre-tokenizer, in order; a `ByteLevel` step with
/// `use_regex` contributes GPT-2's regex.
fn split_regexes(pre: &Value, out: &mut Vec<String>) {
    match pre.get("type").and_then(Value::as_str) {
        Some("Sequence") => {
            for p in pre.get("pretokenizers").and_then(Value::as_array).into_iter().flatten() {
                split_regexes(p, out);
            }
        }
        Some("Split") => {
            if let Some(r) = pre.get("pattern").and_then(|p| p.get("Regex")).and_then(Value::as_str) {
                out.push(r.to_string());
            } else if let Some(s) = pre.get("pattern").and_then(|p| p.get("String")).and_then(Value::as_str) {
                out.push(format!("literal:{s}"));
            }
        }
        Some("ByteLevel") if pre.get("use_regex").and_then(Value::as_bool).unwrap_or(true) => {
            out.push(PRE_TOKENIZERS[PRE_TOKENIZERS.len() - 1].1[0].to_string());
        }
        Some("Digits") => out.push("digits".into()),
        _ => {}
    }
}

/// llama.cpp's name for the pre-tokenizer of a `tokenizer.json`.
pub fn pre_tokenizer_name(tok: &Value, path: &Path) -> Result<String> {
    let mut found = Vec::new();
    if let Some(p) = tok.get("pre_tokenizer") {
        split_regexes(p, &mut found);
    }
    for (name, regexes) in PRE_TOKENIZERS {
        if found.len() == regexes.len() && found.iter().zip(regexes.iter()).all(|(a, b)| a == b) {
            return Ok((*name).to_string());
        }
    }
    Err(ExportError::Tokenizer {
        path: path.to_path_buf(),
        problem: format!(
            "its BPE pre-tokenizer is not one llama.cpp implements for these models (known: {}); \
             a GGUF with the wrong pre-tokenizer would tokenize differently from the model",
            PRE_TOKENIZERS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
        ),
    })
}

/// `model.vocab` (text → id) and the added tokens of a `tokenizer.json`.
pub struct HfTokenizer {
    /// The parsed file.
    pub json: Value,
    /// `model.vocab`.
    pub vocab: HashMap<String, u32>,
    /// `added_tokens`: (id, content, special).
    pub added: Vec<(u32, String, bool)>,
}

impl HfTokenizer {
    /// Reads `tokenizer.json`.
    pub fn read(path: &Path) -> Result<HfTokenizer> {
        let text = std::fs::read_to_string(path).map_err(|e| ExportError::read(path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| {
            ExportError::tokenizer(path, format!("is not valid JSON (line {}): {e}", e.line()))
        })?;
        let mut vocab = HashMap::new();
        if let Some(v) = json.get("model").and_then(|m| m.get("vocab")).and_then(Value::as_object) {
            for (k, id) in v {
                let id = id.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| {
                    ExportError::tokenizer(path, format!("`model.vocab.{k}` is not a token id"))
                })?;
                vocab.insert(k.clone(), id);
            }
        }
        let mut added = Vec::new();
        for a in json.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
            let (Some(id), Some(content)) =
                (a.get("id").and_then(Value::as_u64), a.get("content").and_then(Value::as_str))
            else {
                return Err(ExportError::tokenizer(
                    path,
                    "an entry of `added_tokens` lacks `id` or `content`",
                ));
            };
            let id = u32::try_from(id)
                .map_err(|_| ExportError::tokenizer(path, format!("added token id {id} is too large")))?;
            added.push((id, content.to_string(), a.get("special").and_then(Value::as_bool).unwrap_or(false)));
        }
        Ok(HfTokenizer { json, vocab, added })
    }

    fn model_type(&self) -> Option<&str> {
        self.json.get("model").and_then(|m| m.get("type")).and_then(Value::as_str)
    }

    /// A SentencePiece-style BPE (byte fallback, `Sequence` decoder), as Llama 2 and Gemma ship.
    pub fn is_byte_fallback_bpe(&self) -> bool {
        self.model_type() == Some("BPE")
            && self.json["model"].get("byte_fallback").and_then(Value::as_bool) == Some(true)
            && self.json.get("decoder").and_then(|d| d.get("type")).and_then(Value::as_str)
                == Some("Sequence")
    }

    /// The merges as `"a b"` strings (the pair format's spaces encoded as llama.cpp does).
    pub fn merges(&self, path: &Path) -> Result<Vec<String>> {
        let Some(m) = self.json.get("model").and_then(|m| m.get("merges")).and_then(Value::as_array) else {
            return Ok(Vec::new());
        };
        m.iter()
            .map(|e| match e {
                Value::String(s) => Ok(s.clone()),
                Value::Array(pair) if pair.len() == 2 => {
                    let enc = |v: &Value| -> Option<String> {
                        Some(v.as_str()?.chars().map(|c| if c == ' ' { '\u{120}' } else { c }).collect())
                    };
                    match (enc(&pair[0]), enc(&pair[1])) {
                        (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                        _ => Err(ExportError::tokenizer(path, "a merge is not a pair of strings")),
                    }
                }
                _ => Err(ExportError::tokenizer(path, "`model.merges` has an entry that is not a merge")),
            })
            .collect()
    }
}

/// llama.cpp's `get_vocab_base` + `_set_vocab_gpt2`: one token per id below `vocab_size`, `[PADn]` for
/// holes, added tokens marked control or user-defined.
pub fn gpt2_vocab(tok: &HfTokenizer, vocab_size: usize, path: &Path) -> Result<Vocab> {
    if tok.model_type() != Some("BPE") {
        return Err(ExportError::tokenizer(
            path,
            format!(
                "is a {} tokenizer; retort writes BPE and SentencePiece vocabularies",
                tok.model_type().unwrap_or("unknown")
            ),
        ));
    }
    let mut by_id: Vec<Option<(String, TokenType)>> = vec![None; vocab_size];
    let too_big = |id: u32| {
        ExportError::tokenizer(
            path,
            format!(
                "has token id {id}, but the model's vocab_size is {vocab_size}: the tokenizer does not belong to this model"
            ),
        )
    };
    for (text, &id) in &tok.vocab {
        *by_id.get_mut(id as usize).ok_or_else(|| too_big(id))? = Some((text.clone(), TokenType::Normal));
    }
    for (id, content, special) in &tok.added {
        let slot = by_id.get_mut(*id as usize).ok_or_else(|| too_big(*id))?;
        *slot = Some(if *special || looks_special(content) {
            (content.clone(), TokenType::Control)
        } else {
            (content.replace('\u{2581}', " "), TokenType::UserDefined)
        });
    }
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for (i, slot) in by_id.into_iter().enumerate() {
        let (t, ty) = slot.unwrap_or_else(|| (format!("[PAD{i}]"), TokenType::Unused));
        tokens.push(t);
        types.push(ty as i32);
    }
    Ok(Vocab {
        model: "gpt2",
        pre: pre_tokenizer_name(&tok.json, path)?,
        tokens,
        scores: None,
        types,
        merges: tok.merges(path)?,
    })
}

/// A SentencePiece-derived BPE from `tokenizer.json` alone (no `tokenizer.model`), as llama.cpp's
/// `LlamaHfVocab`, except for scores: llama.cpp writes -1000 for every token, which makes its
/// SentencePiece tokenizer merge in the wrong order; retort scores each token by the rank of the merge
/// that makes it (`-rank`), so llama.cpp merges in exactly the BPE order. The vocabulary is padded to
/// the model's `vocab_size` so it matches `token_embd`.
pub fn llama_hf_vocab(tok: &HfTokenizer, vocab_size: usize, specials: &[u32], path: &Path) -> Result<Vocab> {
    let merges = tok.merges(path)?;
    let mut rank: HashMap<String, usize> = HashMap::new();
    for (i, m) in merges.iter().enumerate() {
        if let Some((a, b)) = m.split_once(' ') {
            rank.entry(format!("{a}{b}")).or_insert(i);
        }
    }
    let base = tok.vocab.len();
    let n = vocab_size.max(base + tok.added.iter().filter(|a| a.0 as usize >= base).count());
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-1000.0f32; n];
    let mut types = vec![TokenType::Unused as i32; n];
    for (text, &id) in &tok.vocab {
        let i = id as usize;
        if i >= n {
            return Err(ExportError::tokenizer(
                path,
                format!("has token id {id} beyond the model's vocab_size {vocab_size}"),
            ));
        }
        let is_byte = text.len() == 6
            && text.starts_with("<0x")
            && text.ends_with('>')
            && u8::from_str_radix(&text[3..5], 16).is_ok();
        types[i] = if is_byte {
            TokenType::Byte
        } else if specials.contains(&id) {
            TokenType::Control
        } else {
            TokenType::Normal
        } as i32;
        scores[i] = rank.get(text).map_or(0.0, |&r| -(r as f32));
        tokens[i] = text.clone();
    }
    for (id, content, special) in &tok.added {
        let i = *id as usize;
        if i < base {
            continue;
        }
        if i >= n {
            return Err(ExportError::tokenizer(
                path,
                format!("added token id {id} is beyond the model's vocab_size {vocab_size}"),
            ));
        }
        tokens[i] = content.clone();
        types[i] = if *special || specials.contains(id) { TokenType::Control } else { TokenType::UserDefined }
            as i32;
        scores[i] = -1000.0;
    }
    Ok(Vocab {
        model: "llama",
        pre: "default".into(),
        tokens,
        scores: Some(scores),
        types,
        merges: Vec::new(),
    })
}
