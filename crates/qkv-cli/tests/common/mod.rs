//! Helpers shared by the integration tests that need a model directory.
#![allow(dead_code)]

use qkv::data::Tokenizer;
use qkv::model::{Classifier, Family, LanguageModel, ModelConfig, Seq2Seq};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub const TEXTS: [&str; 6] = [
    "the king went to the house",
    "great people of the land",
    "the son of god",
    "a house in the great land",
    "people and kings",
    "the land of the son",
];

pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qkv-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A random-weight model of `family` with a tokenizer (and labels) saved as a model directory.
pub fn tiny_model(family: Family, name: &str) -> PathBuf {
    let dir = scratch(name);
    let tok = Tokenizer::train_bpe(TEXTS.iter().cycle().take(60), 80, false).unwrap();
    let mut cfg = ModelConfig::preset("tiny", family, tok.vocab_size()).unwrap();
    cfg.max_len = 64;
    cfg.pad_id = tok.pad;
    let params = match family {
        Family::Classifier => {
            cfg.n_classes = 3;
            std::fs::write(
                dir.join("labels.json"),
                r#"["negative", "neutral", "positive"]"#,
            )
            .unwrap();
            Classifier::new(cfg.clone(), 1).unwrap().params
        }
        Family::Seq2seq => Seq2Seq::new(cfg.clone(), 1).unwrap().params,
        Family::Lm => LanguageModel::new(cfg.clone(), 1).unwrap().params,
    };
    qkv::checkpoint::save(&dir, &cfg, &params, None).unwrap();
    tok.save(&dir.join("tokenizer.json")).unwrap();
    dir
}

/// Run the binary with 2 threads: (success, stdout, stderr). A panic fails the test.
pub fn qkv(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qkv"))
        .args(["--threads", "2"])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qkv");
    let mut input = child.stdin.take().unwrap();
    // The process may exit (on bad input) before reading stdin.
    let _ = input.write_all(stdin.unwrap_or("").as_bytes());
    drop(input);
    let out = child.wait_with_output().unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(!e.contains("panicked"), "qkv panicked: {e}");
    // An abort (e.g. a failed allocation) or any other signal is never an answer.
    assert!(
        out.status.code().is_some(),
        "qkv was killed: {:?} {e}",
        out.status
    );
    (out.status.success(), o, e)
}

const WORDS: [(&str, &str); 8] = [
    ("the", "el"),
    ("king", "rey"),
    ("house", "casa"),
    ("god", "dios"),
    ("land", "tierra"),
    ("son", "hijo"),
    ("great", "grande"),
    ("people", "pueblo"),
];

/// `n` word-for-word "translations" (`english<TAB>spanish` lines) of random word strings of
/// 2 to 1 + `longest` words.
pub fn parallel_corpus(n: usize, seed: usize, longest: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let len = 2 + (i * 7 + seed) % longest;
        let idx: Vec<usize> = (0..len)
            .map(|j| (i * 31 + j * 17 + seed * 3) % WORDS.len())
            .collect();
        let en: Vec<&str> = idx.iter().map(|&k| WORDS[k].0).collect();
        let es: Vec<&str> = idx.iter().map(|&k| WORDS[k].1).collect();
        out += &format!("{}\t{}\n", en.join(" "), es.join(" "));
    }
    out
}
