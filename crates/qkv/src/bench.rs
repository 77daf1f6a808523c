//! Training-step benchmarks: the same step the PyTorch scripts under `scripts/bench/` time.
//! Returns timings only; printing and memory readings belong to the CLI.

use crate::backend::Cpu;
use crate::data::{ClassifyBatch, LmBatch, Seq2SeqBatch};
use crate::error::Result;
use crate::kernels::attention::Masks;
use crate::kernels::matmul::{set_matmul_precision, Layout, Precision};
use crate::kernels::Acc;
use crate::model::stack::{InputGrad, Stack};
use crate::model::{Classifier, Family, LanguageModel, Mode, Model, ModelConfig, Seq2Seq, SiteIds};
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
    /// Operand precision of the matrix products (bf16 = mixed precision).
    pub precision: Precision,
    /// Encoder: also compute the gradient of the input (else only parameter gradients, as
    /// PyTorch does for an input without requires_grad). The models always need it: it feeds
    /// their embeddings.
    pub input_grad: bool,
}

/// The model configuration a benchmark's sizes describe (dropout 0, post-LN, ReLU), validated.
fn bench_config(b: &TrainStepBench) -> Result<ModelConfig> {
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
    Ok(cfg)
}

/// The model benchmarks' tokens: (B·T) ids, none of them padding (0).
fn bench_tokens(b: &TrainStepBench) -> Vec<u32> {
    let mut rng = Rng::new(7);
    (0..b.batch * b.seq)
        .map(|_| 1 + rng.below(b.vocab as u64 - 1) as u32)
        .collect()
}

/// A translation batch of the rows, each its own target (source and target T − 1 tokens).
fn seq2seq_batch(rows: &[&[u32]]) -> Seq2SeqBatch {
    let pairs: Vec<(&[u32], &[u32])> = rows.iter().map(|r| (&r[1..], &r[1..])).collect();
    Seq2SeqBatch::new(&pairs, 0, 1, 2)
}

/// A language-model batch: each row followed by its first token, so T tokens are predicted.
fn lm_batch(rows: &[&[u32]]) -> LmBatch {
    let blocks: Vec<Vec<u32>> = rows.iter().map(|r| [*r, &r[..1]].concat()).collect();
    let blocks: Vec<&[u32]> = blocks.iter().map(|r| r.as_slice()).collect();
    LmBatch::new(&blocks)
}

/// A classification batch of the rows, labelled 0 and 1 in turn.
fn classify_batch(rows: &[&[u32]]) -> ClassifyBatch {
    let examples: Vec<(&[u32], u32)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (*r, (i % 2) as u32))
        .collect();
    ClassifyBatch::new(&examples, 0)
}

/// The encoder benchmark's stack of `b.layers` blocks and its parameters (on the host).
fn encoder_stack<B: crate::backend::Backend>(
    b: &TrainStepBench,
    cfg: &ModelConfig,
) -> Result<(Stack<B>, Params)> {
    let mut pb = ParamBuilder::default();
    let mut sites = SiteIds::default();
    let stack = Stack::new(&mut pb, "encoder", b.layers, false, cfg, &mut sites);
    Ok((stack, pb.build(1)?))
}

/// The encoder benchmark's input and target, (B·T, C) each: the same on either device.
fn encoder_data(b: &TrainStepBench) -> (Vec<f32>, Vec<f32>) {
    let n = b.batch * b.seq * b.d_model;
    let mut rng = Rng::new(8);
    let x = (0..n).map(|_| rng.normal()).collect();
    let target = (0..n).map(|_| rng.normal()).collect();
    (x, target)
}

/// Per-step wall times in milliseconds, after warm-up.
pub fn train_step(b: &TrainStepBench) -> Result<Vec<f64>> {
    let _precision = set_matmul_precision(b.precision);
    let cfg = bench_config(b)?;
    let (n, c) = (b.batch * b.seq, b.d_model);
    let tokens = bench_tokens(b);
    let opt_cfg = AdamWConfig {
        clip_norm: None,
        ..AdamWConfig::default()
    };
    let rows: Vec<&[u32]> = tokens.chunks(b.seq).collect();
    match b.model {
        BenchModel::Encoder => {
            let (mut stack, mut params) = encoder_stack::<Cpu>(b, &cfg)?;
            let mut opt = AdamW::new(opt_cfg, params.len());
            let (x, target) = encoder_data(b);
            let mut dy = vec![0.0f32; n * c];
            let masks = Masks::default();
            time_steps(b.warmup, b.steps, &mut || {
                let y = stack.forward(
                    &Cpu,
                    &params.data,
                    &x,
                    b.batch,
                    b.seq,
                    &masks,
                    None,
                    Mode::EVAL,
                );
                // MSE loss: dL/dy = 2 (y − target) / numel
                let s = 2.0 / (n * c) as f32;
                dy.iter_mut()
                    .zip(y)
                    .zip(&target)
                    .for_each(|((d, y), t)| *d = (y - t) * s);
                params.zero_grad();
                let input_grad = if b.input_grad {
                    InputGrad::Wanted
                } else {
                    InputGrad::Skip
                };
                stack.backward(
                    &Cpu,
                    &params.data,
                    &mut params.grad,
                    &dy,
                    input_grad,
                    None,
                    &mut |_| {},
                );
                opt.step(&mut params, 1e-4)?;
                Ok(())
            })
        }
        BenchModel::Seq2seq => {
            let batch = seq2seq_batch(&rows);
            time_model(Seq2Seq::new(cfg.clone(), 1)?, &batch, &opt_cfg, b)
        }
        BenchModel::Lm => {
            let batch = lm_batch(&rows);
            time_model(LanguageModel::new(cfg.clone(), 1)?, &batch, &opt_cfg, b)
        }
        BenchModel::Classifier => {
            let batch = classify_batch(&rows);
            time_model(Classifier::new(cfg.clone(), 1)?, &batch, &opt_cfg, b)
        }
    }
}

/// Training steps of a model on one batch: forward with the loss, backward, AdamW.
fn time_model<M: Model>(
    mut model: M,
    batch: &M::Batch,
    opt_cfg: &AdamWConfig,
    b: &TrainStepBench,
) -> Result<Vec<f64>> {
    let mut opt = AdamW::new(opt_cfg.clone(), model.params().len());
    time_steps(b.warmup, b.steps, &mut || {
        model.params_mut().zero_grad();
        model.forward(batch, Mode::train(0.0, 0.1, 0))?;
        model.backward(1.0)?;
        opt.step(model.params_mut(), 1e-4)?;
        Ok(())
    })
}

/// Wall times in milliseconds of `steps` calls of `f` after `warmup` untimed ones.
fn time_steps(warmup: usize, steps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        f()?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times)
}

/// Per-call wall times in milliseconds of `out (m, n) = op(a) · op(b)` after warm-up. With
/// `packed` (x·Wᵀ only), the products run as a decoding step's do: on `b` packed once, at the
/// first (warm-up) call.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    precision: Precision,
    steps: usize,
    warmup: usize,
    packed: bool,
) -> Vec<f64> {
    let _precision = set_matmul_precision(precision);
    let _scope = packed.then(|| {
        crate::kernels::packed::PackedScope::install(
            crate::kernels::packed::PackedWeights::default(),
        )
    });
    let mut rng = Rng::new(5);
    let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
    let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
    let mut out = vec![0.0f32; m * n];
    let (ta, tb) = (Layout::transposed_if(ta), Layout::transposed_if(tb));
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        crate::kernels::matmul::matmul(&mut out, &a, &b, m, k, n, ta, tb, Acc::Set);
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times
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

/// Which attention kernel [`attention`] times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    Flash,
    /// The materialized reference (scores stored as (B, H, N, N)).
    Reference,
    Linear,
    /// Flash with a sliding window of this many keys.
    Window(usize),
}

#[derive(Clone, Debug)]
pub struct AttentionBench {
    pub kernel: AttentionKernel,
    pub batch: usize,
    pub heads: usize,
    pub n: usize,
    pub head_dim: usize,
    pub causal: bool,
    /// Time forward + backward (else forward only).
    pub backward: bool,
    pub steps: usize,
    pub warmup: usize,
    /// Operand precision of flash's tile products (the reference and linear kernels are f32).
    pub precision: Precision,
}

impl AttentionBench {
    /// Bytes of Q, K, V, O and (with backward) dO, dQ, dK, dV: what any implementation holds.
    /// The kernel's own state (log-sum-exp, or the materialized probabilities) is not counted.
    pub fn tensor_bytes(&self) -> usize {
        let one = self.batch * self.n * self.heads * self.head_dim * 4;
        one * if self.backward { 8 } else { 4 }
    }
}

/// Per-call wall times in milliseconds of self-attention (Tq = Tk = n) on random inputs laid
/// out as the models hold them, (B, N, H·D).
pub fn attention(b: &AttentionBench) -> Result<Vec<f64>> {
    use crate::kernels::attention::{
        attention_backward, attention_forward, AttentionShape, HeadsMut, HeadsRef,
    };
    use crate::kernels::flash::{flash_backward, flash_forward};
    use crate::kernels::linear_attention::{linear_attention_backward, linear_attention_forward};
    if b.batch == 0 || b.heads == 0 || b.n == 0 || b.head_dim == 0 || b.steps == 0 {
        return Err(crate::error::Error::Config(
            "attention bench: batch, heads, n, head_dim and steps must be positive".into(),
        ));
    }
    let flash = matches!(
        b.kernel,
        AttentionKernel::Flash | AttentionKernel::Window(_)
    );
    if b.precision == Precision::Bf16 && !flash {
        return Err(crate::error::Error::Config(format!(
            "attention bench: the {:?} kernel computes in f32 only; bf16 is for flash and window",
            b.kernel
        )));
    }
    let s = AttentionShape {
        batch: b.batch,
        heads: b.heads,
        q_len: b.n,
        k_len: b.n,
        head_dim: b.head_dim,
    };
    let w = b.heads * b.head_dim;
    let len = b.batch * b.n * w;
    let mut rng = Rng::new(3);
    let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal()).collect() };
    let (q, k, v) = (rand(len), rand(len), rand(len));
    // Every buffer is written here, so its pages are resident before the kernels run and the
    // process's peak memory is (tensors + the kernel's own scratch), not less.
    let mut out = vec![f32::NAN; len];
    let (dout, mut dq, mut dk, mut dv) = if b.backward {
        let nan = || vec![f32::NAN; len];
        (rand(len), nan(), nan(), nan())
    } else {
        (Vec::new(), Vec::new(), Vec::new(), Vec::new())
    };
    let rows = b.batch * b.heads * b.n;
    let materialized = b.kernel == AttentionKernel::Reference;
    let mut saved = vec![f32::NAN; if materialized { rows * b.n } else { rows }];
    let scratch_len = if materialized && b.backward {
        rows * b.n
    } else {
        0
    };
    let mut scratch = vec![f32::NAN; scratch_len];
    let masks = Masks {
        key_padding: None,
        causal: b.causal,
        window: match b.kernel {
            AttentionKernel::Window(w) => Some(w),
            _ => None,
        },
    };
    let scale = 1.0 / (b.head_dim as f32).sqrt();
    let _precision = set_matmul_precision(b.precision);
    fn view(data: &[f32], rs: usize) -> HeadsRef<'_> {
        HeadsRef {
            data,
            rs,
            offset: 0,
        }
    }
    let mut times = Vec::with_capacity(b.steps);
    for i in 0..b.warmup + b.steps {
        let t0 = Instant::now();
        let (qv, kv, vv) = (view(&q, w), view(&k, w), view(&v, w));
        match b.kernel {
            AttentionKernel::Reference => {
                attention_forward(&mut out, &mut saved, qv, kv, vv, s, &masks, scale)
            }
            AttentionKernel::Flash | AttentionKernel::Window(_) => {
                flash_forward(&mut out, &mut saved, qv, kv, vv, s, &masks, scale)
            }
            AttentionKernel::Linear => {
                linear_attention_forward(&mut out, &mut saved, qv, kv, vv, s, &masks)
            }
        }
        if b.backward {
            let [a] = HeadsMut::split(&mut dq, w, w, [0]);
            let [c] = HeadsMut::split(&mut dk, w, w, [0]);
            let [d] = HeadsMut::split(&mut dv, w, w, [0]);
            match b.kernel {
                AttentionKernel::Reference => attention_backward(
                    &a,
                    &c,
                    &d,
                    &dout,
                    &saved,
                    qv,
                    kv,
                    vv,
                    &mut scratch,
                    s,
                    scale,
                ),
                AttentionKernel::Flash | AttentionKernel::Window(_) => flash_backward(
                    &a, &c, &d, &dout, &out, &saved, qv, kv, vv, s, &masks, scale,
                ),
                AttentionKernel::Linear => linear_attention_backward(
                    &a, &c, &d, &dout, &out, &saved, qv, kv, vv, s, &masks,
                ),
            }
        }
        if i >= b.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times)
}

/// [`train_step`] on the first GPU: the same model code (the encoder stack or any model
/// family) on the CUDA backend, with parameters, gradients and AdamW's moments on the device
/// (TF32 products, or bf16 operands with f32 sums). Each step is timed to its completion.
/// Returns the times and the device's description.
pub fn train_step_cuda(b: &TrainStepBench) -> Result<(Vec<f64>, String)> {
    use crate::backend::{Backend, Cuda};
    use crate::cuda::Gpu;

    let bf16 = match b.precision {
        Precision::F32 => false,
        Precision::Bf16 => true,
    };
    let cfg = bench_config(b)?;
    let gpu = std::sync::Arc::new(Gpu::new(0)?);
    let be = Cuda::new(gpu.clone(), bf16);
    let opt_cfg = AdamWConfig {
        clip_norm: None,
        ..AdamWConfig::default()
    };
    let tokens = bench_tokens(b);
    let rows: Vec<&[u32]> = tokens.chunks(b.seq).collect();
    match b.model {
        BenchModel::Seq2seq => {
            let model = Seq2Seq::on(be, cfg, 1)?;
            return time_model_cuda(model, &seq2seq_batch(&rows), opt_cfg, b);
        }
        BenchModel::Lm => {
            let model = LanguageModel::on(be, cfg, 1)?;
            return time_model_cuda(model, &lm_batch(&rows), opt_cfg, b);
        }
        BenchModel::Classifier => {
            let model = Classifier::on(be, cfg, 1)?;
            return time_model_cuda(model, &classify_batch(&rows), opt_cfg, b);
        }
        BenchModel::Encoder => {}
    }
    let (mut stack, params) = encoder_stack::<Cuda>(b, &cfg)?;
    let n = params.len();
    let mut dev = Params::upload(&be, params);
    let mut opt = AdamW::on(&be, opt_cfg, n);
    let (x, target) = encoder_data(b);
    let neg_target: Vec<f32> = target.iter().map(|t| -t).collect();
    let st = gpu.stream();
    let x = st.clone_htod(&x).map_err(cuda_err)?;
    let neg_target = st.clone_htod(&neg_target).map_err(cuda_err)?;
    let mut dy = st.alloc_zeros::<f32>(x.len()).map_err(cuda_err)?;
    let masks = Masks::default();
    let input_grad = if b.input_grad {
        InputGrad::Wanted
    } else {
        InputGrad::Skip
    };
    let times = time_steps(b.warmup, b.steps, &mut || {
        let data = Cuda::view(&dev.data, n);
        let y = stack.forward(
            &be,
            data,
            (&x).into(),
            b.batch,
            b.seq,
            &masks,
            None,
            Mode::EVAL,
        );
        // MSE loss: dL/dy = 2 (y − target) / numel
        be.residual_add((&mut dy).into(), y, (&neg_target).into(), None);
        gpu.scale(&mut dy, 2.0 / x.len() as f32)?;
        dev.zero_grad_on(&be);
        let (data, grad) = (Cuda::view(&dev.data, n), be.grow(&mut dev.grad, n));
        stack.backward(&be, data, grad, (&dy).into(), input_grad, None, &mut |_| {});
        be.sync()?;
        opt.step_on(&be, &mut dev, 1e-4)?;
        be.sync()?;
        Ok(())
    })?;
    Ok((times, gpu.describe()))
}

/// [`time_model`] on the GPU: the model's parameters and AdamW's moments on the device, each
/// step timed to its completion.
fn time_model_cuda<M: Model<crate::backend::Cuda>>(
    mut model: M,
    batch: &M::Batch,
    opt_cfg: AdamWConfig,
    b: &TrainStepBench,
) -> Result<(Vec<f64>, String)> {
    use crate::backend::Backend;
    let be = model.backend().clone();
    let mut opt = AdamW::on(&be, opt_cfg, model.params().len());
    let times = time_steps(b.warmup, b.steps, &mut || {
        model.params_mut().zero_grad_on(&be);
        model.forward(batch, Mode::train(0.0, 0.1, 0))?;
        model.backward(1.0)?;
        opt.step_on(&be, model.params_mut(), 1e-4)?;
        be.sync()?;
        Ok(())
    })?;
    Ok((times, be.gpu().describe()))
}

/// [`matmul`] on the first GPU (cuBLASLt): TF32 for f32, bf16 operands with f32 sums for bf16.
/// Each call is timed from a drained stream to its completion, so launch cost is included.
/// Returns the times and the device's description.
#[allow(clippy::too_many_arguments)]
pub fn matmul_cuda(
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    precision: Precision,
    steps: usize,
    warmup: usize,
) -> Result<(Vec<f64>, String)> {
    let gpu = &crate::cuda::Gpu::new(0)?;
    let mut rng = Rng::new(5);
    let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
    let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
    let s = gpu.stream();
    let (da, db) = (
        s.clone_htod(&a).map_err(cuda_err)?,
        s.clone_htod(&b).map_err(cuda_err)?,
    );
    let mut out = s.alloc_zeros::<f32>(m * n).map_err(cuda_err)?;
    let (ta, tb) = (Layout::transposed_if(ta), Layout::transposed_if(tb));
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        gpu.synchronize()?;
        let t0 = Instant::now();
        match precision {
            Precision::F32 => gpu.matmul(&mut out, &da, &db, m, k, n, ta, tb, Acc::Set)?,
            Precision::Bf16 => gpu.matmul_bf16(&mut out, &da, &db, m, k, n, ta, tb, Acc::Set)?,
        }
        gpu.synchronize()?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok((times, gpu.describe()))
}

fn cuda_err(e: cudarc::driver::DriverError) -> crate::error::Error {
    crate::cuda::CudaError::Driver(e).into()
}

/// [`attention`] on the first GPU: the FlashAttention-2 kernels (flash or window only; f32 on
/// CUDA cores, or bf16 on tensor cores), each call timed from a drained stream to its
/// completion. The arguments are checked before the GPU is opened. Returns the times and the
/// device's description.
pub fn attention_cuda(b: &AttentionBench) -> Result<(Vec<f64>, String)> {
    use crate::cuda::ops::{DevHeads, DevHeadsMut};
    use crate::kernels::attention::AttentionShape;
    use cudarc::driver::CudaSlice;
    let window = match b.kernel {
        AttentionKernel::Flash => None,
        AttentionKernel::Window(w) => Some(w),
        k => {
            return Err(crate::error::Error::Config(format!(
                "attention bench on the GPU: the {k:?} kernel has no CUDA version (flash, window)"
            )))
        }
    };
    let tensor_cores = b.precision == Precision::Bf16;
    if b.batch == 0 || b.heads == 0 || b.n == 0 || b.head_dim == 0 || b.steps == 0 {
        return Err(crate::error::Error::Config(
            "attention bench: batch, heads, n, head_dim and steps must be positive".into(),
        ));
    }
    let gpu = &crate::cuda::Gpu::new(0)?;
    let s = AttentionShape {
        batch: b.batch,
        heads: b.heads,
        q_len: b.n,
        k_len: b.n,
        head_dim: b.head_dim,
    };
    let w = b.heads * b.head_dim;
    let len = b.batch * b.n * w;
    let mut rng = Rng::new(3);
    let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal()).collect() };
    let st = gpu.stream();
    let up = |x: Vec<f32>| st.clone_htod(&x).map_err(cuda_err);
    let (q, k, v, dout) = (
        up(rand(len))?,
        up(rand(len))?,
        up(rand(len))?,
        up(rand(len))?,
    );
    let zeros = |n: usize| st.alloc_zeros::<f32>(n).map_err(cuda_err);
    let (mut out, mut lse) = (zeros(len)?, zeros(b.batch * b.heads * b.n)?);
    let (mut dq, mut dk, mut dv) = (zeros(len)?, zeros(len)?, zeros(len)?);
    let masks = Masks {
        key_padding: None,
        causal: b.causal,
        window,
    };
    let scale = 1.0 / (b.head_dim as f32).sqrt();
    fn heads(data: &CudaSlice<f32>, rs: usize) -> DevHeads<'_> {
        let (data, offset) = (data.into(), 0);
        DevHeads { data, rs, offset }
    }
    let view = |data| heads(data, w);
    let mut times = Vec::with_capacity(b.steps);
    for i in 0..b.warmup + b.steps {
        gpu.synchronize()?;
        let t0 = Instant::now();
        let (qv, kv, vv) = (view(&q), view(&k), view(&v));
        if tensor_cores {
            gpu.flash_forward_bf16(&mut out, &mut lse, qv, kv, vv, s, &masks, scale)?;
        } else {
            gpu.flash_forward(&mut out, &mut lse, qv, kv, vv, s, &masks, scale)?;
        }
        if b.backward {
            let [a] = DevHeadsMut::split(&mut dq, w, w, [0])?;
            let [c] = DevHeadsMut::split(&mut dk, w, w, [0])?;
            let [d] = DevHeadsMut::split(&mut dv, w, w, [0])?;
            let (qv, kv, vv) = (view(&q), view(&k), view(&v));
            if tensor_cores {
                gpu.flash_backward_bf16(
                    &a, &c, &d, &dout, &out, &lse, qv, kv, vv, s, &masks, scale,
                )?;
            } else {
                gpu.flash_backward(&a, &c, &d, &dout, &out, &lse, qv, kv, vv, s, &masks, scale)?;
            }
        }
        gpu.synchronize()?;
        if i >= b.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok((times, gpu.describe()))
}
