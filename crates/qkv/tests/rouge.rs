//! ROUGE against Google's `rouge-score` 0.1.2 (with nltk's Porter stemmer), through the
//! fixture `scripts/reference/rouge_fixture.py` wrote: every stem, every precision, recall
//! and F1 of real outputs and edge cases, and the corpus means of the data's lead baselines.
//! Numbers are stored as Python's `repr` strings and read with `str::parse`, which round-trips
//! them exactly.

use qkv::metrics::rouge::{corpus, porter_stem, score, Rouge};
use serde_json::Value;
use std::io::Read;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rouge/rouge.json.gz"
    );
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_stem_is_nltks() {
    let f = fixture();
    let stems = f["stems"].as_array().unwrap();
    assert!(stems.len() > 15_000);
    let wrong: Vec<String> = stems
        .iter()
        .filter_map(|p| {
            let (w, s) = (p[0].as_str().unwrap(), p[1].as_str().unwrap());
            let got = porter_stem(w);
            (got != s).then(|| format!("{w}: {got}, nltk {s}"))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} differ: {:?}",
        wrong.len(),
        stems.len(),
        &wrong[..wrong.len().min(20)]
    );
}

fn as_triples(r: &Rouge) -> [[f64; 3]; 3] {
    [r.rouge1, r.rouge2, r.rouge_l].map(|s| [s.precision, s.recall, s.fmeasure])
}

#[test]
fn every_score_is_rouge_scores() {
    let f = fixture();
    let pairs = f["pairs"].as_array().unwrap();
    assert!(pairs.len() > 150);
    for p in pairs {
        let (t, pred) = (
            p["target"].as_str().unwrap(),
            p["prediction"].as_str().unwrap(),
        );
        for (key, stem) in [("plain", false), ("stem", true)] {
            let got = as_triples(&score(t, pred, stem));
            for (i, name) in ["rouge1", "rouge2", "rougeL"].iter().enumerate() {
                let want: Vec<f64> = p[key][name]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().parse().unwrap())
                    .collect();
                assert_eq!(
                    got[i].to_vec(),
                    want,
                    "{name} ({key}) of {:?}: {pred:?} against {t:?}",
                    p["kind"]
                );
            }
        }
    }
}

#[test]
fn the_lead_baselines_match_the_data_readme() {
    let f = fixture();
    let pairs = f["pairs"].as_array().unwrap();
    for (name, printed) in [
        (
            "first 6 words",
            "ROUGE-1 11.68 / ROUGE-2 1.73 / ROUGE-L 11.11 (F1 × 100)",
        ),
        (
            "first clause",
            "ROUGE-1 13.71 / ROUGE-2 2.83 / ROUGE-L 11.55 (F1 × 100)",
        ),
    ] {
        let these: Vec<(&str, &str)> = pairs
            .iter()
            .filter(|p| p["kind"] == name)
            .map(|p| {
                (
                    p["target"].as_str().unwrap(),
                    p["prediction"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(these.len(), 75);
        let r = corpus(&these, true);
        let want = &f["corpus"][name];
        for (got, key) in [r.rouge1, r.rouge2, r.rouge_l]
            .iter()
            .zip(["rouge1", "rouge2", "rougeL"])
        {
            let w: f64 = want[key].as_str().unwrap().parse().unwrap();
            assert!(
                (got.fmeasure - w).abs() < 1e-12,
                "{name} {key}: {} vs {w}",
                got.fmeasure
            );
        }
        assert_eq!(r.to_string(), printed);
    }
}
