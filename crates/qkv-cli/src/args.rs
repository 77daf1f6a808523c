//! What several commands share: the precision flag, stdin lines, profiles and memory.

use anyhow::{Context, Result};
use clap::ValueEnum;
use std::io::BufRead;

#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    Int8,
}

/// `--device`: the CPU, or the first NVIDIA GPU.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

impl DeviceArg {
    pub fn device(self) -> qkv::backend::Device {
        match self {
            DeviceArg::Cpu => qkv::backend::Device::Cpu,
            DeviceArg::Cuda => qkv::backend::Device::Cuda,
        }
    }
}

/// The first GPU for `--device cuda`, its products in bf16 with `--dtype bf16`, else TF32.
pub fn first_gpu(precision: PrecisionArgs) -> Result<qkv::backend::Cuda> {
    let bf16 = gpu_bf16(precision)?;
    qkv::backend::Cuda::first_gpu(bf16).context("--device cuda")
}

/// Whether `--device cuda`'s products are bf16 (`--dtype bf16`) rather than TF32; `--dtype
/// int8` is the CPU's decoding kernels, an error there.
pub fn gpu_bf16(precision: PrecisionArgs) -> Result<bool> {
    match precision.dtype {
        DtypeArg::Int8 => anyhow::bail!(
            "--dtype int8 runs decoding steps on the CPU's int8 kernels; with --device cuda use \
             --dtype f32 (TF32 products) or bf16"
        ),
        dtype => Ok(matches!(dtype, DtypeArg::Bf16)),
    }
}

/// `--dtype` of the inference commands (a job's training precision is in its config).
#[derive(clap::Args, Clone, Copy)]
pub struct PrecisionArgs {
    /// Operand precision of the matrix products: bf16 runs them on the CPU's avx512_bf16
    /// dot-product instruction with f32 sums and f32 weights (on CPUs without avx512_bf16,
    /// bf16 runs as f32); int8 runs decoding steps' products (translate, generate, serve) on
    /// int8 weights with a scale per output channel and int8 activations with a scale per
    /// row, summed in i32 (needs AVX2); the encoder stays f32.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
}

impl PrecisionArgs {
    /// Use this precision on the calling thread until the guard drops.
    pub fn apply(self) -> qkv::kernels::matmul::PrecisionGuard {
        qkv::kernels::matmul::set_matmul_precision(self.dtype.precision())
    }

    /// Quantize `model`'s decoding steps for `--dtype int8` (an error for a model that does
    /// not decode, or a CPU without AVX2).
    pub fn apply_to(self, model: &mut qkv::model::AnyModel) -> Result<()> {
        Ok(model.set_int8_steps(matches!(self.dtype, DtypeArg::Int8))?)
    }
}

impl DtypeArg {
    pub fn precision(self) -> qkv::kernels::matmul::Precision {
        match self {
            // int8 is a property of decoding steps (`apply_to`); other products stay f32.
            DtypeArg::F32 | DtypeArg::Int8 => qkv::kernels::matmul::Precision::F32,
            DtypeArg::Bf16 => qkv::kernels::matmul::Precision::Bf16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DtypeArg::F32 => "f32",
            DtypeArg::Bf16 => "bf16",
            DtypeArg::Int8 => "int8",
        }
    }
}

/// Lines of stdin (empty ones kept, so outputs align with inputs); invalid UTF-8 names the
/// line.
pub fn stdin_lines() -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.with_context(|| format!("stdin line {}", i + 1))?;
        out.push(line.trim_end_matches('\r').to_string());
    }
    Ok(out)
}

/// An input over a model's length limit, named as the user gave it (line `index + 1` of
/// stdin); other errors pass through.
pub fn name_input(e: qkv::Error, what: &str) -> anyhow::Error {
    match e {
        qkv::Error::InputTooLong { index, len, limit } => anyhow::anyhow!(
            "{what} {}: {len} tokens, more than the model's limit of {limit} (split it, or \
             use a model trained with a larger max_len)",
            index + 1
        ),
        e => e.into(),
    }
}

/// With `QKV_PROFILE=1`, where the time of each of `steps` went, to stderr.
pub fn print_profile(steps: usize) {
    if qkv::profile::enabled() {
        let steps = steps as f64;
        for (name, ms, calls) in qkv::profile::report() {
            eprintln!(
                "{:>9.3} ms/step  {:>6} calls/step  {name}",
                ms / steps,
                calls as f64 / steps
            );
        }
    }
}

/// Peak resident set size of this process in MiB (Linux: VmHWM).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
