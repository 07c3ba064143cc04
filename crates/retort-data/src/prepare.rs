//! One dataset file to training rows: read, encode, build rows, with one report of everything that
//! was skipped, cut or dropped.

use std::fmt;
use std::path::{Path, PathBuf};

use retort_recipe::schema::distill::DatasetFormat;
use retort_recipe::schema::train::{LossOn, OnBadRow, TooLong, Train};
use serde::Serialize;

use crate::dataset::{DataError, JsonlRows, RowError, format_name};
use crate::labels::encode;
use crate::pack::{PackReport, Row, build_rows};
use crate::report::Skips;
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;

/// How to turn a file into rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrepareOptions {
    /// Dataset format (`auto` detects it).
    pub format: DatasetFormat,
    /// Bad rows: stop, or skip and count.
    pub on_bad_row: OnBadRow,
    /// Which tokens carry loss.
    pub loss_on: LossOn,
    /// Longest row in tokens.
    pub max_len: usize,
    /// Examples longer than `max_len`.
    pub too_long: TooLong,
    /// Pack several examples per row.
    pub packing: bool,
    /// Shuffle seed.
    pub seed: u64,
}

impl PrepareOptions {
    /// The options a recipe's `[train]` table gives, with the project seed.
    pub fn from_recipe(train: &Train, seed: u64) -> PrepareOptions {
        PrepareOptions {
            format: train.data_format,
            on_bad_row: train.on_bad_row,
            loss_on: train.loss_on,
            max_len: train.max_seq_len as usize,
            too_long: train.too_long,
            packing: train.packing,
            seed,
        }
    }
}

/// Everything [`prepare`] read, skipped, cut and built.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrepareReport {
    /// The file.
    pub path: PathBuf,
    /// The format rows were read as.
    pub format: DatasetFormat,
    /// Non-empty lines.
    pub rows_in_file: usize,
    /// Rows skipped while reading or encoding, by reason (policy `skip`).
    pub skipped: Skips,
    /// Truncation, drops and packing.
    pub pack: PackReport,
}

impl fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} rows as `{}`, {} skipped",
            self.path.display(),
            self.rows_in_file,
            format_name(self.format),
            self.skipped.total()
        )?;
        if self.skipped.total() > 0 {
            write!(f, "\n{}", self.skipped)?;
        }
        write!(f, "\n{}", self.pack)
    }
}

/// Reads, encodes and builds the rows of one split. Rows are encoded as they are read, so with
/// `fail` the error is the first bad row of the file, whatever is wrong with it.
pub fn prepare(
    path: &Path,
    tok: &Tokenizer,
    template: &ChatTemplate,
    opts: &PrepareOptions,
) -> Result<(Vec<Row>, PrepareReport), DataError> {
    let mut rows = JsonlRows::open(path, opts.format)?;
    let mut skipped = Skips::default();
    let mut examples = Vec::new();
    while let Some((line, row)) = rows.next_row()? {
        match row.and_then(|conv| encode(&conv, tok, template, opts.loss_on).map_err(RowError::Example)) {
            Ok(ex) => examples.push(ex),
            Err(problem) => rows.bad_row(line, problem, opts.on_bad_row, &mut skipped)?,
        }
    }
    if rows.rows() == 0 {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    let (built, pack) = build_rows(examples, opts.max_len, opts.too_long, opts.packing, opts.seed);
    let report = PrepareReport {
        path: path.to_path_buf(),
        format: rows.format(),
        rows_in_file: rows.rows(),
        skipped,
        pack,
    };
    if built.is_empty() {
        return Err(DataError::NothingUsable { path: path.to_path_buf(), summary: report.to_string() });
    }
    Ok((built, report))
}
