//! One module per command group.

pub mod base;
pub mod distill;
pub mod eval;
pub mod export;
pub mod inspect;
pub mod model;
pub mod recipe;
pub mod run;
pub mod train;
