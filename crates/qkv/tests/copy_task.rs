//! The Annotated Transformer's first example: learn to copy random symbol sequences, then
//! decode held-out sequences greedily. Trained from scratch inside the suite.

use qkv::model::{Family, Mode, ModelConfig, Seq2Seq, Tokens};
use qkv::optim::{AdamW, AdamWConfig};
use qkv::rng::Rng;
use qkv::schedule::Schedule;
use qkv::toy::{copy_batch, BOS, EOS, PAD};

const VOCAB: usize = 13;
const LEN: usize = 8;

fn batch(rng: &mut Rng, b: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    copy_batch(rng, b, LEN, VOCAB)
}

#[test]
fn copy_task_reaches_exact_match() {
    let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, VOCAB).unwrap();
    cfg.d_model = 32;
    cfg.n_heads = 4;
    cfg.d_ff = 64;
    cfg.max_len = 16;
    cfg.dropout = 0.0;
    cfg.pad_id = PAD;
    let mut model = Seq2Seq::new(cfg, 0).unwrap();
    let mut opt = AdamW::new(
        AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        model.params.len(),
    );
    let schedule = Schedule::InverseSqrt {
        peak: 3e-3,
        warmup: 100,
    };
    let mut rng = Rng::new(1);
    let b = 32;
    let mut last = f32::INFINITY;
    for step in 1..=1500 {
        let (src, tin, tout) = batch(&mut rng, b);
        model
            .forward(
                Tokens::new(&src, b, LEN + 1).unwrap(),
                Tokens::new(&tin, b, LEN + 1).unwrap(),
                Mode::EVAL,
            )
            .unwrap();
        last = model.backward(&tout, 0.0).unwrap();
        opt.step(&mut model.params, schedule.lr(step)).unwrap();
    }
    assert!(last < 0.05, "training loss stayed at {last}");

    // Held-out sequences, decoded greedily.
    let mut test_rng = Rng::new(999);
    let n = 100;
    let (src, _, _) = batch(&mut test_rng, n);
    let out = model
        .greedy(Tokens::new(&src, n, LEN + 1).unwrap(), BOS, EOS, LEN + 2)
        .unwrap();
    let exact = out
        .iter()
        .enumerate()
        .filter(|(i, o)| o.as_slice() == &src[i * (LEN + 1)..i * (LEN + 1) + LEN])
        .count();
    assert_eq!(
        exact,
        n,
        "exact match {exact}/{n}; first output {:?} for {:?}",
        out[0],
        &src[..LEN]
    );
}
