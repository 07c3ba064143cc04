//! The dataset formats of DESIGN §5, row by row: OpenAI messages (canonical), ShareGPT, Alpaca and
//! prompt/completion, each read into a [`Conversation`]. Every problem names its JSON path.

use retort_recipe::schema::distill::DatasetFormat;
use serde_json::{Map, Value};

use crate::dataset::{Conversation, Message, Role, RowError};

/// The recipe's name of a format.
pub fn format_name(format: DatasetFormat) -> &'static str {
    match format {
        DatasetFormat::Auto => "auto",
        DatasetFormat::Messages => "messages",
        DatasetFormat::Sharegpt => "sharegpt",
        DatasetFormat::Alpaca => "alpaca",
        DatasetFormat::PromptCompletion => "prompt-completion",
    }
}

pub(crate) fn example(format: DatasetFormat) -> &'static str {
    match format {
        DatasetFormat::Auto | DatasetFormat::Messages => {
            r#"{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}"#
        }
        DatasetFormat::Sharegpt => {
            r#"{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}"#
        }
        DatasetFormat::Alpaca => {
            r#"{"instruction": "...", "input": "...", "output": "..."} (`input` and `system` optional)"#
        }
        DatasetFormat::PromptCompletion => {
            r#"{"prompt": "...", "completion": "..."} (`prompt` may also be a list of messages)"#
        }
    }
}

/// The format a row's keys name: `messages`, `conversations`, `prompt`/`completion`, then
/// `instruction`/`output`.
pub fn detect_format(row: &Value) -> Option<DatasetFormat> {
    let o = row.as_object()?;
    if o.contains_key("messages") {
        Some(DatasetFormat::Messages)
    } else if o.contains_key("conversations") {
        Some(DatasetFormat::Sharegpt)
    } else if o.contains_key("prompt") || o.contains_key("completion") {
        Some(DatasetFormat::PromptCompletion)
    } else if o.contains_key("instruction") || o.contains_key("output") {
        Some(DatasetFormat::Alpaca)
    } else {
        None
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Text of a `content`: a string, null (empty), or a list of `{"type": "text", "text": ...}` parts
/// joined with `\n`, as vLLM joins them when serving, so training and serving see the same text.
fn content(v: &Value, at: &str) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                let ty = p.get("type").and_then(Value::as_str);
                match (ty, p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                    (Some(t), _) if t != "text" => {
                        return Err(format!(
                            "`{at}[{j}]` is a `{t}` part; only text parts can be trained on"
                        ));
                    }
                    _ => {
                        return Err(format!(
                            "`{at}[{j}]` must be a text part like {{\"type\": \"text\", \"text\": \"...\"}}"
                        ));
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        other => Err(format!("`{at}` must be a string or a list of text parts, not {}", kind(other))),
    }
}

/// A list of OpenAI messages at `at`.
fn openai_messages(v: &Value, at: &str) -> Result<Vec<Message>, String> {
    let list = v.as_array().ok_or_else(|| format!("`{at}` must be a list of messages, not {}", kind(v)))?;
    if list.is_empty() {
        return Err(format!("`{at}` is an empty list"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let here = format!("{at}[{i}]");
        let obj = m.as_object().ok_or_else(|| format!("`{here}` must be an object, not {}", kind(m)))?;
        let role = match obj.get("role") {
            Some(Value::String(r)) => match r.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => {
                    return Err(format!(
                        "`{here}.role` is \"{other}\"; use \"system\", \"user\", \"assistant\" or \"tool\""
                    ));
                }
            },
            Some(other) => return Err(format!("`{here}.role` must be a string, not {}", kind(other))),
            None => return Err(format!("`{here}` has no `role`")),
        };
        let text = match obj.get("content") {
            Some(c) => content(c, &format!("{here}.content"))?,
            None if obj.contains_key("tool_calls") => String::new(),
            None => return Err(format!("`{here}` has no `content`")),
        };
        let extra: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| *k != "role" && *k != "content")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.push(Message { role, content: text, extra });
    }
    Ok(out)
}

fn sharegpt(v: &Value) -> Result<Vec<Message>, String> {
    let list = v.as_array().ok_or_else(|| format!("`conversations` must be a list, not {}", kind(v)))?;
    if list.is_empty() {
        return Err("`conversations` is an empty list".into());
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let here = format!("conversations[{i}]");
        let obj = m.as_object().ok_or_else(|| format!("`{here}` must be an object, not {}", kind(m)))?;
        let role = match obj.get("from").and_then(Value::as_str) {
            Some("system") => Role::System,
            Some("human" | "user") => Role::User,
            Some("gpt" | "assistant") => Role::Assistant,
            Some("tool") => Role::Tool,
            Some(other) => {
                return Err(format!(
                    "`{here}.from` is \"{other}\"; use \"system\", \"human\", \"gpt\" or \"tool\""
                ));
            }
            None => return Err(format!("`{here}` needs a string `from`")),
        };
        let text = match obj.get("value") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(format!("`{here}.value` must be a string, not {}", kind(other))),
            None => return Err(format!("`{here}` has no `value`")),
        };
        let extra: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| *k != "from" && *k != "value")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.push(Message { role, content: text, extra });
    }
    Ok(out)
}

fn string_field(o: &Map<String, Value>, key: &str, required: bool) -> Result<Option<String>, String> {
    match o.get(key) {
        Some(Value::String(s)) => Ok(Some(s.clone())),
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => Err(format!("no `{key}`")),
        Some(other) => Err(format!("`{key}` must be a string, not {}", kind(other))),
    }
}

/// Alpaca: the user turn is `instruction + "\n\n" + input` (transformers' and Stanford Alpaca's join),
/// or whichever of the two is not empty.
fn alpaca(o: &Map<String, Value>) -> Result<Vec<Message>, String> {
    let instruction = string_field(o, "instruction", true)?.unwrap_or_default();
    let input = string_field(o, "input", false)?.unwrap_or_default();
    let output = string_field(o, "output", true)?.unwrap_or_default();
    let system = string_field(o, "system", false)?.unwrap_or_default();
    let user = match (instruction.is_empty(), input.is_empty()) {
        (_, true) => instruction,
        (true, false) => input,
        (false, false) => format!("{instruction}\n\n{input}"),
    };
    let mut out = Vec::with_capacity(3);
    if !system.is_empty() {
        out.push(Message::new(Role::System, system));
    }
    out.push(Message::new(Role::User, user));
    out.push(Message::new(Role::Assistant, output));
    Ok(out)
}

fn prompt_completion(o: &Map<String, Value>) -> Result<Vec<Message>, String> {
    let mut out = match o.get("prompt") {
        Some(Value::String(s)) => vec![Message::new(Role::User, s.clone())],
        Some(v @ Value::Array(_)) => openai_messages(v, "prompt")?,
        Some(other) => {
            return Err(format!("`prompt` must be a string or a list of messages, not {}", kind(other)));
        }
        None => return Err("no `prompt`".into()),
    };
    match o.get("completion") {
        Some(Value::String(s)) => out.push(Message::new(Role::Assistant, s.clone())),
        Some(v @ Value::Array(_)) => out.extend(openai_messages(v, "completion")?),
        Some(other) => {
            return Err(format!("`completion` must be a string or a list of messages, not {}", kind(other)));
        }
        None => return Err("no `completion`".into()),
    }
    Ok(out)
}

fn tools(o: &Map<String, Value>) -> Result<Option<Value>, String> {
    match o.get("tools") {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Array(_)) => Ok(Some(v.clone())),
        Some(other) => Err(format!("`tools` must be a list of function schemas, not {}", kind(other))),
    }
}

/// Reads one row as a conversation in `format` (`auto` detects it from this row alone).
pub fn parse_row(row: &Value, format: DatasetFormat, line: usize) -> Result<Conversation, RowError> {
    let format = match format {
        DatasetFormat::Auto => detect_format(row).ok_or_else(|| unknown(row))?,
        f => f,
    };
    let shape = |message: String| RowError::Shape {
        format,
        message,
        looks_like: detect_format(row),
        detected_at: None,
    };
    let o =
        row.as_object().ok_or_else(|| shape(format!("the row must be a JSON object, not {}", kind(row))))?;
    let (messages, tools) = match format {
        DatasetFormat::Auto | DatasetFormat::Messages => {
            let m = o.get("messages").ok_or_else(|| shape("no `messages` list".into()))?;
            (openai_messages(m, "messages").map_err(shape)?, tools(o).map_err(shape)?)
        }
        DatasetFormat::Sharegpt => {
            let c = o.get("conversations").ok_or_else(|| shape("no `conversations` list".into()))?;
            (sharegpt(c).map_err(shape)?, None)
        }
        DatasetFormat::Alpaca => (alpaca(o).map_err(shape)?, None),
        DatasetFormat::PromptCompletion => (prompt_completion(o).map_err(shape)?, tools(o).map_err(shape)?),
    };
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err(RowError::NoAssistant);
    }
    Ok(Conversation { messages, tools, line })
}

pub(crate) fn unknown(row: &Value) -> RowError {
    let keys = match row.as_object() {
        Some(o) if o.is_empty() => "none".into(),
        Some(o) => o.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
        None => format!("none: the row is {}", kind(row)),
    };
    RowError::UnknownFormat { keys }
}
