//! The trainer: resuming from a checkpoint reproduces an uninterrupted run exactly; a NaN stops
//! training with the last checkpoint intact; best/last-K checkpoint bookkeeping.

mod common;
use common::tiny;
use qkv::backend::{Backend, Cpu};
use qkv::data::Seq2SeqBatch;
use qkv::model::{Family, NormPlacement, Seq2Seq, ToBackend};
use qkv::rng::Rng;
use qkv::schedule::Schedule;
use qkv::train::{
    self, Observer, Outcome, Part, RunDir, StepLog, Tally, TrainConfig, TrainData, Trainer,
    Validation,
};
use std::path::Path;

struct Losses(Vec<(u64, f32)>);
impl Observer for Losses {
    fn on_step(&mut self, log: &StepLog) {
        self.0.push((log.step, log.loss));
    }
}

/// A small synthetic corpus: reverse-copy of random symbol strings of varied lengths.
fn corpus() -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut rng = Rng::new(3);
    (0..40)
        .map(|_| {
            let len = 2 + rng.below(8) as usize;
            let s: Vec<u32> = (0..len).map(|_| 3 + rng.below(8) as u32).collect();
            let t: Vec<u32> = s.iter().rev().copied().collect();
            (s, t)
        })
        .collect()
}

fn epoch(data: &[(Vec<u32>, Vec<u32>)], seed: u64, e: u64) -> Vec<Seq2SeqBatch> {
    let lengths: Vec<usize> = data.iter().map(|(s, t)| s.len().max(t.len()) + 1).collect();
    qkv::data::batches_by_tokens(&lengths, 48, seed, e)
        .into_iter()
        .map(|idx| {
            let pairs: Vec<(&[u32], &[u32])> = idx
                .iter()
                .map(|&i| (data[i].0.as_slice(), data[i].1.as_slice()))
                .collect();
            Seq2SeqBatch::new(&pairs, 0, 1, 2)
        })
        .collect()
}

/// The corpus as the trainer sees it; validation is the mean loss on its first pairs, or
/// `score` when a test scripts the validation results.
struct Data {
    pairs: Vec<(Vec<u32>, Vec<u32>)>,
    seed: u64,
    valid: Vec<Seq2SeqBatch>,
    score: Option<Box<dyn FnMut() -> Tally>>,
}

impl Data {
    fn new(seed: u64) -> Self {
        let pairs = corpus();
        let valid = epoch(&pairs[..8], 0, 0);
        Self {
            pairs,
            seed,
            valid,
            score: None,
        }
    }
}

impl<B: Backend> TrainData<Seq2Seq<B>, B> for Data {
    fn epoch(&self, e: u64) -> qkv::Result<Vec<Seq2SeqBatch>> {
        Ok(epoch(&self.pairs, self.seed, e))
    }
    fn validate(&mut self, m: &mut Seq2Seq<B>, part: Part) -> qkv::Result<Tally> {
        match &mut self.score {
            Some(f) => Ok(f()),
            None => train::loss_tally(m, &self.valid, part),
        }
    }
}

fn config(max_steps: u64) -> TrainConfig {
    TrainConfig {
        max_steps,
        max_tokens: 48,
        accumulate: 2,
        schedule: Schedule::Cosine {
            peak: 3e-3,
            min: 1e-4,
            warmup: 3,
            total: 10,
        },
        label_smoothing: 0.1,
        seed: 7,
        valid_every: 4,
        save_every: 3,
        keep_last: 2,
        ..TrainConfig::default()
    }
}

fn model() -> Seq2Seq {
    let mut cfg = tiny(Family::Seq2seq, NormPlacement::Post, false, false);
    cfg.dropout = 0.1; // masks must be reproduced too
    Seq2Seq::new(cfg, 1).unwrap()
}

fn run_dir(dir: &Path) -> RunDir {
    RunDir {
        path: dir.to_path_buf(),
        extra_files: vec![],
    }
}

fn run(dir: &Path, cfg: &TrainConfig, resume: bool) -> (Vec<(u64, f32)>, Outcome, Seq2Seq) {
    let mut t = Trainer::new(model(), cfg.clone(), Some(run_dir(dir))).unwrap();
    if resume {
        let last = run_dir(dir).latest().unwrap().unwrap();
        t.resume_from(&last).unwrap();
    }
    let mut losses = Losses(Vec::new());
    let outcome = t.fit(&mut Data::new(cfg.seed), &mut losses).unwrap();
    (losses.0, outcome, t.model)
}

#[test]
fn resumed_run_reproduces_uninterrupted_losses_exactly() {
    let tmp = std::env::temp_dir().join(format!("qkv-resume-{}", std::process::id()));
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    let _ = std::fs::remove_dir_all(&tmp);
    let (full, outcome, full_model) = run(&a, &config(10), false);
    assert_eq!(outcome, Outcome::Finished);
    assert_eq!(full.len(), 10);
    // Several epochs pass in 10 updates of this corpus, so the epoch boundary is crossed.
    let (first, _, _) = run(&b, &config(5), false);
    assert_eq!(first[..], full[..5]);
    let (rest, _, resumed_model) = run(&b, &config(10), true);
    assert_eq!(
        rest.iter().map(|x| x.0).collect::<Vec<_>>(),
        (6..=10).collect::<Vec<_>>()
    );
    for ((s, x), (_, y)) in rest.iter().zip(&full[5..]) {
        assert_eq!(
            x.to_bits(),
            y.to_bits(),
            "step {s}: resumed loss {x} vs uninterrupted {y}"
        );
    }
    assert_eq!(resumed_model.params.data, full_model.params.data);
    // keep_last = 2 checkpoints, plus best/.
    let ckpts = run_dir(&a).checkpoints().unwrap();
    assert_eq!(ckpts.iter().map(|c| c.0).collect::<Vec<_>>(), vec![9, 10]);
    assert!(a.join("best").join("model.safetensors").exists());
    let csv = std::fs::read_to_string(a.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().filter(|l| l.contains(",train,")).count(), 10);
    assert!(csv.lines().any(|l| l.contains(",valid,")));
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Each update's loss and each validation's loss.
#[derive(Default)]
struct Seen {
    losses: Vec<(u64, u32)>,
    valid: Vec<(u64, u64)>,
}
impl Observer for Seen {
    fn on_step(&mut self, log: &StepLog) {
        self.losses.push((log.step, log.loss.to_bits()));
    }
    fn on_validation(&mut self, step: u64, v: &Validation) {
        self.valid.push((step, v.loss.to_bits()));
    }
}

/// [`run`] the way `train.device` cuda trains: the model built on the CPU, its twin on another
/// backend (here the CPU again) trained.
fn run_twin(dir: &Path, cfg: &TrainConfig, resume: bool, seen: &mut Seen) -> Seq2Seq {
    let twin = model().to_backend(Cpu).unwrap();
    let mut t = Trainer::new(twin, cfg.clone(), Some(run_dir(dir))).unwrap();
    if resume {
        let last = run_dir(dir).latest().unwrap().unwrap();
        t.resume_from(&last).unwrap();
    }
    t.fit(&mut Data::new(cfg.seed), seen).unwrap();
    t.model
}

#[test]
fn a_twin_on_another_backend_trains_validates_and_resumes_as_the_model_itself() {
    let tmp = std::env::temp_dir().join(format!("qkv-twin-{}", std::process::id()));
    let (a, b, c) = (tmp.join("a"), tmp.join("b"), tmp.join("c"));
    let _ = std::fs::remove_dir_all(&tmp);
    let cfg = config(10);
    let mut direct = Seen::default();
    let mut t = Trainer::new(model(), cfg.clone(), Some(run_dir(&a))).unwrap();
    t.fit(&mut Data::new(cfg.seed), &mut direct).unwrap();
    let mut twin = Seen::default();
    let twin_model = run_twin(&b, &cfg, false, &mut twin);
    assert_eq!(twin.losses, direct.losses);
    assert!(direct.valid.len() >= 3);
    assert_eq!(twin.valid, direct.valid);
    assert_eq!(twin_model.params.data, t.model.params.data);
    let (x, y) = (a.join("best"), b.join("best"));
    let model_file = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(model_file(&x) == model_file(&y), "best/ weights differ");
    let (ox, oy) = (
        qkv::checkpoint::load_optimizer(&x, &t.model.params).unwrap(),
        qkv::checkpoint::load_optimizer(&y, &t.model.params).unwrap(),
    );
    assert_eq!((ox.step, &ox.m, &ox.v), (oy.step, &oy.m, &oy.v));
    // Interrupted at update 5 and resumed on the twin path: the uninterrupted run's losses.
    run_twin(&c, &config(5), false, &mut Seen::default());
    let mut rest = Seen::default();
    let resumed = run_twin(&c, &cfg, true, &mut rest);
    assert_eq!(rest.losses[..], direct.losses[5..]);
    assert_eq!(resumed.params.data, t.model.params.data);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn nan_stops_training_and_keeps_the_last_checkpoint() {
    let tmp = std::env::temp_dir().join(format!("qkv-nan-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let cfg = TrainConfig {
        save_every: 2,
        valid_every: 0,
        ..config(8)
    };
    let first = TrainConfig {
        max_steps: 2,
        ..cfg.clone()
    };
    let mut t = Trainer::new(model(), first, Some(run_dir(&tmp))).unwrap();
    let mut data = Data::new(cfg.seed);
    t.fit(&mut data, &mut ()).unwrap();
    let saved = std::fs::read(tmp.join("checkpoint-0000002").join("model.safetensors")).unwrap();
    // Poison one weight after step 2 is saved: the next forward produces NaN.
    t.model.params.data[0] = f32::NAN;
    t.cfg = cfg;
    let msg = t.fit(&mut data, &mut ()).unwrap_err().to_string();
    assert!(
        msg.contains("non-finite") && msg.contains("step 3"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(tmp.join("checkpoint-0000002").join("model.safetensors")).unwrap(),
        saved
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn bf16_training_tracks_f32_and_resumes_exactly() {
    use qkv::kernels::matmul::{matmul_precision, Precision};
    if !qkv::kernels::bf16::run_bf16_test("bf16 training") {
        return;
    }
    let tmp = std::env::temp_dir().join(format!("qkv-bf16-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let bf16 = TrainConfig {
        precision: Precision::Bf16,
        ..config(10)
    };
    let (f32_losses, _, _) = run(&tmp.join("f32"), &config(10), false);
    let (bf16_losses, outcome, bf16_model) = run(&tmp.join("bf16"), &bf16, false);
    assert_eq!(outcome, Outcome::Finished);
    assert_eq!(
        matmul_precision(),
        Precision::F32,
        "train() leaves the thread as it found it"
    );
    // The products really ran in bf16 (losses differ from f32 from the first step on)...
    assert_ne!(bf16_losses[0].1.to_bits(), f32_losses[0].1.to_bits());
    // ...and training follows the f32 run: 8-bit mantissas move a loss by far less than a step.
    for ((s, x), (_, y)) in bf16_losses.iter().zip(&f32_losses) {
        assert!(
            (x - y).abs() < 0.05 * y,
            "step {s}: bf16 loss {x} vs f32 {y}"
        );
    }
    assert!(bf16_losses[9].1 < bf16_losses[0].1 - 0.3, "{bf16_losses:?}");
    // The precision is saved with the run and resume in bf16 is exact.
    let saved = train::load_train_config(&tmp.join("bf16").join("best")).unwrap();
    assert_eq!(saved.precision, Precision::Bf16);
    let half = TrainConfig {
        precision: Precision::Bf16,
        ..config(5)
    };
    let (_, _, _) = run(&tmp.join("resumed"), &half, false);
    let (rest, _, resumed) = run(&tmp.join("resumed"), &bf16, true);
    for ((s, x), (_, y)) in rest.iter().zip(&bf16_losses[5..]) {
        assert_eq!(x.to_bits(), y.to_bits(), "step {s}: resumed {x} vs {y}");
    }
    assert_eq!(resumed.params.data, bf16_model.params.data);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn averaging_the_last_checkpoints_replaces_best_only_when_it_validates_better() {
    let tmp = std::env::temp_dir().join(format!("qkv-average-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let cfg = TrainConfig {
        save_every: 2,
        keep_last: 3,
        average_last: 3,
        ..config(8)
    };
    // keep_last must cover what is averaged.
    let err = TrainConfig {
        keep_last: 2,
        ..cfg.clone()
    }
    .validate()
    .unwrap_err();
    assert!(err.to_string().contains("keep_last"), "{err}");

    struct Averages(Vec<(usize, bool)>);
    impl Observer for Averages {
        fn on_average(&mut self, n: usize, _v: &Validation, best: bool) {
            self.0.push((n, best));
        }
    }
    for rising in [true, false] {
        let dir = tmp.join(if rising { "rising" } else { "falling" });
        let mut t = Trainer::new(model(), cfg.clone(), Some(run_dir(&dir))).unwrap();
        // A score that rises (falls) with every validation: the average, validated last,
        // is then the best (worst) model seen.
        let mut calls = 0.0;
        let mut data = Data::new(cfg.seed);
        data.score = Some(Box::new(move || {
            calls += 1.0;
            Tally {
                nll_sum: 1.0,
                count: 1.0,
                metric: Some(("score".into(), if rising { calls } else { -calls }, 1.0)),
            }
        }));
        let mut seen = Averages(Vec::new());
        t.fit(&mut data, &mut seen).unwrap();
        let m = t.model;
        assert_eq!(seen.0, vec![(3, rising)]);
        let load = |d: &Path| {
            let mut p = model().params;
            qkv::checkpoint::load_params(&d.join("model.safetensors"), &mut p).unwrap();
            p.data
        };
        let ckpts: Vec<Vec<f32>> = [4, 6, 8]
            .iter()
            .map(|s| load(&dir.join(format!("checkpoint-{s:07}"))))
            .collect();
        // The model keeps its final parameters.
        assert_eq!(m.params.data, ckpts[2]);
        let best = load(&dir.join("best"));
        if rising {
            for (i, b) in best.iter().enumerate() {
                let mean = (ckpts.iter().map(|c| c[i] as f64).sum::<f64>() / 3.0) as f32;
                assert_eq!(*b, mean, "parameter {i}");
            }
        } else {
            // The first validation (update 4) stayed the best.
            assert_eq!(best, ckpts[0]);
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// With a time limit the trainer fits the run's horizon to the time after timing the first
/// updates: the run ends its schedule (the cosine at its minimum) inside the limit, and the
/// horizon is saved so a resumed run keeps it.
#[test]
fn a_time_limit_fits_the_schedule_to_the_time_and_resume_keeps_it() {
    let tmp = std::env::temp_dir().join(format!("qkv-budget-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    // Each update takes at least 30 ms (the observer sleeps, so the tiny model's compute and
    // the machine's load hardly move it): 4 s hold about 130 updates.
    struct Slow {
        logs: Vec<StepLog>,
        horizon: Option<u64>,
    }
    impl Observer for Slow {
        fn on_step(&mut self, log: &StepLog) {
            std::thread::sleep(std::time::Duration::from_millis(30));
            self.logs.push(log.clone());
        }
        fn on_horizon(&mut self, horizon: u64, _max: u64, _s: f64) {
            self.horizon = Some(horizon);
        }
    }
    // The resumed run's remaining updates at full speed: its horizon is fixed (saved in the
    // cooldown), and slow updates on a loaded machine could reach the time limit a step or two
    // before it, which is not what this test is about.
    struct Fast {
        logs: Vec<StepLog>,
        horizon: Option<u64>,
    }
    impl Observer for Fast {
        fn on_step(&mut self, log: &StepLog) {
            self.logs.push(log.clone());
        }
        fn on_horizon(&mut self, horizon: u64, _max: u64, _s: f64) {
            self.horizon = Some(horizon);
        }
    }
    let (max_steps, min) = (1000, 1e-4);
    let cfg = TrainConfig {
        schedule: Schedule::Cosine {
            peak: 3e-3,
            min,
            warmup: 50,
            total: max_steps,
        },
        accumulate: 1,
        valid_every: 0,
        save_every: 0,
        time_limit_s: Some(4.0),
        ..config(max_steps)
    };
    let start = std::time::Instant::now();
    let mut t = Trainer::new(model(), cfg.clone(), Some(run_dir(&tmp.join("full")))).unwrap();
    let mut obs = Slow {
        logs: Vec::new(),
        horizon: None,
    };
    let outcome = t.fit(&mut Data::new(cfg.seed), &mut obs).unwrap();
    let horizon = obs.horizon.expect("no horizon fitted");
    assert!(horizon < max_steps && horizon > 40, "horizon {horizon}");
    assert_eq!(t.state.horizon, Some(horizon));
    assert_eq!(outcome, Outcome::Finished, "stopped at {}", t.state.step);
    assert_eq!(t.state.step, horizon);
    assert!(start.elapsed().as_secs_f64() < 4.5, "{:?}", start.elapsed());
    let last = obs.logs.last().unwrap();
    assert_eq!(last.last_step, horizon);
    assert!(
        (last.lr - min).abs() < 1e-7,
        "the schedule did not end: lr {}",
        last.lr
    );

    // Once the cooldown begins the horizon stays: every later update reports the same end.
    let cooldown = qkv::schedule::cooldown_start(horizon);
    assert!(obs
        .logs
        .iter()
        .filter(|l| l.step > cooldown)
        .all(|l| l.last_step == horizon));

    // Interrupted in the cooldown: the checkpoint holds the horizon, and the resumed run
    // ends at it with the learning rates of the uninterrupted schedule.
    let dir = tmp.join("resumed");
    let mut t = Trainer::new(model(), cfg.clone(), Some(run_dir(&dir))).unwrap();
    let obs = Slow {
        logs: Vec::new(),
        horizon: None,
    };
    // Stop one update into the cooldown, whatever horizon this run fits.
    struct StopInCooldown(Slow);
    impl Observer for StopInCooldown {
        fn on_step(&mut self, log: &StepLog) {
            self.0.on_step(log)
        }
        fn should_stop(&mut self) -> bool {
            self.0.logs.last().is_some_and(|l| {
                l.last_step < 1000 && l.step > qkv::schedule::cooldown_start(l.last_step)
            })
        }
    }
    let mut stopper = StopInCooldown(obs);
    assert_eq!(
        t.fit(&mut Data::new(cfg.seed), &mut stopper).unwrap(),
        Outcome::Interrupted
    );
    let fitted = t.state.horizon.expect("fitted before the cooldown");
    let mut t = Trainer::new(model(), cfg.clone(), Some(run_dir(&dir))).unwrap();
    t.resume_from(&run_dir(&dir).latest().unwrap().unwrap())
        .unwrap();
    assert_eq!(t.state.horizon, Some(fitted));
    let mut obs = Fast {
        logs: Vec::new(),
        horizon: None,
    };
    t.fit(&mut Data::new(cfg.seed), &mut obs).unwrap();
    assert_eq!(obs.horizon, None, "the horizon moved in the cooldown");
    assert_eq!(t.state.step, fitted);
    let schedule = cfg.schedule.fitted(fitted);
    for log in &obs.logs {
        assert_eq!(log.last_step, fitted);
        assert_eq!(log.lr, schedule.lr(log.step), "step {}", log.step);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Data parallel on the GPU is not built: `train.device` cuda with more than one rank is an
/// error naming both, before any GPU is looked for or any file is written.
#[test]
fn cuda_training_under_several_ranks_is_an_error() {
    /// Rank 0 of two; never asked to move data.
    struct TwoRanks;
    impl qkv::dist::Collective for TwoRanks {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            2
        }
        fn sum_f64(&self, _: &mut [f64], what: &str) -> qkv::Result<()> {
            panic!("{what}: no collective expected")
        }
        fn start_sum(&self, _: usize, _: &[f32], what: &str) -> qkv::Result<()> {
            panic!("{what}: no collective expected")
        }
        fn progress(&self) -> qkv::Result<()> {
            Ok(())
        }
        fn finish_sums(&self, _: &mut [f32], what: &str) -> qkv::Result<()> {
            panic!("{what}: no collective expected")
        }
        fn broadcast_f32(&self, _: &mut [f32], what: &str) -> qkv::Result<()> {
            panic!("{what}: no collective expected")
        }
        fn broadcast_f64(&self, _: &mut [f64], what: &str) -> qkv::Result<()> {
            panic!("{what}: no collective expected")
        }
        fn broadcast_bytes(&self, _: &mut Vec<u8>, what: &str) -> qkv::Result<()> {
            panic!("{what}: no collective expected")
        }
    }
    let dir = std::env::temp_dir().join(format!("qkv-cuda-ranks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["train.tsv", "valid.tsv"] {
        std::fs::write(dir.join(f), "a b\tb a\n").unwrap();
    }
    let config = r#"{"task": "translate", "data": {"train": "train.tsv", "valid": "valid.tsv"},
        "train": {"device": "cuda"}, "out": "run"}"#;
    std::fs::write(dir.join("job.json"), config).unwrap();
    let job = qkv::job::Job::load(&dir.join("job.json")).unwrap();
    let err = qkv::pipeline::train_with(&job, false, &mut (), std::rc::Rc::new(TwoRanks))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train.device cuda") && err.contains("mpirun"),
        "{err}"
    );
    assert!(!dir.join("run").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
