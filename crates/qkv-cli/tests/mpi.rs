//! Data-parallel training under `mpirun` (OpenMPI), on loopback: the same losses as one
//! process, resuming with another number of ranks, and a rank that dies or hangs. Built only
//! with `--features mpi` (`.ci/run` installs OpenMPI and runs them).
#![cfg(feature = "mpi")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::scratch;

fn parallel(n: usize, seed: usize) -> String {
    common::parallel_corpus(n, seed, 9)
}

/// A job for `task` in `dir` (data written there): dropout on, so the ranks must draw the
/// masks one process would; two micro-batches per update; validation and checkpoints every
/// 5 updates of a 20-update cosine.
fn job(dir: &Path, task: &str) -> PathBuf {
    job_with(dir, task, 160)
}

fn job_with(dir: &Path, task: &str, max_tokens: usize) -> PathBuf {
    let (train, valid) = match task {
        "translate" => (parallel(400, 1), parallel(40, 2)),
        _ => (
            parallel(400, 1).replace('\t', " "),
            parallel(40, 2).replace('\t', " "),
        ),
    };
    std::fs::write(dir.join("train.txt"), train).unwrap();
    std::fs::write(dir.join("valid.txt"), valid).unwrap();
    let cfg = format!(
        r#"{{
  "task": "{task}",
  "data": {{ "train": "train.txt", "valid": "valid.txt" }},
  "tokenizer": {{ "vocab_size": 60 }},
  "model": {{ "preset": "tiny", "d_model": 32, "n_heads": 2, "d_ff": 64, "max_len": 32, "dropout": 0.1 }},
  "train": {{
    "max_steps": 20, "max_tokens": {max_tokens}, "accumulate": 2,
    "schedule": {{ "kind": "cosine", "peak": 0.003, "min": 0.0001, "warmup": 3, "total": 20 }},
    "label_smoothing": 0.1, "seed": 7, "valid_every": 5, "save_every": 5, "keep_last": 10,
    "average_last": 1
  }},
  "samples": 0
}}"#
    );
    let path = dir.join(format!("{task}.json"));
    std::fs::write(&path, cfg).unwrap();
    path
}

fn qkv_cmd(threads: usize) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qkv"));
    c.args(["--threads", &threads.to_string()]);
    c
}

/// `mpirun -n ranks qkv --threads 1 …` (allowed as root, as in CI containers).
fn mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-n", &ranks.to_string(), "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RUST_BACKTRACE", "0")
        .args([env!("CARGO_BIN_EXE_qkv"), "--threads", "1"]);
    c
}

fn train_args(cfg: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--config", cfg.to_str().unwrap(), "--out"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(out.to_str().unwrap().to_string());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn run(mut c: Command) -> Output {
    let out = c
        .output()
        .expect("start the command (is OpenMPI installed?)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{c:?} failed: {err}");
    assert!(!err.contains("panicked"), "{err}");
    out
}

/// The losses of a run's metrics.csv by (step, kind).
fn losses(run: &Path) -> BTreeMap<(u64, String), f64> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (step, kind, loss) = (col("step"), col("kind"), col("loss"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                (f[step].parse().unwrap(), f[kind].to_string()),
                f[loss].parse().unwrap(),
            )
        })
        .collect()
}

/// Every loss of `got` within `rel` of `want`'s at the same step and kind.
fn assert_close(
    want: &BTreeMap<(u64, String), f64>,
    got: &BTreeMap<(u64, String), f64>,
    steps: std::ops::RangeInclusive<u64>,
    rel: f64,
) {
    let mut compared = 0;
    for ((step, kind), w) in want.iter().filter(|((s, _), _)| steps.contains(s)) {
        let g = got
            .get(&(*step, kind.clone()))
            .unwrap_or_else(|| panic!("no {kind} loss at step {step}: {got:?}"));
        assert!(
            (g - w).abs() <= rel * w.abs(),
            "{kind} loss at step {step}: {g} against {w} (relative {:.2e})",
            (g - w).abs() / w.abs()
        );
        compared += 1;
    }
    assert!(
        compared as u64 >= steps.end() - steps.start(),
        "compared only {compared}"
    );
}

fn same_trajectory(task: &str, ranks: usize, max_tokens: usize) {
    let dir = scratch(&format!("mpi-{task}-{ranks}"));
    let cfg = job_with(&dir, task, max_tokens);
    let mut one = qkv_cmd(2);
    one.args(train_args(&cfg, &dir.join("one"), &[]));
    run(one);
    let mut two = mpirun(ranks);
    two.args(train_args(&cfg, &dir.join("two"), &[]));
    let out = run(two);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("data parallel: {ranks} ranks")),
        "{err}"
    );
    let (want, got) = (losses(&dir.join("one")), losses(&dir.join("two")));
    // 20 updates and 4 validations.
    assert_eq!(want.len(), 24, "{want:?}");
    assert_close(&want, &got, 1..=20, 1e-5);
    // The training moved: the losses are not one value repeated.
    assert!(
        want[&(20, "train".into())] < want[&(1, "train".into())] - 0.1,
        "{want:?}"
    );
}

#[test]
fn two_ranks_follow_one_process_translate() {
    same_trajectory("translate", 2, 160);
}

#[test]
fn two_ranks_follow_one_process_lm() {
    same_trajectory("lm", 2, 160);
}

/// Batches of two or three sentences over three ranks: some ranks have no rows of a batch,
/// and still take part in every sum.
#[test]
fn three_ranks_with_fewer_rows_than_ranks_follow_one_process() {
    same_trajectory("translate", 3, 24);
}

#[test]
fn a_checkpoint_of_two_ranks_resumes_in_one_and_in_two() {
    let dir = scratch("mpi-resume");
    let cfg = job(&dir, "translate");
    let mut whole = qkv_cmd(2);
    whole.args(train_args(&cfg, &dir.join("whole"), &[]));
    run(whole);
    let mut half = mpirun(2);
    half.args(train_args(&cfg, &dir.join("in1"), &["--max-steps", "10"]));
    run(half);
    assert!(dir.join("in1/checkpoint-0000010").exists());
    copy_dir(&dir.join("in1"), &dir.join("in2"));
    let mut in1 = qkv_cmd(2);
    in1.args(train_args(&cfg, &dir.join("in1"), &["--resume"]));
    run(in1);
    let mut in2 = mpirun(2);
    in2.args(train_args(&cfg, &dir.join("in2"), &["--resume"]));
    run(in2);
    let want = losses(&dir.join("whole"));
    assert_close(&want, &losses(&dir.join("in1")), 1..=20, 1e-5);
    assert_close(&want, &losses(&dir.join("in2")), 1..=20, 1e-5);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The pid of rank `rank` of the job training into `out`.
fn rank_pid(out: &Path, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let has = |hay: &[u8], needle: &[u8]| hay.split(|&b| b == 0).any(|p| p == needle);
        if has(&cmd, out.to_str()?.as_bytes())
            && has(&env, want.as_bytes())
            && !has(&cmd, b"mpirun")
        {
            return Some(pid);
        }
    }
    None
}

/// Start a long two-rank run that saves every 5 updates; returns once checkpoint 5 exists.
fn start_long_run(dir: &Path, timeout_s: &str) -> (Child, PathBuf, PathBuf) {
    let cfg = job(dir, "translate");
    let out = dir.join("run");
    let mut c = mpirun(2);
    c.args(train_args(
        &cfg,
        &out,
        &["--max-steps", "100000", "--mpi-timeout", timeout_s],
    ))
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = c.spawn().expect("start mpirun");
    let t0 = Instant::now();
    let ckpt = out.join("checkpoint-0000005");
    while !ckpt.join("trainer_state.json").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint after 120 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, cfg, out)
}

/// Wait for `child` at most `limit`; its output, or a failed test (after killing it).
fn wait_bounded(mut child: Child, limit: Duration) -> (Output, Duration) {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return (child.wait_with_output().unwrap(), t0.elapsed());
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("the job did not stop within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The run's checkpoint 5 still loads: training resumes from it in one process.
fn checkpoint_intact(cfg: &Path, out: &Path) {
    // The dead job's later checkpoints may be there too; resume from checkpoint 5 alone.
    let copy = out.with_file_name("resumed");
    std::fs::create_dir_all(&copy).unwrap();
    copy_dir(
        &out.join("checkpoint-0000005"),
        &copy.join("checkpoint-0000005"),
    );
    std::fs::copy(out.join("tokenizer.json"), copy.join("tokenizer.json")).unwrap();
    let mut c = qkv_cmd(2);
    c.args(train_args(cfg, &copy, &["--resume", "--max-steps", "6"]));
    let o = run(c);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("resuming from") && err.contains("(step 5)"),
        "{err}"
    );
}

#[test]
fn a_killed_rank_stops_the_job_and_the_checkpoint_survives() {
    let dir = scratch("mpi-killed");
    let (child, cfg, out) = start_long_run(&dir, "600");
    let pid = rank_pid(&out, 1).expect("rank 1's process");
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let (o, took) = wait_bounded(child, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("rank 1"), "the error names rank 1: {err}");
    eprintln!("stopped {took:?} after rank 1 was killed");
    checkpoint_intact(&cfg, &out);
}

#[test]
fn a_hung_rank_is_named_within_the_timeout() {
    let dir = scratch("mpi-hung");
    let (child, cfg, out) = start_long_run(&dir, "5");
    let pid = rank_pid(&out, 1).expect("rank 1's process");
    Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    let (o, took) = wait_bounded(child, Duration::from_secs(60));
    // A stopped process ignores everything but SIGKILL.
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("error: rank 0 of 2")
            && err.contains("rank 1 did not arrive or stopped inside it"),
        "{err}"
    );
    eprintln!("stopped {took:?} after rank 1 hung");
    checkpoint_intact(&cfg, &out);
}

/// Ranks started with different settings (here the seed) refuse to train together.
#[test]
fn ranks_with_different_configs_refuse_to_train() {
    let dir = scratch("mpi-mismatch");
    let cfg = job(&dir, "translate");
    let out = dir.join("run");
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RUST_BACKTRACE", "0");
    for (i, seed) in ["7", "8"].iter().enumerate() {
        if i > 0 {
            c.arg(":");
        }
        c.args([
            "-n",
            "1",
            "--oversubscribe",
            env!("CARGO_BIN_EXE_qkv"),
            "--threads",
            "1",
        ])
        .args(train_args(
            &cfg,
            &out,
            &["--seed", seed, "--mpi-timeout", "30"],
        ));
    }
    let o = c.output().expect("start mpirun");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("rank 1's training or model config differs from rank 0's"),
        "{err}"
    );
}
