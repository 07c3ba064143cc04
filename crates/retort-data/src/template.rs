//! Chat templates (the Jinja `chat_template` of `tokenizer_config.json`) rendered as transformers renders
//! them, byte for byte: `trim_blocks` and `lstrip_blocks`, Python string methods (`strip`, `split`,
//! `startswith`, ...), loop controls, and the extensions transformers adds to its sandbox:
//! `raise_exception`, `strftime_now`, and a `tojson` that is Python's `json.dumps` (no HTML escaping).

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value as Json;

use crate::pyjson::{self, Dumps};

/// Marks errors raised by the template itself through `raise_exception`.
const RAISED: &str = "retort:raise_exception:";

/// Why a template could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// The template is not valid Jinja.
    #[error("the chat template is not valid Jinja at line {line}: {message}")]
    Syntax {
        /// 1-based line in the template.
        line: usize,
        /// What the parser said.
        message: String,
    },
    /// The template itself refused the conversation (`raise_exception`), e.g. "System role not
    /// supported".
    #[error("the chat template refused this conversation: {0}")]
    Raised(String),
    /// Rendering failed for another reason.
    #[error("the chat template failed at line {line}: {message}")]
    Render {
        /// 1-based line in the template.
        line: usize,
        /// What went wrong.
        message: String,
    },
}

/// Inputs of a rendering besides the messages.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Append the header that starts the assistant's turn.
    pub add_generation_prompt: bool,
    /// Tool schemas (OpenAI function format), or none.
    pub tools: Option<Json>,
    /// The tokenizer's BOS token text.
    pub bos_token: Option<String>,
    /// The tokenizer's EOS token text.
    pub eos_token: Option<String>,
    /// Any other variables the template reads (`date_string`, `enable_thinking`, ...).
    pub extra: serde_json::Map<String, Json>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

fn tojson(value: Value, kwargs: Kwargs) -> Result<String, Error> {
    let json: Json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut o = Dumps::default();
    if let Some(a) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        o.ensure_ascii = a;
    }
    if let Some(i) = kwargs.get::<Option<Value>>("indent")? {
        if let Some(n) = i.as_usize() {
            o.indent = Some(" ".repeat(n));
        } else if let Some(s) = i.as_str() {
            o.indent = Some(s.to_string());
        }
    }
    if let Some(seps) = kwargs.get::<Option<Vec<String>>>("separators")?
        && let [item, key] = seps.as_slice()
    {
        o.item_sep = item.clone();
        o.key_sep = key.clone();
    }
    if let Some(s) = kwargs.get::<Option<bool>>("sort_keys")? {
        o.sort_keys = s;
    }
    kwargs.assert_all_used()?;
    Ok(pyjson::dumps(&json, &o))
}

fn strftime_now(format: String) -> Result<String, Error> {
    use chrono::format::{Item, StrftimeItems};
    if StrftimeItems::new(&format).any(|i| matches!(i, Item::Error)) {
        return Err(Error::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format `{format}`")));
    }
    Ok(chrono::Local::now().format(&format).to_string())
}

fn line_of(e: &Error) -> usize {
    e.line().unwrap_or(0)
}

impl ChatTemplate {
    /// Compiles a template.
    pub fn new(source: &str) -> Result<ChatTemplate, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, format!("{RAISED}{msg}")))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string()).map_err(|e| TemplateError::Syntax {
            line: line_of(&e),
            message: e.detail().unwrap_or("").to_string(),
        })?;
        Ok(ChatTemplate { env })
    }

    /// Renders a conversation (OpenAI-style message objects).
    pub fn render(&self, messages: &[Json], opts: &RenderOptions) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError::Render { line: 0, message: e.to_string() })?;
        let mut ctx = serde_json::Map::new();
        for (k, v) in &opts.extra {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), Json::Array(messages.to_vec()));
        ctx.insert("tools".into(), opts.tools.clone().unwrap_or(Json::Null));
        ctx.insert("documents".into(), Json::Null);
        ctx.insert("add_generation_prompt".into(), Json::Bool(opts.add_generation_prompt));
        ctx.insert("bos_token".into(), opts.bos_token.clone().map_or(Json::Null, Json::String));
        ctx.insert("eos_token".into(), opts.eos_token.clone().map_or(Json::Null, Json::String));
        tmpl.render(Value::from_serialize(&ctx)).map_err(|e| {
            // The raise may be wrapped in the errors of enclosing blocks.
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = cur {
                let text = err.to_string();
                if let Some(i) = text.find(RAISED) {
                    let msg = &text[i + RAISED.len()..];
                    let msg = msg.split(" (in chat:").next().unwrap_or(msg);
                    return TemplateError::Raised(msg.trim().to_string());
                }
                cur = err.source();
            }
            TemplateError::Render {
                line: line_of(&e),
                message: e.detail().unwrap_or(&e.to_string()).to_string(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn raise_exception_becomes_a_clear_error() {
        let t = ChatTemplate::new("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok").unwrap();
        let err =
            t.render(&[json!({"role": "system", "content": "x"})], &RenderOptions::default()).unwrap_err();
        assert_eq!(err, TemplateError::Raised("System role not supported".into()));
        assert_eq!(
            t.render(&[json!({"role": "user", "content": "x"})], &RenderOptions::default()).unwrap(),
            "ok"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = ChatTemplate::new("line one\n{% if %}").unwrap_err();
        assert!(matches!(err, TemplateError::Syntax { line: 2, .. }), "{err:?}");
    }

    #[test]
    fn strftime_now_formats_today_and_refuses_bad_formats() {
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}").unwrap();
        let year = t.render(&[], &RenderOptions::default()).unwrap();
        assert_eq!(year.len(), 4);
        let bad = ChatTemplate::new("{{ strftime_now('%Q%') }}").unwrap();
        assert!(bad.render(&[], &RenderOptions::default()).is_err());
    }

    #[test]
    fn python_string_methods_and_tojson() {
        let t = ChatTemplate::new("{{ messages[0].content.strip().split(',')[1] }}|{{ {'a': 1.0, 'b': 'é'} | tojson }}|{{ [1] | tojson(indent=2) }}").unwrap();
        let out = t.render(&[json!({"content": "  x,y  "})], &RenderOptions::default()).unwrap();
        assert_eq!(out, "y|{\"a\": 1.0, \"b\": \"é\"}|[\n  1\n]");
    }
}
