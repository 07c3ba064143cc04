//! The binary on inputs that cannot live in a transcript: generated files (50 MB, binary, Latin-1),
//! colour and format selection, and secrets across every output mode. None may panic (exit 101) or
//! report an internal error (exit 2).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::Path;
use std::process::{Command, Output};

fn retort(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_retort"));
    cmd.current_dir(dir)
        .args(args)
        .env_remove("RETORT_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .env_remove("CLICOLOR_FORCE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn generated_bad_files_exit_1_with_the_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::File::create(d.join("big.toml")).unwrap().set_len(50 * 1024 * 1024).unwrap();
    std::fs::write(d.join("binary.toml"), b"\x7fELF\x02\x01\x01\x00\x00\x00garbage\xff\xfe").unwrap();
    std::fs::write(d.join("latin1.toml"), b"[base]\nmodel = \"caf\xe9\"\n").unwrap();
    let mut noise = Vec::new();
    let mut x: u32 = 12345;
    for _ in 0..4096 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        noise.push((x >> 16) as u8 | 1); // no NUL bytes: exercise the UTF-8 and TOML paths
    }
    std::fs::write(d.join("noise.toml"), &noise).unwrap();
    let cases: &[(&str, &str)] = &[
        ("big.toml", "is 52428800 bytes; a recipe must be at most 1048576 bytes"),
        ("binary.toml", "looks like binary data (NUL byte at 1:8)"),
        ("latin1.toml", "is not valid UTF-8 at 2:13"),
        ("noise.toml", "noise.toml"),
    ];
    for (file, want) in cases {
        let o = retort(d, &["--log-format", "human", "recipe", "check", file], &[]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{file}: {err}");
        assert!(err.contains(file) && err.contains(want), "{file}: {err}");
        assert!(!err.contains("panicked"), "{file}: {err}");
    }
}

#[test]
fn keys_never_reach_any_output() {
    let key = "sk-ant-api03-Qm9vYmFyYmF6cXV4cXV1eHF1dXg";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.toml"),
        format!("[base]\nmodel = \"a/b\"\n[teacher]\nprovider = \"anthropic\"\nmodel = \"m\"\napi_key = \"{key}\"\n# backup: {key}\n"),
    )
    .unwrap();
    for format in ["human", "json"] {
        for cmd in [
            &["recipe", "check", "r.toml"][..],
            &["recipe", "show", "r.toml"][..],
            &["-v", "recipe", "check", "r.toml"][..],
        ] {
            let mut args = vec!["--log-format", format];
            args.extend_from_slice(cmd);
            let o = retort(dir.path(), &args, &[("CLICOLOR_FORCE", "1")]);
            let (out, err) = text(&o);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
            assert!(!out.contains(key) && !err.contains(key), "{args:?} leaked the key:\n{out}\n{err}");
            assert!(!err.contains(&key[12..30]), "{args:?} leaked part of the key:\n{err}");
            assert!(err.contains("secret"), "{args:?}: {err}");
        }
    }
}

#[test]
fn colour_follows_no_color_and_format_follows_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("r.toml"), "[base]\nmodel = \"a/b\"\n[train]\nlr = 0\n").unwrap();
    let args = ["--log-format", "human", "recipe", "check", "r.toml"];
    let forced = retort(dir.path(), &args, &[("CLICOLOR_FORCE", "1")]);
    assert!(text(&forced).1.contains("\x1b["), "CLICOLOR_FORCE should colour");
    let no_color = retort(dir.path(), &args, &[("CLICOLOR_FORCE", "1"), ("NO_COLOR", "1")]);
    assert!(!text(&no_color).1.contains('\x1b'), "NO_COLOR must win");
    // Not a terminal and no --log-format: JSON lines, one object per line.
    let auto = retort(dir.path(), &["recipe", "check", "r.toml"], &[]);
    let (_, err) = text(&auto);
    assert_eq!(auto.status.code(), Some(1));
    for line in err.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
}

#[test]
fn usage_errors_are_bad_input_not_internal_errors() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["recipe", "check"][..],
        &["nonsense"][..],
        &["recipe", "new"][..],
        &["--log-format", "xml", "recipe", "docs"][..],
    ] {
        let o = retort(dir.path(), args, &[]);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
    }
    let o = retort(dir.path(), &["--version"], &[]);
    assert_eq!(o.status.code(), Some(0));
    assert!(text(&o).0.starts_with("retort "));
}

#[test]
fn docs_and_schema_print_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let docs = retort(dir.path(), &["recipe", "docs"], &[]);
    assert_eq!(docs.status.code(), Some(0));
    let (out, _) = text(&docs);
    assert!(out.contains("[train]") && out.contains("lr = 0.0002") && out.contains("[[distill.filters]]"));
    let parsed: Result<toml::Table, _> = toml::from_str(&out);
    assert!(parsed.is_ok(), "the reference is valid TOML");
    let schema = retort(dir.path(), &["recipe", "schema"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&schema.stdout).unwrap();
    assert_eq!(v["title"], "retort recipe");
    assert!(v["properties"]["train"].is_object());
}

#[test]
fn new_refuses_missing_directories_and_writes_into_existing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let o = retort(dir.path(), &["--log-format", "human", "recipe", "new", "nowhere/x"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("directory `nowhere` does not exist"));
    std::fs::create_dir(dir.path().join("recipes")).unwrap();
    let o = retort(dir.path(), &["recipe", "new", "recipes/ticket-router.toml"], &[]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let written = std::fs::read_to_string(dir.path().join("recipes/ticket-router.toml")).unwrap();
    assert!(written.contains("name = \"ticket-router\""));
    let o = retort(dir.path(), &["recipe", "check", "recipes/ticket-router.toml"], &[]);
    assert_eq!(o.status.code(), Some(0));
}
