//! Transcripts of the real `retort` binary: arguments, stdout, stderr and exit code, in
//! `tests/cmd/*.trycmd` at the workspace root. Update them with `TRYCMD=overwrite cargo test -p retort-cli`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

#[test]
fn transcripts() {
    trycmd::TestCases::new()
        .env("NO_COLOR", "1")
        .env("RETORT_LOG_FORMAT", "human")
        // Hub ids resolve from an empty cache and never reach the network: same output on every machine.
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", "/nonexistent/retort-test-hub-cache")
        .case("../../tests/cmd/*.trycmd");
}
