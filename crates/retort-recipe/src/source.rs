//! Reading a recipe file safely: size cap before reading, no directories, UTF-8 only, no binary data.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Recipes are hand-written configuration; anything larger is a mistake (a dataset passed by accident).
pub const MAX_RECIPE_BYTES: u64 = 1024 * 1024;

/// The text of one recipe with a line index for turning byte offsets into positions.
#[derive(Debug, Clone)]
pub struct Source {
    /// The path as the user gave it (used in messages).
    pub path: PathBuf,
    /// The full text.
    pub text: String,
    line_starts: Vec<usize>,
}

/// A 1-based line and column (in characters) inside a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Position {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column, counted in Unicode scalar values.
    pub col: usize,
}

/// Why a file could not be read as a recipe. Each variant says what to do in its message.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The path does not exist.
    #[error("recipe file `{path}` does not exist")]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The path is a directory.
    #[error("`{path}` is a directory, not a recipe file")]
    IsDirectory {
        /// The path given.
        path: PathBuf,
    },
    /// The file is over [`MAX_RECIPE_BYTES`].
    #[error("recipe file `{path}` is {size} bytes; a recipe must be at most {max} bytes")]
    TooLarge {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The cap.
        max: u64,
    },
    /// The file is not UTF-8.
    #[error("recipe file `{path}` is not valid UTF-8 at {line}:{col} (byte {offset})")]
    NotUtf8 {
        /// The path given.
        path: PathBuf,
        /// Byte offset of the first invalid byte.
        offset: usize,
        /// Line of it.
        line: usize,
        /// Column of it.
        col: usize,
    },
    /// The file holds a NUL byte, so it is binary data rather than TOML.
    #[error("recipe file `{path}` looks like binary data (NUL byte at {line}:{col})")]
    Binary {
        /// The path given.
        path: PathBuf,
        /// Line of the NUL byte.
        line: usize,
        /// Column of it.
        col: usize,
    },
    /// The file is empty or only whitespace.
    #[error("recipe file `{path}` is empty")]
    Empty {
        /// The path given.
        path: PathBuf,
    },
    /// Any other I/O failure.
    #[error("cannot read recipe file `{path}`: {source}")]
    Io {
        /// The path given.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl ReadError {
    /// A hint telling the user how to fix the problem.
    pub fn hint(&self) -> Option<String> {
        match self {
            ReadError::NotFound { .. } => {
                Some("check the path, or create a starter recipe with `retort recipe new NAME`".into())
            }
            ReadError::IsDirectory { path } => {
                Some(format!("pass the `.toml` file inside it, e.g. `{}/recipe.toml`", path.display()))
            }
            ReadError::TooLarge { .. } => Some(
                "a recipe is configuration, not data; point `distill.inputs.path` at large files instead"
                    .into(),
            ),
            ReadError::NotUtf8 { .. } => Some("save the file as UTF-8".into()),
            ReadError::Binary { .. } => Some("a recipe is a TOML text file; check the path".into()),
            ReadError::Empty { .. } => {
                Some("start from a commented template with `retort recipe new NAME`".into())
            }
            ReadError::Io { .. } => None,
        }
    }
}

impl Source {
    /// Wraps text that is already in memory (tests, `retort recipe new`).
    pub fn from_text(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        let text = text.into();
        let line_starts = line_starts(text.as_bytes());
        Source { path: path.into(), text, line_starts }
    }

    /// Reads a recipe file, refusing directories, oversized files, non-UTF-8 and binary data
    /// before any parsing happens.
    pub fn read(path: &Path) -> Result<Self, ReadError> {
        let owned = || path.to_path_buf();
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ReadError::NotFound { path: owned() },
            _ => ReadError::Io { path: owned(), source: e },
        })?;
        if meta.is_dir() {
            return Err(ReadError::IsDirectory { path: owned() });
        }
        if meta.len() > MAX_RECIPE_BYTES {
            return Err(ReadError::TooLarge { path: owned(), size: meta.len(), max: MAX_RECIPE_BYTES });
        }
        let file = std::fs::File::open(path).map_err(|e| ReadError::Io { path: owned(), source: e })?;
        // The size may change between stat and read (or the file may be a pipe): cap the read too.
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_RECIPE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| ReadError::Io { path: owned(), source: e })?;
        if bytes.len() as u64 > MAX_RECIPE_BYTES {
            return Err(ReadError::TooLarge {
                path: owned(),
                size: bytes.len() as u64,
                max: MAX_RECIPE_BYTES,
            });
        }
        let starts = line_starts(&bytes);
        let pos = |offset: usize| position_in(&bytes, &starts, offset);
        if let Some(nul) = bytes.iter().position(|&b| b == 0) {
            let p = pos(nul);
            return Err(ReadError::Binary { path: owned(), line: p.line, col: p.col });
        }
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let offset = e.utf8_error().valid_up_to();
                let p = position_in(e.as_bytes(), &starts, offset);
                return Err(ReadError::NotUtf8 { path: owned(), offset, line: p.line, col: p.col });
            }
        };
        if text.trim().is_empty() {
            return Err(ReadError::Empty { path: owned() });
        }
        Ok(Source { path: owned(), text, line_starts: starts })
    }

    /// The directory relative paths in this recipe are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// Line and column of a byte offset (clamped to the text).
    pub fn position(&self, offset: usize) -> Position {
        position_in(self.text.as_bytes(), &self.line_starts, offset)
    }

    /// The text of a 1-based line without its line terminator.
    pub fn line_text(&self, line: usize) -> &str {
        let Some(&start) = self.line_starts.get(line.saturating_sub(1)) else { return "" };
        let end = self.line_starts.get(line).copied().unwrap_or(self.text.len());
        let raw = self.text.get(start..end).unwrap_or("");
        raw.trim_end_matches(['\n', '\r'])
    }

    /// The number of lines.
    pub fn line_count(&self) -> usize {
        self.line_starts.len()
    }
}

fn line_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = vec![0];
    starts.extend(bytes.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i + 1));
    starts
}

fn position_in(bytes: &[u8], starts: &[usize], offset: usize) -> Position {
    let offset = offset.min(bytes.len());
    let line_idx = match starts.binary_search(&offset) {
        Ok(i) => i,
        Err(i) => i - 1,
    };
    let line_start = starts[line_idx];
    // Count characters, not bytes; invalid UTF-8 is counted byte-wise (only used for NotUtf8 positions).
    let prefix = &bytes[line_start..offset];
    let col = match std::str::from_utf8(prefix) {
        Ok(s) => s.chars().count(),
        Err(_) => prefix.len(),
    } + 1;
    Position { line: line_idx + 1, col }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_characters() {
        let src = Source::from_text("x.toml", "a = 1\n# é\nb = \"é\" # x\n");
        assert_eq!(src.position(0), Position { line: 1, col: 1 });
        assert_eq!(src.position(6), Position { line: 2, col: 1 });
        // "b = \"é\" " : the `#` after é is at byte 10+... count chars.
        let hash = src.text.rfind('#').unwrap();
        assert_eq!(src.position(hash), Position { line: 3, col: 9 });
        assert_eq!(src.line_text(2), "# é");
        assert_eq!(src.line_text(99), "");
    }
}
