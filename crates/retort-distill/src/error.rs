//! What can stop a distill run, each with where it happened and how to fix it.

use std::path::PathBuf;

use retort_teacher::TeacherError;

/// Why `distill` stopped.
#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    /// The teacher failed as a whole (key, quota, budget, stall, replay miss) while answering an
    /// input.
    #[error("{source} (while answering {input})")]
    Teacher {
        /// Which input: its id and where it came from.
        input: String,
        /// What the teacher said.
        source: TeacherError,
    },
    /// The teacher could not even be set up.
    #[error(transparent)]
    Setup(#[from] TeacherError),
    /// An input file is unreadable or a row lacks the input field.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Input {
        /// The file.
        path: PathBuf,
        /// 1-based line, when one line is at fault.
        line: Option<usize>,
        /// What is wrong.
        message: String,
        /// How to fix it.
        hint: String,
    },
    /// A prompt template failed to render.
    #[error("`{key}` cannot be rendered for {input}: {message}")]
    Template {
        /// The recipe key of the template.
        key: &'static str,
        /// Which input.
        input: String,
        /// What went wrong.
        message: String,
    },
    /// The recipe asks for something this run cannot do (token bounds without a local tokenizer,
    /// an unreadable schema file, ...).
    #[error("{message}")]
    Config {
        /// What is wrong.
        message: String,
        /// How to fix it.
        hint: String,
    },
    /// An output file could not be written.
    #[error("cannot write `{}`: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl DistillError {
    /// How to fix it.
    pub fn hint(&self) -> Option<String> {
        match self {
            DistillError::Teacher { source, .. } | DistillError::Setup(source) => source.hint(),
            DistillError::Input { hint, .. } | DistillError::Config { hint, .. } => Some(hint.clone()),
            DistillError::Template { .. } => Some(
                "templates use Jinja syntax; `{{ input }}` and the input row's fields are available".into(),
            ),
            DistillError::Write { .. } => {
                Some("check that the data directory is writable and the disk is not full".into())
            }
        }
    }

    /// True when running the same command again continues the work (a budget or time limit).
    pub fn is_resumable(&self) -> bool {
        match self {
            DistillError::Teacher { source, .. } | DistillError::Setup(source) => source.is_resumable(),
            _ => false,
        }
    }
}
