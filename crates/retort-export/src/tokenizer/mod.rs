//! The tokenizer part of a GGUF file (`tokenizer.ggml.*`, `tokenizer.chat_template`), built from a
//! Hugging Face directory the way llama.cpp's `convert_hf_to_gguf.py` builds it: the same vocabulary
//! source per architecture (SentencePiece `tokenizer.model`, or `tokenizer.json`), the same token
//! types and `[PADn]` filler, the same special-token resolution (`SpecialVocab`: tokenizer.json's
//! post-processor, tokenizer_config.json, then config.json) and chat template lookup.
//!
//! Where retort does better than llama.cpp it says so: special tokens llama.cpp cannot resolve are
//! looked up by their text in the vocabulary (llama.cpp would leave out `eos_token_id`), and a
//! `tokenizer.json`-only SentencePiece vocabulary gets merge-rank scores (see [`bpe::llama_hf_vocab`]).

pub mod bpe;
pub mod spm;

use std::path::Path;

use retort_hf::{Arch, ModelConfig};
use serde_json::Value as Json;

use crate::error::{ExportError, Result};
use crate::gguf::{GgufHeader, Value, ValueType};
use bpe::HfTokenizer;
use spm::PieceType;

/// GGUF token types (the SentencePiece numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum TokenType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

/// The token list and how to use it.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    /// `tokenizer.ggml.model`: `gpt2` or `llama`.
    pub model: &'static str,
    /// `tokenizer.ggml.pre`.
    pub pre: String,
    /// `tokenizer.ggml.tokens`.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores` (SentencePiece only).
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`.
    pub types: Vec<i32>,
    /// `tokenizer.ggml.merges` (BPE only).
    pub merges: Vec<String>,
}

/// Chat templates: one, or several by name (`default` first).
#[derive(Debug, Clone, PartialEq)]
pub enum ChatTemplates {
    /// `tokenizer.chat_template`.
    One(String),
    /// `tokenizer.chat_template` (the `default` one) and `tokenizer.chat_template.<name>`.
    Named(Vec<(String, String)>),
}

impl ChatTemplates {
    /// The default template.
    pub fn default_template(&self) -> Option<&str> {
        match self {
            ChatTemplates::One(t) => Some(t),
            ChatTemplates::Named(v) => v.iter().find(|(n, _)| n == "default").map(|(_, t)| t.as_str()),
        }
    }
}

/// Everything the GGUF file says about tokenization.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenizer {
    /// The vocabulary.
    pub vocab: Vocab,
    /// Special token ids by kind (`bos`, `eos`, `unk`, `sep`, `pad`, `cls`, `mask`, `eot`, `eom`), in the
    /// order they were resolved.
    pub special: Vec<(String, u32)>,
    /// `add_bos_token` and friends.
    pub add_special: Vec<(String, bool)>,
    /// The chat template(s).
    pub chat_template: Option<ChatTemplates>,
    /// `tokenizer.ggml.add_space_prefix`, when the converter writes it.
    pub add_space_prefix: Option<bool>,
}

/// llama.cpp's `does_token_look_special`.
pub(crate) fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ExportError::read(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ExportError::tokenizer(path, format!("is not valid JSON (line {}): {e}", e.line())))
}

/// The text of a special-token entry (`"<s>"` or `{"content": "<s>", ...}`).
fn content(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// What a model directory holds for tokenization.
struct Files {
    tokenizer_json: Option<HfTokenizer>,
    tokenizer_config: Option<Json>,
    config: Option<Json>,
}

impl Tokenizer {
    /// Builds the tokenizer metadata of the model in `dir`. `template` replaces the model's own chat
    /// template (the recipe's `base.chat_template`).
    pub fn load(dir: &Path, cfg: &ModelConfig, template: Option<String>) -> Result<Tokenizer> {
        let tj = dir.join("tokenizer.json");
        let files = Files {
            tokenizer_json: if tj.is_file() { Some(HfTokenizer::read(&tj)?) } else { None },
            tokenizer_config: read_json(&dir.join("tokenizer_config.json"))?,
            config: read_json(&dir.join("config.json"))?,
        };
        let spm_path = dir.join("tokenizer.model");
        let has_spm = spm_path.is_file();
        let tc_str = |k: &str| files.tokenizer_config.as_ref().and_then(|c| c.get(k)).and_then(Json::as_str);
        let mut add_space_prefix = None;
        let no_tokenizer = || {
            ExportError::tokenizer(
                dir,
                "has neither tokenizer.model nor tokenizer.json; GGUF files embed the tokenizer",
            )
        };
        let (vocab, n_vocab_check) = match cfg.arch {
            Arch::Llama | Arch::Mistral => {
                if dir.join("tekken.json").is_file() && files.tokenizer_json.is_none() {
                    return Err(ExportError::tokenizer(
                        &dir.join("tekken.json"),
                        "is Mistral's own tokenizer format; retort needs the Hugging Face tokenizer.json of the model",
                    ));
                }
                if let Some(b) = files
                    .tokenizer_config
                    .as_ref()
                    .and_then(|c| c.get("add_prefix_space"))
                    .and_then(Json::as_bool)
                {
                    add_space_prefix = Some(b);
                }
                if has_spm {
                    (spm_vocab(&spm_path, cfg.vocab_size, dir, &files, false)?, true)
                } else {
                    let t = files.tokenizer_json.as_ref().ok_or_else(no_tokenizer)?;
                    if t.is_byte_fallback_bpe() {
                        (bpe::llama_hf_vocab(t, cfg.vocab_size, &special_ids(&files), &tj)?, true)
                    } else {
                        (bpe::gpt2_vocab(t, cfg.vocab_size, &tj)?, false)
                    }
                }
            }
            Arch::Phi3 if tc_str("tokenizer_class") != Some("GPT2Tokenizer") => {
                if !has_spm {
                    return Err(ExportError::tokenizer(
                        &spm_path,
                        "is missing; Phi-3 GGUF files take their vocabulary from it",
                    ));
                }
                (spm_vocab(&spm_path, cfg.vocab_size, dir, &files, true)?, true)
            }
            Arch::Qwen2 | Arch::Qwen3 | Arch::Phi3 | Arch::Gemma2 | Arch::Gemma3 => {
                if matches!(cfg.arch, Arch::Gemma2 | Arch::Gemma3) {
                    add_space_prefix = Some(false);
                }
                if has_spm {
                    (spm_vocab(&spm_path, cfg.vocab_size, dir, &files, false)?, true)
                } else {
                    let t = files.tokenizer_json.as_ref().ok_or_else(no_tokenizer)?;
                    if t.is_byte_fallback_bpe() {
                        (bpe::llama_hf_vocab(t, cfg.vocab_size, &special_ids(&files), &tj)?, true)
                    } else {
                        (bpe::gpt2_vocab(t, cfg.vocab_size, &tj)?, false)
                    }
                }
            }
        };
        let mut sv = SpecialVocab::new(if n_vocab_check { Some(vocab.tokens.len()) } else { None });
        sv.load(dir, &files)?;
        sv.fill_from_vocab(&vocab, &files);
        let mut chat_template = sv.chat_template.take();
        if let Some(t) = template {
            chat_template = Some(match chat_template {
                Some(ChatTemplates::Named(mut v)) => {
                    v.retain(|(n, _)| n != "default");
                    v.insert(0, ("default".into(), t));
                    ChatTemplates::Named(v)
                }
                _ => ChatTemplates::One(t),
            });
        }
        Ok(Tokenizer { vocab, special: sv.ids, add_special: sv.add, chat_template, add_space_prefix })
    }

    /// The id of a special token kind.
    pub fn special_id(&self, kind: &str) -> Option<u32> {
        self.special.iter().find(|(k, _)| k == kind).map(|(_, id)| *id)
    }

    /// The text of a token.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.vocab.tokens.get(id as usize).map(String::as_str)
    }

    /// Adds the `tokenizer.*` keys.
    pub fn write(&self, h: &mut GgufHeader) {
        let v = &self.vocab;
        h.set("tokenizer.ggml.model", Value::str(v.model));
        h.set("tokenizer.ggml.pre", Value::str(&v.pre));
        h.set("tokenizer.ggml.tokens", Value::strings(&v.tokens));
        if let Some(s) = &v.scores {
            h.set(
                "tokenizer.ggml.scores",
                Value::Array(ValueType::F32, s.iter().map(|&x| Value::F32(x)).collect()),
            );
        }
        h.set(
            "tokenizer.ggml.token_type",
            Value::Array(ValueType::I32, v.types.iter().map(|&t| Value::I32(t)).collect()),
        );
        if !v.merges.is_empty() {
            h.set("tokenizer.ggml.merges", Value::strings(&v.merges));
        }
        for (kind, id) in &self.special {
            let key = match kind.as_str() {
                "unk" => "unknown",
                "sep" => "seperator", // sic: llama.cpp's spelling
                "pad" => "padding",
                other => other,
            };
            h.set(format!("tokenizer.ggml.{key}_token_id"), Value::U32(*id));
        }
        for (kind, on) in &self.add_special {
            if matches!(kind.as_str(), "bos" | "eos" | "sep") {
                h.set(format!("tokenizer.ggml.add_{kind}_token"), Value::Bool(*on));
            }
        }
        match &self.chat_template {
            Some(ChatTemplates::One(t)) => h.set("tokenizer.chat_template", Value::str(t)),
            Some(ChatTemplates::Named(list)) => {
                let mut names = Vec::new();
                for (name, t) in list {
                    if name == "default" {
                        h.set("tokenizer.chat_template", Value::str(t));
                    } else {
                        h.set(format!("tokenizer.chat_template.{name}"), Value::str(t));
                        names.push(name.clone());
                    }
                }
                if !names.is_empty() {
                    h.set("tokenizer.chat_templates", Value::strings(&names));
                }
            }
            None => {}
        }
        if let Some(b) = self.add_space_prefix {
            h.set("tokenizer.ggml.add_space_prefix", Value::Bool(b));
        }
    }
}

/// Ids of the tokens `tokenizer_config.json` names as special (for `LlamaHfVocab`'s control marks).
fn special_ids(files: &Files) -> Vec<u32> {
    let Some(t) = &files.tokenizer_json else { return Vec::new() };
    let mut ids: Vec<u32> = t.added.iter().filter(|a| a.2).map(|a| a.0).collect();
    if let Some(tc) = &files.tokenizer_config {
        for k in ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]
        {
            if let Some(c) = content(tc.get(k))
                && let Some(&id) = t.vocab.get(&c)
            {
                ids.push(id);
            }
        }
    }
    ids
}

/// llama.cpp's `_create_vocab_sentencepiece` (and, with `phi3`, Phi-3's variant of it).
fn spm_vocab(path: &Path, vocab_size: usize, dir: &Path, files: &Files, phi3: bool) -> Result<Vocab> {
    let pieces = spm::read(path)?;
    let n = if vocab_size > 0 { vocab_size } else { pieces.len() };
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; n];
    let mut types = vec![TokenType::Unused as i32; n];
    for (i, p) in pieces.iter().enumerate().take(n) {
        let t = match p.kind {
            PieceType::Unknown => TokenType::Unknown,
            PieceType::Control => TokenType::Control,
            PieceType::Unused => TokenType::Unused,
            PieceType::Byte => TokenType::Byte,
            PieceType::Normal | PieceType::UserDefined => TokenType::Normal,
        };
        tokens[i] = p.piece.clone();
        scores[i] = p.score;
        types[i] = t as i32;
    }
    let out_of_range = |id: u64, what: &str| {
        ExportError::tokenizer(dir, format!("{what} has token id {id}, beyond the model's vocab_size {n}"))
    };
    if let Some(Json::Object(added)) = read_json(&dir.join("added_tokens.json"))? {
        for (text, id) in added {
            let Some(id) = id.as_u64() else { continue };
            if id as usize >= n {
                if phi3 {
                    return Err(out_of_range(id, "added_tokens.json"));
                }
                continue;
            }
            tokens[id as usize] = text;
            scores[id as usize] = -1000.0;
            types[id as usize] = TokenType::UserDefined as i32;
        }
    }
    let mut apply = |id: u64, text: &str, special: bool, what: &str| -> Result<()> {
        let i = id as usize;
        if i >= n {
            return if phi3 { Err(out_of_range(id, what)) } else { Ok(()) };
        }
        let (text, ty) = if phi3 {
            (text.to_string(), if special { TokenType::Control } else { TokenType::UserDefined })
        } else if special || looks_special(text) {
            (text.to_string(), TokenType::Control)
        } else {
            (text.replace('\u{2581}', " "), TokenType::UserDefined)
        };
        tokens[i] = text;
        scores[i] = -1000.0;
        types[i] = ty as i32;
        Ok(())
    };
    if let Some(dec) =
        files.tokenizer_config.as_ref().and_then(|c| c.get("added_tokens_decoder")).and_then(Json::as_object)
    {
        for (id, data) in dec {
            let Ok(id) = id.parse::<u64>() else { continue };
            let Some(text) = data.get("content").and_then(Json::as_str) else { continue };
            let special = data.get("special").and_then(Json::as_bool).unwrap_or(false);
            apply(id, text, special, "tokenizer_config.json")?;
        }
    }
    if phi3 && let Some(t) = &files.tokenizer_json {
        for (id, text, special) in &t.added {
            apply(u64::from(*id), text, *special, "tokenizer.json")?;
        }
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

/// llama.cpp's `gguf.SpecialVocab`.
struct SpecialVocab {
    n_vocab: Option<usize>,
    types: Vec<&'static str>,
    ids: Vec<(String, u32)>,
    add: Vec<(String, bool)>,
    chat_template: Option<ChatTemplates>,
}

impl SpecialVocab {
    fn new(n_vocab: Option<usize>) -> SpecialVocab {
        SpecialVocab {
            n_vocab,
            types: vec!["bos", "eos", "unk", "sep", "pad", "cls", "mask"],
            ids: Vec::new(),
            add: Vec::new(),
            chat_template: None,
        }
    }

    fn set_id(&mut self, kind: &str, id: Option<u64>) {
        let Some(id) = id.and_then(|i| u32::try_from(i).ok()) else { return };
        if self.n_vocab.is_some_and(|n| id as usize >= n) || self.ids.iter().any(|(k, _)| k == kind) {
            return;
        }
        self.ids.push((kind.to_string(), id));
    }

    fn set_add(&mut self, kind: &str, on: bool, overwrite: bool) {
        match self.add.iter_mut().find(|(k, _)| k == kind) {
            Some(slot) if overwrite => slot.1 = on,
            Some(_) => {}
            None => self.add.push((kind.to_string(), on)),
        }
    }

    fn load(&mut self, dir: &Path, files: &Files) -> Result<()> {
        let mut tc = files.tokenizer_config.clone();
        let added: &[(u32, String, bool)] = files.tokenizer_json.as_ref().map_or(&[], |t| &t.added);
        if let Some(tok) = &files.tokenizer_json {
            self.post_processor(&tok.json, &mut tc);
        }
        let Some(tc) = tc else {
            self.load_config_json(files);
            return Ok(());
        };
        self.chat_template = chat_template(dir, &tc)?;
        for kind in self.types.clone() {
            if let Some(on) = tc.get(format!("add_{kind}_token")).and_then(Json::as_bool) {
                self.set_add(kind, on, false);
            }
            if let Some(c) = content(tc.get(format!("{kind}_token"))) {
                let id = added.iter().find(|a| a.1 == c).map(|a| u64::from(a.0));
                self.set_id(kind, id);
            }
        }
        self.load_config_json(files);
        Ok(())
    }

    fn load_config_json(&mut self, files: &Files) {
        let Some(cfg) = &files.config else { return };
        for kind in self.types.clone() {
            let key = format!("{kind}_token_id");
            let v = cfg.get(&key).or_else(|| cfg.get("text_config").and_then(|t| t.get(&key)));
            self.set_id(kind, v.and_then(Json::as_u64));
        }
    }

    /// The `post_processor` of tokenizer.json: whether BOS/EOS/SEP are added, and tokens it names.
    fn post_processor(&mut self, tok: &Json, tc: &mut Option<Json>) {
        let Some(pp) = tok.get("post_processor").filter(|p| !p.is_null()) else { return };
        let get = |tc: &Option<Json>, k: &str| content(tc.as_ref().and_then(|c| c.get(k)));
        let mut special_bos = get(tc, "bos_token");
        let mut special_cls = get(tc, "cls_token");
        let mut special_eos = get(tc, "eos_token");
        let special_sep = get(tc, "sep_token");
        let set = |tc: &mut Option<Json>, k: &str, v: &str| {
            if let Some(Json::Object(o)) = tc {
                o.insert(k.to_string(), Json::String(v.to_string()));
            }
        };
        if special_bos.is_none() && special_cls.is_some() && tc.is_some() {
            special_bos = special_cls.clone();
            set(tc, "bos_token", special_bos.as_deref().unwrap_or_default());
        }
        if special_eos.is_none() && special_sep.is_some() && tc.is_some() {
            special_eos = special_sep.clone();
            set(tc, "eos_token", special_eos.as_deref().unwrap_or_default());
        }
        let list: Vec<&Json> = match pp.get("processors").and_then(Json::as_array) {
            Some(a) => a.iter().collect(),
            None => vec![pp],
        };
        let id_of = |v: Option<&Json>| {
            v.and_then(|s| s.get("SpecialToken"))
                .and_then(|s| s.get("id"))
                .and_then(Json::as_str)
                .map(str::to_string)
        };
        for p in list {
            match p.get("type").and_then(Json::as_str) {
                Some("ByteLevel") => {
                    self.set_add("bos", false, false);
                    self.set_add("eos", false, false);
                }
                Some("RobertaProcessing") => {
                    for k in ["bos", "eos", "sep"] {
                        self.set_add(k, true, true);
                    }
                }
                Some("TemplateProcessing") => {
                    let single = p.get("single").and_then(Json::as_array).cloned().unwrap_or_default();
                    let pair = p.get("pair").and_then(Json::as_array).cloned().unwrap_or_default();
                    let (mut first, mut last) = (None, None);
                    if single.len() > 1 {
                        first = id_of(single.first());
                        if let Some(f) = &first {
                            if tc.is_none() {
                                special_bos = Some(f.clone());
                            } else if Some(f) != special_bos.as_ref() && Some(f) != special_cls.as_ref() {
                                if special_bos.is_none() {
                                    special_bos = Some(f.clone());
                                    set(tc, "bos_token", f);
                                }
                                if special_cls.is_none() {
                                    special_cls = Some(f.clone());
                                    set(tc, "cls_token", f);
                                }
                            }
                            let on = Some(f) == special_bos.as_ref() || Some(f) == special_cls.as_ref();
                            self.set_add("bos", on, true);
                        }
                        last = id_of(single.last());
                        if let Some(l) = &last {
                            if tc.is_none() {
                                special_eos = Some(l.clone());
                            } else if Some(l) != special_eos.as_ref() {
                                let old = special_eos.clone().unwrap_or_default();
                                if !self.types.contains(&"eot") {
                                    self.types.push("eot");
                                    set(tc, "eot_token", &old);
                                } else if !self.types.contains(&"eom") {
                                    self.types.push("eom");
                                    set(tc, "eom_token", &old);
                                }
                                set(tc, "eos_token", l);
                                special_eos = Some(l.clone());
                            }
                            self.set_add("eos", Some(l) == special_eos.as_ref(), true);
                        }
                    }
                    if !pair.is_empty() {
                        let start = usize::from(first.is_some() && id_of(pair.first()) == first);
                        let stop = if last.is_some() && id_of(pair.last()) == last {
                            pair.len() - 1
                        } else {
                            pair.len()
                        };
                        let inner = if start <= stop { &pair[start..stop] } else { &[][..] };
                        let seq = |v: Option<&Json>| -> Option<String> {
                            v.and_then(|s| s.get("Sequence"))
                                .and_then(|s| s.get("id"))
                                .and_then(Json::as_str)
                                .map(str::to_string)
                        };
                        if !inner.is_empty()
                            && seq(inner.first()).as_deref() == Some("A")
                            && seq(inner.last()).as_deref() == Some("B")
                            && inner.len() > 2
                        {
                            let middle = &inner[1..inner.len() - 1];
                            let is_sep = |e: Option<String>| {
                                e.is_some_and(|e| {
                                    Some(&e) == special_sep.as_ref() || Some(&e) == special_eos.as_ref()
                                })
                            };
                            let mut add_sep = false;
                            if is_sep(id_of(middle.first())) && last.is_none() {
                                add_sep = true;
                            }
                            if middle.len() == 2 && is_sep(id_of(middle.get(1))) {
                                add_sep = true;
                            }
                            self.set_add("sep", add_sep, true);
                            if add_sep
                                && special_sep.is_none()
                                && let Some(e) = &special_eos
                            {
                                set(tc, "sep_token", e);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// retort's addition: special tokens named in tokenizer_config.json but absent from
    /// `added_tokens` are looked up by text in the vocabulary, and a config.json list of EOS ids
    /// contributes its first id, so `eos_token_id` is not silently missing.
    fn fill_from_vocab(&mut self, vocab: &Vocab, files: &Files) {
        if let Some(tc) = &files.tokenizer_config {
            for kind in ["bos", "eos", "unk", "pad"] {
                if self.ids.iter().any(|(k, _)| k == kind) {
                    continue;
                }
                if let Some(c) = content(tc.get(format!("{kind}_token")))
                    && let Some(i) = vocab.tokens.iter().position(|t| *t == c)
                {
                    self.set_id(kind, Some(i as u64));
                }
            }
        }
        if !self.ids.iter().any(|(k, _)| k == "eos")
            && let Some(cfg) = &files.config
            && let Some(first) = cfg.get("eos_token_id").and_then(Json::as_array).and_then(|a| a.first())
        {
            self.set_id("eos", first.as_u64());
        }
    }
}

/// tokenizer_config.json's `chat_template`, else `chat_template.jinja` (with
/// `additional_chat_templates/*.jinja`), else `chat_template.json`.
fn chat_template(dir: &Path, tc: &Json) -> Result<Option<ChatTemplates>> {
    let from_value = |v: &Json| -> Option<ChatTemplates> {
        match v {
            Json::String(s) => Some(ChatTemplates::One(s.clone())),
            Json::Array(a) => Some(ChatTemplates::Named(
                a.iter()
                    .filter_map(|e| {
                        let name: String = e
                            .get("name")?
                            .as_str()?
                            .chars()
                            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                            .collect();
                        Some((name, e.get("template")?.as_str()?.to_string()))
                    })
                    .filter(|(n, _)| !n.is_empty())
                    .collect(),
            )),
            _ => None,
        }
    };
    if let Some(v) = tc.get("chat_template").filter(|v| !v.is_null()) {
        return Ok(from_value(v));
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let t = std::fs::read_to_string(&jinja).map_err(|e| ExportError::read(&jinja, e))?;
        let extra_dir = dir.join("additional_chat_templates");
        let mut extra: Vec<(String, String)> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&extra_dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "jinja")
                    && let Some(stem) = p.file_stem().and_then(|s| s.to_str())
                {
                    let body = std::fs::read_to_string(&p).map_err(|err| ExportError::read(&p, err))?;
                    extra.push((stem.to_string(), body));
                }
            }
        }
        if extra.is_empty() {
            return Ok(Some(ChatTemplates::One(t)));
        }
        extra.sort();
        extra.insert(0, ("default".into(), t));
        return Ok(Some(ChatTemplates::Named(extra)));
    }
    Ok(read_json(&dir.join("chat_template.json"))?.and_then(|j| j.get("chat_template").and_then(from_value)))
}
