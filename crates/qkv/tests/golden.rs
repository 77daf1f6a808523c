//! Golden tests against PyTorch: `scripts/reference/make_fixtures.py` builds the same tiny
//! models in PyTorch (float64), and writes inputs, parameters, logits, loss, every parameter
//! gradient and a 10-step AdamW loss trajectory. Every tensor is compared by name.

mod common;
use common::{fixture, load_params, rel_err, train_mode, Case};
use qkv::checkpoint::{TensorData, TensorFile};
use qkv::data::{ClassifyBatch, LmBatch, Seq2SeqBatch};
use qkv::model::{Classifier, Family, LanguageModel, ModelConfig, Seq2Seq};
use qkv::optim::{AdamW, AdamWConfig};
use qkv::params::Params;

const TOL: f32 = 1e-4;

fn ids(f: &TensorFile, name: &str) -> (Vec<u32>, Vec<usize>) {
    match f.get(name).unwrap() {
        (shape, TensorData::I64(v)) => (v.into_iter().map(|x| x as u32).collect(), shape),
        _ => panic!("{name} is not int64"),
    }
}

fn f32s(f: &TensorFile, name: &str) -> Vec<f32> {
    match f.get(name).unwrap() {
        (_, TensorData::F32(v)) => v,
        _ => panic!("{name} is not f32"),
    }
}

fn meta(f: &TensorFile, key: &str) -> f32 {
    f.metadata()[key].parse().unwrap()
}

fn check_grads(f: &TensorFile, params: &Params, what: &str) {
    for spec in &params.specs {
        let want = f32s(f, &format!("grad.{}", spec.name));
        let got = params.grad_of(&spec.name).unwrap();
        let e = rel_err(got, &want);
        assert!(
            e <= TOL,
            "{what}: gradient of {} differs from PyTorch: relative error {e:.2e}",
            spec.name
        );
    }
}

fn adamw(f: &TensorFile) -> AdamWConfig {
    AdamWConfig {
        beta1: meta(f, "beta1"),
        beta2: meta(f, "beta2"),
        eps: meta(f, "eps"),
        weight_decay: meta(f, "weight_decay"),
        clip_norm: Some(meta(f, "clip_norm")),
    }
}

/// The fixture's model (any family) with its parameters and batch loaded.
fn model(f: &TensorFile) -> Case {
    let cfg: ModelConfig = serde_json::from_str(&f.metadata()["config"])
        .expect("fixture config parses as ModelConfig");
    let mut m = match cfg.family {
        Family::Seq2seq => {
            let ((src, ss), (tin, ts), (tout, _)) = (
                ids(f, "input.src"),
                ids(f, "input.tgt_in"),
                ids(f, "input.tgt_out"),
            );
            let n_tokens = tout.iter().filter(|&&t| t != cfg.pad_id).count();
            let batch = Seq2SeqBatch {
                src,
                tgt_in: tin,
                tgt_out: tout,
                batch: ss[0],
                src_len: ss[1],
                tgt_len: ts[1],
                n_tokens,
            };
            Case::Seq2Seq(Seq2Seq::new(cfg, 0).unwrap(), batch)
        }
        Family::Classifier => {
            let ((x, xs), (y, _)) = (ids(f, "input.tokens"), ids(f, "input.labels"));
            let batch = ClassifyBatch {
                tokens: x,
                labels: y,
                batch: xs[0],
                len: xs[1],
            };
            Case::Classifier(Classifier::new(cfg, 0).unwrap(), batch)
        }
        Family::Lm => {
            let ((x, xs), (y, _)) = (ids(f, "input.tokens"), ids(f, "input.targets"));
            let batch = LmBatch {
                input: x,
                target: y,
                batch: xs[0],
                len: xs[1],
            };
            Case::Lm(LanguageModel::new(cfg, 0).unwrap(), batch)
        }
    };
    load_params(f, m.params());
    m
}

/// Logits, loss, every gradient and the AdamW loss trajectory, each against PyTorch.
fn golden(name: &str) {
    let f = fixture(name);
    let mut m = model(&f);
    let ls = meta(&f, "label_smoothing");
    let e = rel_err(&m.logits(), &f32s(&f, "output.logits"));
    assert!(e <= TOL, "{name}: logits relative error {e:.2e}");
    let loss = m.loss_and_grad(train_mode(ls));
    let want = f32s(&f, "output.loss");
    assert!(
        rel_err(&[loss], &want) <= TOL,
        "{name}: loss {loss}, PyTorch {want:?}"
    );
    check_grads(&f, m.params(), name);

    let cfg = adamw(&f);
    let lr = meta(&f, "lr");
    let mut opt = AdamW::new(cfg.clone(), m.params().len());
    for (i, &w) in f32s(&f, "train.losses").iter().enumerate() {
        let loss = m.loss_and_grad(train_mode(ls));
        let rel = (loss - w).abs() / w.abs();
        assert!(
            rel <= TOL,
            "{name}: loss at step {i} is {loss}, PyTorch {w} (relative error {rel:.2e})"
        );
        opt.step(m.params(), lr).unwrap();
    }
}

#[test]
fn seq2seq_post_ln_matches_pytorch() {
    golden("seq2seq_post");
}
#[test]
fn seq2seq_pre_ln_shared_embeddings_matches_pytorch() {
    golden("seq2seq_pre");
}
#[test]
fn classifier_post_ln_matches_pytorch() {
    golden("classifier_post");
}
#[test]
fn classifier_pre_ln_matches_pytorch() {
    golden("classifier_pre");
}
#[test]
fn lm_post_ln_matches_pytorch() {
    golden("lm_post");
}
#[test]
fn lm_pre_ln_matches_pytorch() {
    golden("lm_pre");
}
