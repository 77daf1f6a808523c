//! Golden tests against PyTorch: `scripts/reference/make_fixtures.py` builds the same tiny
//! models in PyTorch (float64), and writes inputs, parameters, logits, loss, every parameter
//! gradient and a 10-step AdamW loss trajectory. Every tensor is compared by name.

mod common;
use common::{fixture, fixture_adamw, fixture_case, fixture_f32s, fixture_meta, rel_err};
use common::{train_mode, TOL};
use qkv::checkpoint::TensorFile;
use qkv::optim::AdamW;
use qkv::params::Params;

fn check_grads(f: &TensorFile, params: &Params, what: &str) {
    for spec in &params.specs {
        let want = fixture_f32s(f, &format!("grad.{}", spec.name));
        let got = params.grad_of(&spec.name).unwrap();
        let e = rel_err(got, &want);
        assert!(
            e <= TOL,
            "{what}: gradient of {} differs from PyTorch: relative error {e:.2e}",
            spec.name
        );
    }
}

/// Logits, loss, every gradient and the AdamW loss trajectory, each against PyTorch.
fn golden(name: &str) {
    let f = fixture(name);
    let mut m = fixture_case(&f);
    let ls = fixture_meta(&f, "label_smoothing");
    let e = rel_err(&m.logits(), &fixture_f32s(&f, "output.logits"));
    assert!(e <= TOL, "{name}: logits relative error {e:.2e}");
    let loss = m.loss_and_grad(train_mode(ls));
    let want = fixture_f32s(&f, "output.loss");
    assert!(
        rel_err(&[loss], &want) <= TOL,
        "{name}: loss {loss}, PyTorch {want:?}"
    );
    check_grads(&f, m.params(), name);

    let cfg = fixture_adamw(&f);
    let lr = fixture_meta(&f, "lr");
    let mut opt = AdamW::new(cfg.clone(), m.params().len());
    for (i, &w) in fixture_f32s(&f, "train.losses").iter().enumerate() {
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
