//! Exports against their toolkits. CTranslate2: scripts/reference/ctranslate2_convert.py
//! converted the golden seq2seq fixtures with `ctranslate2.specs` (after checking that
//! CTranslate2 scores their targets with PyTorch's log-probabilities) into
//! tests/fixtures/ctranslate2/; qkv's exporter must write the same model.bin, byte for byte,
//! and the same configuration and vocabularies.

mod common;
use common::{fixture, load_params};
use qkv::export::ctranslate2::{self, Vocabularies};
use qkv::model::{Family, ModelConfig, Seq2Seq};
use std::path::{Path, PathBuf};

fn reference(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/ctranslate2")
        .join(name)
}

fn out_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qkv-export-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The fixture model and the vocabulary the reference script gave it (t0, t1, …).
fn fixture_model(name: &str) -> (Seq2Seq, Vocabularies) {
    let f = fixture(name);
    let cfg: ModelConfig = serde_json::from_str(&f.metadata()["config"]).unwrap();
    let mut m = Seq2Seq::new(cfg.clone(), 0).unwrap();
    load_params(&f, &mut m.params);
    let names = |n: usize| (0..n).map(|i| format!("t{i}")).collect::<Vec<_>>();
    let vocab = Vocabularies {
        source: names(cfg.vocab_size),
        target: names(cfg.tgt_vocab()),
        bos: "t1".into(),
        eos: "t2".into(),
        unk: "t3".into(),
    };
    (m, vocab)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn same_as_ctranslate2(name: &str) {
    let (m, vocab) = fixture_model(name);
    let out = out_dir(name);
    let written = ctranslate2::write(&m.config, &m.params, &vocab, &out).unwrap();
    let want = reference(name);
    assert_eq!(files(&out), files(&want), "{name}: the files written");
    assert_eq!(written.len(), files(&want).len());
    let (got, expected) = (
        std::fs::read(out.join("model.bin")).unwrap(),
        std::fs::read(want.join("model.bin")).unwrap(),
    );
    assert_eq!(got.len(), expected.len(), "{name}: model.bin sizes differ");
    if let Some(at) = got.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!("{name}: model.bin differs from CTranslate2's at byte {at}");
    }
    for file in files(&want).iter().filter(|f| f.ends_with(".json")) {
        assert_eq!(
            json(&out.join(file)),
            json(&want.join(file)),
            "{name}: {file}"
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn post_ln_model_with_two_vocabularies_matches_ctranslate2() {
    // Sinusoidal positions, ReLU, separate source and target tables, the output tied to
    // the target table: one alias for the projection and one for the equal position tables.
    same_as_ctranslate2("seq2seq_post");
}

#[test]
fn pre_ln_model_with_shared_embeddings_matches_ctranslate2() {
    // Learned positions, GELU, final norms, one table for both sides and the output.
    same_as_ctranslate2("seq2seq_pre");
}

#[test]
fn exporting_never_overwrites_a_model() {
    let (m, vocab) = fixture_model("seq2seq_pre");
    let out = out_dir("twice");
    ctranslate2::write(&m.config, &m.params, &vocab, &out).unwrap();
    let before = std::fs::read(out.join("model.bin")).unwrap();
    let (mut other, _) = fixture_model("seq2seq_pre");
    other.params.data.iter_mut().for_each(|x| *x = 0.5);
    let e = ctranslate2::write(&other.config, &other.params, &vocab, &out).unwrap_err();
    assert!(e.to_string().contains("model.bin: already exists"), "{e}");
    assert_eq!(std::fs::read(out.join("model.bin")).unwrap(), before);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn what_ctranslate2_cannot_run_is_refused_by_name() {
    let (m, vocab) = fixture_model("seq2seq_post");
    let refused = |cfg: &ModelConfig, vocab: &Vocabularies| {
        let out = out_dir("refused");
        let e = ctranslate2::write(cfg, &m.params, vocab, &out)
            .unwrap_err()
            .to_string();
        assert!(
            !out.join("model.bin").exists(),
            "nothing is written when refused"
        );
        e
    };
    let mut cfg = m.config.clone();
    cfg.family = Family::Lm;
    assert!(refused(&cfg, &vocab).contains("only seq2seq models"));
    let mut cfg = m.config.clone();
    cfg.attention_window = Some(4);
    assert!(refused(&cfg, &vocab).contains("sliding attention window (4)"));

    let mut short = vocab.clone();
    short.target.pop();
    let e = refused(&m.config, &short);
    assert!(
        e.contains("target tokenizer has 10 tokens but the model's target embedding has 11"),
        "{e}"
    );
    let mut no_unk = vocab.clone();
    no_unk.unk = "<unk>".into();
    let e = refused(&m.config, &no_unk);
    assert!(
        e.contains("unknown token \"<unk>\" is not in the target"),
        "{e}"
    );
}

/// MarianMT export against scripts/reference/marian_fixture.py, whose own mapping of the
/// post-LN fixture gives PyTorch's logits through transformers' MarianMTModel: every tensor
/// the same name, shape and values (sinusoid halves permuted, Q/K/V split, embeddings
/// untied, output tied to the target table).
#[test]
fn post_ln_model_matches_transformers_marian() {
    use qkv::checkpoint::{TensorData, TensorFile};
    use qkv::export::huggingface;
    let (m, _) = fixture_model("seq2seq_post");
    let want = TensorFile::open(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/marian/seq2seq_post.safetensors"),
    )
    .unwrap();
    let got = huggingface::tensors(&m.config, &m.params).unwrap();
    let mut names: Vec<&str> = got.iter().map(|(n, _, _)| n.as_str()).collect();
    names.sort_unstable();
    let mut expected = want.names();
    expected.sort();
    assert_eq!(names, expected);
    for (name, shape, data) in &got {
        let (s, d) = want.get(name).unwrap();
        let TensorData::F32(d) = d else {
            panic!("{name} is not f32")
        };
        assert_eq!(&s, shape, "{name}");
        assert!(data == &d, "{name} differs from the reference mapping");
    }
}

#[test]
fn what_marian_cannot_hold_is_refused_by_name() {
    use qkv::export::huggingface::check_exportable;
    let (pre, _) = fixture_model("seq2seq_pre");
    let e = check_exportable(&pre.config).unwrap_err().to_string();
    assert!(
        e.contains("MarianMT is post-LN") && e.contains("this model is pre-LN"),
        "{e}"
    );
    let (post, _) = fixture_model("seq2seq_post");
    let mut cfg = post.config.clone();
    cfg.positional = qkv::model::Positional::Learned;
    let e = check_exportable(&cfg).unwrap_err().to_string();
    assert!(e.contains("learned its own"), "{e}");
    let mut cfg = post.config.clone();
    cfg.layer_norm_eps = 1e-6;
    let e = check_exportable(&cfg).unwrap_err().to_string();
    assert!(e.contains("fixed at 1e-5; this model uses 0.000001"), "{e}");
    let mut cfg = post.config.clone();
    cfg.embed_norm = true;
    assert!(check_exportable(&cfg)
        .unwrap_err()
        .to_string()
        .contains("no LayerNorm"));
}

/// The remaining refusals of both exports, each by what the target cannot hold.
#[test]
fn every_other_refusal_names_its_reason() {
    use qkv::export::{ctranslate2, huggingface};
    use qkv::kernels::activation::Activation;
    use qkv::model::AttentionKind;
    let (post, _) = fixture_model("seq2seq_post");
    let with = |f: &dyn Fn(&mut ModelConfig)| {
        let mut c = post.config.clone();
        f(&mut c);
        c
    };
    let linear = with(&|c| c.attention = AttentionKind::Linear);
    let identity = with(&|c| c.activation = Activation::Identity);
    let hf = |c: &ModelConfig| huggingface::check_exportable(c).unwrap_err().to_string();
    let ct2 = |c: &ModelConfig| {
        ctranslate2::model_bin(c, &post.params)
            .unwrap_err()
            .to_string()
    };
    assert!(hf(&with(&|c| c.family = Family::Lm)).contains("only seq2seq models become MarianMT"));
    assert!(hf(&linear).contains("full softmax attention only"));
    assert!(hf(&identity).contains("feed-forward has an activation"));
    assert!(hf(&with(&|c| c.d_model = 15)).contains("must be even"));
    assert!(hf(&with(&|c| c.token_types = 2)).contains("no token types"));
    assert!(ct2(&linear).contains("linear attention has no CTranslate2 equivalent"));
    assert!(ct2(&identity).contains("a feed-forward without activation"));
}
