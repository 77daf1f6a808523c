//! The Annotated Transformer's first example: learn to copy random symbol sequences, then
//! decode held-out sequences greedily. Trained from scratch inside the suite.

use qkv::model::{Family, ModelConfig, Seq2Seq};
use qkv::tasks::copy::{evaluate_copy, train_copy, CopyTask, PAD};
use qkv::train::{Observer, StepLog};

struct LastLoss(f32);
impl Observer for LastLoss {
    fn on_step(&mut self, log: &StepLog) {
        self.0 = log.loss;
    }
}

#[test]
fn copy_task_reaches_exact_match() {
    let task = CopyTask {
        len: 8,
        vocab: 13,
        batch: 32,
        steps: 1500,
        seed: 1,
    };
    let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, task.vocab).unwrap();
    cfg.d_model = 32;
    cfg.n_heads = 4;
    cfg.d_ff = 64;
    cfg.max_len = 16;
    cfg.dropout = 0.0;
    cfg.pad_id = PAD;
    let model = Seq2Seq::new(cfg, 0).unwrap();
    let mut last = LastLoss(f32::INFINITY);
    let mut model = train_copy(model, &task, &mut last).unwrap().model;
    assert!(last.0 < 0.05, "training loss stayed at {}", last.0);

    let n = 100;
    let eval = evaluate_copy(&mut model, &task, n, 999).unwrap();
    assert_eq!(
        eval.exact, n,
        "exact match {}/{n}; first output {:?} for {:?}",
        eval.exact, eval.outputs[0], eval.sources[0]
    );
}
