//! `scripts/jobs/retort-job.sh`, the entry point of the cron, systemd, Slurm and Kubernetes examples:
//! it passes retort's exit code through, forwards SIGTERM so retort can checkpoint and exit 4, and
//! refuses a second job on the same checkout. A stand-in binary plays retort here; the real one's
//! signal handling is tested in `train.rs` and `pipeline.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/jobs/retort-job.sh")
}

/// A fake `retort` that records its arguments, exits with `FAKE_EXIT` when set, and otherwise waits
/// until SIGTERM, then exits 4 as retort does after checkpointing (taking its `sleep` along, which would
/// otherwise hold the test's stderr pipe open for a minute).
fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(repo.join(".git")).unwrap();
    let fake = dir.path().join("fake-retort");
    std::fs::write(
        &fake,
        "#!/usr/bin/env bash\necho \"$*|$RETORT_LOG_FORMAT\" > \"$RETORT_REPO/args\"\n\
         trap 'kill \"${s:-}\" 2>/dev/null; exit 4' TERM\n[ -n \"${FAKE_EXIT:-}\" ] && exit \"$FAKE_EXIT\"\n\
         touch \"$RETORT_REPO/started\"\nsleep 60 & s=$!\nwait\n",
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&fake).status().unwrap();
    (dir, fake)
}

fn job(dir: &Path, fake: &Path, exit: Option<u8>) -> Child {
    let mut c = Command::new("bash");
    c.arg(script())
        .env("RETORT_REPO", dir.join("repo"))
        .env("RECIPE", "recipes/x.toml")
        .env("RETORT_BIN", fake)
        .env("RETORT_NO_PULL", "1")
        .env("RETORT_ARGS", "--from train")
        .env_remove("RETORT_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(e) = exit {
        c.env("FAKE_EXIT", e.to_string());
    }
    c.spawn().unwrap()
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exit_codes_pass_through_with_json_logs() {
    let (dir, fake) = setup();
    for code in [0u8, 1, 3, 4] {
        let out = job(dir.path(), &fake, Some(code)).wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(i32::from(code)), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let args = std::fs::read_to_string(dir.path().join("repo/args")).unwrap();
    assert_eq!(args.trim(), "run recipes/x.toml --from train|json");
}

#[test]
fn sigterm_reaches_retort_and_a_second_job_is_refused() {
    let (dir, fake) = setup();
    let first = job(dir.path(), &fake, None);
    wait_for(&dir.path().join("repo/started"));
    // The checkout is locked while the first job runs.
    let second = job(dir.path(), &fake, Some(0)).wait_with_output().unwrap();
    assert_eq!(second.status.code(), Some(75), "{}", String::from_utf8_lossy(&second.stderr));
    assert!(String::from_utf8_lossy(&second.stderr).contains("another retort job"));
    // SIGTERM to the wrapper (what Slurm, systemd and the kubelet send) reaches retort, whose exit 4
    // (stopped, resumable) is the job's.
    let status = Command::new("kill").arg("-TERM").arg(first.id().to_string()).status().unwrap();
    assert!(status.success());
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    // The lock went with it.
    let again = job(dir.path(), &fake, Some(0)).wait_with_output().unwrap();
    assert_eq!(again.status.code(), Some(0));
}
