//! The supervised fine-tuning run: LoRA (rsLoRA, DoRA) and QLoRA adapters trained on a frozen base with
//! the loss on label tokens only, AdamW with torch's semantics, gradient accumulation normalised over
//! every label token of a step, global-norm clipping, and checkpoints that resume exactly.
//!
//! The model and adapter math live in `retort-model`, adapter creation and PEFT files in
//! `retort-lora`, datasets in `retort-data`.

pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod plot;
pub mod probe;
pub mod run;
pub mod scaler;
pub mod schedule;
pub mod step;

pub use optim::{AdamW, AdamWConfig};
pub use run::{Layout, Outcome, Plan, Report, Setup, TrainError, run};
pub use scaler::LossScaler;
pub use step::{MicroBatch, StepStats, train_step, train_step_scaled};
