#![allow(dead_code)]
use qkv::checkpoint::{TensorData, TensorFile};
use qkv::data::{ClassifyBatch, LmBatch, Seq2SeqBatch};
use qkv::model::{Classifier, Family, LanguageModel, Mode, Model, ModelConfig, Seq2Seq};
use qkv::optim::AdamWConfig;
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

/// A fresh, empty directory of this test process's own.
pub fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("qkv-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn random_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

/// `n` ids drawn from `lo..vocab`.
pub fn random_ids(rng: &mut Rng, n: usize, lo: u32, vocab: u32) -> Vec<u32> {
    (0..n)
        .map(|_| lo + rng.below((vocab - lo) as u64) as u32)
        .collect()
}

/// `b` sources of `s` ids from `3..vocab`, row r ending in r padding positions (0), so the
/// cross-attention mask matters.
pub fn padded_source(rng: &mut Rng, b: usize, s: usize, vocab: u32) -> Vec<u32> {
    let mut src = random_ids(rng, b * s, 3, vocab);
    for row in 0..b {
        for pos in s - row.min(s - 1)..s {
            src[row * s + pos] = 0;
        }
    }
    src
}

/// Beam search's reorders of a 3-row cache, one per step after the first: rows repeated,
/// dropped and permuted, the rows growing past the batch and shrinking again.
pub const BEAM_ORDERS: [&[usize]; 5] = [
    &[0, 0, 1, 1, 1, 2],
    &[5, 1, 1, 0, 3],
    &[4, 4, 4, 0],
    &[3, 1, 1],
    &[2, 0, 1, 2, 2],
];

/// One model of any family with one batch: a loss function of the parameters, for gradient
/// checks, golden tests and training tests.
#[allow(clippy::large_enum_variant)]
pub enum Case {
    Seq2Seq(Seq2Seq, Seq2SeqBatch),
    Classifier(Classifier, ClassifyBatch),
    Lm(LanguageModel, LmBatch),
}

impl Case {
    pub fn params(&mut self) -> &mut Params {
        match self {
            Case::Seq2Seq(m, _) => &mut m.params,
            Case::Classifier(m, _) => &mut m.params,
            Case::Lm(m, _) => &mut m.params,
        }
    }

    /// Zeroed gradients, then forward (training `mode`) and backward on the batch: returns
    /// the loss, fills `params.grad`.
    pub fn loss_and_grad(&mut self, mode: Mode) -> f32 {
        fn run<M: Model>(m: &mut M, b: &M::Batch, mode: Mode) -> f32 {
            m.params_mut().zero_grad();
            let loss = m.forward(b, mode).unwrap().loss.mean;
            m.backward(1.0).unwrap();
            loss
        }
        match self {
            Case::Seq2Seq(m, b) => run(m, b, mode),
            Case::Classifier(m, b) => run(m, b, mode),
            Case::Lm(m, b) => run(m, b, mode),
        }
    }

    /// The logits of an evaluation forward.
    pub fn logits(&mut self) -> Vec<f32> {
        fn run<M: Model>(m: &mut M, b: &M::Batch) -> Vec<f32> {
            m.forward(b, Mode::EVAL).unwrap().logits.to_vec()
        }
        match self {
            Case::Seq2Seq(m, b) => run(m, b),
            Case::Classifier(m, b) => run(m, b),
            Case::Lm(m, b) => run(m, b),
        }
    }

    /// A model for `cfg` with a random batch (padding at the end of row 1).
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
                let tgt_in = ids(b, t, vt);
                let mut tgt_out = ids(b, t, vt);
                for (o, i) in tgt_out.iter_mut().zip(&tgt_in) {
                    if *i == pad {
                        *o = pad;
                    }
                }
                let n_tokens = tgt_out.iter().filter(|&&x| x != pad).count();
                let batch = Seq2SeqBatch {
                    src,
                    tgt_in,
                    tgt_out,
                    batch: b,
                    src_len: s,
                    tgt_len: t,
                    n_tokens,
                };
                Case::Seq2Seq(Seq2Seq::new(cfg, seed).unwrap(), batch)
            }
            qkv::model::Family::Classifier => {
                let tokens = ids(b, t, cfg.vocab_size);
                let k = cfg.n_classes as u64;
                let labels = (0..b).map(|_| rng.below(k) as u32).collect();
                let batch = ClassifyBatch {
                    tokens,
                    labels,
                    batch: b,
                    len: t,
                };
                Case::Classifier(Classifier::new(cfg, seed).unwrap(), batch)
            }
            qkv::model::Family::Lm => {
                let input = ids(b, t, cfg.vocab_size);
                let mut target = ids(b, t, cfg.vocab_size);
                for (o, i) in target.iter_mut().zip(&input) {
                    if *i == pad {
                        *o = pad;
                    }
                }
                let batch = LmBatch {
                    input,
                    target,
                    batch: b,
                    len: t,
                };
                Case::Lm(LanguageModel::new(cfg, seed).unwrap(), batch)
            }
        }
    }
}

/// A training-mode forward without dropout: what golden tests and gradient checks run.
pub fn train_mode(label_smoothing: f32) -> Mode {
    Mode::train(0.0, label_smoothing, 0)
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

/// A golden fixture of `tests/fixtures/` (written by scripts/reference/make_fixtures.py).
pub fn fixture(name: &str) -> TensorFile {
    let file = format!("{name}.safetensors");
    let mut path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(&file);
    if !path.exists() {
        // A test binary carried to another machine (the GPU's: scripts/gpu/run.sh) runs from
        // the repository's root there, not where it was built.
        path = std::path::Path::new("tests/fixtures").join(&file);
    }
    TensorFile::open(&path)
        .unwrap_or_else(|e| panic!("{e} (regenerate with scripts/reference/make_fixtures.py)"))
}

/// How close qkv (f32 on the CPU) must come to PyTorch's float64 fixtures.
pub const TOL: f32 = 1e-4;

pub fn fixture_ids(f: &TensorFile, name: &str) -> (Vec<u32>, Vec<usize>) {
    match f.get(name).unwrap() {
        (shape, TensorData::I64(v)) => (v.into_iter().map(|x| x as u32).collect(), shape),
        _ => panic!("{name} is not int64"),
    }
}

pub fn fixture_f32s(f: &TensorFile, name: &str) -> Vec<f32> {
    match f.get(name).unwrap() {
        (_, TensorData::F32(v)) => v,
        _ => panic!("{name} is not f32"),
    }
}

pub fn fixture_meta(f: &TensorFile, key: &str) -> f32 {
    f.metadata()[key].parse().unwrap()
}

pub fn fixture_adamw(f: &TensorFile) -> AdamWConfig {
    AdamWConfig {
        beta1: fixture_meta(f, "beta1"),
        beta2: fixture_meta(f, "beta2"),
        eps: fixture_meta(f, "eps"),
        weight_decay: fixture_meta(f, "weight_decay"),
        clip_norm: Some(fixture_meta(f, "clip_norm")),
    }
}

/// The fixture's model (any family) with its parameters and batch loaded.
pub fn fixture_case(f: &TensorFile) -> Case {
    let cfg: ModelConfig = serde_json::from_str(&f.metadata()["config"])
        .expect("fixture config parses as ModelConfig");
    let mut m = match cfg.family {
        Family::Seq2seq => {
            let ((src, ss), (tin, ts), (tout, _)) = (
                fixture_ids(f, "input.src"),
                fixture_ids(f, "input.tgt_in"),
                fixture_ids(f, "input.tgt_out"),
            );
            let n_tokens = tout.iter().filter(|&&t| t != cfg.pad_id).count();
            let batch = Seq2SeqBatch {
                src,
                tgt_in: tin,
                tgt_out: tout,
                batch: ss[0],
                src_len: ss[1],
                tgt_len: ts[1],
                n_tokens,
            };
            Case::Seq2Seq(Seq2Seq::new(cfg, 0).unwrap(), batch)
        }
        Family::Classifier => {
            let ((x, xs), (y, _)) = (
                fixture_ids(f, "input.tokens"),
                fixture_ids(f, "input.labels"),
            );
            let batch = ClassifyBatch {
                tokens: x,
                labels: y,
                batch: xs[0],
                len: xs[1],
            };
            Case::Classifier(Classifier::new(cfg, 0).unwrap(), batch)
        }
        Family::Lm => {
            let ((x, xs), (y, _)) = (
                fixture_ids(f, "input.tokens"),
                fixture_ids(f, "input.targets"),
            );
            let batch = LmBatch {
                input: x,
                target: y,
                batch: xs[0],
                len: xs[1],
            };
            Case::Lm(LanguageModel::new(cfg, 0).unwrap(), batch)
        }
    };
    load_params(f, m.params());
    m
}

/// Every `param.*` tensor of the fixture is a parameter of the model, and vice versa.
pub fn load_params(f: &TensorFile, params: &mut Params) {
    let fixture_names: Vec<String> = f
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix("param.").map(String::from))
        .collect();
    let mut model_names: Vec<String> = params.specs.iter().map(|s| s.name.clone()).collect();
    let mut fixture_sorted = fixture_names.clone();
    fixture_sorted.sort();
    model_names.sort();
    assert_eq!(
        model_names, fixture_sorted,
        "parameter names differ from PyTorch's"
    );
    for spec in params.specs.clone() {
        let v = f
            .f32_exact(&format!("param.{}", spec.name), &spec.shape)
            .unwrap();
        params.data[spec.offset..spec.offset + spec.len].copy_from_slice(&v);
    }
}
