//! Where outputs go, without ever leaving a half-written file or directory under its final name.
//!
//! Files are written through a [`Sink`] (by default [`Disk`]: `retort-io`'s temp file, fsync, rename);
//! a directory output is assembled in a hidden temporary directory next to its final path and renamed
//! into place only when complete ([`StagedDir`]). Tests inject a [`Sink`] that fails mid-way to prove
//! that a failed write leaves nothing behind.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use retort_io::AtomicFile;

/// A file being written; nothing appears under its name until [`OutFile::commit`].
pub trait OutFile: Write + Send {
    /// Flushes, syncs and moves the file to its final name.
    fn commit(self: Box<Self>) -> io::Result<()>;
}

/// Creates output files.
pub trait Sink: Sync + Send {
    /// Starts writing `path`.
    fn create(&self, path: &Path) -> io::Result<Box<dyn OutFile>>;
}

/// The real file system, through [`AtomicFile`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Disk;

/// An [`AtomicFile`] that ends up readable by others (`0644`): temporary files are created private
/// (`0600`), but models are often served by another user (Ollama's and vLLM's services).
struct Shared(AtomicFile);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl OutFile for Shared {
    fn commit(self: Box<Self>) -> io::Result<()> {
        let path = self.0.path().to_path_buf();
        self.0.commit()?;
        set_mode(&path, 0o644)
    }
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> io::Result<()> {
    Ok(())
}

impl Sink for Disk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn OutFile>> {
        Ok(Box::new(Shared(AtomicFile::create(path)?)))
    }
}

/// Writes a whole file through a sink.
pub fn write_file(sink: &dyn Sink, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = sink.create(path)?;
    f.write_all(bytes)?;
    f.commit()
}

/// A directory being assembled under a hidden temporary name next to its final path.
pub struct StagedDir {
    tmp: PathBuf,
    target: PathBuf,
    done: bool,
}

impl StagedDir {
    /// Starts staging `target` (its parent must exist).
    pub fn new(target: &Path) -> io::Result<StagedDir> {
        let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name =
            target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
        let tmp = tempfile::Builder::new().prefix(&format!(".{name}.retort-")).tempdir_in(parent)?.keep();
        Ok(StagedDir { tmp, target: target.to_path_buf(), done: false })
    }

    /// Where files go while staging.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final directory.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the directory into place, replacing an older one.
    pub fn commit(mut self) -> io::Result<()> {
        set_mode(&self.tmp, 0o755)?;
        if self.target.exists() {
            let old = self.tmp.with_extension("old");
            std::fs::rename(&self.target, &old)?;
            std::fs::rename(&self.tmp, &self.target)?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.tmp, &self.target)?;
        }
        if let Some(parent) = self.target.parent()
            && let Ok(d) = std::fs::File::open(parent)
        {
            let _ = d.sync_all();
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}
