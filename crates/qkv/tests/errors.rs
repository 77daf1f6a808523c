//! Bad input gets an error naming the value and where it occurred — never a panic.

mod common;
use common::tiny;
use qkv::model::{
    Classifier, Family, LanguageModel, Mode, ModelConfig, NormPlacement, Seq2Seq, Tokens,
};
use qkv::optim::{AdamW, AdamWConfig};

fn lm() -> LanguageModel {
    LanguageModel::new(tiny(Family::Lm, NormPlacement::Post, false, false), 0).unwrap()
}

#[test]
fn token_outside_vocabulary_names_value_and_position() {
    let mut m = lm();
    let ids = [1u32, 2, 3, 4, 99, 5];
    let e = m
        .forward(Tokens::new(&ids, 2, 3).unwrap(), Mode::EVAL)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("token id 99")
            && e.contains("row 1")
            && e.contains("position 1")
            && e.contains("size 13"),
        "{e}"
    );

    let mut s = Seq2Seq::new(tiny(Family::Seq2seq, NormPlacement::Post, false, false), 0).unwrap();
    let tgt = [1u32, 11];
    let e = s
        .forward(
            Tokens::new(&[3, 4], 1, 2).unwrap(),
            Tokens::new(&tgt, 1, 2).unwrap(),
            Mode::EVAL,
        )
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("target") && e.contains("token id 11"), "{e}");
}

#[test]
fn target_and_label_out_of_range_are_errors() {
    let mut m = lm();
    m.forward(Tokens::new(&[1, 2, 3], 1, 3).unwrap(), Mode::EVAL)
        .unwrap();
    let e = m.backward(&[1, 2, 40], 0.0).unwrap_err().to_string();
    assert!(
        e.contains("targets") && e.contains("token id 40") && e.contains("position 2"),
        "{e}"
    );

    let mut c = Classifier::new(
        tiny(Family::Classifier, NormPlacement::Post, false, false),
        0,
    )
    .unwrap();
    c.forward(Tokens::new(&[1, 2, 3, 4], 2, 2).unwrap(), Mode::EVAL)
        .unwrap();
    let e = c.backward(&[0, 7], 0.0).unwrap_err().to_string();
    assert!(
        e.contains("label 7") && e.contains("row 1") && e.contains("0..3"),
        "{e}"
    );
}

#[test]
fn sequence_longer_than_positional_table_is_an_error() {
    let mut m = lm();
    let ids = vec![1u32; 17];
    let e = m
        .forward(Tokens::new(&ids, 1, 17).unwrap(), Mode::EVAL)
        .unwrap_err()
        .to_string();
    assert!(e.contains("length 17") && e.contains("max_len 16"), "{e}");
}

#[test]
fn mismatched_batch_shapes_are_errors() {
    let e = Tokens::new(&[1, 2, 3], 2, 2).unwrap_err().to_string();
    assert!(e.contains("token batch") && e.contains("got 3"), "{e}");

    let mut s = Seq2Seq::new(tiny(Family::Seq2seq, NormPlacement::Post, false, false), 0).unwrap();
    let e = s
        .forward(
            Tokens::new(&[3, 4, 5, 6], 2, 2).unwrap(),
            Tokens::new(&[1, 3], 1, 2).unwrap(),
            Mode::EVAL,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("target batch") && e.contains("got 1"), "{e}");

    let mut m = lm();
    m.forward(Tokens::new(&[1, 2, 3, 4], 2, 2).unwrap(), Mode::EVAL)
        .unwrap();
    let e = m.backward(&[1, 2, 3], 0.0).unwrap_err().to_string();
    assert!(e.contains("targets") && e.contains("got 3"), "{e}");

    let e = m.backward(&[], 0.0).unwrap_err().to_string();
    assert!(e.contains("targets"), "{e}");
}

#[test]
fn non_finite_loss_and_gradients_are_errors_and_leave_parameters_intact() {
    let mut m = lm();
    let name = "decoder.layers.0.ffn.up.weight";
    let off = m.params.spec(name).unwrap().offset;
    m.params.data[off + 3] = f32::NAN;
    m.forward(Tokens::new(&[1, 2, 3], 1, 3).unwrap(), Mode::EVAL)
        .unwrap();
    let e = m.backward(&[2, 3, 4], 0.0).unwrap_err().to_string();
    assert!(e.contains("non-finite") && e.contains("loss"), "{e}");

    let mut m = lm();
    m.forward(Tokens::new(&[1, 2, 3], 1, 3).unwrap(), Mode::EVAL)
        .unwrap();
    m.backward(&[2, 3, 4], 0.0).unwrap();
    let gi = m
        .params
        .spec("decoder.layers.1.ffn_norm.bias")
        .unwrap()
        .offset
        + 2;
    m.params.grad[gi] = f32::INFINITY;
    let before = m.params.data.clone();
    let mut opt = AdamW::new(AdamWConfig::default(), m.params.len());
    let e = opt.step(&mut m.params, 1e-3).unwrap_err().to_string();
    assert!(
        e.contains("gradient of decoder.layers.1.ffn_norm.bias (element 2)") && e.contains("inf"),
        "{e}"
    );
    assert_eq!(
        before, m.params.data,
        "parameters changed despite the error"
    );
    assert_eq!(opt.step, 0);
}

#[test]
fn invalid_configs_are_rejected_with_the_field() {
    let mut c = ModelConfig::preset("tiny", Family::Seq2seq, 10).unwrap();
    c.n_heads = 3;
    let e = Seq2Seq::new(c, 0).err().unwrap().to_string();
    assert!(e.contains("d_model 64") && e.contains("n_heads 3"), "{e}");
    let e = ModelConfig::preset("huge", Family::Lm, 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("huge"), "{e}");
    let mut c = ModelConfig::preset("tiny", Family::Classifier, 10).unwrap();
    c.n_classes = 1;
    assert!(Classifier::new(c, 0)
        .err()
        .unwrap()
        .to_string()
        .contains("n_classes"));
    // Token types and an embedding norm belong to (BERT-style) classifiers.
    let mut c = ModelConfig::preset("tiny", Family::Lm, 10).unwrap();
    c.token_types = 2;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("token_types"), "{e}");
    // Without a head (n_classes 0) a classifier embeds but refuses to classify or train.
    let mut c = ModelConfig::preset("tiny", Family::Classifier, 10).unwrap();
    c.n_classes = 0;
    let mut m = Classifier::new(c, 0).unwrap();
    let ids = [4u32, 5, 6];
    let tokens = qkv::model::Tokens::new(&ids, 1, 3).unwrap();
    assert_eq!(m.features(tokens).unwrap().len(), 64);
    let e = m
        .forward(tokens, qkv::model::Mode::EVAL)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no class head"), "{e}");
    let e = m.backward(&[0], 0.0).unwrap_err().to_string();
    assert!(e.contains("no class head"), "{e}");
    let c = ModelConfig::preset("tiny", Family::Lm, 10).unwrap();
    assert!(Seq2Seq::new(c, 0)
        .err()
        .unwrap()
        .to_string()
        .contains("expected family seq2seq"));
    let mut c = ModelConfig::preset("tiny", Family::Lm, 10).unwrap();
    c.attention_window = Some(0);
    let e = LanguageModel::new(c.clone(), 0).err().unwrap().to_string();
    assert!(e.contains("attention_window"), "{e}");
    c.attention_window = Some(4);
    c.attention = qkv::model::AttentionKind::Linear;
    let e = LanguageModel::new(c, 0).err().unwrap().to_string();
    assert!(
        e.contains("attention_window") && e.contains("linear"),
        "{e}"
    );
    // An unknown kernel name in a config file names the field's choices.
    let mut v = serde_json::to_value(ModelConfig::preset("tiny", Family::Lm, 10).unwrap()).unwrap();
    v["attention"] = "sparse".into();
    let e = serde_json::from_value::<ModelConfig>(v)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sparse") && e.contains("flash"), "{e}");
}
