//! How a stage reports progress without knowing how it is shown: the command line renders it as a bar
//! on a terminal or as JSON lines in a job log; tests and library users can pass [`NoProgress`].

/// A source of progress tasks (one per long phase of a stage).
pub trait Progress: Send + Sync {
    /// Starts a task with a known total (items, requests, steps, bytes).
    fn task(&self, name: &str, total: u64) -> Box<dyn Task>;
}

/// One task in progress.
pub trait Task: Send + Sync {
    /// `n` more units done.
    fn inc(&self, n: u64);
    /// A short status (cost so far, loss, ...).
    fn set_message(&self, msg: &str);
    /// The task is over; the final state is always reported.
    fn finish(&self);
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn task(&self, _name: &str, _total: u64) -> Box<dyn Task> {
        Box::new(NoProgress)
    }
}

impl Task for NoProgress {
    fn inc(&self, _n: u64) {}
    fn set_message(&self, _msg: &str) {}
    fn finish(&self) {}
}
