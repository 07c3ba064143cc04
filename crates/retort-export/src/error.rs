//! The one error type of this crate. Every message says what went wrong and where (file, tensor, key);
//! [`ExportError::hint`] says how to fix it.

use std::path::{Path, PathBuf};

use retort_hf::{ConfigError, WeightsError};

/// Something that stops an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The base model's `config.json` is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The base model's safetensors are missing or invalid.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// A file could not be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An output could not be written (permissions, disk full, ...). Nothing is left under its name.
    #[error("cannot write `{}`: {source}", path.display())]
    Write {
        /// The output file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The base checkpoint lacks tensors its config needs, or has them in another shape.
    #[error("the base model in `{}` does not match its config.json: {report}", dir.display())]
    BaseIncomplete {
        /// The model directory.
        dir: PathBuf,
        /// What loading found (missing and wrongly shaped tensors).
        report: String,
    },
    /// The adapter directory or its config is unusable.
    #[error("adapter `{}`: {problem}", path.display())]
    Adapter {
        /// The adapter directory or file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
        /// How to fix it.
        hint: String,
    },
    /// An adapter tensor does not fit the base model (usually: an adapter trained on another base).
    #[error(
        "adapter tensor `{tensor}` does not fit the base model: expected shape {expected:?}, found {found:?}"
    )]
    AdapterShape {
        /// The adapter tensor.
        tensor: String,
        /// The shape the base model implies.
        expected: Vec<usize>,
        /// The shape in the adapter.
        found: Vec<usize>,
        /// The adapter's `base_model_name_or_path`, if it says.
        trained_on: Option<String>,
    },
    /// An adapter tensor names a module the base model does not have.
    #[error("adapter tensor `{tensor}` targets `{module}`, which the base model ({arch}) does not have")]
    AdapterModule {
        /// The adapter tensor.
        tensor: String,
        /// The module path it targets.
        module: String,
        /// The base model's architecture.
        arch: String,
        /// The adapter's `base_model_name_or_path`, if it says.
        trained_on: Option<String>,
    },
    /// A format cannot represent what this model or adapter contains.
    #[error("cannot write {format}: {reason}")]
    Unsupported {
        /// The output format (`gguf:q4_k_m`, `gguf-adapter`, ...).
        format: String,
        /// Why not.
        reason: String,
        /// What to do instead.
        hint: String,
    },
    /// A GGUF tensor type or mix name retort does not write.
    #[error("`{found}` is not a GGUF type retort writes; valid: {}", valid.join(", "))]
    UnknownQuantType {
        /// What was asked for.
        found: String,
        /// The valid names.
        valid: Vec<&'static str>,
    },
    /// A tokenizer file is missing or not understood.
    #[error("tokenizer `{}`: {problem}", path.display())]
    Tokenizer {
        /// The file (or directory when a file is missing).
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A GGUF file is malformed.
    #[error("`{}` is not a valid GGUF file: {problem}", path.display())]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the byte offset where it helps.
        problem: String,
    },
    /// A GGUF file does not hold the model it is read as (another architecture, missing tensors).
    #[error("`{}` does not hold this model: {problem}", path.display())]
    GgufMismatch {
        /// The file.
        path: PathBuf,
        /// What does not fit.
        problem: String,
        /// How to fix it.
        hint: String,
    },
    /// A tensor holds NaN or infinite values.
    #[error("tensor `{tensor}` has {count} non-finite values (NaN or infinity){}", source_hint(.origin))]
    NonFinite {
        /// The tensor.
        tensor: String,
        /// How many values are not finite.
        count: usize,
        /// Where the values came from (base or adapter file).
        origin: Option<PathBuf>,
    },
    /// A written output failed its read-back check. The file was written; it must not be shipped.
    #[error("read-back check of `{}` failed: {problem}", path.display())]
    Lint {
        /// The output.
        path: PathBuf,
        /// What the check found.
        problem: String,
    },
}

fn source_hint(origin: &Option<PathBuf>) -> String {
    match origin {
        Some(p) => format!(" (from `{}`)", p.display()),
        None => String::new(),
    }
}

impl ExportError {
    /// Shorthand for a read error.
    pub(crate) fn read(path: &Path, source: std::io::Error) -> ExportError {
        ExportError::Read { path: path.to_path_buf(), source }
    }

    /// Shorthand for a malformed GGUF file.
    pub(crate) fn gguf(path: &Path, problem: impl Into<String>) -> ExportError {
        ExportError::Gguf { path: path.to_path_buf(), problem: problem.into() }
    }

    /// Shorthand for a tokenizer problem.
    pub(crate) fn tokenizer(path: &Path, problem: impl Into<String>) -> ExportError {
        ExportError::Tokenizer { path: path.to_path_buf(), problem: problem.into() }
    }

    /// Shorthand for a write error.
    pub(crate) fn write(path: &Path, source: std::io::Error) -> ExportError {
        ExportError::Write { path: path.to_path_buf(), source }
    }

    /// How to fix it, when there is something to say beyond the message.
    pub fn hint(&self) -> Option<String> {
        match self {
            ExportError::Config(_) => {
                Some("`--base` must be a Hugging Face model directory (config.json, *.safetensors)".into())
            }
            ExportError::Weights(_) => Some(
                "the base directory needs model.safetensors, or shards with model.safetensors.index.json"
                    .into(),
            ),
            ExportError::Write { source, .. } => Some(match source.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    "choose a directory you can write to with `--out`, or fix its permissions".into()
                }
                std::io::ErrorKind::StorageFull => {
                    "free disk space or choose another `--out`; nothing was left under the output's name"
                        .into()
                }
                _ => "check that the output directory exists and is writable".into(),
            }),
            ExportError::BaseIncomplete { .. } => {
                Some("the checkpoint is truncated or belongs to another model; download it again".into())
            }
            ExportError::Adapter { hint, .. }
            | ExportError::Unsupported { hint, .. }
            | ExportError::GgufMismatch { hint, .. } => Some(hint.clone()),
            ExportError::AdapterShape { trained_on, .. } | ExportError::AdapterModule { trained_on, .. } => {
                Some(match trained_on {
                    Some(b) => format!(
                        "the adapter says it was trained on `{b}`; export it with that base (`--base DIR`)"
                    ),
                    None => "export the adapter with the base model it was trained on (`--base DIR`)".into(),
                })
            }
            ExportError::UnknownQuantType { .. } => {
                Some("q4_k_m is the usual choice; q8_0 is nearly lossless; f16 is unquantized".into())
            }
            ExportError::Tokenizer { .. } => Some(
                "the base directory needs tokenizer.json or tokenizer.model (and tokenizer_config.json) from the model's hub page"
                    .into(),
            ),
            ExportError::NonFinite { .. } => Some(
                "the adapter or base holds NaN/inf (diverged training?); retrain or use an earlier checkpoint"
                    .into(),
            ),
            ExportError::Lint { .. } => Some("this is a bug in retort's writer; please report it".into()),
            ExportError::Read { .. } | ExportError::Gguf { .. } => None,
        }
    }

    /// True when the problem is the input (exit 1) rather than a bug or the environment.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, ExportError::Lint { .. })
    }
}

/// Shorthand result type.
pub type Result<T> = std::result::Result<T, ExportError>;
