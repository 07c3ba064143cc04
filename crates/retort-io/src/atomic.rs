//! Files written to a temporary name, fsynced, then renamed: a crash leaves either the old file or the
//! new one, never half of one under the final name.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Fsyncs a directory so a rename inside it survives a power loss.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(unix)]
fn set_final_mode(tmp: &Path, target: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match std::fs::metadata(target) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(_) => 0o666 & !umask(),
    };
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_final_mode(_tmp: &Path, _target: &Path) -> io::Result<()> {
    Ok(())
}

/// The process umask, read from /proc (reading it with umask(2) would change it, racing other threads).
#[cfg(unix)]
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Umask:").map(|v| v.trim().to_string())))
        .and_then(|v| u32::from_str_radix(&v, 8).ok())
        .unwrap_or(0o022)
}

/// Writes `bytes` to `path` atomically. With `overwrite = false` an existing file is never replaced
/// (the final step is a no-clobber link), so of two concurrent writers exactly one wins.
pub fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> io::Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)?;
    if overwrite { f.commit() } else { f.commit_noclobber() }
}

/// A file being written. Nothing appears at the final path until [`AtomicFile::commit`]; dropping it
/// without committing removes the temporary file.
pub struct AtomicFile {
    path: PathBuf,
    writer: BufWriter<NamedTempFile>,
}

impl AtomicFile {
    /// Starts writing `path`; the temporary file lives in the same directory (same filesystem, so the
    /// rename is atomic).
    pub fn create(path: &Path) -> io::Result<AtomicFile> {
        let tmp = tempfile::Builder::new().prefix(".retort-").suffix(".tmp").tempfile_in(dir_of(path))?;
        Ok(AtomicFile { path: path.to_path_buf(), writer: BufWriter::with_capacity(1 << 20, tmp) })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn finish(self) -> io::Result<(NamedTempFile, PathBuf)> {
        let tmp = self.writer.into_inner().map_err(|e| e.into_error())?;
        // Temporary files are created 0600; the final file gets the mode a plain create would give it
        // (0666 minus the umask), or keeps the mode of the file it replaces.
        set_final_mode(tmp.path(), &self.path)?;
        tmp.as_file().sync_all()?;
        Ok((tmp, self.path))
    }

    /// Flushes, fsyncs and renames over the final path (replacing any file there).
    pub fn commit(self) -> io::Result<()> {
        let (tmp, path) = self.finish()?;
        tmp.persist(&path).map_err(|e| e.error)?;
        sync_dir(dir_of(&path));
        Ok(())
    }

    /// Like [`AtomicFile::commit`] but fails with `AlreadyExists` instead of replacing a file.
    pub fn commit_noclobber(self) -> io::Result<()> {
        let (tmp, path) = self.finish()?;
        tmp.persist_noclobber(&path).map_err(|e| e.error)?;
        sync_dir(dir_of(&path));
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_and_refuses_to_clobber() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        write_atomic(&p, b"one", false).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        let err = write_atomic(&p, b"two", false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        write_atomic(&p, b"three", true).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        assert_eq!(names(dir.path()), ["a.toml"]);
    }

    #[cfg(unix)]
    #[test]
    fn committed_files_get_normal_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train.jsonl");
        write_atomic(&p, b"x", false).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask(), "a new file follows the umask, not tempfile's 0600");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&p, b"y", true).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640,
            "a replaced file keeps its mode"
        );
    }

    #[test]
    fn an_uncommitted_file_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.bin");
        std::fs::write(&p, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&p).unwrap();
            f.write_all(&[7u8; 3 << 20]).unwrap();
            // Dropped: a crash or an error before commit.
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"old", "the old file is intact");
        assert_eq!(names(dir.path()), ["big.bin"], "no temporary file is left");
        let mut f = AtomicFile::create(&p).unwrap();
        f.write_all(&[7u8; 3 << 20]).unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap().len(), 3 << 20);
    }
}
