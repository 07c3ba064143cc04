//! Dataset files: JSONL, one conversation per line, in the formats of DESIGN §5. OpenAI messages are
//! canonical; ShareGPT, Alpaca and prompt/completion rows are read into the same [`Conversation`].
//!
//! With `auto`, the first non-empty row that names a format's keys decides it, and every row is then
//! held to that format. Empty lines are ignored and a UTF-8 BOM is accepted. Every problem names the
//! file and 1-based line; `on_bad_row = "skip"` counts skipped rows by reason instead of stopping.

use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use retort_recipe::schema::distill::DatasetFormat;
use retort_recipe::schema::train::OnBadRow;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::labels::ExampleError;
use crate::report::{Reason, Skips};

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the model (OpenAI `developer` is read as this).
    System,
    /// The user.
    User,
    /// The model: these turns are learned.
    Assistant,
    /// A tool's result.
    Tool,
}

impl Role {
    /// The OpenAI role name chat templates test for.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// The text (content parts joined).
    pub content: String,
    /// Every other field of the message, passed to the chat template unchanged: `tool_calls`,
    /// `tool_call_id`, `name`, `reasoning_content`, ...
    pub extra: Map<String, Value>,
}

impl Message {
    /// A message with no extra fields.
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message { role, content: content.into(), extra: Map::new() }
    }

    /// The OpenAI-style object a chat template reads.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("role".into(), Value::String(self.role.as_str().into()));
        m.insert("content".into(), Value::String(self.content.clone()));
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }
}

/// One dataset row as a conversation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conversation {
    /// The messages in order; at least one is an assistant turn.
    pub messages: Vec<Message>,
    /// The row's `tools` (OpenAI function schemas), passed to the chat template.
    pub tools: Option<Value>,
    /// 1-based line in the file.
    pub line: usize,
}

/// What is wrong with one row.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    /// The line is not UTF-8.
    #[error("not UTF-8 text")]
    NotUtf8,
    /// The line is not JSON.
    #[error("not JSON: {message} at column {column}")]
    NotJson {
        /// 1-based column where serde_json stopped.
        column: usize,
        /// What serde_json said.
        message: String,
    },
    /// `auto` could not tell the format from the row's keys.
    #[error("cannot tell the dataset format from this row (keys: {keys})")]
    UnknownFormat {
        /// The row's keys, or what the row is when not an object.
        keys: String,
    },
    /// JSON, but not the shape of the format.
    #[error("wrong shape for `{}`: {message}{}", format_name(*.format), mismatch(*.looks_like, *.format, *.detected_at))]
    Shape {
        /// The format the row was read as.
        format: DatasetFormat,
        /// What is wrong, with the JSON path.
        message: String,
        /// The format the row's keys suggest, when another.
        looks_like: Option<DatasetFormat>,
        /// The line `auto` detected the format from.
        detected_at: Option<usize>,
    },
    /// No assistant turn to learn from.
    #[error("the conversation has no assistant turn to learn from")]
    NoAssistant,
    /// Rendering or tokenizing failed.
    #[error(transparent)]
    Example(#[from] ExampleError),
}

fn mismatch(looks_like: Option<DatasetFormat>, format: DatasetFormat, detected_at: Option<usize>) -> String {
    match (looks_like.filter(|l| *l != format), detected_at) {
        (Some(l), Some(at)) => {
            format!(" (the row looks like `{}`, but line {at} set the format)", format_name(l))
        }
        (Some(l), None) => format!(" (the row looks like `{}`)", format_name(l)),
        _ => String::new(),
    }
}

impl RowError {
    /// The reason it is counted under when skipped.
    pub fn reason(&self) -> Reason {
        match self {
            RowError::NotUtf8 | RowError::NotJson { .. } => Reason::NotJson,
            RowError::UnknownFormat { .. } | RowError::Shape { .. } => Reason::WrongShape,
            RowError::NoAssistant => Reason::NoAssistant,
            RowError::Example(e) => e.reason(),
        }
    }

    /// How to fix it.
    pub fn hint(&self) -> String {
        match self {
            RowError::NotUtf8 => "save the file as UTF-8".into(),
            RowError::NotJson { .. } => "each line must be one complete JSON object: look for an object spread \
                 over several lines, a trailing comma, or an unescaped quote"
                .into(),
            RowError::UnknownFormat { .. } => "rows need `messages` (OpenAI), `conversations` (ShareGPT), \
                 `instruction` and `output` (Alpaca), or `prompt` and `completion`; or set `train.data_format`"
                .into(),
            RowError::Shape { format, looks_like, .. } => {
                let mut h = format!("a `{}` row looks like {}", format_name(*format), example(*format));
                if let Some(l) = looks_like.filter(|l| l != format) {
                    h.push_str(&format!("; to read this file as `{}`, set `train.data_format`", format_name(l)));
                }
                h
            }
            RowError::NoAssistant => {
                "add the answer as an assistant message (role `assistant`; ShareGPT `gpt`)".into()
            }
            RowError::Example(e) => e.hint(),
        }
    }
}

/// Why a dataset file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file cannot be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file has no rows.
    #[error("`{}` is empty: it has no rows", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// One row is bad (policy `fail`).
    #[error("{}:{line}: {problem}", path.display())]
    Row {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        problem: RowError,
    },
    /// Every row was skipped or dropped.
    #[error("`{}` has nothing left to train on:\n{summary}", path.display())]
    NothingUsable {
        /// The file.
        path: PathBuf,
        /// What was left out and why.
        summary: String,
    },
}

impl DataError {
    /// How to fix it.
    pub fn hint(&self) -> String {
        match self {
            DataError::Io { .. } => {
                "check the path in the recipe (paths are relative to the recipe file)".into()
            }
            DataError::Empty { .. } => {
                "check the path, or run `retort distill` to write the dataset first".into()
            }
            DataError::Row { problem, .. } => format!(
                "{}; or set `train.on_bad_row = \"skip\"` to skip such rows (they are counted)",
                problem.hint()
            ),
            DataError::NothingUsable { .. } => {
                "fix the rows named above, or raise `train.max_seq_len` if examples were too long".into()
            }
        }
    }
}

/// What reading a file found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReadReport {
    /// The file.
    pub path: PathBuf,
    /// The format rows were read as (`auto` only when no row named one).
    pub format: DatasetFormat,
    /// The line `auto` detected the format from.
    pub detected_at: Option<usize>,
    /// Non-empty lines.
    pub rows: usize,
    /// Conversations read.
    pub conversations: usize,
    /// Rows skipped, by reason (policy `skip`).
    pub skipped: Skips,
}

impl fmt::Display for ReadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} rows as `{}`, {} read, {} skipped",
            self.path.display(),
            self.rows,
            format_name(self.format),
            self.conversations,
            self.skipped.total()
        )
    }
}

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

fn example(format: DatasetFormat) -> &'static str {
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

fn unknown(row: &Value) -> RowError {
    let keys = match row.as_object() {
        Some(o) if o.is_empty() => "none".into(),
        Some(o) => o.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
        None => format!("none: the row is {}", kind(row)),
    };
    RowError::UnknownFormat { keys }
}

/// serde_json's message without its ` at line 1 column N` suffix.
fn json_error(e: &serde_json::Error) -> RowError {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = text.strip_suffix(&suffix).unwrap_or(&text).to_string();
    RowError::NotJson { column: e.column(), message }
}

/// Reads a JSONL dataset: the conversations, and what was skipped (policy `skip`) or the first bad
/// row (policy `fail`).
pub fn read_jsonl(
    path: &Path,
    format: DatasetFormat,
    on_bad_row: OnBadRow,
) -> Result<(Vec<Conversation>, ReadReport), DataError> {
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut reader = std::io::BufReader::new(file);
    let mut report = ReadReport {
        path: path.to_path_buf(),
        format,
        detected_at: None,
        rows: 0,
        conversations: 0,
        skipped: Skips::default(),
    };
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(io)? == 0 {
            break;
        }
        line += 1;
        let mut bytes = buf.as_slice();
        if line == 1 {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        report.rows += 1;
        match read_row(bytes, line, &mut report) {
            Ok(c) => out.push(c),
            Err(problem) => match on_bad_row {
                OnBadRow::Fail => return Err(DataError::Row { path: path.to_path_buf(), line, problem }),
                OnBadRow::Skip => report.skipped.add(problem.reason(), line, || problem.to_string()),
            },
        }
    }
    report.conversations = out.len();
    if report.rows == 0 {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    if out.is_empty() {
        return Err(DataError::NothingUsable {
            path: path.to_path_buf(),
            summary: format!("all {} rows were skipped:\n{}", report.rows, report.skipped),
        });
    }
    Ok((out, report))
}

fn read_row(bytes: &[u8], line: usize, report: &mut ReadReport) -> Result<Conversation, RowError> {
    let text = std::str::from_utf8(bytes).map_err(|_| RowError::NotUtf8)?;
    let value: Value = serde_json::from_str(text).map_err(|e| json_error(&e))?;
    if report.format == DatasetFormat::Auto {
        report.format = detect_format(&value).ok_or_else(|| unknown(&value))?;
        report.detected_at = Some(line);
    }
    parse_row(&value, report.format, line).map_err(|e| match e {
        RowError::Shape { format, message, looks_like, .. } => {
            RowError::Shape { format, message, looks_like, detected_at: report.detected_at }
        }
        e => e,
    })
}
