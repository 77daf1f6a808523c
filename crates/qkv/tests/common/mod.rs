#![allow(dead_code)]
use qkv::model::{Classifier, LanguageModel, Mode, ModelConfig, Seq2Seq, Tokens};
use qkv::params::Params;
use qkv::rng::Rng;

/// Max |a - b| relative to max |b| (with a floor), the metric used against references.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0f32, f32::max).max(1e-6);
    diff / scale
}

pub fn random_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

/// One model of any family behind a loss function, for gradient checks and training tests.
pub enum AnyModel {
    Seq2Seq(Seq2Seq, Vec<u32>, Vec<u32>, Vec<u32>, usize, usize, usize),
    Classifier(Classifier, Vec<u32>, Vec<u32>, usize, usize),
    Lm(LanguageModel, Vec<u32>, Vec<u32>, usize, usize),
}

impl AnyModel {
    pub fn params(&mut self) -> &mut Params {
        match self {
            AnyModel::Seq2Seq(m, ..) => &mut m.params,
            AnyModel::Classifier(m, ..) => &mut m.params,
            AnyModel::Lm(m, ..) => &mut m.params,
        }
    }

    /// Forward + backward on the stored batch: returns the loss, fills `params.grad`.
    pub fn loss_and_grad(&mut self, smoothing: f32, mode: Mode) -> f32 {
        match self {
            AnyModel::Seq2Seq(m, src, tin, tout, b, s, t) => {
                m.forward(
                    Tokens::new(src, *b, *s).unwrap(),
                    Tokens::new(tin, *b, *t).unwrap(),
                    mode,
                )
                .unwrap();
                m.backward(tout, smoothing).unwrap()
            }
            AnyModel::Classifier(m, x, y, b, t) => {
                m.forward(Tokens::new(x, *b, *t).unwrap(), mode).unwrap();
                m.backward(y, smoothing).unwrap()
            }
            AnyModel::Lm(m, x, y, b, t) => {
                m.forward(Tokens::new(x, *b, *t).unwrap(), mode).unwrap();
                m.backward(y, smoothing).unwrap()
            }
        }
    }

    pub fn logits(&mut self, mode: Mode) -> Vec<f32> {
        match self {
            AnyModel::Seq2Seq(m, src, tin, _, b, s, t) => m
                .forward(
                    Tokens::new(src, *b, *s).unwrap(),
                    Tokens::new(tin, *b, *t).unwrap(),
                    mode,
                )
                .unwrap()
                .to_vec(),
            AnyModel::Classifier(m, x, _, b, t) => m
                .forward(Tokens::new(x, *b, *t).unwrap(), mode)
                .unwrap()
                .to_vec(),
            AnyModel::Lm(m, x, _, b, t) => m
                .forward(Tokens::new(x, *b, *t).unwrap(), mode)
                .unwrap()
                .to_vec(),
        }
    }

    /// Build a model for `cfg` with a random batch (padding at the end of row 1).
    pub fn random(cfg: ModelConfig, seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0xabc);
        let (b, s, t) = (3usize, 7usize, 6usize);
        let pad = cfg.pad_id;
        let mut ids = |n: usize, len: usize, v: usize| -> Vec<u32> {
            let mut x: Vec<u32> = (0..n * len)
                .map(|_| 1 + rng.below(v as u64 - 1) as u32)
                .collect();
            for pos in len - 2..len {
                x[len + pos] = pad; // row 1 ends in padding
            }
            x
        };
        match cfg.family {
            qkv::model::Family::Seq2seq => {
                let vt = cfg.tgt_vocab();
                let src = ids(b, s, cfg.vocab_size);
                let tin = ids(b, t, vt);
                let mut tout = ids(b, t, vt);
                for (o, i) in tout.iter_mut().zip(&tin) {
                    if *i == pad {
                        *o = pad;
                    }
                }
                AnyModel::Seq2Seq(Seq2Seq::new(cfg, seed).unwrap(), src, tin, tout, b, s, t)
            }
            qkv::model::Family::Classifier => {
                let x = ids(b, t, cfg.vocab_size);
                let k = cfg.n_classes as u64;
                let y = (0..b).map(|_| rng.below(k) as u32).collect();
                AnyModel::Classifier(Classifier::new(cfg, seed).unwrap(), x, y, b, t)
            }
            qkv::model::Family::Lm => {
                let x = ids(b, t, cfg.vocab_size);
                let mut y = ids(b, t, cfg.vocab_size);
                for (o, i) in y.iter_mut().zip(&x) {
                    if *i == pad {
                        *o = pad;
                    }
                }
                AnyModel::Lm(LanguageModel::new(cfg, seed).unwrap(), x, y, b, t)
            }
        }
    }
}

/// A tiny config of each family.
pub fn tiny(
    family: qkv::model::Family,
    norm: qkv::model::NormPlacement,
    gelu: bool,
    learned: bool,
) -> ModelConfig {
    use qkv::kernels::activation::Activation;
    let mut c = ModelConfig::preset("tiny", family, 13).unwrap();
    c.d_model = 16;
    c.n_heads = 2;
    c.d_ff = 24;
    c.max_len = 16;
    c.dropout = 0.0;
    c.norm = norm;
    c.activation = if gelu {
        Activation::Gelu
    } else {
        Activation::Relu
    };
    c.positional = if learned {
        qkv::model::Positional::Learned
    } else {
        qkv::model::Positional::Sinusoidal
    };
    if family == qkv::model::Family::Classifier {
        c.n_classes = 3;
    }
    if family == qkv::model::Family::Seq2seq {
        c.tgt_vocab_size = Some(11);
        c.tie_output = !learned;
    }
    c
}
