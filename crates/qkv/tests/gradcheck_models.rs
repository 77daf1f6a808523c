//! Finite-difference checks of every layer's backward through whole models: all three
//! families, both LayerNorm placements, ReLU/GELU, sinusoidal/learned positions, tied outputs,
//! BERT-style embeddings (token types, LayerNorm).

mod common;
use common::{tiny, train_mode, Case};
use qkv::backend::Cpu;
use qkv::model::{Family, Mode, NormPlacement};

fn check(m: Case, what: &str) {
    check_in(m, what, train_mode(0.1));
}

/// As `check`, in `mode` (a fixed dropout seed makes the dropped network a fixed function).
fn check_in(mut m: Case, what: &str, mode: Mode) {
    m.loss_and_grad(mode);
    let analytic = m.params().grad.clone();
    let specs = m.params().specs.clone();
    let h = 1e-2f32;
    let mut worst = (0.0f32, String::new());
    for spec in &specs {
        // A few entries of every parameter tensor.
        for k in 0..4 {
            let i = spec.offset + (k * 7919 + 13) % spec.len;
            let orig = m.params().data[i];
            m.params().data[i] = orig + h;
            let lp = m.loss_and_grad(mode) as f64;
            m.params().data[i] = orig - h;
            let lm = m.loss_and_grad(mode) as f64;
            m.params().data[i] = orig;
            let numeric = ((lp - lm) / (2.0 * h as f64)) as f32;
            let a = analytic[i];
            let err = (a - numeric).abs() / (a.abs().max(numeric.abs()) + 2e-3);
            if err > worst.0 {
                worst = (
                    err,
                    format!(
                        "{} [{}]: analytic {a}, numeric {numeric}",
                        spec.name,
                        i - spec.offset
                    ),
                );
            }
        }
    }
    assert!(
        worst.0 < 3e-2,
        "{what}: worst gradient mismatch {:.3e} at {}",
        worst.0,
        worst.1
    );
}

#[test]
fn seq2seq_post_ln_gradients() {
    check(
        Case::random(tiny(Family::Seq2seq, NormPlacement::Post, true, false), 1),
        "seq2seq post",
    );
}

#[test]
fn seq2seq_pre_ln_gradients_learned_positions() {
    check(
        Case::random(tiny(Family::Seq2seq, NormPlacement::Pre, true, true), 2),
        "seq2seq pre",
    );
}

#[test]
fn classifier_gradients_both_poolings() {
    for (norm, pooling) in [
        (NormPlacement::Post, qkv::model::Pooling::Mean),
        (NormPlacement::Pre, qkv::model::Pooling::First),
    ] {
        let mut cfg = tiny(Family::Classifier, norm, true, norm == NormPlacement::Pre);
        cfg.pooling = pooling;
        check(Case::random(cfg, 3), "classifier");
    }
}

/// `cfg` with a BERT-family encoder's embeddings (token types and a LayerNorm over the sum,
/// with the dropout after the norm), checked without dropout and then with it.
fn check_bert_embeddings(mut cfg: qkv::model::ModelConfig, seed: u64, what: &str) {
    cfg.token_types = 2;
    cfg.embed_norm = true;
    cfg.scale_embeddings = false;
    check(Case::random(cfg.clone(), seed), what);
    cfg.dropout = 0.2;
    let dropped = format!("{what} with dropout");
    check_in(
        Case::random(cfg, seed + 1),
        &dropped,
        Mode::train(0.2, 0.1, 7),
    );
}

#[test]
fn bert_style_classifier_gradients() {
    let cfg = tiny(Family::Classifier, NormPlacement::Post, true, true);
    check_bert_embeddings(cfg, 8, "bert-style classifier");
}

#[test]
fn bert_layout_seq2seq_gradients() {
    // A BERT-family encoder under a decoder of the same layout (init_from a Hugging Face
    // encoder): token types and a LayerNorm on both embeddings, one shared table.
    let mut cfg = tiny(Family::Seq2seq, NormPlacement::Post, true, true);
    cfg.tgt_vocab_size = None;
    cfg.share_embeddings = true;
    cfg.tie_output = true;
    check_bert_embeddings(cfg, 10, "bert-layout seq2seq");
}

#[test]
fn lm_gradients_tied_and_untied() {
    for (norm, tie) in [(NormPlacement::Post, true), (NormPlacement::Pre, false)] {
        let mut cfg = tiny(Family::Lm, norm, true, !tie);
        cfg.tie_output = tie;
        check(Case::random(cfg, 4), "lm");
    }
}

#[test]
fn linear_and_windowed_attention_gradients() {
    use qkv::model::AttentionKind;
    for (family, kind, window) in [
        (Family::Lm, AttentionKind::Linear, None),
        (Family::Classifier, AttentionKind::Linear, None),
        (Family::Seq2seq, AttentionKind::Flash, Some(2)),
        (Family::Lm, AttentionKind::Materialized, Some(2)),
    ] {
        let mut cfg = tiny(family, NormPlacement::Pre, true, false);
        cfg.attention = kind;
        cfg.attention_window = window;
        check(
            Case::random(cfg, 6),
            &format!("{family:?} {kind:?} {window:?}"),
        );
    }
}

#[test]
fn flash_and_materialized_models_compute_the_same_function() {
    use qkv::model::AttentionKind;
    for family in [Family::Seq2seq, Family::Classifier, Family::Lm] {
        let mut cfg = tiny(family, NormPlacement::Post, true, false);
        let mut grads = Vec::new();
        for kind in [AttentionKind::Flash, AttentionKind::Materialized] {
            cfg.attention = kind;
            let mut m = Case::random(cfg.clone(), 7);
            let loss = m.loss_and_grad(train_mode(0.1));
            grads.push((loss, m.params().grad.clone()));
        }
        assert!((grads[0].0 - grads[1].0).abs() < 1e-5, "{family:?} loss");
        let e = common::rel_err(&grads[0].1, &grads[1].1);
        assert!(e < 1e-4, "{family:?} gradients differ: {e}");
    }
}

#[test]
fn dropout_is_reproducible_per_seed_and_trains_differently_from_eval() {
    let mut cfg = tiny(Family::Lm, NormPlacement::Post, false, false);
    cfg.dropout = 0.3;
    let mut m = Case::random(cfg, 5);
    let a = m.loss_and_grad(Mode::train(0.3, 0.0, 42));
    let ga = m.params().grad.clone();
    let b = m.loss_and_grad(Mode::train(0.3, 0.0, 42));
    let gb = m.params().grad.clone();
    let c = m.loss_and_grad(Mode::train(0.3, 0.0, 43));
    let e = m.loss_and_grad(train_mode(0.0));
    assert_eq!(a, b);
    assert_eq!(ga, gb);
    assert_ne!(a, c);
    assert_ne!(a, e);
}

#[test]
fn dropout_gradients_match_finite_differences() {
    // With a fixed seed the dropped network is a fixed function: its gradient must match too.
    let mut cfg = tiny(Family::Seq2seq, NormPlacement::Post, true, true);
    cfg.dropout = 0.2;
    let mut m = Case::random(cfg, 6);
    let mode = Mode::train(0.2, 0.0, 7);
    m.loss_and_grad(mode);
    let analytic = m.params().grad.clone();
    let specs = m.params().specs.clone();
    let h = 1e-2f32;
    for spec in specs.iter().step_by(5) {
        let i = spec.offset + spec.len / 2;
        let orig = m.params().data[i];
        m.params().data[i] = orig + h;
        let lp = m.loss_and_grad(mode);
        m.params().data[i] = orig - h;
        let lm = m.loss_and_grad(mode);
        m.params().data[i] = orig;
        let numeric = (lp - lm) / (2.0 * h);
        let err = (analytic[i] - numeric).abs() / (analytic[i].abs().max(numeric.abs()) + 2e-3);
        assert!(
            err < 3e-2,
            "{}: analytic {} numeric {numeric}",
            spec.name,
            analytic[i]
        );
    }
}

#[test]
fn parameter_only_backward_gives_the_same_parameter_gradients() {
    use qkv::kernels::attention::Masks;
    use qkv::model::stack::{InputGrad, Stack};
    use qkv::model::SiteIds;
    use qkv::params::ParamBuilder;
    for norm in [NormPlacement::Post, NormPlacement::Pre] {
        let cfg = tiny(Family::Classifier, norm, false, false);
        let mut pb = ParamBuilder::default();
        let mut stack = Stack::new(&mut pb, "enc", 2, false, &cfg, &mut SiteIds::default());
        let mut params = pb.build(5).unwrap();
        let (b, t, c) = (3, 5, cfg.d_model);
        let x: Vec<f32> = (0..b * t * c)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let dy: Vec<f32> = (0..b * t * c)
            .map(|i| ((i * 53 % 89) as f32 - 44.0) / 60.0)
            .collect();
        let mut grads = Vec::new();
        for params_only in [false, true] {
            stack.forward(
                &Cpu,
                &params.data,
                &x,
                b,
                t,
                &Masks::default(),
                None,
                Mode::EVAL,
            );
            params.zero_grad();
            let input_grad = if params_only {
                InputGrad::Skip
            } else {
                InputGrad::Wanted
            };
            let dx = stack.backward(
                &Cpu,
                &params.data,
                &mut params.grad,
                &dy,
                input_grad,
                None,
                &mut |_| {},
            );
            if !params_only {
                assert!(dx.iter().any(|v| *v != 0.0));
            }
            grads.push(params.grad.clone());
        }
        assert!(grads[0].iter().any(|v| *v != 0.0));
        assert_eq!(grads[0], grads[1], "{norm:?}: parameter gradients differ");
    }
}
