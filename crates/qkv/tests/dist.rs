//! What data-parallel training relies on, without MPI: a batch's row shares, each weighted by
//! its share of the targets, add up to the whole batch's gradient (dropout included); and a
//! backward announces each gradient range only once it is final.

mod common;
use common::{rel_err, tiny, Case};
use qkv::data::Rows;
use qkv::model::{Family, Mode, Model, NormPlacement};

const FAMILIES: [Family; 3] = [Family::Seq2seq, Family::Classifier, Family::Lm];

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for family in FAMILIES {
        for (norm, gelu, learned) in [
            (NormPlacement::Post, false, false),
            (NormPlacement::Pre, true, true),
        ] {
            let mut cfg = tiny(family, norm, gelu, learned);
            cfg.n_encoder_layers = 2;
            cfg.n_decoder_layers = 2;
            if family == Family::Lm {
                cfg.n_encoder_layers = 0;
            }
            if family == Family::Classifier {
                cfg.n_decoder_layers = 0;
            }
            out.push(Case::random(cfg, 5));
        }
    }
    out
}

/// Whole-batch gradient against the sum of row shares `cuts`, each backward scaled by its
/// targets over the batch's, with dropout 0.2 and label smoothing.
fn shares_sum_to_the_whole<M: Model>(m: &mut M, batch: &M::Batch, cuts: &[usize]) -> f32 {
    let mode = Mode::train(0.2, 0.1, 99);
    m.params_mut().zero_grad();
    let whole_loss = m.forward(batch, mode).unwrap().loss;
    m.backward(1.0).unwrap();
    let whole = m.params().grad.clone();
    let pad = m.config().pad_id;
    let total = m.loss_count(batch);
    m.params_mut().zero_grad();
    let mut loss_sum = 0.0f64;
    for w in cuts.windows(2) {
        let share = batch.select(w[0]..w[1], pad);
        let n = m.loss_count(&share);
        let loss = m
            .forward(&share, mode.rows_of(w[0], w[1] - w[0]))
            .unwrap()
            .loss;
        loss_sum += loss.mean as f64 * loss.count as f64;
        m.backward(n as f32 / total as f32).unwrap();
    }
    let mean = loss_sum / total as f64;
    assert!(
        (mean - whole_loss.mean as f64).abs() < 1e-5,
        "loss {mean} against the whole batch's {}",
        whole_loss.mean
    );
    rel_err(&m.params().grad, &whole)
}

#[test]
fn row_shares_add_up_to_the_whole_batch_gradient_with_dropout() {
    for mut case in cases() {
        let err = match &mut case {
            Case::Seq2Seq(m, b) => shares_sum_to_the_whole(m, b, &[0, 1, 3]),
            Case::Classifier(m, b) => shares_sum_to_the_whole(m, b, &[0, 2, 3]),
            Case::Lm(m, b) => shares_sum_to_the_whole(m, b, &[0, 1, 2, 3]),
        };
        assert!(err < 1e-5, "relative gradient error {err}");
    }
}

#[test]
fn without_the_row_offset_the_dropout_masks_differ() {
    // The test above can fail: shares that forget where they start draw other masks.
    let Case::Seq2Seq(m, b) = &mut cases().remove(0) else {
        unreachable!()
    };
    let mode = Mode::train(0.2, 0.0, 99);
    let whole = m.forward(b, mode).unwrap().loss.nll_sum;
    let pad = m.config().pad_id;
    let (first, rest) = (b.select(0..1, pad), b.select(1..3, pad));
    let nll = |m: &mut qkv::model::Seq2Seq, x, mode| m.forward(x, mode).unwrap().loss.nll_sum;
    let right = nll(m, &first, mode.rows_of(0, 1)) + nll(m, &rest, mode.rows_of(1, 2));
    let wrong = nll(m, &first, mode) + nll(m, &rest, mode);
    assert!(
        (right - whole).abs() < 1e-4 * whole.abs(),
        "{right} vs {whole}"
    );
    assert!(
        (wrong - whole).abs() > 1e-3 * whole.abs(),
        "{wrong} vs {whole}"
    );
}

/// Every range of `grad_order` is announced once, in order, and holds its final values when
/// announced; the ranges cover the buffer once.
fn ranges_are_final_when_announced<M: Model>(m: &mut M, batch: &M::Batch) {
    let order = m.grad_order();
    let len = m.params().len();
    let mut covered = vec![0u8; len];
    for r in &order {
        covered[r.clone()].iter_mut().for_each(|c| *c += 1);
    }
    assert!(
        covered.iter().all(|&c| c == 1),
        "grad_order covers the buffer once"
    );
    m.params_mut().zero_grad();
    m.forward(batch, Mode::train(0.1, 0.1, 3)).unwrap();
    let mut seen: Vec<(usize, Vec<f32>)> = Vec::new();
    m.backward_with(0.5, &mut |k, g| {
        let before = seen.last().map_or(0, |s| s.0);
        assert!(
            k > before && k <= order.len(),
            "announced {k} after {before}"
        );
        for r in &order[before..k] {
            seen.push((k, g[r.clone()].to_vec()));
        }
    })
    .unwrap();
    let blocks = m.config().n_encoder_layers + m.config().n_decoder_layers;
    assert_eq!(seen.len(), blocks, "one announcement per block");
    let g = &m.params().grad;
    for (i, (_, snap)) in seen.iter().enumerate() {
        assert_eq!(
            &g[order[i].clone()],
            &snap[..],
            "range {i} changed after it was announced"
        );
        assert!(
            snap.iter().any(|&x| x != 0.0),
            "range {i} had no gradient yet"
        );
    }
}

#[test]
fn backward_announces_each_block_once_its_gradients_are_final() {
    for mut case in cases() {
        match &mut case {
            Case::Seq2Seq(m, b) => ranges_are_final_when_announced(m, b),
            Case::Classifier(m, b) => ranges_are_final_when_announced(m, b),
            Case::Lm(m, b) => ranges_are_final_when_announced(m, b),
        }
    }
}
