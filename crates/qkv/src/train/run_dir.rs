//! A run directory: `checkpoint-<step>/` (the last `keep_last`), `best/` (the best validation
//! score) and `metrics.csv`. Each checkpoint is a complete model directory (what
//! [`crate::model_dir::ModelDir`] loads: config, weights, tokenizer, decoding defaults) plus
//! the optimizer and trainer state that make resuming exact.
//!
//! Crash safety: a checkpoint is written to `<name>.tmp` and moved into place; `best/` is
//! replaced by an atomic exchange of the two directories (Linux `renameat2`), so at every
//! moment `best/` holds a complete checkpoint, old or new. Where the filesystem cannot
//! exchange, the old `best/` is parked as `best.old/` between two renames; a crash between
//! them leaves `best.old/` alone, which the next run over the directory moves back
//! ([`RunDir::restore_interrupted`]).

use super::{TrainConfig, TrainerState};
use crate::backend::Backend;
use crate::checkpoint::{self, io_err, json_err, write_atomic};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::optim::AdamW;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const TRAIN_CONFIG_FILE: &str = "train_config.json";
pub const METRICS_FILE: &str = "metrics.csv";
pub const BEST_DIR: &str = "best";

/// The run directory and what goes into each checkpoint besides the model.
pub struct RunDir {
    pub path: PathBuf,
    /// Files copied into every checkpoint (tokenizers, labels, decoding defaults), so each
    /// checkpoint is usable alone.
    pub extra_files: Vec<PathBuf>,
}

/// One line of `metrics.csv`: a training update or a validation.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsRow {
    pub step: u64,
    pub epoch: u64,
    pub kind: RowKind,
    pub loss: f64,
    /// Training rows: learning rate, gradient norm, tokens per second.
    pub lr: Option<f64>,
    pub grad_norm: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// Validation rows: the task metric, e.g. ("accuracy", 81.3).
    pub metric: Option<(String, f64)>,
    pub elapsed_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKind {
    Train,
    Valid,
}

const METRICS_HEADER: &str =
    "step,epoch,kind,loss,lr,grad_norm,tokens_per_s,metric,value,elapsed_s";

impl MetricsRow {
    fn to_csv(&self) -> String {
        let opt = |x: Option<f64>, f: &dyn Fn(f64) -> String| x.map(f).unwrap_or_default();
        let (name, value) = match &self.metric {
            Some((n, v)) => (n.clone(), format!("{v:.4}")),
            None => (String::new(), String::new()),
        };
        format!(
            "{},{},{},{:.6},{},{},{},{name},{value},{:.1}",
            self.step,
            self.epoch,
            match self.kind {
                RowKind::Train => "train",
                RowKind::Valid => "valid",
            },
            self.loss,
            opt(self.lr, &|x| format!("{x:.3e}")),
            opt(self.grad_norm, &|x| format!("{x:.4}")),
            opt(self.tokens_per_s, &|x| format!("{x:.0}")),
            self.elapsed_s
        )
    }

    fn from_csv(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 10 {
            return None;
        }
        let num = |s: &str| s.parse::<f64>().ok();
        Some(Self {
            step: f[0].parse().ok()?,
            epoch: f[1].parse().ok()?,
            kind: match f[2] {
                "train" => RowKind::Train,
                "valid" => RowKind::Valid,
                _ => return None,
            },
            loss: num(f[3])?,
            lr: num(f[4]),
            grad_norm: num(f[5]),
            tokens_per_s: num(f[6]),
            metric: num(f[8]).map(|v| (f[7].to_string(), v)),
            elapsed_s: num(f[9])?,
        })
    }
}

/// The rows of a run's `metrics.csv`. A resumed run appends steps it may already have
/// logged: the latest line of each (step, kind) wins.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRow>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut rows: Vec<MetricsRow> = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let row = MetricsRow::from_csv(line).ok_or_else(|| Error::Data {
            path: path.to_path_buf(),
            line: i + 1,
            msg: format!("not a metrics row: {line:?}"),
        })?;
        rows.retain(|r| (r.step, r.kind) != (row.step, row.kind));
        rows.push(row);
    }
    rows.sort_by_key(|r| (r.step, r.kind == RowKind::Valid));
    Ok(rows)
}

impl RunDir {
    pub fn best(&self) -> PathBuf {
        self.path.join(BEST_DIR)
    }

    /// Move back a `best.old/` (or `checkpoint-N.old/`) that a crash left parked in the
    /// middle of [`replace_dir`]'s fallback, where its directory is missing.
    pub fn restore_interrupted(&self) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return Ok(()); // a new run: nothing to restore
        };
        for entry in entries {
            let old = entry.map_err(io_err(&self.path))?.path();
            let dst = old.with_extension("");
            let ours = dst
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == BEST_DIR || n.starts_with("checkpoint-"));
            let parked = old.extension().is_some_and(|e| e == "old") && old.is_dir();
            if ours && parked && !dst.exists() {
                std::fs::rename(&old, &dst).map_err(io_err(&dst))?;
            }
        }
        Ok(())
    }

    /// Write a checkpoint into `name/` via `name.tmp/`.
    pub(crate) fn save<B: Backend, M: Model<B>>(
        &self,
        name: &str,
        model: &M,
        opt: &AdamW<B>,
        state: &TrainerState,
        cfg: &TrainConfig,
    ) -> Result<PathBuf> {
        let dir = self.path.join(name);
        let tmp = self.path.join(format!("{name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        checkpoint::save_on(
            model.backend(),
            &tmp,
            model.config(),
            model.params(),
            Some(opt),
        )?;
        write_json(&tmp.join(TRAINER_STATE_FILE), state)?;
        write_json(&tmp.join(TRAIN_CONFIG_FILE), cfg)?;
        for f in &self.extra_files {
            let name = f
                .file_name()
                .ok_or_else(|| Error::Config(format!("{} has no file name", f.display())))?;
            std::fs::copy(f, tmp.join(name)).map_err(io_err(f))?;
        }
        replace_dir(&tmp, &dir)?;
        Ok(dir)
    }

    /// `checkpoint-<step>` directories, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        if !self.path.exists() {
            return Ok(out);
        }
        for entry in std::fs::read_dir(&self.path).map_err(io_err(&self.path))? {
            let entry = entry.map_err(io_err(&self.path))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(step) = name
                .strip_prefix("checkpoint-")
                .and_then(|s| s.parse::<u64>().ok())
            {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The newest `checkpoint-<step>`, which a resumed run continues from.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        Ok(self.checkpoints()?.pop().map(|(_, p)| p))
    }

    pub(crate) fn prune(&self, keep: usize) -> Result<()> {
        let all = self.checkpoints()?;
        for (_, dir) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
            std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
        }
        Ok(())
    }

    pub(crate) fn append_metrics(&self, row: &MetricsRow) -> Result<()> {
        let path = self.path.join(METRICS_FILE);
        let new = !path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if new {
            writeln!(f, "{METRICS_HEADER}").map_err(io_err(&path))?;
        }
        writeln!(f, "{}", row.to_csv()).map_err(io_err(&path))
    }
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let json = serde_json::to_string_pretty(value).map_err(|e| json_err(path, e))?;
    write_atomic(path, json.as_bytes())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| json_err(path, e))
}

/// Read a checkpoint's trainer state.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    read_json(&dir.join(TRAINER_STATE_FILE))
}

/// Read the training config saved beside a checkpoint.
pub fn load_train_config(dir: &Path) -> Result<TrainConfig> {
    read_json(&dir.join(TRAIN_CONFIG_FILE))
}

/// Move the complete directory `new` to `dst`. An existing `dst` is exchanged with `new` in
/// one step and then removed, so `dst` is never missing; without the exchange, `dst` is
/// missing between two renames, and `<dst>.old` holds it meanwhile.
pub(crate) fn replace_dir(new: &Path, dst: &Path) -> Result<()> {
    let old = dst.with_extension("old");
    if !dst.exists() {
        std::fs::rename(new, dst).map_err(io_err(dst))?;
        // A parked copy left by an interrupted replacement is older than `new`.
        if old.is_dir() {
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        return Ok(());
    }
    match exchange(new, dst) {
        Ok(()) => {}
        // Filesystems without the exchange: park the old directory beside it for the
        // moment between the two renames.
        Err(_) => {
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
            }
            std::fs::rename(dst, &old).map_err(io_err(dst))?;
            std::fs::rename(new, dst).map_err(io_err(dst))?;
            return std::fs::remove_dir_all(&old).map_err(io_err(&old));
        }
    }
    // `new` now holds the old directory.
    std::fs::remove_dir_all(new).map_err(io_err(new))
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both paths are NUL-terminated C strings that live across the call; the
    // syscall reads them and touches no other memory of this process.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::other("no atomic directory exchange here"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacing_a_directory_keeps_it_whole_and_leaves_nothing_behind() {
        let root = std::env::temp_dir().join(format!("qkv-replace-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (dst, new) = (root.join("best"), root.join("best.tmp"));
        for (dir, text) in [(&dst, "old"), (&new, "new")] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("f"), text).unwrap();
        }
        replace_dir(&new, &dst).unwrap();
        assert_eq!(std::fs::read_to_string(dst.join("f")).unwrap(), "new");
        assert!(!new.exists() && !root.join("best.old").exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_best_parked_by_an_interrupted_replacement_is_restored() {
        let root = std::env::temp_dir().join(format!("qkv-restore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // The crash came between the fallback's two renames: only best.old/ is left.
        let parked = root.join("best.old");
        std::fs::create_dir_all(&parked).unwrap();
        std::fs::write(parked.join("f"), "old").unwrap();
        std::fs::create_dir_all(root.join("notes.old")).unwrap();
        let run = RunDir {
            path: root.clone(),
            extra_files: vec![],
        };
        run.restore_interrupted().unwrap();
        assert_eq!(
            std::fs::read_to_string(run.best().join("f")).unwrap(),
            "old"
        );
        assert!(!parked.exists());
        assert!(root.join("notes.old").is_dir(), "not ours: left alone");
        // Had the next save come first, its new best/ supersedes the parked one.
        std::fs::rename(run.best(), &parked).unwrap();
        let new = root.join("best.tmp");
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(new.join("f"), "new").unwrap();
        replace_dir(&new, &run.best()).unwrap();
        assert_eq!(
            std::fs::read_to_string(run.best().join("f")).unwrap(),
            "new"
        );
        assert!(!parked.exists() && !new.exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn metrics_rows_round_trip_and_later_lines_win() {
        let train = MetricsRow {
            step: 3,
            epoch: 0,
            kind: RowKind::Train,
            loss: 2.5,
            lr: Some(1e-3),
            grad_norm: Some(0.5),
            tokens_per_s: Some(1234.0),
            metric: None,
            elapsed_s: 1.5,
        };
        let valid = MetricsRow {
            kind: RowKind::Valid,
            lr: None,
            grad_norm: None,
            tokens_per_s: None,
            metric: Some(("accuracy".into(), 81.25)),
            ..train.clone()
        };
        let path = std::env::temp_dir().join(format!("qkv-metrics-{}.csv", std::process::id()));
        let again = MetricsRow {
            loss: 2.0,
            ..train.clone()
        };
        let text = [
            METRICS_HEADER.to_string(),
            train.to_csv(),
            valid.to_csv(),
            again.to_csv(),
        ]
        .join("\n");
        std::fs::write(&path, text).unwrap();
        assert_eq!(read_metrics(&path).unwrap(), vec![again, valid]);
        std::fs::write(&path, format!("{METRICS_HEADER}\n1,0,train,oops")).unwrap();
        let e = read_metrics(&path).unwrap_err().to_string();
        assert!(e.contains(":2:") && e.contains("oops"), "{e}");
        let _ = std::fs::remove_file(path);
    }
}
