//! The recipe's base model as a local directory: a directory as it is, a hub id through the hub cache
//! (downloaded once, resumable, `HF_HUB_OFFLINE` respected), a built-in model written once under
//! `<output_dir>/builtin/NAME`.

use std::path::{Path, PathBuf};

use retort_recipe::Recipe;
use retort_recipe::types::ModelRef;

use crate::cmd::model::resolve_model;
use crate::exit::CliError;
use crate::ui::Ui;

/// A base model ready to load.
pub(crate) struct Base {
    /// The HF-format directory.
    pub dir: PathBuf,
    /// What the recipe calls it (hub id, path or `builtin:NAME`), for adapter configs and reports.
    pub name: String,
}

/// Where a built-in model is written for a recipe.
pub(crate) fn builtin_dir(recipe: &Recipe, name: &str) -> PathBuf {
    recipe.project.output_dir.join("builtin").join(name)
}

/// Resolves `base.model` of a loaded recipe (paths in it are already absolute).
pub(crate) fn resolve(ui: &Ui, recipe: &Recipe) -> anyhow::Result<Base> {
    let name = recipe.base.model.to_string();
    let dir = match &recipe.base.model {
        ModelRef::Local(p) => {
            if !p.is_dir() {
                return Err(CliError::input(format!(
                    "`base.model`: directory `{}` does not exist",
                    p.display()
                ))
                .hint("a base model directory holds config.json, *.safetensors and tokenizer.json")
                .into());
            }
            p.clone()
        }
        ModelRef::Hub { repo } => resolve_model(ui, Path::new(repo), &recipe.base.revision)?,
        ModelRef::Builtin(n) => {
            let dir = builtin_dir(recipe, n);
            let dir = retort_model::builtin::materialize(n, &dir)
                .map_err(|e| CliError::input(e.to_string()).hint("built-in models: tiny-llama"))?;
            ui.status(
                "base",
                &format!(
                    "`builtin:{n}` is a tiny random model retort builds itself: it shows that the pipeline \
                     works, not model quality; set `base.model` to a hub id for real results"
                ),
            );
            dir
        }
    };
    Ok(Base { dir, name })
}

/// The recipe's training device (`train.device`) and the precision `base.dtype` means on it.
pub(crate) fn device(
    recipe: &Recipe,
) -> anyhow::Result<(retort_model::device::Selected, retort_model::Precision)> {
    use retort_model::Precision;
    use retort_recipe::schema::project::Dtype;
    let device = retort_model::device::select(recipe.train.device).map_err(|e| {
        CliError::input(format!("`train.device`: {e}"))
            .hint("use `device = \"cpu\"`, or build retort with `--features wgpu` (or `cuda`) for a GPU")
    })?;
    let precision = match recipe.base.dtype {
        Dtype::Auto => device.auto_precision(),
        Dtype::F32 => Precision::F32,
        Dtype::F16 => Precision::F16,
        Dtype::Bf16 => Precision::Bf16,
    };
    Ok((device, precision))
}

/// Loads a recipe, printing its problems; `None` when it is invalid (exit 1, already reported).
pub(crate) fn load_recipe(ui: &Ui, file: &Path) -> Option<Recipe> {
    use crate::cmd::recipe::{print_read_error, print_report};
    match retort_recipe::load(file) {
        Ok(l) => {
            print_report(ui, &l.report);
            Some(l.recipe)
        }
        Err(retort_recipe::LoadError::Invalid(report)) => {
            print_report(ui, &report);
            None
        }
        Err(retort_recipe::LoadError::Read(e)) => {
            print_read_error(ui, &e);
            None
        }
    }
}
