//! The tasks end to end through the binary, on tiny generated corpora: `qkv train` for each
//! task (tokenizer, batching, trainer, checkpoints, final evaluation), then `eval`, `translate`,
//! `classify`, `generate`, `average`, resuming, and bad input that must fail cleanly.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;
use common::{qkv, scratch, tiny_model};
use qkv::model::Family;

fn parallel(n: usize, seed: usize) -> String {
    common::parallel_corpus(n, seed, 5)
}

fn job(dir: &Path, task: &str, model: &str, max_steps: u64, files: [&str; 3]) -> PathBuf {
    let warmup = max_steps.min(10);
    let cfg = format!(
        r#"{{
  "task": "{task}",
  "data": {{ "train": "{}", "valid": "{}", "test": "{}" }},
  "tokenizer": {{ "vocab_size": 60 }},
  "model": {model},
  "train": {{
    "max_steps": {max_steps}, "max_tokens": 256, "accumulate": 1,
    "schedule": {{ "kind": "cosine", "peak": 0.003, "min": 0.0001, "warmup": {warmup}, "total": {max_steps} }},
    "optimizer": {{ "beta1": 0.9, "beta2": 0.98, "eps": 1e-9, "weight_decay": 0.0, "clip_norm": 1.0 }},
    "label_smoothing": 0.1, "seed": 1, "valid_every": 20, "save_every": 20, "keep_last": 2, "time_limit_s": null
  }},
  "decode": {{ "beam": 2 }},
  "out": "run",
  "samples": 1
}}"#,
        files[0], files[1], files[2]
    );
    let path = dir.join(format!("{task}.json"));
    std::fs::write(&path, cfg).unwrap();
    path
}

const TINY: &str = r#"{ "preset": "tiny", "d_model": 32, "n_heads": 2, "d_ff": 64, "max_len": 24, "dropout": 0.0 }"#;

/// `qkv eval` on a file with nothing to score fails, naming the file and what it lacks, once.
fn eval_of_an_empty_file_is_an_error(model: &Path, what: &str) {
    let empty = model.parent().unwrap().join("empty.txt");
    std::fs::write(&empty, "\n \n").unwrap();
    let (ok, out, err) = qkv(
        &[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            empty.to_str().unwrap(),
        ],
        None,
    );
    assert!(!ok, "{out}");
    assert!(
        err.contains("empty.txt") && err.contains(&format!("no {what} to evaluate")),
        "{err}"
    );
    assert_eq!(err.matches("to evaluate").count(), 1, "{err}");
}

/// Without a GPU, `qkv args` (a `--device cuda` command) fails naming what is missing: never
/// a CPU run in its place.
fn needs_a_gpu(args: &[&str], stdin: Option<&str>) {
    if qkv::cuda::driver_available() {
        return;
    }
    let (ok, _, err) = qkv(args, stdin);
    assert!(
        !ok && err.contains("--device cuda") && err.contains("libcuda.so"),
        "{args:?}: {err}"
    );
}

#[test]
fn translate_train_eval_translate_average_resume() {
    let dir = scratch("translate");
    std::fs::write(dir.join("train.tsv"), parallel(300, 1)).unwrap();
    std::fs::write(dir.join("valid.tsv"), parallel(20, 2)).unwrap();
    std::fs::write(dir.join("test.tsv"), parallel(20, 3)).unwrap();
    let model = TINY.replace(
        "\"preset\": \"tiny\"",
        "\"preset\": \"tiny\", \"share_embeddings\": true",
    );
    let cfg = job(
        &dir,
        "translate",
        &model,
        60,
        ["train.tsv", "valid.tsv", "test.tsv"],
    );
    let (ok, out, err) = qkv(&["train", "--config", cfg.to_str().unwrap()], None);
    assert!(ok, "{err}");
    assert!(out.contains("BLEU = ") && out.contains("chrF2 = "), "{out}");
    let run = dir.join("run");
    for f in [
        "best/model.safetensors",
        "best/tokenizer.json",
        "best/trainer_state.json",
        "metrics.csv",
        "test.hyp",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    // The loss curve is an 800 × 500 PNG (width and height are bytes 16..24 of the IHDR chunk).
    let png = std::fs::read(run.join("loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 800);
    assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 500);
    let best = run.join("best");
    // `--device cuda` decodes on the GPU: without one, `eval` and `translate` name what is
    // missing; `--dtype int8` (the CPU's kernels) is an error there, GPU or not.
    let (best_s, test_s) = (best.to_str().unwrap(), dir.join("test.tsv"));
    let eval = [
        "eval",
        "--model",
        best_s,
        "--data",
        test_s.to_str().unwrap(),
    ];
    needs_a_gpu(&[&eval[..], &["--device", "cuda"]].concat(), None);
    let translate = ["translate", "--model", best_s, "--device", "cuda"];
    needs_a_gpu(&translate, Some("the king\n"));
    let args = [&eval[..], &["--device", "cuda", "--dtype", "int8"]].concat();
    let (ok, _, err) = qkv(&args, None);
    assert!(
        !ok && err.contains("--dtype int8 runs decoding steps"),
        "{err}"
    );
    let args = [
        "translate",
        "--model",
        best.to_str().unwrap(),
        "--device",
        "cuda",
    ];
    let (ok, _, err) = qkv(
        &[&args[..], &["--dtype", "int8"]].concat(),
        Some("the king\n"),
    );
    assert!(
        !ok && err.contains("--dtype int8 runs decoding steps"),
        "{err}"
    );
    let (ok, out, err) = qkv(
        &[
            "eval",
            "--model",
            best.to_str().unwrap(),
            "--data",
            dir.join("test.tsv").to_str().unwrap(),
            "--beam",
            "1",
        ],
        None,
    );
    assert!(ok && out.contains("BLEU = "), "{out}{err}");
    eval_of_an_empty_file_is_an_error(&best, "`source<TAB>target` pairs");
    // A word-for-word task this small is learned: BLEU well above zero.
    let bleu: f64 = out
        .split("BLEU = ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(bleu > 20.0, "BLEU {bleu}");
    let (ok, out, err) = qkv(
        &[
            "translate",
            "--model",
            best.to_str().unwrap(),
            "--beam",
            "3",
            "--nbest",
            "2",
        ],
        Some("the king\ngreat house god\n"),
    );
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines.iter().all(|l| l.split('\t').count() == 2), "{out}");
    // Averaging the kept checkpoints gives a loadable model.
    let ckpts: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("checkpoint-")
        })
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert_eq!(ckpts.len(), 2);
    let avg = dir.join("avg");
    let mut args = vec!["average", "--output", avg.to_str().unwrap(), "--inputs"];
    args.extend(ckpts.iter().map(|s| s.as_str()));
    let (ok, _, err) = qkv(&args, None);
    assert!(ok, "{err}");
    let (ok, out, err) = qkv(
        &["translate", "--model", avg.to_str().unwrap()],
        Some("the son\n"),
    );
    assert!(ok && out.lines().count() == 1, "{out}{err}");
    // Two copies of a model decode as the model; two checkpoints as an ensemble, in
    // `translate` and `eval`.
    let translate = |models: &[&str]| {
        let mut args = vec!["translate", "--beam", "3", "--nbest", "2", "--model"];
        args.extend(models);
        let (ok, out, err) = qkv(&args, Some("the king\ngreat house god\n"));
        assert!(ok, "{err}");
        out
    };
    let best_s = best.to_str().unwrap();
    let alone = translate(&[best_s]);
    assert_eq!(translate(&[best_s, best_s]), alone);
    assert_eq!(translate(&[&ckpts[0], &ckpts[1]]).lines().count(), 2);
    let eval = |models: &[&str]| {
        let test = dir.join("test.tsv");
        let mut args = vec!["eval", "--data", test.to_str().unwrap(), "--model"];
        args.extend(models);
        let (ok, out, err) = qkv(&args, None);
        assert!(ok, "{err}");
        out.lines()
            .find(|l| l.starts_with("BLEU = "))
            .unwrap()
            .to_string()
    };
    assert_eq!(eval(&[best_s, best_s]), eval(&[best_s]));
    let test = dir.join("test.tsv");
    let args = ["eval", "--data", test.to_str().unwrap(), "--device", "cuda"];
    let (ok, _, err) = qkv(&[&args[..], &["--model", best_s, best_s]].concat(), None);
    assert!(
        !ok && err.contains("an ensemble decodes on the CPU"),
        "{err}"
    );
    let args = ["translate", "--device", "cuda", "--model", best_s, best_s];
    let (ok, _, err) = qkv(&args, Some("the king\n"));
    assert!(
        !ok && err.contains("an ensemble decodes on the CPU"),
        "{err}"
    );
    assert!(eval(&[&ckpts[0], &ckpts[1]]).contains("BLEU = "));
    // A fresh run never overwrites a used run directory; nbest must fit the beam.
    let (ok, _, err) = qkv(&["train", "--config", cfg.to_str().unwrap()], None);
    assert!(
        !ok && err.contains("already holds a run") && err.contains("--resume"),
        "{err}"
    );
    let (ok, _, err) = qkv(
        &[
            "translate",
            "--model",
            best.to_str().unwrap(),
            "--beam",
            "2",
            "--nbest",
            "3",
        ],
        Some("the king\n"),
    );
    assert!(!ok && err.contains("--nbest"), "{err}");
    // Resuming a finished run with more steps continues from step 60.
    let (ok, _, err) = qkv(
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--resume",
            "--max-steps",
            "70",
        ],
        None,
    );
    assert!(
        ok && err.contains("resuming from") && err.contains("step 60"),
        "{err}"
    );
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert!(
        csv.lines().any(|l| l.starts_with("70,")),
        "no step 70 in metrics"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn classify_and_lm_train_and_predict() {
    let dir = scratch("classify-lm");
    // Sentiment from the words alone.
    let mut tsv = String::new();
    for i in 0..300 {
        let (label, word) = if i % 2 == 0 {
            ("positive", "great good happy")
        } else {
            ("negative", "bad awful sad")
        };
        tsv += &format!(
            "{label}\t{} day {}\n",
            word.split(' ').nth(i % 3).unwrap(),
            ["today", "again", "now"][i % 3]
        );
    }
    for f in ["train.tsv", "valid.tsv", "test.tsv"] {
        std::fs::write(dir.join(f), &tsv).unwrap();
    }
    let cfg = job(
        &dir,
        "classify",
        TINY,
        40,
        ["train.tsv", "valid.tsv", "test.tsv"],
    );
    let (ok, out, err) = qkv(&["train", "--config", cfg.to_str().unwrap()], None);
    assert!(ok, "{err}");
    assert!(out.contains("accuracy 100.00%"), "{out}");
    let best = dir.join("run/best");
    let (ok, out, err) = qkv(
        &["classify", "--model", best.to_str().unwrap()],
        Some("happy day now\nawful day again\n"),
    );
    assert!(ok, "{err}");
    let labels: Vec<&str> = out.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(labels, ["positive", "negative"]);
    eval_of_an_empty_file_is_an_error(&best, "`label<TAB>text` examples");
    for command in ["classify", "embed", "serve"] {
        let args = [
            command,
            "--model",
            best.to_str().unwrap(),
            "--device",
            "cuda",
        ];
        needs_a_gpu(&args, Some("happy day now\n"));
    }
    // bf16 inference (f32 where the CPU lacks avx512_bf16) agrees with f32.
    let (ok, out16, err) = qkv(
        &[
            "classify",
            "--model",
            best.to_str().unwrap(),
            "--dtype",
            "bf16",
        ],
        Some("happy day now\nawful day again\n"),
    );
    assert!(ok, "{err}");
    for (a, b) in out.lines().zip(out16.lines()) {
        let (la, pa) = a.split_once('\t').unwrap();
        let (lb, pb) = b.split_once('\t').unwrap();
        let (pa, pb): (f32, f32) = (pa.parse().unwrap(), pb.parse().unwrap());
        assert!(la == lb && (pa - pb).abs() < 0.02, "f32 {a} vs bf16 {b}");
    }

    let text = "to be or not to be that is the question\n".repeat(80);
    for f in ["train.txt", "valid.txt"] {
        std::fs::write(dir.join(f), &text).unwrap();
    }
    std::fs::remove_dir_all(dir.join("run")).unwrap();
    let lm_job = |valid: &str| job(&dir, "lm", TINY, 40, ["train.txt", valid, "valid.txt"]);
    let cfg = lm_job("valid.txt");
    let (ok, out, err) = qkv(&["train", "--config", cfg.to_str().unwrap()], None);
    assert!(ok, "{err}");
    assert!(
        out.contains("perplexity") && out.contains("bits per character"),
        "{out}"
    );
    let best = dir.join("run/best");
    let (ok, out, err) = qkv(
        &[
            "generate",
            "--model",
            best.to_str().unwrap(),
            "--prompt",
            "to be or",
            "--greedy",
            "--max-new-tokens",
            "6",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("to be or not to be"), "{out}");
    eval_of_an_empty_file_is_an_error(&best, "text");
    // A server, generation and evaluation on the GPU.
    let best_s = best.to_str().unwrap();
    needs_a_gpu(&["serve", "--model", best_s, "--device", "cuda"], None);
    let prompt = ["--prompt", "to be", "--device", "cuda"];
    needs_a_gpu(
        &[&["generate", "--model", best_s][..], &prompt].concat(),
        None,
    );
    let valid = dir.join("valid.txt");
    let eval = ["eval", "--model", best_s, "--data", valid.to_str().unwrap()];
    needs_a_gpu(&[&eval[..], &["--device", "cuda"]].concat(), None);
    // Text shorter than one block of max_len tokens names its file, in eval and in a job
    // (before any training).
    std::fs::write(dir.join("short.txt"), "to be\n").unwrap();
    let short = dir.join("short.txt");
    let args = ["eval", "--model", best.to_str().unwrap(), "--data"];
    let (ok, _, err) = qkv(&[&args[..], &[short.to_str().unwrap()]].concat(), None);
    assert!(!ok && err.contains("short.txt: the text has"), "{err}");
    std::fs::remove_dir_all(dir.join("run")).unwrap();
    let cfg = lm_job("short.txt");
    let (ok, _, err) = qkv(&["train", "--config", cfg.to_str().unwrap()], None);
    assert!(!ok && err.contains("short.txt: the text has"), "{err}");
    assert!(!err.contains("update 1/"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_fails_cleanly() {
    let dir = scratch("bad");
    std::fs::write(dir.join("train.tsv"), "ok line\tbuena\nno tab here\n").unwrap();
    std::fs::write(dir.join("valid.tsv"), "a\tb\n").unwrap();
    let cfg = job(
        &dir,
        "translate",
        TINY,
        5,
        ["train.tsv", "valid.tsv", "valid.tsv"],
    );
    let (ok, _, err) = qkv(&["train", "--config", cfg.to_str().unwrap()], None);
    assert!(
        !ok && err.contains("train.tsv:2") && err.contains("0 tab(s)"),
        "{err}"
    );
    // Invalid UTF-8 names the line.
    std::fs::write(dir.join("train.tsv"), b"a\tb\n\xff\xfe\tc\n").unwrap();
    let (ok, _, err) = qkv(&["train", "--config", cfg.to_str().unwrap()], None);
    assert!(
        !ok && err.contains("train.tsv:2") && err.contains("UTF-8"),
        "{err}"
    );
    // A typo in the model config is named.
    std::fs::write(dir.join("train.tsv"), "a\tb\n").unwrap();
    let bad = job(
        &dir,
        "translate",
        r#"{ "preset": "tiny", "d_modle": 32 }"#,
        5,
        ["train.tsv", "valid.tsv", "valid.tsv"],
    );
    let (ok, _, err) = qkv(&["train", "--config", bad.to_str().unwrap()], None);
    assert!(!ok && err.contains("d_modle"), "{err}");
    // So is an unknown precision.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let bad_precision = text.replacen("\"train\": {", "\"train\": { \"precision\": \"fp16\",", 1);
    assert_ne!(text, bad_precision, "the job has a train section");
    std::fs::write(&bad, bad_precision).unwrap();
    let (ok, _, err) = qkv(&["train", "--config", bad.to_str().unwrap()], None);
    assert!(!ok && err.contains("fp16") && err.contains("bf16"), "{err}");
    // Missing files and non-model directories.
    let (ok, _, err) = qkv(
        &["train", "--config", dir.join("nope.json").to_str().unwrap()],
        None,
    );
    assert!(!ok && err.contains("nope.json"), "{err}");
    let (ok, _, err) = qkv(
        &["translate", "--model", dir.to_str().unwrap()],
        Some("x\n"),
    );
    assert!(!ok && err.contains("config.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let dir = scratch("sigint");
    std::fs::write(dir.join("train.tsv"), parallel(300, 1)).unwrap();
    std::fs::write(dir.join("valid.tsv"), parallel(20, 2)).unwrap();
    let cfg = job(
        &dir,
        "translate",
        TINY,
        1_000_000,
        ["train.tsv", "valid.tsv", "valid.tsv"],
    );
    let child = Command::new(env!("CARGO_BIN_EXE_qkv"))
        .args(["--threads", "1", "train", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way (metrics are being written), then send SIGINT.
    let metrics = dir.join("run/metrics.csv");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 5) {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("interrupted; checkpoint saved"), "{err}");
    let ckpt = std::fs::read_dir(dir.join("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("checkpoint-"));
    assert!(ckpt.is_some(), "no checkpoint after Ctrl-C");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn per_side_vocabularies_train_and_translate() {
    let dir = scratch("per-side");
    std::fs::write(dir.join("train.tsv"), parallel(200, 1)).unwrap();
    std::fs::write(dir.join("valid.tsv"), parallel(20, 2)).unwrap();
    let cfg = job(
        &dir,
        "translate",
        TINY,
        20,
        ["train.tsv", "valid.tsv", "valid.tsv"],
    );
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        r#""tokenizer": { "vocab_size": 60 }"#,
        r#""tokenizer": { "vocab_size": 40, "joint": false }"#,
    );
    std::fs::write(&cfg, text).unwrap();
    let (ok, out, err) = qkv(&["train", "--config", cfg.to_str().unwrap()], None);
    assert!(ok && out.contains("BLEU = "), "{out}{err}");
    let best = dir.join("run/best");
    assert!(best.join("target_tokenizer.json").exists());
    let (ok, out, err) = qkv(
        &["translate", "--model", best.to_str().unwrap()],
        Some("the king\n"),
    );
    assert!(ok && out.lines().count() == 1, "{out}{err}");
    // Sharing embeddings across two vocabularies is refused with a reason.
    std::fs::remove_dir_all(dir.join("run")).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        r#""preset": "tiny","#,
        r#""preset": "tiny", "share_embeddings": true,"#,
    );
    std::fs::write(&cfg, text).unwrap();
    let (ok, _, err) = qkv(&["train", "--config", cfg.to_str().unwrap()], None);
    assert!(
        !ok && err.contains("share_embeddings needs one vocabulary"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A model directory's files are user input too: absurd sizes are errors naming the field
/// (never an allocation that aborts), inputs longer than the model reads are errors naming
/// the line (never cut), and the decoding defaults saved with the model apply.
#[test]
fn model_files_are_checked_and_inputs_are_never_cut() {
    let s2s = tiny_model(Family::Seq2seq, "files-s2s");
    let lm = tiny_model(Family::Lm, "files-lm");
    let cls = tiny_model(Family::Classifier, "files-cls");
    // 64 positions: a 100-word line does not fit.
    let long = "the king ".repeat(100);
    let (ok, _, err) = qkv(
        &["translate", "--model", s2s.to_str().unwrap()],
        Some(&format!("the king\n{long}\n")),
    );
    assert!(
        !ok && err.contains("stdin line 2") && err.contains("limit of 63"),
        "{err}"
    );
    let (ok, _, err) = qkv(
        &[
            "generate",
            "--model",
            lm.to_str().unwrap(),
            "--prompt",
            &long,
        ],
        None,
    );
    assert!(
        !ok && err.contains("prompt 1") && err.contains("limit of 62"),
        "{err}"
    );
    // The model's decode.json decides the beam: nbest 2 needs a beam of 2.
    std::fs::write(s2s.join("decode.json"), r#"{"beam": 1}"#).unwrap();
    let (ok, _, err) = qkv(
        &[
            "translate",
            "--model",
            s2s.to_str().unwrap(),
            "--nbest",
            "2",
        ],
        Some("the king\n"),
    );
    assert!(!ok && err.contains("--beam 1"), "{err}");
    let (ok, out, err) = qkv(
        &[
            "translate",
            "--model",
            s2s.to_str().unwrap(),
            "--nbest",
            "2",
            "--beam",
            "2",
        ],
        Some("the king\n"),
    );
    assert!(
        ok && out.lines().next().unwrap().split('\t').count() == 2,
        "{err}"
    );
    std::fs::write(s2s.join("decode.json"), r#"{"beams": 1}"#).unwrap();
    let (ok, _, err) = qkv(
        &["translate", "--model", s2s.to_str().unwrap()],
        Some("the king\n"),
    );
    assert!(
        !ok && err.contains("decode.json") && err.contains("beams"),
        "{err}"
    );
    std::fs::remove_file(s2s.join("decode.json")).unwrap();
    // d_model 10^12 in config.json: an error naming the field, for every family's loader.
    for (dir, cmd) in [(&s2s, "translate"), (&lm, "generate")] {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
        cfg["d_model"] = 1_000_000_000_000u64.into();
        std::fs::write(&path, cfg.to_string()).unwrap();
        let mut args = vec![cmd, "--model", dir.to_str().unwrap()];
        if cmd == "generate" {
            args.extend(["--prompt", "x"]);
        }
        let (ok, _, err) = qkv(&args, Some("the king\n"));
        assert!(
            !ok && err.contains("d_model 1000000000000 is above the cap"),
            "{cmd}: {err}"
        );
        std::fs::write(&path, text).unwrap();
    }
    let (ok, _, err) = qkv(
        &["classify", "--model", cls.to_str().unwrap()],
        Some(&format!("the king\n\n{long}\n")),
    );
    assert!(
        !ok && err.contains("stdin line 3") && err.contains("limit of 64"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&s2s);
    let _ = std::fs::remove_dir_all(&lm);
    let _ = std::fs::remove_dir_all(&cls);
}

/// A job that names only its task and data trains with every default (here with fewer
/// updates, so the test is quick), and a logged run (stderr not a terminal) prints progress
/// lines.
#[test]
fn a_job_with_only_task_and_data_trains() {
    let dir = scratch("minimal");
    let mut tsv = String::new();
    for i in 0..60 {
        let label = ["neg", "pos"][i % 2];
        let text = ["a sad bad day", "a happy good day"][i % 2];
        tsv += &format!("{label}\t{text} {i}\n");
    }
    std::fs::write(dir.join("train.tsv"), &tsv).unwrap();
    std::fs::write(dir.join("valid.tsv"), &tsv[..200]).unwrap();
    let cfg = dir.join("job.json");
    std::fs::write(
        &cfg,
        r#"{"task": "classify", "data": {"train": "train.tsv", "valid": "valid.tsv"}}"#,
    )
    .unwrap();
    let out = dir.join("run");
    let (ok, _, err) = qkv(
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--max-steps",
            "3",
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(err.contains("update 1/3 loss"), "no progress line: {err}");
    assert!(out.join("best").join("decode.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `passage<TAB>summary` lines whose "summary" is the passage's first two words.
fn summaries(n: usize, seed: usize) -> String {
    parallel(n, seed)
        .lines()
        .map(|l| {
            let passage = l.split('\t').next().unwrap();
            let head: Vec<&str> = passage.split(' ').take(2).collect();
            format!("{passage}\t{}\n", head.join(" "))
        })
        .collect()
}

/// A summarize job trains a Seq2Seq model whose directory says it summarizes: the test report
/// and `qkv eval` give ROUGE. A second job warm-starts from it (`init_from`: its config,
/// tokenizer and every parameter); one whose overrides change a shape is refused, naming
/// the tensor.
#[test]
fn summarize_reports_rouge_and_warm_starts() {
    let dir = scratch("summarize");
    std::fs::write(dir.join("train.tsv"), summaries(300, 1)).unwrap();
    std::fs::write(dir.join("valid.tsv"), summaries(20, 2)).unwrap();
    std::fs::write(dir.join("test.tsv"), summaries(20, 3)).unwrap();
    let cfg = job(
        &dir,
        "summarize",
        TINY,
        40,
        ["train.tsv", "valid.tsv", "test.tsv"],
    );
    let (ok, out, err) = qkv(&["train", "--config", cfg.to_str().unwrap()], None);
    assert!(ok, "{err}");
    assert!(out.contains("ROUGE-1 ") && !out.contains("BLEU"), "{out}");
    let best = dir.join("run/best");
    assert_eq!(
        std::fs::read_to_string(best.join("task.json")).unwrap(),
        "\"summarize\""
    );
    let (ok, out, err) = qkv(
        &[
            "eval",
            "--model",
            best.to_str().unwrap(),
            "--data",
            dir.join("test.tsv").to_str().unwrap(),
            "--no-repeat-ngram-size",
            "2",
            "--min-len",
            "2",
        ],
        None,
    );
    assert!(ok && out.contains("ROUGE-L "), "{out}{err}");
    // MBR returns, of the beam's outputs, the one qkv::mbr ranks first by ROUGE-L; with
    // --nbest it reorders them; eval says it ran it.
    let sources: String = std::fs::read_to_string(dir.join("test.tsv"))
        .unwrap()
        .lines()
        .map(|l| format!("{}\n", l.split('\t').next().unwrap()))
        .collect();
    let model = best.to_str().unwrap();
    let run = |extra: &[&str]| -> Vec<Vec<String>> {
        let mut args = vec!["translate", "--model", model, "--beam", "4"];
        args.extend(extra);
        let (ok, out, err) = qkv(&args, Some(&sources));
        assert!(ok, "{err}");
        out.lines()
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect()
    };
    let nbest = run(&["--nbest", "4"]);
    let chosen = run(&["--mbr", "4"]);
    let reordered = run(&["--mbr", "4", "--nbest", "4"]);
    assert_eq!(nbest.len(), 20);
    let mut moved = 0;
    for ((cands, one), all) in nbest.iter().zip(&chosen).zip(&reordered) {
        let order = qkv::mbr::rank(cands, qkv::mbr::Utility::RougeL).unwrap();
        moved += usize::from(order[0] != 0);
        assert_eq!(one, &vec![cands[order[0]].clone()]);
        let want: Vec<String> = order.iter().map(|&i| cands[i].clone()).collect();
        assert_eq!(all, &want);
    }
    // Somewhere the consensus is not the most probable output, so MBR changed something.
    assert!(moved > 0, "{nbest:?}");
    // --sampling draws the beam's worth of outputs per input instead, reproducibly.
    let sampled = run(&["--sampling", "--temperature", "2", "--nbest", "4"]);
    assert!(sampled.iter().all(|s| s.len() == 4), "{sampled:?}");
    assert_ne!(sampled, nbest);
    assert_eq!(
        sampled,
        run(&["--sampling", "--temperature", "2", "--nbest", "4"])
    );
    // --mbr-references scores the beam's outputs against samples instead: those --sampling
    // draws with the references' seed.
    let seed = (7 ^ qkv::tasks::translate::REFERENCE_STREAM).to_string();
    let (ok, out, err) = qkv(
        &[
            "translate",
            "--model",
            model,
            "--sampling",
            "--beam",
            "8",
            "--nbest",
            "8",
            "--temperature",
            "2",
            "--seed",
            &seed,
        ],
        Some(&sources),
    );
    assert!(ok, "{err}");
    let drawn: Vec<Vec<String>> = out
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect();
    let against = run(&[
        "--mbr",
        "4",
        "--nbest",
        "4",
        "--mbr-references",
        "8",
        "--temperature",
        "2",
        "--seed",
        "7",
    ]);
    assert_eq!(against.len(), nbest.len());
    for ((cands, refs), all) in nbest.iter().zip(&drawn).zip(&against) {
        assert_eq!(refs.len(), 8);
        let order = qkv::mbr::rank_against(cands, refs, qkv::mbr::Utility::RougeL).unwrap();
        let want: Vec<String> = order.iter().map(|&i| cands[i].clone()).collect();
        assert_eq!(all, &want);
    }
    // eval says how MBR ran.
    let test = dir.join("test.tsv");
    for (extra, says) in [
        (&[][..], "beam 4, MBR over 4,"),
        (
            &["--mbr-references", "6"][..],
            "beam 4, MBR over 4 against 6 samples,",
        ),
    ] {
        let mut args = vec![
            "eval",
            "--model",
            model,
            "--data",
            test.to_str().unwrap(),
            "--beam",
            "4",
            "--mbr",
            "4",
        ];
        args.extend(extra);
        let (ok, out, err) = qkv(&args, None);
        assert!(ok && out.contains(says), "{out}{err}");
    }
    // A summarizer reads the start of a passage longer than its max_len (24) and says so.
    let long = format!("{}\nthe king\n", "the king and the house ".repeat(20));
    let (ok, out, err) = qkv(
        &["translate", "--model", best.to_str().unwrap()],
        Some(&long),
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        err.contains("1 of 2 passages were longer than the model's 23 tokens"),
        "{err}"
    );

    let warm = |model: &str, out: &str| {
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(TINY, model)
            .replace(
                r#""task": "summarize","#,
                &format!(r#""task": "summarize", "init_from": "{}","#, best.display()),
            )
            .replace(r#""out": "run""#, &format!(r#""out": "{out}""#));
        let path = dir.join(format!("{out}.json"));
        std::fs::write(&path, text).unwrap();
        qkv(
            &[
                "train",
                "--config",
                path.to_str().unwrap(),
                "--max-steps",
                "5",
            ],
            None,
        )
    };
    let (ok, _, err) = warm(r#"{ "dropout": 0.0 }"#, "warm");
    assert!(ok, "{err}");
    // Every tensor of the tiny model came from the first run.
    let line = err
        .lines()
        .find(|l| l.starts_with("initialised"))
        .expect(&err);
    let words: Vec<&str> = line.split(' ').collect();
    assert_eq!(words[1], words[5], "{line}");
    assert!(line.contains("(0 of its tensors unused)"), "{line}");
    let (ok, _, err) = warm(r#"{ "d_ff": 48 }"#, "wrong");
    assert!(!ok);
    assert!(err.contains("ffn") && err.contains("has shape"), "{err}");
}

/// `"best_metric": "rougeL"` scores every validation by decoding the validation passages
/// the way the job decodes (the value `qkv eval` gives that checkpoint), logs it in
/// `metrics.csv`, and keeps as `best/` the checkpoint that scored highest.
#[test]
fn summarize_keeps_the_checkpoint_with_the_best_validation_rouge() {
    let dir = scratch("summarize-best-rouge");
    std::fs::write(dir.join("train.tsv"), summaries(300, 1)).unwrap();
    std::fs::write(dir.join("valid.tsv"), summaries(20, 2)).unwrap();
    let cfg = job(
        &dir,
        "summarize",
        TINY,
        60,
        ["train.tsv", "valid.tsv", "valid.tsv"],
    );
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        r#""keep_last": 2,"#,
        r#""keep_last": 3, "best_metric": "rougeL","#,
    );
    std::fs::write(&cfg, text).unwrap();
    let (ok, _, err) = qkv(&["train", "--config", cfg.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let run = dir.join("run");
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let scored: Vec<(u64, f64)> = csv
        .lines()
        .filter(|l| l.contains(",valid,"))
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f[7], "rougeL", "{l}");
            (f[0].parse().unwrap(), f[8].parse().unwrap())
        })
        .collect();
    let steps: Vec<u64> = scored.iter().map(|s| s.0).collect();
    assert_eq!(steps, [20, 40, 60], "{csv}");
    let valid = dir.join("valid.tsv");
    for &(step, value) in &scored {
        let ckpt = run.join(format!("checkpoint-{step:07}"));
        let (ok, out, err) = qkv(
            &[
                "eval",
                "--model",
                ckpt.to_str().unwrap(),
                "--data",
                valid.to_str().unwrap(),
            ],
            None,
        );
        assert!(ok, "{err}");
        let printed: f64 = out
            .split("ROUGE-L ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|v| v.parse().ok())
            .expect(&out);
        assert!(
            (printed - value).abs() < 0.006,
            "step {step}: {value} vs {out}"
        );
    }
    // The first highest score's checkpoint is best/ (a later tie does not replace it).
    let top = scored
        .iter()
        .fold(scored[0], |a, &b| if b.1 > a.1 { b } else { a });
    assert!(top.1 > 0.0, "nothing learned: {scored:?}");
    let state = std::fs::read_to_string(run.join("best/trainer_state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["step"], top.0, "{state} {scored:?}");
    assert_eq!(
        std::fs::read(run.join("best/model.safetensors")).unwrap(),
        std::fs::read(run.join(format!("checkpoint-{:07}/model.safetensors", top.0))).unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A model directory whose `task.json` names no task is an error naming the file.
#[test]
fn an_unknown_task_in_a_model_directory_is_an_error_naming_the_file() {
    let model = tiny_model(Family::Seq2seq, "bad-task");
    std::fs::write(model.join("task.json"), "\"poetry\"").unwrap();
    let (ok, _, err) = qkv(
        &["translate", "--model", model.to_str().unwrap()],
        Some("the king\n"),
    );
    assert!(!ok);
    assert!(
        err.contains("task.json") && err.contains("invalid task"),
        "{err}"
    );
}
