//! One module per command group.

pub mod distill;
pub mod inspect;
pub mod model;
pub mod recipe;
