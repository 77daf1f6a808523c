//! BLEU and chrF of a real system output (qkv's default job test translations) against the
//! bundled test references, compared with what sacreBLEU printed for the same files
//! (`scripts/reference/sacrebleu_system_output.py`).

use qkv::metrics::sacrebleu::{corpus_bleu, corpus_chrf, BleuOptions, ChrfOptions};
use std::path::Path;

#[test]
fn default_job_output_scores_exactly_as_sacrebleu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixture = root.join("tests/fixtures/sacrebleu");
    let refs: Vec<String> =
        qkv::data::read_parallel(&root.join("../../data/translate-en-es/test.tsv.gz"), false)
            .unwrap()
            .records
            .into_iter()
            .map(|(_, t)| t)
            .collect();
    let hyps: Vec<String> = std::fs::read_to_string(fixture.join("en-es-test.hyp"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!((hyps.len(), refs.len()), (660, 660));
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("en-es-test.json")).unwrap())
            .unwrap();
    let refs = [refs];
    let bleu = corpus_bleu(&hyps, &refs, &BleuOptions::default()).unwrap();
    let w = &want["bleu"];
    let u64s = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(bleu.counts, u64s(&w["counts"]));
    assert_eq!(bleu.totals, u64s(&w["totals"]));
    assert_eq!(
        (bleu.sys_len, bleu.ref_len),
        (
            w["sys_len"].as_u64().unwrap(),
            w["ref_len"].as_u64().unwrap()
        )
    );
    assert!((bleu.score - w["score"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(bleu.to_string(), w["line"].as_str().unwrap());
    let chrf = corpus_chrf(&hyps, &refs, &ChrfOptions::default()).unwrap();
    assert!((chrf.score - want["chrf"]["score"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(chrf.to_string(), want["chrf"]["line"].as_str().unwrap());
    let chrf_pp = corpus_chrf(&hyps, &refs, &ChrfOptions::plus_plus()).unwrap();
    assert!((chrf_pp.score - want["chrf_pp"]["score"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(
        chrf_pp.to_string(),
        want["chrf_pp"]["line"].as_str().unwrap()
    );
}
