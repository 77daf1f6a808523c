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

fn qkv_stdout(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qkv"))
        .args(args)
        .output()
        .expect("run qkv");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
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
fn bench_attention_rejects_bad_arguments() {
    for (args, want) in [
        (&["--n", "0"][..], "must be positive"),
        (&["--n", "8", "--heads", "0"][..], "must be positive"),
        (
            &["--n", "8", "--kind", "window", "--window", "0"][..],
            "--window",
        ),
        (
            &["--n", "8", "--kind", "linear", "--dtype", "bf16"][..],
            "f32 only",
        ),
        (&["--n", "8", "--kind", "sparse"][..], "sparse"),
    ] {
        let mut all = vec!["bench", "attention", "--steps", "1", "--warmup", "0"];
        all.extend_from_slice(args);
        let (ok, err) = qkv(&all);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (ok, out) = qkv_stdout(&[
        "bench",
        "attention",
        "--n",
        "70",
        "--steps",
        "1",
        "--backward",
    ]);
    assert!(
        ok && out.contains("\"ms\"") && out.contains("\"extra_mb\""),
        "{out}"
    );
    // bf16 flash runs (in f32 on a CPU without avx512_bf16, and says so).
    let (ok, out) = qkv_stdout(&[
        "bench",
        "attention",
        "--n",
        "70",
        "--steps",
        "1",
        "--backward",
        "--dtype",
        "bf16",
    ]);
    assert!(ok && out.contains("\"dtype\":\""), "{out}");
    let want = if qkv::kernels::bf16::available() {
        "\"dtype\":\"bf16\""
    } else {
        "no avx512_bf16"
    };
    assert!(out.contains(want), "{out}");
}

#[test]
fn bench_matmul_reports_gflops_and_rejects_empty_shapes() {
    for flag in ["--m", "--k", "--n", "--steps"] {
        let mut args = vec!["bench", "matmul"];
        for f in ["--m", "--k", "--n"].into_iter().filter(|&f| f != flag) {
            args.extend([f, "4"]);
        }
        args.extend([flag, "0"]);
        let (ok, err) = qkv(&args);
        assert!(!ok && err.contains("must be positive"), "{flag}: {err}");
    }
    for dtype in ["f32", "bf16"] {
        let (ok, out) = qkv_stdout(&[
            "bench", "matmul", "--m", "61", "--k", "67", "--n", "70", "--ta", "--dtype", dtype,
            "--steps", "1", "--warmup", "0",
        ]);
        let line: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
        assert!(
            ok && line["gflops"].as_f64().is_some_and(|g| g > 0.0),
            "{out}"
        );
        // bf16 says when it fell back to f32 on a CPU without avx512_bf16.
        let want = match dtype {
            "bf16" if !qkv::kernels::bf16::available() => "f32 (no avx512_bf16)",
            d => d,
        };
        assert_eq!(line["dtype"], want, "{out}");
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

#[test]
fn serve_and_its_load_generator_reject_bad_arguments() {
    // Checked before any model is loaded.
    for flag in ["--max-batch", "--queue", "--max-texts", "--max-beam"] {
        let (ok, err) = qkv(&["serve", "--model", "nowhere", flag, "0"]);
        assert!(!ok && err.contains(flag), "{flag}: {err}");
    }
    let (ok, err) = qkv(&["serve", "--model", "/nonexistent-model-dir"]);
    assert!(!ok && err.contains("not a model directory"), "{err}");
    let (ok, err) = qkv(&[
        "bench",
        "serve",
        "--addr",
        "127.0.0.1:1",
        "--bodies",
        "x",
        "--clients",
        "0",
    ]);
    assert!(!ok && err.contains("--clients"), "{err}");
    let (ok, err) = qkv(&[
        "bench",
        "serve",
        "--addr",
        "127.0.0.1:1",
        "--bodies",
        "/nonexistent-bodies.jsonl",
    ]);
    assert!(!ok && err.contains("/nonexistent-bodies.jsonl"), "{err}");
    for out in [&ok.to_string(), &err] {
        assert!(!out.contains("panicked"), "{out}");
    }
}

/// A scratch folder holding a job that names only its task and (absent) data files.
fn minimal_job(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("qkv-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("job.json");
    std::fs::write(
        &cfg,
        r#"{"task": "lm", "data": {"train": "a.txt", "valid": "b.txt"}}"#,
    )
    .unwrap();
    (dir, cfg)
}

/// Started by mpirun (its environment) in a build without MPI: an error that says how to build
/// one, not K processes each training alone into the same directory.
#[cfg(not(feature = "mpi"))]
#[test]
fn train_under_mpirun_without_the_mpi_feature_says_how_to_build_it() {
    let (dir, cfg) = minimal_job("nompi");
    let out = Command::new(env!("CARGO_BIN_EXE_qkv"))
        .args(["train", "--config", cfg.to_str().unwrap(), "--out"])
        .arg(dir.join("run"))
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("one of 2 ranks") && err.contains("--features mpi"),
        "{err}"
    );
    assert!(!dir.join("run").exists(), "nothing was written");
}

#[test]
fn train_rejects_a_timeout_that_is_not_positive() {
    let (dir, cfg) = minimal_job("timeout");
    for bad in ["0", "-3", "NaN"] {
        let (ok, err) = qkv(&[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            dir.join("run").to_str().unwrap(),
            &format!("--mpi-timeout={bad}"),
        ]);
        assert!(!ok);
        assert!(
            err.contains("--mpi-timeout must be a positive"),
            "{bad}: {err}"
        );
    }
    assert!(!dir.join("run").exists());
}

#[test]
fn bench_matmul_packed_needs_an_x_wt_product_in_f32() {
    for extra in [
        &[][..],
        &["--tb", "--ta"][..],
        &["--tb", "--dtype", "bf16"][..],
    ] {
        let mut args = vec![
            "bench", "matmul", "--m", "2", "--k", "3", "--n", "4", "--packed",
        ];
        args.extend_from_slice(extra);
        let (ok, err) = qkv(&args);
        assert!(
            !ok && err.contains("--packed multiplies by a packed x·Wᵀ operand"),
            "{extra:?}: {err}"
        );
    }
}

/// `QKV_ISA` lowers the instruction set the kernels dispatch to (reported in the bench JSON);
/// a value that is not an instruction set, or one the CPU lacks, stops the binary by name.
#[test]
fn qkv_isa_lowers_the_dispatched_instruction_set() {
    let run = |isa: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_qkv"))
            .args([
                "bench", "matmul", "--m", "16", "--k", "16", "--n", "16", "--steps", "1",
            ])
            .env("QKV_ISA", isa)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run qkv");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let (ok, stdout, err) = run("baseline");
    assert!(
        ok && stdout.contains(r#""isa":"baseline""#),
        "{stdout} {err}"
    );
    // The `gemm` crate's products keep the CPU's choice, and the line says so.
    let gemm = format!(r#""gemm_isa":"{}""#, qkv::simd::gemm_isa());
    assert!(stdout.contains(&gemm), "{stdout}");
    let (ok, _, err) = run("sse9");
    assert!(
        !ok && err.contains("QKV_ISA=sse9: expected one of baseline, avx2, avx512"),
        "{err}"
    );
    #[cfg(target_arch = "x86_64")]
    if !std::is_x86_feature_detected!("avx512f") {
        let (ok, _, err) = run("avx512");
        assert!(
            !ok && err.contains("QKV_ISA=avx512: this CPU's best is"),
            "{err}"
        );
    }
}

#[test]
fn device_cuda_without_a_gpu_says_what_is_missing() {
    if qkv::cuda::driver_available() {
        eprintln!("skipping: this machine has an NVIDIA driver");
        return;
    }
    for args in [
        &["bench", "attention", "--n", "64", "--device", "cuda"][..],
        &[
            "bench", "matmul", "--m", "8", "--k", "8", "--n", "8", "--device", "cuda",
        ][..],
        &[
            "bench",
            "train-step",
            "--model",
            "lm",
            "--steps",
            "1",
            "--device",
            "cuda",
        ][..],
    ] {
        let (ok, err) = qkv(args);
        assert!(!ok, "{args:?} succeeded without a GPU");
        assert!(
            err.contains("--device cuda")
                && err.contains("libcuda.so")
                && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// `qkv train --device cuda` without a GPU: an error naming the setting and what is missing,
/// before any data is read or the run directory made.
#[test]
fn train_on_cuda_without_a_gpu_says_what_is_missing_and_writes_nothing() {
    if qkv::cuda::driver_available() {
        eprintln!("skipping: this machine has an NVIDIA driver");
        return;
    }
    let out = std::env::temp_dir().join(format!("qkv-cuda-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let config =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/translate-en-es.json");
    let (ok, err) = qkv(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cuda",
    ]);
    assert!(!ok, "trained on CUDA without a GPU");
    assert!(
        err.contains("train.device cuda")
            && err.contains("libcuda.so")
            && !err.contains("panicked")
            && !err.contains("tokenizer"),
        "{err}"
    );
    assert!(!out.exists(), "{} was created", out.display());
}

/// Arguments the GPU path cannot take are refused before any GPU is looked for.
#[test]
fn device_cuda_refuses_what_it_cannot_run_before_opening_a_gpu() {
    let packed: &[&str] = &[
        "bench", "matmul", "--m", "8", "--k", "8", "--n", "8", "--tb", "--packed", "--device",
        "cuda",
    ];
    let reference: &[&str] = &[
        "bench",
        "attention",
        "--n",
        "64",
        "--kind",
        "reference",
        "--device",
        "cuda",
    ];
    let linear: &[&str] = &[
        "bench",
        "attention",
        "--n",
        "64",
        "--kind",
        "linear",
        "--device",
        "cuda",
    ];
    for (args, want) in [
        (packed, "not with --device cuda"),
        (reference, "has no CUDA version"),
        (linear, "has no CUDA version"),
    ] {
        let (ok, err) = qkv(args);
        assert!(
            !ok && err.contains(want) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
