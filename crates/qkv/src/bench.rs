//! Training-step benchmarks: the same step the PyTorch scripts under `scripts/bench/` time.
//! Returns timings only; printing and memory readings belong to the CLI.

use crate::error::Result;
use crate::kernels::attention::Masks;
use crate::model::encoder::EncoderStack;
use crate::model::{
    Classifier, Family, LanguageModel, Mode, ModelConfig, Seq2Seq, SiteIds, Tokens,
};
use crate::optim::{AdamW, AdamWConfig};
use crate::params::{ParamBuilder, Params};
use crate::rng::Rng;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchModel {
    /// A stack of encoder layers on a random (B, T, C) input with an MSE loss.
    Encoder,
    Seq2seq,
    Lm,
    Classifier,
}

#[derive(Clone, Debug)]
pub struct TrainStepBench {
    pub model: BenchModel,
    pub batch: usize,
    pub seq: usize,
    pub d_model: usize,
    pub heads: usize,
    pub d_ff: usize,
    pub layers: usize,
    pub vocab: usize,
    pub steps: usize,
    pub warmup: usize,
}

/// Per-step wall times in milliseconds, after warm-up.
pub fn train_step(b: &TrainStepBench) -> Result<Vec<f64>> {
    let family = match b.model {
        BenchModel::Encoder | BenchModel::Classifier => Family::Classifier,
        BenchModel::Seq2seq => Family::Seq2seq,
        BenchModel::Lm => Family::Lm,
    };
    let mut cfg = ModelConfig::preset("base", family, b.vocab)?;
    cfg.d_model = b.d_model;
    cfg.n_heads = b.heads;
    cfg.d_ff = b.d_ff;
    cfg.n_encoder_layers = if family == Family::Lm { 0 } else { b.layers };
    cfg.n_decoder_layers = if family == Family::Classifier {
        0
    } else {
        b.layers
    };
    cfg.max_len = b.seq.max(1);
    cfg.dropout = 0.0;
    if family == Family::Classifier {
        cfg.n_classes = 2;
    }
    // The encoder variant builds a bare stack, so validate here as the models' constructors do.
    cfg.validate()?;
    let mut rng = Rng::new(7);
    let (n, c) = (b.batch * b.seq, b.d_model);
    let tokens: Vec<u32> = (0..n)
        .map(|_| 1 + rng.below(b.vocab as u64 - 1) as u32)
        .collect();
    let targets: Vec<u32> = (0..n)
        .map(|_| 1 + rng.below(b.vocab as u64 - 1) as u32)
        .collect();
    let opt_cfg = AdamWConfig {
        lr: 1e-4,
        clip_norm: None,
        ..AdamWConfig::default()
    };
    let mut times = Vec::with_capacity(b.steps);
    let mut time = |i: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let t0 = Instant::now();
        f()?;
        if i >= b.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok(())
    };
    let total = b.warmup + b.steps;
    match b.model {
        BenchModel::Encoder => {
            let mut pb = ParamBuilder::default();
            let mut stack =
                EncoderStack::new(&mut pb, "encoder", b.layers, &cfg, &mut SiteIds::default());
            let mut params: Params = pb.build(1);
            let mut opt = AdamW::new(opt_cfg, params.len());
            let x: Vec<f32> = (0..n * c).map(|_| rng.normal()).collect();
            let target: Vec<f32> = (0..n * c).map(|_| rng.normal()).collect();
            let mut dy = vec![0.0f32; n * c];
            let masks = Masks::default();
            for i in 0..total {
                time(i, &mut || {
                    let y = stack.forward(&params.data, &x, b.batch, b.seq, &masks, Mode::EVAL);
                    // MSE loss: dL/dy = 2 (y − target) / numel
                    let s = 2.0 / (n * c) as f32;
                    dy.iter_mut()
                        .zip(y)
                        .zip(&target)
                        .for_each(|((d, y), t)| *d = (y - t) * s);
                    params.zero_grad();
                    stack.backward(&params.data, &mut params.grad, &dy);
                    opt.step(&mut params, 1e-4)?;
                    Ok(())
                })?;
            }
        }
        BenchModel::Seq2seq => {
            let mut m = Seq2Seq::new(cfg, 1)?;
            let mut opt = AdamW::new(opt_cfg, m.params.len());
            for i in 0..total {
                time(i, &mut || {
                    let t = Tokens::new(&tokens, b.batch, b.seq)?;
                    m.forward(t, t, Mode::EVAL)?;
                    m.backward(&targets, 0.1)?;
                    opt.step(&mut m.params, 1e-4)?;
                    Ok(())
                })?;
            }
        }
        BenchModel::Lm => {
            let mut m = LanguageModel::new(cfg, 1)?;
            let mut opt = AdamW::new(opt_cfg, m.params.len());
            for i in 0..total {
                time(i, &mut || {
                    m.forward(Tokens::new(&tokens, b.batch, b.seq)?, Mode::EVAL)?;
                    m.backward(&targets, 0.1)?;
                    opt.step(&mut m.params, 1e-4)?;
                    Ok(())
                })?;
            }
        }
        BenchModel::Classifier => {
            let mut m = Classifier::new(cfg, 1)?;
            let mut opt = AdamW::new(opt_cfg, m.params.len());
            let labels: Vec<u32> = (0..b.batch).map(|i| (i % 2) as u32).collect();
            for i in 0..total {
                time(i, &mut || {
                    m.forward(Tokens::new(&tokens, b.batch, b.seq)?, Mode::EVAL)?;
                    m.backward(&labels, 0.1)?;
                    opt.step(&mut m.params, 1e-4)?;
                    Ok(())
                })?;
            }
        }
    }
    Ok(times)
}

/// Median of a non-empty sample.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}
