//! The request cache and journal: one append-only JSON-lines file.
//!
//! A request is journaled (`sent`) before it goes out and its answer (`done`) as soon as it arrives,
//! each as one `write` of a whole line, so a `kill -9` at any moment loses nothing that was answered
//! and written (the kernel keeps the written page even when the process dies). A background thread
//! fsyncs the file a few times a second (an fsync never stalls the requests in flight), and it is
//! fsynced when the run ends and whenever a provider batch is journaled, so a power loss costs at
//! most the last fraction of a second of answers, which are then asked again. A torn last line from
//! a crash is cut off on open.
//! Keys are hashes of requests ([`crate::ChatRequest::key`]); nothing here ever holds an API key.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::completion::Completion;
use crate::error::TeacherError;

const SYNC_EVERY: Duration = Duration::from_millis(200);

/// One line of the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Record {
    /// A request is about to be sent.
    Sent {
        /// Its key.
        key: String,
    },
    /// A request was answered.
    Done {
        /// Its key.
        key: String,
        /// The answer.
        c: Completion,
    },
    /// A provider batch was submitted holding these keys.
    Batch {
        /// The provider's batch id.
        id: String,
        /// The request keys in it (its `custom_id`s).
        keys: Vec<String>,
    },
    /// A provider batch is finished and its results are journaled as `done` records.
    BatchClosed {
        /// The provider's batch id.
        id: String,
    },
}

struct Inner {
    file: File,
}

/// What the background fsync thread shares with the store.
#[derive(Default)]
struct SyncState {
    dirty: AtomicBool,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
}

/// Fsyncs a clone of the journal's handle every [`SYNC_EVERY`] while there are unsynced writes.
fn spawn_syncer(file: File, state: Arc<SyncState>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("retort-journal-sync".into()).spawn(move || {
        loop {
            std::thread::park_timeout(SYNC_EVERY);
            if state.dirty.swap(false, Ordering::AcqRel)
                && let Err(e) = file.sync_data()
            {
                *state.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            }
            if state.stop.load(Ordering::Acquire) {
                return;
            }
        }
    })
}

/// The cache and journal of one data directory.
pub struct Store {
    path: PathBuf,
    inner: Mutex<Inner>,
    cache: Mutex<HashMap<String, Completion>>,
    open_batches: Mutex<Vec<(String, Vec<String>)>>,
    unanswered_at_open: usize,
    spent_at_open: f64,
    sync_state: Arc<SyncState>,
    syncer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.sync_state.stop.store(true, Ordering::Release);
        if let Some(h) = self.syncer.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        let _ = self.sync();
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the journal at `path`, loading every answer in it.
    pub fn open(path: &Path) -> Result<Store, TeacherError> {
        let err = |message: String| TeacherError::Journal { path: path.to_path_buf(), message };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create its directory: {e}")))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| err(format!("cannot open: {e}")))?;
        let mut cache = HashMap::new();
        let mut sent = HashSet::new();
        let mut batches: Vec<(String, Vec<String>)> = Vec::new();
        let mut good_len = 0u64;
        let mut torn = false;
        {
            let mut reader = BufReader::new(&file);
            let mut line = String::new();
            let mut lineno = 0usize;
            loop {
                line.clear();
                let n = reader.read_line(&mut line).map_err(|e| err(format!("cannot read: {e}")))?;
                if n == 0 {
                    break;
                }
                lineno += 1;
                if !line.ends_with('\n') {
                    torn = true;
                    break;
                }
                match serde_json::from_str::<Record>(&line) {
                    Ok(Record::Sent { key }) => {
                        sent.insert(key);
                    }
                    Ok(Record::Done { key, c }) => {
                        sent.remove(&key);
                        cache.insert(key, c);
                    }
                    Ok(Record::Batch { id, keys }) => batches.push((id, keys)),
                    Ok(Record::BatchClosed { id }) => batches.retain(|(b, _)| *b != id),
                    Err(e) => {
                        return Err(err(format!("line {lineno} is not a journal record ({e})")));
                    }
                }
                good_len += n as u64;
            }
        }
        if torn {
            // The crash cut a line in half: drop it; its request is simply asked again.
            file.set_len(good_len).map_err(|e| err(format!("cannot cut off a torn last line: {e}")))?;
            file.seek(SeekFrom::End(0)).map_err(|e| err(format!("cannot seek: {e}")))?;
        }
        let spent_at_open = cache.values().map(|c| c.cost_usd).sum::<f64>() + 0.0;
        let sync_state = Arc::new(SyncState::default());
        let handle =
            file.try_clone().map_err(|e| err(format!("cannot open a second handle for fsync: {e}")))?;
        let syncer = spawn_syncer(handle, sync_state.clone())
            .map_err(|e| err(format!("cannot start the fsync thread: {e}")))?;
        Ok(Store {
            sync_state,
            syncer: Some(syncer),
            path: path.to_path_buf(),
            inner: Mutex::new(Inner { file }),
            cache: Mutex::new(cache),
            open_batches: Mutex::new(batches),
            unanswered_at_open: sent.len(),
            spent_at_open,
        })
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached answer for `key`.
    pub fn get(&self, key: &str) -> Option<Completion> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    /// True when `key` has an answer.
    pub fn contains(&self, key: &str) -> bool {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).contains_key(key)
    }

    /// Answers held.
    pub fn len(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when no answer is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests that were sent by an earlier run but never answered (that run was killed).
    pub fn unanswered_at_open(&self) -> usize {
        self.unanswered_at_open
    }

    /// Dollars paid for the answers held when the journal was opened.
    pub fn spent_at_open(&self) -> f64 {
        self.spent_at_open
    }

    /// Batches submitted and not yet closed: (id, keys).
    pub fn open_batches(&self) -> Vec<(String, Vec<String>)> {
        self.open_batches.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Appends one record as a single write.
    pub fn append(&self, record: &Record) -> Result<(), TeacherError> {
        let err = |message: String| TeacherError::Journal { path: self.path.clone(), message };
        let mut line = serde_json::to_string(record).map_err(|e| err(format!("cannot encode: {e}")))?;
        line.push('\n');
        if let Some(e) = self.sync_state.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(err(format!("cannot fsync: {e}")));
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.file.write_all(line.as_bytes()).map_err(|e| err(format!("cannot write: {e}")))?;
        self.sync_state.dirty.store(true, Ordering::Release);
        drop(inner);
        match record {
            Record::Done { key, c } => {
                self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), c.clone());
            }
            Record::Batch { id, keys } => {
                self.open_batches.lock().unwrap_or_else(|e| e.into_inner()).push((id.clone(), keys.clone()));
            }
            Record::BatchClosed { id } => {
                self.open_batches.lock().unwrap_or_else(|e| e.into_inner()).retain(|(b, _)| b != id);
            }
            Record::Sent { .. } => {}
        }
        Ok(())
    }

    /// Journals that `key` is about to be sent.
    pub fn record_sent(&self, key: &str) -> Result<(), TeacherError> {
        self.append(&Record::Sent { key: key.to_string() })
    }

    /// Journals and caches the answer to `key`.
    pub fn record_done(&self, key: &str, c: &Completion) -> Result<(), TeacherError> {
        self.append(&Record::Done { key: key.to_string(), c: c.clone() })
    }

    /// Forces everything written to disk.
    pub fn sync(&self) -> Result<(), TeacherError> {
        // Always fsync: the background thread may have taken the dirty flag and still be syncing.
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.sync_state.dirty.store(false, Ordering::Release);
        inner.file.sync_data().map_err(|e| TeacherError::Journal {
            path: self.path.clone(),
            message: format!("cannot fsync: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::completion::{Finish, Usage};

    fn answer(text: &str, cost: f64) -> Completion {
        Completion {
            content: text.into(),
            finish: Finish::Stop,
            usage: Usage { input_tokens: 3, output_tokens: 1, cached_input_tokens: 0 },
            refusal: None,
            cost_usd: cost,
        }
    }

    #[test]
    fn answers_survive_reopening_and_unanswered_requests_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j").join("journal.jsonl");
        let s = Store::open(&p).unwrap();
        s.record_sent("a").unwrap();
        s.record_done("a", &answer("A", 0.5)).unwrap();
        s.record_sent("b").unwrap();
        drop(s);
        let s = Store::open(&p).unwrap();
        assert_eq!(s.get("a").unwrap().content, "A");
        assert!(s.get("b").is_none());
        assert_eq!(s.unanswered_at_open(), 1);
        assert!((s.spent_at_open() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_a_corrupt_one_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal.jsonl");
        let s = Store::open(&p).unwrap();
        s.record_done("a", &answer("A", 0.0)).unwrap();
        drop(s);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"t\":\"done\",\"key\":\"b\",\"c\":{\"cont").unwrap();
        drop(f);
        let s = Store::open(&p).unwrap();
        assert_eq!(s.len(), 1);
        s.record_done("c", &answer("C", 0.0)).unwrap();
        drop(s);
        let s = Store::open(&p).unwrap();
        assert_eq!(s.len(), 2, "the record after the cut is intact");
        drop(s);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"garbage\n").unwrap();
        drop(f);
        let e = Store::open(&p).unwrap_err();
        assert!(e.to_string().contains("line 3 is not a journal record"), "{e}");
    }

    #[test]
    fn batches_stay_open_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal.jsonl");
        let s = Store::open(&p).unwrap();
        s.append(&Record::Batch { id: "b1".into(), keys: vec!["k".into()] }).unwrap();
        s.append(&Record::Batch { id: "b2".into(), keys: vec!["l".into()] }).unwrap();
        s.append(&Record::BatchClosed { id: "b1".into() }).unwrap();
        drop(s);
        let s = Store::open(&p).unwrap();
        assert_eq!(s.open_batches(), vec![("b2".to_string(), vec!["l".to_string()])]);
    }
}
