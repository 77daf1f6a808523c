//! Bad input gets an error naming the value and where it occurred — never a panic.

mod common;
use common::{tiny, train_mode};
use qkv::data::{ClassifyBatch, LmBatch, Seq2SeqBatch};
use qkv::model::{
    Classifier, Family, Incremental, LanguageModel, Model, ModelConfig, NormPlacement, Seq2Seq,
    Tokens,
};
use qkv::optim::{AdamW, AdamWConfig};

fn lm() -> LanguageModel {
    LanguageModel::new(tiny(Family::Lm, NormPlacement::Post, false, false), 0).unwrap()
}

fn lm_batch(input: &[u32], target: &[u32], batch: usize) -> LmBatch {
    LmBatch {
        input: input.to_vec(),
        target: target.to_vec(),
        batch,
        len: input.len() / batch,
    }
}

#[test]
fn token_outside_vocabulary_names_value_and_position() {
    let mut m = lm();
    let ids = [1u32, 2, 3, 4, 99, 5];
    let e = m
        .logits(Tokens::new(&ids, 2, 3).unwrap())
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
        .logits(
            Tokens::new(&[3, 4], 1, 2).unwrap(),
            Tokens::new(&tgt, 1, 2).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("target") && e.contains("token id 11"), "{e}");
}

#[test]
fn target_and_label_out_of_range_are_errors() {
    let mut m = lm();
    let b = lm_batch(&[1, 2, 3], &[1, 2, 40], 1);
    let e = m.forward(&b, train_mode(0.0)).err().unwrap().to_string();
    assert!(
        e.contains("targets") && e.contains("token id 40") && e.contains("position 2"),
        "{e}"
    );

    let mut c = Classifier::new(
        tiny(Family::Classifier, NormPlacement::Post, false, false),
        0,
    )
    .unwrap();
    let b = ClassifyBatch::new(&[(&[1, 2], 0), (&[3, 4], 7)], 0);
    let e = c.forward(&b, train_mode(0.0)).err().unwrap().to_string();
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
        .logits(Tokens::new(&ids, 1, 17).unwrap())
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
        .logits(
            Tokens::new(&[3, 4, 5, 6], 2, 2).unwrap(),
            Tokens::new(&[1, 3], 1, 2).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("target batch") && e.contains("got 1"), "{e}");

    let mut m = lm();
    let b = lm_batch(&[1, 2, 3, 4], &[1, 2, 3], 2);
    let e = m.forward(&b, train_mode(0.0)).err().unwrap().to_string();
    assert!(e.contains("targets") && e.contains("got 3"), "{e}");

    let b = lm_batch(&[1, 2, 3, 4], &[], 2);
    let e = m.forward(&b, train_mode(0.0)).err().unwrap().to_string();
    assert!(e.contains("targets"), "{e}");
}

#[test]
fn non_finite_loss_and_gradients_are_errors_and_leave_parameters_intact() {
    let mut m = lm();
    let name = "decoder.layers.0.ffn.up.weight";
    let off = m.params.spec(name).unwrap().offset;
    m.params.data[off + 3] = f32::NAN;
    let b = lm_batch(&[1, 2, 3], &[2, 3, 4], 1);
    let e = m.forward(&b, train_mode(0.0)).err().unwrap().to_string();
    assert!(e.contains("non-finite") && e.contains("loss"), "{e}");

    let mut m = lm();
    m.forward(&b, train_mode(0.0)).unwrap();
    m.backward(1.0).unwrap();
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
    let e = m.logits(tokens).unwrap_err().to_string();
    assert!(e.contains("no class head"), "{e}");
    let b = ClassifyBatch::new(&[(&ids, 0)], 0);
    let e = m.forward(&b, train_mode(0.0)).err().unwrap().to_string();
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
    // A zero size names its field, the target vocabulary of a seq2seq model included.
    let mut c = ModelConfig::preset("tiny", Family::Seq2seq, 10).unwrap();
    c.tgt_vocab_size = Some(0);
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("tgt_vocab_size must be positive"), "{e}");
    let t = qkv::train::TrainConfig {
        accumulate: 0,
        ..Default::default()
    };
    let e = t.validate().unwrap_err().to_string();
    assert!(e.contains("train.accumulate must be at least 1"), "{e}");
    // A cosine that would rise, or end before its warm-up does, is a mistake in the file.
    use qkv::schedule::Schedule;
    let cosine = |min, warmup, total| Schedule::Cosine {
        peak: 1e-3,
        min,
        warmup,
        total,
    };
    assert!(cosine(5e-5, 150, 1200).validate().is_ok());
    let e = cosine(2e-3, 150, 1200).validate().unwrap_err().to_string();
    assert!(
        e.contains("schedule.min 0.002 is above schedule.peak 0.001"),
        "{e}"
    );
    let e = cosine(5e-5, 1500, 1200).validate().unwrap_err().to_string();
    assert!(e.contains("schedule.warmup 1500, got 1200"), "{e}");
    // An unknown kernel name in a config file names the field's choices.
    let mut v = serde_json::to_value(ModelConfig::preset("tiny", Family::Lm, 10).unwrap()).unwrap();
    v["attention"] = "sparse".into();
    let e = serde_json::from_value::<ModelConfig>(v)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sparse") && e.contains("flash"), "{e}");
}

/// `backward` reads what its training forward left behind; anything that replaced it makes
/// `backward` an error instead of a wrong gradient.
#[test]
fn backward_after_anything_but_a_training_forward_is_an_error() {
    let mut m = lm();
    let b = lm_batch(&[1, 2, 3, 4], &[2, 3, 4, 5], 2);
    let e = m.backward(1.0).unwrap_err().to_string();
    assert!(e.contains("training-mode forward"), "{e}");
    // Evaluation runs forward only: nothing to differentiate.
    m.forward(&b, qkv::model::Mode::EVAL).unwrap();
    let e = m.backward(1.0).unwrap_err().to_string();
    assert!(e.contains("evaluation forward"), "{e}");
    // A decoding step overwrites the layers' buffers.
    m.forward(&b, train_mode(0.1)).unwrap();
    let mut cache = m.start_decoding(2, 4);
    m.step(&mut cache, &[1, 1]).unwrap();
    let e = m.backward(1.0).unwrap_err().to_string();
    assert!(e.contains("decoding step"), "{e}");
    // One backward per forward.
    m.forward(&b, train_mode(0.1)).unwrap();
    m.backward(1.0).unwrap();
    let e = m.backward(1.0).unwrap_err().to_string();
    assert!(e.contains("backward after backward"), "{e}");

    let mut s = Seq2Seq::new(tiny(Family::Seq2seq, NormPlacement::Pre, false, false), 0).unwrap();
    let sb = Seq2SeqBatch::new(&[(&[3, 4], &[5, 6]), (&[7], &[8])], 0, 1, 2);
    s.forward(&sb, train_mode(0.1)).unwrap();
    s.start_decoding(Tokens::new(&[3, 4, 2], 1, 3).unwrap(), 4)
        .unwrap();
    let e = s.backward(1.0).unwrap_err().to_string();
    assert!(e.contains("start_decoding"), "{e}");
    // A failed forward leaves nothing to differentiate either.
    s.forward(&sb, train_mode(0.1)).unwrap();
    let bad = Seq2SeqBatch {
        src: vec![3, 99, 2],
        ..Seq2SeqBatch::new(&[(&[3, 4], &[5])], 0, 1, 2)
    };
    assert!(s.forward(&bad, train_mode(0.1)).is_err());
    let e = s.backward(1.0).unwrap_err().to_string();
    assert!(e.contains("failed forward"), "{e}");

    let mut c = Classifier::new(
        tiny(Family::Classifier, NormPlacement::Post, false, false),
        0,
    )
    .unwrap();
    let cb = ClassifyBatch::new(&[(&[1, 2], 0), (&[3], 2)], 0);
    c.forward(&cb, train_mode(0.0)).unwrap();
    c.features(Tokens::new(&[4, 5], 1, 2).unwrap()).unwrap();
    let e = c.backward(1.0).unwrap_err().to_string();
    assert!(e.contains("features"), "{e}");
}

/// The model contract's accumulation: backward adds `scale ×` the gradient and never zeroes.
#[test]
fn backward_accumulates_scaled_gradients() {
    let mut m = lm();
    let b = lm_batch(&[1, 2, 3, 4], &[2, 3, 4, 5], 2);
    m.params.zero_grad();
    m.forward(&b, train_mode(0.1)).unwrap();
    m.backward(1.0).unwrap();
    let once = m.params.grad.clone();
    m.forward(&b, train_mode(0.1)).unwrap();
    m.backward(0.5).unwrap();
    for (g, o) in m.params.grad.iter().zip(&once) {
        assert!(
            (g - 1.5 * o).abs() <= 1e-5 * (1.0 + o.abs()),
            "{g} vs 1.5 × {o}"
        );
    }
    assert!(once.iter().any(|g| *g != 0.0));
}

/// Sizes in a config come from users' files: each is capped, so an absurd one is an error
/// naming the field, not an allocation that aborts the process.
#[test]
fn absurd_sizes_are_errors_naming_the_field() {
    let base = ModelConfig::preset("tiny", Family::Lm, 10).unwrap();
    let set = |f: &dyn Fn(&mut ModelConfig)| {
        let mut c = base.clone();
        f(&mut c);
        LanguageModel::new(c, 0).err().unwrap().to_string()
    };
    let e = set(&|c| c.d_model = 1_000_000_000_000);
    assert!(e.contains("d_model 1000000000000 is above the cap"), "{e}");
    let e = set(&|c| c.vocab_size = usize::MAX);
    assert!(e.contains("vocab_size"), "{e}");
    let e = set(&|c| c.n_decoder_layers = 1 << 20);
    assert!(e.contains("n_decoder_layers"), "{e}");
    let e = set(&|c| {
        c.max_len = 1 << 20;
        c.d_model = 4096;
        c.n_heads = 4;
    });
    assert!(e.contains("max_len") && e.contains("d_model"), "{e}");
    let e = set(&|c| c.layer_norm_eps = -1.0);
    assert!(e.contains("layer_norm_eps"), "{e}");
    // Within every cap but still more memory than the machine has: an allocation error.
    let mut c = base.clone();
    c.d_model = 1 << 16;
    c.n_heads = 1;
    c.d_ff = 1 << 20;
    c.n_decoder_layers = 1 << 10;
    c.max_len = 8;
    let e = LanguageModel::new(c, 0).err().unwrap().to_string();
    assert!(e.contains("cannot allocate") && e.contains("GiB"), "{e}");
}
