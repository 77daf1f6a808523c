//! `qkv bench`: the training-step, matrix-product and attention benchmarks of the library
//! (`qkv::bench`), one JSON line each, and the load generator for `qkv serve`.

use crate::args::{peak_rss_mb, print_profile, DeviceArg, DtypeArg};
use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use qkv::bench::{self, BenchModel, TrainStepBench};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time one training step (forward, backward, AdamW) of a model.
    TrainStep(TrainStepArgs),
    /// Time one self-attention call (Tq = Tk = N) of one kernel; reports its peak memory.
    Attention(AttentionArgs),
    /// Load-test a running `qkv serve`: throughput and latency percentiles.
    Serve(crate::serve::load::LoadArgs),
    /// Time one matrix product `(m, k) · (k, n)` in f32 or bf16 and report GFLOP/s.
    Matmul(MatmulArgs),
    /// Translate a test set with a model directory: target tokens/s, BLEU, peak memory
    /// (scripts/bench/translate.sh runs CTranslate2 on the exported model beside it).
    Translate(TranslateArgs),
}

#[derive(clap::Args)]
pub struct TranslateArgs {
    #[arg(long)]
    model: std::path::PathBuf,
    /// Test pairs, `source<TAB>target` (e.g. data/translate-en-es/test.tsv.gz).
    #[arg(long)]
    data: std::path::PathBuf,
    #[command(flatten)]
    decode: crate::infer::DecodeArgs,
    /// Source tokens per decoding batch (greedy decoding refills its batch as rows end, with
    /// chunks of an eighth as many).
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Write the translations here.
    #[arg(long)]
    output: Option<std::path::PathBuf>,
    #[command(flatten)]
    precision: crate::args::PrecisionArgs,
    /// Where the model decodes: the CPU, or the first NVIDIA GPU (TF32, or bf16 products).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

#[derive(clap::Args)]
pub struct MatmulArgs {
    #[arg(long)]
    m: usize,
    #[arg(long)]
    k: usize,
    #[arg(long)]
    n: usize,
    /// The left operand is stored transposed, (k, m).
    #[arg(long)]
    ta: bool,
    /// The right operand is stored transposed, (n, k) (as `x · Wᵀ`).
    #[arg(long)]
    tb: bool,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Multiply by the right operand packed once, as decoding steps do (needs --tb and
    /// AVX2+FMA; f32).
    #[arg(long)]
    packed: bool,
    /// Where the product runs: the CPU, or the first NVIDIA GPU (cuBLASLt: TF32 for f32,
    /// bf16 operands with f32 sums for bf16).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum AttentionKindArg {
    Flash,
    Reference,
    Linear,
    Window,
}

#[derive(clap::Args)]
pub struct AttentionArgs {
    /// Sequence length (queries = keys).
    #[arg(long)]
    n: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long)]
    causal: bool,
    /// Time forward + backward instead of forward only.
    #[arg(long)]
    backward: bool,
    #[arg(long, value_enum, default_value = "flash")]
    kind: AttentionKindArg,
    /// Keys per query for `--kind window`.
    #[arg(long, default_value_t = 256)]
    window: usize,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Timed calls (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Where the kernels run: the CPU, or the first NVIDIA GPU (flash and window; f32, or
    /// bf16 on tensor cores).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModelKind {
    Encoder,
    Seq2seq,
    Lm,
    Classifier,
}

#[derive(clap::Args)]
pub struct TrainStepArgs {
    #[arg(long, value_enum, default_value = "encoder")]
    model: ModelKind,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    seq: usize,
    #[arg(long, default_value_t = 256)]
    d_model: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 1024)]
    d_ff: usize,
    #[arg(long, default_value_t = 1)]
    layers: usize,
    #[arg(long, default_value_t = 8000)]
    vocab: usize,
    /// Operand precision of the matrix products: bf16 is mixed precision (f32 weights and sums).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Encoder model: also compute the gradient of the random input (PyTorch computes it only
    /// for an input with requires_grad; the comparison script passes this flag to both sides).
    #[arg(long)]
    input_grad: bool,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 30)]
    steps: usize,
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Where the step runs: the CPU, or the first NVIDIA GPU (the encoder stack: TF32 for f32,
    /// bf16 operands with f32 sums for bf16).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

/// JSON numbers with `digits` decimals.
fn round(x: f64, digits: i32) -> f64 {
    let k = 10f64.powi(digits);
    (x * k).round() / k
}

pub fn run(command: BenchCommand, threads: usize) -> Result<()> {
    match command {
        BenchCommand::TrainStep(a) => train_step(a, threads),
        BenchCommand::Attention(a) => attention(a, threads),
        BenchCommand::Serve(a) => crate::serve::load::run(a),
        BenchCommand::Matmul(a) => matmul(a, threads),
        BenchCommand::Translate(a) => translate(a, threads),
    }
}

fn train_step(a: TrainStepArgs, threads: usize) -> Result<()> {
    if matches!(a.dtype, DtypeArg::Int8) {
        bail!(
            "--dtype int8 applies to decoding steps (translate, generate, serve, bench translate)"
        );
    }
    if a.steps == 0 || a.batch == 0 || a.seq == 0 || a.layers == 0 || a.vocab < 2 {
        bail!("--steps, --batch, --seq and --layers must be positive and --vocab at least 2");
    }
    let model = match a.model {
        ModelKind::Encoder => BenchModel::Encoder,
        ModelKind::Seq2seq => BenchModel::Seq2seq,
        ModelKind::Lm => BenchModel::Lm,
        ModelKind::Classifier => BenchModel::Classifier,
    };
    let b = TrainStepBench {
        model,
        batch: a.batch,
        seq: a.seq,
        d_model: a.d_model,
        heads: a.heads,
        d_ff: a.d_ff,
        layers: a.layers,
        vocab: a.vocab,
        steps: a.steps,
        warmup: a.warmup,
        precision: a.dtype.precision(),
        input_grad: a.input_grad,
    };
    let (times, device, dtype) = match a.device {
        DeviceArg::Cpu => (
            bench::train_step(&b)?,
            "cpu".to_string(),
            effective_dtype(a.dtype),
        ),
        DeviceArg::Cuda => {
            let (times, device) = bench::train_step_cuda(&b).context("--device cuda")?;
            (times, device, a.dtype.name())
        }
    };
    let ms = bench::median(&times);
    let line = serde_json::json!({
        "impl": "qkv", "isa": qkv::simd::isa(), "gemm_isa": qkv::simd::gemm_isa(),
        "model": format!("{:?}", model).to_lowercase(), "device": device,
        "batch": a.batch, "seq": a.seq, "d_model": a.d_model, "heads": a.heads, "d_ff": a.d_ff, "layers": a.layers,
        "threads": threads, "dtype": dtype, "input_grad": a.input_grad,
        "ms_per_step": round(ms, 3),
        "min_ms": round(times.iter().cloned().fold(f64::INFINITY, f64::min), 3),
        "tokens_per_s": ((a.batch * a.seq) as f64 / (ms / 1e3)).round(),
        "peak_rss_mb": peak_rss_mb().map(|m| round(m, 1)),
    });
    println!("{line}");
    print_profile(a.steps + a.warmup);
    Ok(())
}

fn matmul(a: MatmulArgs, threads: usize) -> Result<()> {
    if matches!(a.dtype, DtypeArg::Int8) {
        bail!(
            "--dtype int8 applies to decoding steps (translate, generate, serve, bench translate)"
        );
    }
    if a.steps == 0 || a.m == 0 || a.k == 0 || a.n == 0 {
        bail!("--steps, --m, --k and --n must be positive");
    }
    if a.packed && a.device == DeviceArg::Cuda {
        bail!("--packed is the CPU's decoding product; not with --device cuda");
    }
    if a.packed && (a.ta || !a.tb || !matches!(a.dtype, DtypeArg::F32)) {
        bail!("--packed multiplies by a packed x·Wᵀ operand: give --tb, without --ta, in f32");
    }
    if a.packed && !qkv::kernels::packed::available() {
        bail!("--packed needs AVX2 and FMA, which this CPU does not have");
    }
    let (times, device, dtype) = match a.device {
        DeviceArg::Cpu => (
            bench::matmul(
                a.m,
                a.k,
                a.n,
                a.ta,
                a.tb,
                a.dtype.precision(),
                a.steps,
                a.warmup,
                a.packed,
            ),
            "cpu".to_string(),
            effective_dtype(a.dtype),
        ),
        DeviceArg::Cuda => {
            let (t, device) = bench::matmul_cuda(
                a.m,
                a.k,
                a.n,
                a.ta,
                a.tb,
                a.dtype.precision(),
                a.steps,
                a.warmup,
            )
            .context("--device cuda")?;
            let dtype = match a.dtype {
                DtypeArg::Bf16 => "bf16",
                _ => "tf32",
            };
            (t, device, dtype)
        }
    };
    let ms = bench::median(&times);
    let gflop = 2.0 * (a.m * a.k * a.n) as f64 / 1e9;
    let line = serde_json::json!({
        "impl": "qkv", "m": a.m, "k": a.k, "n": a.n, "ta": a.ta, "tb": a.tb,
        "packed": a.packed, "isa": qkv::simd::isa(), "gemm_isa": qkv::simd::gemm_isa(),
        "device": device, "dtype": dtype, "threads": threads,
        "ms": round(ms, 3),
        "gflops": round(gflop / (ms / 1e3), 2),
    });
    println!("{line}");
    print_profile(a.steps + a.warmup);
    Ok(())
}

fn translate(a: TranslateArgs, threads: usize) -> Result<()> {
    let dtype = match a.device {
        DeviceArg::Cpu => effective_dtype(a.precision.dtype),
        DeviceArg::Cuda if crate::args::gpu_bf16(a.precision)? => "bf16",
        DeviceArg::Cuda => "tf32",
    };
    let _precision = a.precision.apply();
    let mut dir = qkv::model_dir::ModelDir::load(&a.model)?;
    a.precision.apply_to(&mut dir.model)?;
    let decode = a.decode.over(&dir.files.decode)?;
    let (data, max) = (&a.data, a.max_tokens.max(1));
    let device = a.device.device();
    let report = qkv::pipeline::evaluate_on(&mut dir, data, Some(&decode), max, device)?;
    let qkv::tasks::Report::Translate(r) = report else {
        bail!("{}: not a translation model", a.model.display());
    };
    if let Some(out) = &a.output {
        std::fs::write(out, r.hypotheses.join("\n") + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
    }
    let line = serde_json::json!({
        "impl": "qkv", "bench": "translate", "device": device.name(), "isa": qkv::simd::isa(), "gemm_isa": qkv::simd::gemm_isa(), "dtype": dtype,
        "threads": threads, "beam": decode.beam, "mbr": decode.mbr, "mbr_references": decode.references(), "max_tokens": a.max_tokens,
        "sentences": r.sentences, "seconds": round(r.seconds, 3),
        "target_tokens": r.target_tokens,
        "tokens_per_s": round(r.target_tokens as f64 / r.seconds, 1),
        "bleu": round(r.bleu.score, 2),
        "peak_rss_mb": peak_rss_mb().map(|m| round(m, 1)),
    });
    println!("{line}");
    print_profile(1);
    Ok(())
}

/// The dtype a benchmark really ran: bf16 falls back to f32 on CPUs without avx512_bf16.
fn effective_dtype(d: DtypeArg) -> &'static str {
    match d {
        DtypeArg::Bf16 if !qkv::kernels::bf16::available() => "f32 (no avx512_bf16)",
        d => d.name(),
    }
}

fn attention(a: AttentionArgs, threads: usize) -> Result<()> {
    if matches!(a.dtype, DtypeArg::Int8) {
        bail!(
            "--dtype int8 applies to decoding steps (translate, generate, serve, bench translate)"
        );
    }
    use qkv::bench::{AttentionBench, AttentionKernel};
    if matches!(a.dtype, DtypeArg::Bf16)
        && matches!(
            a.kind,
            AttentionKindArg::Reference | AttentionKindArg::Linear
        )
    {
        bail!(
            "--dtype bf16 with --kind {}: the materialized and linear attention kernels compute \
             in f32 only; bf16 tile products are flash's (--kind flash or window)",
            a.kind_name()
        );
    }
    if a.window == 0 {
        bail!("--window must be at least 1");
    }
    let kernel = match a.kind {
        AttentionKindArg::Flash => AttentionKernel::Flash,
        AttentionKindArg::Reference => AttentionKernel::Reference,
        AttentionKindArg::Linear => AttentionKernel::Linear,
        AttentionKindArg::Window => AttentionKernel::Window(a.window),
    };
    let b = AttentionBench {
        kernel,
        batch: a.batch,
        heads: a.heads,
        n: a.n,
        head_dim: a.head_dim,
        causal: a.causal,
        backward: a.backward,
        steps: a.steps,
        warmup: a.warmup,
        precision: a.dtype.precision(),
    };
    let base = peak_rss_mb();
    let (times, device) = match a.device {
        DeviceArg::Cpu => (bench::attention(&b)?, "cpu".to_string()),
        DeviceArg::Cuda => bench::attention_cuda(&b).context("--device cuda")?,
    };
    // The GPU has bf16 whatever the CPU has.
    let dtype = match a.device {
        DeviceArg::Cuda => a.dtype.name(),
        DeviceArg::Cpu => effective_dtype(a.dtype),
    };
    let ms = bench::median(&times);
    let peak = peak_rss_mb();
    let tensors = b.tensor_bytes() as f64 / (1024.0 * 1024.0);
    let mb = |x: f64| round(x, 1);
    let line = serde_json::json!({
        "impl": "qkv", "isa": qkv::simd::isa(), "gemm_isa": qkv::simd::gemm_isa(),
        "device": device, "kind": a.kind_name(),
        "n": a.n, "heads": a.heads, "head_dim": a.head_dim, "batch": a.batch,
        "causal": a.causal, "backward": a.backward, "dtype": dtype,
        "threads": threads,
        "ms": round(ms, 3),
        "min_ms": round(times.iter().cloned().fold(f64::INFINITY, f64::min), 3),
        "peak_rss_mb": peak.map(mb),
        // What the process held before the benchmark, and Q, K, V, O (+ dO, dQ, dK, dV):
        // peak − baseline − tensors is the kernel's own extra memory.
        "baseline_rss_mb": base.map(mb),
        "tensors_mb": mb(tensors),
        "extra_mb": peak.zip(base).map(|(p, b)| mb(p - b - tensors)),
    });
    println!("{line}");
    Ok(())
}

impl AttentionArgs {
    fn kind_name(&self) -> &'static str {
        match self.kind {
            AttentionKindArg::Flash => "flash",
            AttentionKindArg::Reference => "reference",
            AttentionKindArg::Linear => "linear",
            AttentionKindArg::Window => "window",
        }
    }
}
