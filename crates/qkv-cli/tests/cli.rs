//! The `qkv` binary's own argument checks: bad values give a clear error and a non-zero exit,
//! never a panic.

use std::process::Command;

fn qkv(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qkv"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run qkv");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn zero_threads_is_rejected() {
    let (ok, err) = qkv(&["--threads", "0", "bench", "train-step"]);
    assert!(!ok && err.contains("--threads must be at least 1"), "{err}");
}

#[test]
fn bench_rejects_empty_shapes() {
    for flag in ["--batch", "--seq", "--layers", "--steps"] {
        let (ok, err) = qkv(&["bench", "train-step", flag, "0"]);
        assert!(!ok && err.contains("must be positive"), "{flag}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn bench_rejects_heads_that_do_not_divide_the_width() {
    let (ok, err) = qkv(&[
        "bench",
        "train-step",
        "--d-model",
        "30",
        "--heads",
        "4",
        "--steps",
        "1",
    ]);
    assert!(
        !ok && err.contains("d_model 30 is not divisible by n_heads 4"),
        "{err}"
    );
}

#[test]
fn copy_rejects_a_vocabulary_without_symbols() {
    let (ok, err) = qkv(&["copy", "--vocab", "3"]);
    assert!(
        !ok && err.contains("--vocab must be greater than 4") && err.contains("got 3"),
        "{err}"
    );
    let (ok, err) = qkv(&["copy", "--len", "0"]);
    assert!(
        !ok && err.contains("--len and --batch must be positive"),
        "{err}"
    );
}

#[test]
fn copy_reports_an_unwritable_output_directory() {
    let dir = std::env::temp_dir().join(format!("qkv-cli-test-{}", std::process::id()));
    std::fs::write(&dir, b"a file, not a directory").unwrap();
    let out = dir.to_string_lossy().into_owned();
    let (ok, err) = qkv(&["copy", "--steps", "1", "--out", &out]);
    let _ = std::fs::remove_file(&dir);
    assert!(
        !ok && err.contains("saving to") && err.contains(&out),
        "{err}"
    );
}
