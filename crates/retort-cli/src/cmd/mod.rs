//! One module per command group.

pub mod distill;
pub mod recipe;
