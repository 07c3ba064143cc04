//! One module per command group.

pub mod export;
pub mod inspect;
pub mod recipe;
