//! Errors of loading and running models.

use std::path::PathBuf;

/// What can go wrong building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// config.json is missing or invalid.
    #[error(transparent)]
    Config(#[from] retort_hf::ConfigError),
    /// The weights could not be read.
    #[error(transparent)]
    Weights(#[from] retort_hf::WeightsError),
    /// The checkpoint does not match the config: missing tensors or wrong shapes.
    #[error("the weights in `{}` do not match its config.json: {report}", dir.display())]
    Incomplete {
        /// The model directory.
        dir: PathBuf,
        /// What was found.
        report: retort_hf::LoadReport,
    },
    /// A built-in model could not be written.
    #[error("builtin:{name}: {message}")]
    Builtin {
        /// The built-in model.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// An input the model cannot take.
    #[error("{0}")]
    Input(String),
}
