//! `qkv train`: run a job (`qkv::pipeline::train`) with a progress bar (or, when stderr is
//! not a terminal, a progress line at most every 30 s), Ctrl-C handling and the final
//! evaluation printed. Under `mpirun` (a build with the `mpi` feature) every process is a
//! rank of one data-parallel run; rank 0 shows the progress.

use crate::args::DeviceArg;
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use qkv::job::Job;
use qkv::pipeline::TrainReport;
use qkv::train::{Observer, Outcome, StepLog, Validation};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Job config (JSON): task, data, tokenizer, model, trainer, decoding.
    #[arg(long)]
    pub config: PathBuf,
    /// Override the run directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override the number of updates.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Override the time limit in seconds.
    #[arg(long)]
    pub time_limit: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue from the latest checkpoint in the run directory.
    #[arg(long)]
    pub resume: bool,
    /// Where the model trains (overrides the job's `train.device`): the CPU, or the first
    /// NVIDIA GPU (products in TF32, or bf16 with the job's `precision` "bf16"), which also
    /// validates (a BLEU `best_metric` decodes there); the final test runs on the CPU.
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
    /// Under mpirun: seconds a rank waits for the others at any step before it names the
    /// ranks that did not arrive and stops the job.
    #[arg(long, default_value_t = 600.0, value_name = "SECONDS")]
    pub mpi_timeout: f64,
}

/// Without a terminal, a progress line at most this often.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Progress bar or log lines, loss curve, and the Ctrl-C flag.
struct Progress {
    bar: ProgressBar,
    last_line: Option<Instant>,
    stop: Arc<AtomicBool>,
    run_dir: PathBuf,
}

impl Progress {
    /// A line above the bar; on stderr directly when the bar is hidden (not a terminal), where
    /// `ProgressBar::println` would drop it and a logged run would lose its lines.
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

fn metric(v: &Validation) -> String {
    v.metric
        .as_ref()
        .map(|(n, x)| format!(" {n} {x:.2}"))
        .unwrap_or_default()
}

fn minutes(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    format!("{}m{:02}s", s / 60, s % 60)
}

impl Observer for Progress {
    fn on_step(&mut self, log: &StepLog) {
        let line = format!(
            "loss {:.3} lr {:.2e} {:.0} tok/s ep {}",
            log.loss, log.lr, log.tokens_per_s, log.epoch
        );
        if !self.bar.is_hidden() {
            self.bar.set_length(log.last_step);
            self.bar.set_position(log.step);
            self.bar.set_message(line);
        } else if self.last_line.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.last_line = Some(Instant::now());
            eprintln!(
                "update {}/{} {line} elapsed {} ETA {}",
                log.step,
                log.last_step,
                minutes(log.elapsed_s),
                minutes(log.eta_s)
            );
        }
    }
    fn on_validation(&mut self, step: u64, v: &Validation) {
        if let Err(e) = crate::plot::loss_curve(&self.run_dir) {
            self.say(format!("warning: no loss curve: {e:#}"));
        }
        self.say(format!(
            "step {step}: valid loss {:.4} ppl {:.2}{}",
            v.loss,
            v.loss.exp(),
            metric(v)
        ));
    }
    fn on_horizon(&mut self, horizon: u64, max_steps: u64, seconds_per_update: f64) {
        // Only a horizon below max_steps fits the schedule (Trainer::schedule): a run whose
        // max_steps is below its schedule's end stops there without cooling down.
        self.say(if horizon < max_steps {
            format!(
                "{seconds_per_update:.3} s/update here: the time limit holds {horizon} of the \
                 {max_steps} updates; the schedule ends at update {horizon}"
            )
        } else {
            format!("{seconds_per_update:.3} s/update here: the time limit holds all {max_steps} updates")
        });
    }
    fn on_average(&mut self, n: usize, v: &Validation, best: bool) {
        self.say(format!(
            "average of the last {n} checkpoints: valid loss {:.4}{} — {}",
            v.loss,
            metric(v),
            if best {
                "better than every single checkpoint: it is now best/"
            } else {
                "not better than best/, which stays"
            }
        ));
    }
    fn on_message(&mut self, msg: &str) {
        self.say(msg.to_string());
    }
    fn should_stop(&mut self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

fn ctrl_c_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    // A second Ctrl-C while saving would be lost; the first one already stops at the next step.
    let _ = ctrlc::set_handler(move || f.store(true, Ordering::Relaxed));
    flag
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mut job = Job::load(&args.config)?;
    if let Some(out) = args.out.clone() {
        job.out = Some(out);
    }
    if let Some(s) = args.max_steps {
        job.train.max_steps = s;
    }
    if let Some(t) = args.time_limit {
        job.train.time_limit_s = Some(t);
    }
    if let Some(s) = args.seed {
        job.train.seed = s;
    }
    if let Some(d) = args.device {
        job.train.device = d.device();
    }
    job.train.validate()?;
    if job.train.precision == qkv::kernels::matmul::Precision::Bf16
        && job.train.device == qkv::backend::Device::Cpu
        && !qkv::kernels::bf16::available()
    {
        eprintln!("precision bf16: this CPU has no avx512_bf16, so the products run in f32");
    }
    // Validation and the final test evaluation run in the precision the model trains in.
    let _precision = qkv::kernels::matmul::set_matmul_precision(job.train.precision);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let mut progress = Progress {
        bar,
        last_line: None,
        stop: ctrl_c_flag(),
        run_dir: job.out().to_path_buf(),
    };
    if !(args.mpi_timeout > 0.0 && args.mpi_timeout.is_finite()) {
        anyhow::bail!(
            "--mpi-timeout must be a positive number of seconds, got {}",
            args.mpi_timeout
        );
    }
    let t0 = Instant::now();
    if let Some(ranks) = launched_ranks().filter(|&n| n > 1) {
        return train_ranks(&job, &args, progress, ranks);
    }
    let report = qkv::pipeline::train(&job, args.resume, &mut progress)?;
    progress.bar.finish_and_clear();
    print_report(&report, t0.elapsed().as_secs_f64());
    Ok(())
}

/// The number of processes an MPI launcher started, when it started this one.
fn launched_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// One rank of a data-parallel run. An error on any rank ends the whole job (MPI_Abort):
/// the others would otherwise wait for it until their timeout.
#[cfg(feature = "mpi")]
fn train_ranks(job: &Job, args: &TrainArgs, mut progress: Progress, _ranks: usize) -> Result<()> {
    use qkv::dist::{mpi::Mpi, Collective};
    let t0 = Instant::now();
    let mpi = std::rc::Rc::new(Mpi::init(Duration::from_secs_f64(args.mpi_timeout))?);
    let root = mpi.is_root();
    let result = if root {
        qkv::pipeline::train_with(job, args.resume, &mut progress, mpi.clone())
    } else {
        progress.bar.finish_and_clear();
        qkv::pipeline::train_with(job, args.resume, &mut (), mpi.clone())
    };
    progress.bar.finish_and_clear();
    match result {
        Ok(report) => {
            if root {
                print_report(&report, t0.elapsed().as_secs_f64());
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("error: rank {} of {}: {e}", mpi.rank(), mpi.size());
            mpi.abort(1)
        }
    }
}

#[cfg(not(feature = "mpi"))]
fn train_ranks(_: &Job, _: &TrainArgs, _: Progress, ranks: usize) -> Result<()> {
    anyhow::bail!(
        "started by mpirun as one of {ranks} ranks, but this qkv was built without MPI: \
         build it with `cargo build --release --features mpi` (needs OpenMPI and libclang)"
    )
}
fn print_report(r: &TrainReport, seconds: f64) {
    eprintln!(
        "{} after {} of {} updates in {:.0} s ({seconds:.0} s in this process); best checkpoint: {}",
        match r.outcome {
            Outcome::Finished => "finished",
            Outcome::TimeLimit => "stopped at the time limit",
            Outcome::Interrupted => "interrupted; checkpoint saved",
        },
        r.state.step,
        r.last_step,
        r.state.elapsed_s,
        r.best.display()
    );
    // Per update, validation included (QKV_PROFILE=1).
    crate::args::print_profile(r.state.step.max(1) as usize);
    if let Some(test) = &r.test {
        println!("test: {test}");
    }
    if r.outcome != Outcome::Interrupted {
        println!("\nmodel: {}", r.best.display());
    }
}
