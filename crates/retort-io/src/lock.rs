//! An exclusive lock on a run directory, so two jobs (a cron run overlapping a manual one, a requeued
//! Slurm job racing its predecessor) never write the same run.
//!
//! The lock is a file created with `O_EXCL` holding the owner's pid, host and start time. It is removed
//! on drop. A lock whose process is gone (same host, pid no longer alive) is stale and taken over, so a
//! `kill -9` does not block the next run forever.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the lock file inside a run directory.
pub const LOCK_FILE: &str = ".retort.lock";

/// Who holds a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Process id.
    pub pid: u32,
    /// Host name.
    pub host: String,
    /// What the holder is doing (e.g. "retort train recipes/x.toml").
    pub command: String,
    /// Seconds since the Unix epoch when it was taken.
    pub since: u64,
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds it.
    #[error("`{}` is in use by `{}` (pid {} on {}, since {}s after the epoch)", dir.display(), holder.command, holder.pid, holder.host, holder.since)]
    Held {
        /// The directory.
        dir: PathBuf,
        /// The holder.
        holder: Holder,
    },
    /// The lock file could not be created or read.
    #[error("cannot lock `{}`: {source}", dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A held lock; released on drop.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

fn alive(pid: u32) -> bool {
    // On Linux a live process has /proc/<pid>; elsewhere assume alive (never steal a lock we cannot
    // check).
    if Path::new("/proc/self").exists() { Path::new(&format!("/proc/{pid}")).exists() } else { true }
}

impl RunLock {
    /// Takes the lock on `dir` (created if missing) for `command`.
    pub fn acquire(dir: &Path, command: &str) -> Result<RunLock, LockError> {
        let io = |source| LockError::Io { dir: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(LOCK_FILE);
        let me = Holder {
            pid: std::process::id(),
            host: host(),
            command: command.to_string(),
            since: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        for _ in 0..3 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let body = serde_json::to_vec(&me).unwrap_or_default();
                    f.write_all(&body).map_err(io)?;
                    f.sync_all().map_err(io)?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder: Option<Holder> =
                        std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok());
                    match holder {
                        Some(h) if h.host == me.host && !alive(h.pid) => {
                            // Stale: its process is gone. Remove and retry.
                            let _ = std::fs::remove_file(&path);
                        }
                        Some(h) => return Err(LockError::Held { dir: dir.to_path_buf(), holder: h }),
                        None => {
                            // Being written right now, or garbage: a holder writes its record at once,
                            // so an unreadable lock older than a few seconds is garbage.
                            let old = std::fs::metadata(&path)
                                .and_then(|m| m.modified())
                                .ok()
                                .and_then(|t| t.elapsed().ok())
                                .is_some_and(|age| age.as_secs() > 5);
                            if old {
                                let _ = std::fs::remove_file(&path);
                            } else {
                                std::thread::sleep(std::time::Duration::from_millis(100));
                            }
                        }
                    }
                }
                Err(e) => return Err(io(e)),
            }
        }
        let holder = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Holder { pid: 0, host: "unknown".into(), command: "unknown".into(), since: 0 });
        Err(LockError::Held { dir: dir.to_path_buf(), holder })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = RunLock::acquire(dir.path(), "retort train a").unwrap();
        match RunLock::acquire(dir.path(), "retort train b") {
            Err(LockError::Held { holder, .. }) => {
                assert_eq!(holder.pid, std::process::id());
                assert_eq!(holder.command, "retort train a");
            }
            other => panic!("{other:?}"),
        }
        drop(a);
        let _b = RunLock::acquire(dir.path(), "retort train b").unwrap();
    }

    #[test]
    fn a_lock_of_a_dead_process_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        // A pid that cannot be alive: beyond the kernel's pid_max.
        let stale = Holder { pid: 4_194_305, host: host(), command: "killed".into(), since: 1 };
        std::fs::write(dir.path().join(LOCK_FILE), serde_json::to_vec(&stale).unwrap()).unwrap();
        let lock = RunLock::acquire(dir.path(), "retort run").unwrap();
        let now: Holder = serde_json::from_slice(&std::fs::read(lock.path()).unwrap()).unwrap();
        assert_eq!(now.pid, std::process::id());
    }
}
