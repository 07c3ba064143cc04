//! The retort recipe language.
//!
//! A recipe is one TOML file that drives the whole pipeline: distill, train, eval, export. This crate
//! owns its schema (typed structs with documented defaults), reads recipe files safely, and validates
//! them reporting every problem at once, each with file, line, column, key path, what was found, what
//! is allowed and a hint. It resolves paths relative to the recipe file and fills derived defaults.
//!
//! It does not run anything: stages read a [`Recipe`] that already passed [`load`].
//!
//! ```
//! let src = retort_recipe::Source::from_text("demo.toml", "[base]\nmodel = \"builtin:tiny-llama\"\n");
//! let loaded = retort_recipe::load_source(src).unwrap();
//! assert_eq!(loaded.recipe.project.name, "demo");
//! assert_eq!(loaded.recipe.lora.r, 16);
//! ```

mod de;
pub mod diag;
pub mod docs;
mod load;
pub mod schema;
pub mod secrets;
pub mod source;
pub mod starter;
mod suggest;
mod tree;
pub mod types;
mod validate;

pub use diag::{Diagnostic, RenderStyle, Report, Severity};
pub use load::{LoadError, Loaded, load, load_source};
pub use schema::Recipe;
pub use source::{MAX_RECIPE_BYTES, ReadError, Source};
pub use tree::KeyPath;

impl Recipe {
    /// The fully resolved recipe as TOML (what `retort recipe show` prints).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string_pretty(self)
    }
}
