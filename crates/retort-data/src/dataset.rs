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

pub use crate::formats::{detect_format, format_name, parse_row};
use crate::formats::{example, unknown};
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

/// serde_json's message without its ` at line 1 column N` suffix.
fn json_error(e: &serde_json::Error) -> RowError {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = text.strip_suffix(&suffix).unwrap_or(&text).to_string();
    RowError::NotJson { column: e.column(), message }
}

/// One row: its conversation, or what is wrong with it.
pub type RowResult = Result<Conversation, RowError>;

/// A JSONL dataset read one row at a time, in file order, so a caller can act on each row as it
/// comes (the first bad row of a file is the first one met).
#[derive(Debug)]
pub struct JsonlRows {
    path: PathBuf,
    reader: std::io::BufReader<std::fs::File>,
    buf: Vec<u8>,
    line: usize,
    format: DatasetFormat,
    detected_at: Option<usize>,
    rows: usize,
}

impl JsonlRows {
    /// Opens a file whose rows are in `format` (`auto`: the first row that names a format's keys
    /// decides it for the whole file).
    pub fn open(path: &Path, format: DatasetFormat) -> Result<JsonlRows, DataError> {
        let file =
            std::fs::File::open(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
        Ok(JsonlRows {
            path: path.to_path_buf(),
            reader: std::io::BufReader::new(file),
            buf: Vec::new(),
            line: 0,
            format,
            detected_at: None,
            rows: 0,
        })
    }

    /// The next non-empty row: its 1-based line, and its conversation or what is wrong with it.
    /// `None` at the end of the file.
    pub fn next_row(&mut self) -> Result<Option<(usize, RowResult)>, DataError> {
        loop {
            self.buf.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.buf)
                .map_err(|source| DataError::Io { path: self.path.clone(), source })?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            let mut bytes = std::mem::take(&mut self.buf);
            let mut text = bytes.as_slice();
            if self.line == 1 {
                text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
            }
            // Without its line ending, serde_json's column for a truncated row is on this line.
            text = text.strip_suffix(b"\n").unwrap_or(text);
            text = text.strip_suffix(b"\r").unwrap_or(text);
            if text.iter().all(u8::is_ascii_whitespace) {
                self.buf = bytes;
                continue;
            }
            self.rows += 1;
            let row = self.parse(text);
            bytes.clear();
            self.buf = bytes;
            return Ok(Some((self.line, row)));
        }
    }

    fn parse(&mut self, bytes: &[u8]) -> Result<Conversation, RowError> {
        let text = std::str::from_utf8(bytes).map_err(|_| RowError::NotUtf8)?;
        let value: Value = serde_json::from_str(text).map_err(|e| json_error(&e))?;
        if self.format == DatasetFormat::Auto {
            self.format = detect_format(&value).ok_or_else(|| unknown(&value))?;
            self.detected_at = Some(self.line);
        }
        parse_row(&value, self.format, self.line).map_err(|e| match e {
            RowError::Shape { format, message, looks_like, .. } => {
                RowError::Shape { format, message, looks_like, detected_at: self.detected_at }
            }
            e => e,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format rows are read as (`auto` until a row names one).
    pub fn format(&self) -> DatasetFormat {
        self.format
    }

    /// Non-empty lines read so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Applies the `on_bad_row` policy to a bad row: an error for `fail`, counted in `skipped` for
    /// `skip`.
    pub fn bad_row(
        &self,
        line: usize,
        problem: RowError,
        on_bad_row: OnBadRow,
        skipped: &mut Skips,
    ) -> Result<(), DataError> {
        match on_bad_row {
            OnBadRow::Fail => Err(DataError::Row { path: self.path.clone(), line, problem }),
            OnBadRow::Skip => {
                skipped.add(problem.reason(), line, || problem.to_string());
                Ok(())
            }
        }
    }
}

/// Reads a JSONL dataset: the conversations, and what was skipped (policy `skip`) or the first bad
/// row (policy `fail`).
pub fn read_jsonl(
    path: &Path,
    format: DatasetFormat,
    on_bad_row: OnBadRow,
) -> Result<(Vec<Conversation>, ReadReport), DataError> {
    let mut rows = JsonlRows::open(path, format)?;
    let mut skipped = Skips::default();
    let mut out = Vec::new();
    while let Some((line, row)) = rows.next_row()? {
        match row {
            Ok(c) => out.push(c),
            Err(problem) => rows.bad_row(line, problem, on_bad_row, &mut skipped)?,
        }
    }
    if rows.rows == 0 {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    if out.is_empty() {
        return Err(DataError::NothingUsable {
            path: path.to_path_buf(),
            summary: format!("all {} rows were skipped:\n{skipped}", rows.rows),
        });
    }
    let report = ReadReport {
        path: path.to_path_buf(),
        format: rows.format,
        detected_at: rows.detected_at,
        rows: rows.rows,
        conversations: out.len(),
        skipped,
    };
    Ok((out, report))
}
