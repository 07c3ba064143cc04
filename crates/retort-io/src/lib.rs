//! Plumbing every retort stage shares: files that are either complete or absent, a lock that stops two
//! jobs writing one run directory, and the progress interface stages report through.
//!
//! It holds no policy about what is written where; the stages decide that.

pub mod atomic;
pub mod lock;
pub mod progress;

pub use atomic::{AtomicFile, write_atomic};
pub use lock::{LockError, RunLock};
pub use progress::{NoProgress, Progress, Task};
