//! A model's tokenizer: `tokenizer.json` through the `tokenizers` crate, with the special tokens, chat
//! template and end-of-sequence ids from `tokenizer_config.json`, `chat_template.jinja` and
//! `generation_config.json`, as transformers reads them.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::template::{ChatTemplate, TemplateError};

/// A problem with tokenizer files.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// No tokenizer.json.
    #[error("`{}` has no tokenizer.json; retort needs the fast-tokenizer file Hugging Face repos ship", dir.display())]
    Missing {
        /// The directory.
        dir: PathBuf,
    },
    /// A file could not be read or parsed.
    #[error("cannot load `{}`: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The tokenizer produces ids the model has no embedding for.
    #[error(
        "the tokenizer has {tokenizer} tokens but the model's embedding has only {model} rows; they do not belong together"
    )]
    VocabMismatch {
        /// Tokenizer vocabulary (with added tokens).
        tokenizer: usize,
        /// Model `vocab_size`.
        model: usize,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Codec(String),
    /// The chat template is broken.
    #[error(transparent)]
    Template(#[from] TemplateError),
}

/// Token ids with the byte range `[start, end)` of the text each one covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Byte ranges in the text, one per token.
    pub offsets: Vec<(usize, usize)>,
}

/// A loaded tokenizer with its special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// BOS token text.
    pub bos_token: Option<String>,
    /// EOS token text.
    pub eos_token: Option<String>,
    /// PAD token text.
    pub pad_token: Option<String>,
    /// Whether the BOS token is prepended when encoding (`add_bos_token`), if the config says.
    pub add_bos_token: Option<bool>,
    /// The chat template source, if the model has one.
    pub chat_template: Option<String>,
    /// Token ids that end generation: `generation_config.json`'s `eos_token_id`s and the EOS token.
    pub eos_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
        Some(Value::Array(a)) => {
            a.iter().filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok())).collect()
        }
        _ => Vec::new(),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| TokenizerError::Invalid { path: path.to_path_buf(), message: e.to_string() })?;
    serde_json::from_str(&text).map(Some).map_err(|e| TokenizerError::Invalid {
        path: path.to_path_buf(),
        message: format!("line {}: {e}", e.line()),
    })
}

impl Tokenizer {
    /// Loads the tokenizer of a model directory.
    pub fn load(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(TokenizerError::Missing { dir: dir.to_path_buf() });
        }
        let bytes = std::fs::read(&file)
            .map_err(|e| TokenizerError::Invalid { path: file.clone(), message: e.to_string() })?;
        Tokenizer::from_parts(&bytes, dir, &file)
    }

    /// Builds from `tokenizer.json` bytes; side files are read from `dir` when present.
    pub fn from_parts(tokenizer_json: &[u8], dir: &Path, file: &Path) -> Result<Tokenizer, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| TokenizerError::Invalid { path: file.to_path_buf(), message: e.to_string() })?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let template_file = dir.join("chat_template.jinja");
        let chat_template = if template_file.is_file() {
            Some(std::fs::read_to_string(&template_file).map_err(|e| TokenizerError::Invalid {
                path: template_file.clone(),
                message: e.to_string(),
            })?)
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: transformers uses the one named "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            }
        };
        let eos_token = token_text(config.get("eos_token"));
        let mut eos_ids = ids(generation.get("eos_token_id"));
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t))
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
        Ok(Tokenizer {
            inner,
            bos_token: token_text(config.get("bos_token")),
            eos_token,
            pad_token: token_text(config.get("pad_token")),
            add_bos_token: config.get("add_bos_token").and_then(Value::as_bool),
            chat_template,
            eos_ids,
        })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Fails when the tokenizer can produce ids the model has no embedding for.
    pub fn check_model_vocab(&self, model_vocab: usize) -> Result<(), TokenizerError> {
        let n = self.vocab_size();
        if n > model_vocab {
            return Err(TokenizerError::VocabMismatch { tokenizer: n, model: model_vocab });
        }
        Ok(())
    }

    /// The id of a token, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of a text; `add_special_tokens` applies the tokenizer's post-processor (BOS etc.).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Codec(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Token ids with the byte range of the text each token covers.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Encoded, TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(|e| TokenizerError::Codec(e.to_string()))?;
        Ok(Encoded { ids: enc.get_ids().to_vec(), offsets: enc.get_offsets().to_vec() })
    }

    /// Text of token ids.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// The compiled chat template, if the model has one.
    pub fn template(&self) -> Result<Option<ChatTemplate>, TokenizerError> {
        self.chat_template.as_deref().map(ChatTemplate::new).transpose().map_err(Into::into)
    }
}
