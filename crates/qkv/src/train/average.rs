//! Checkpoint averaging (§6.1: "averaging the last 5 checkpoints").

use crate::backend::{Backend, Cpu};
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::params::Params;
use std::path::PathBuf;

/// Average the parameters of several checkpoints of one model into `params`, in f64.
pub fn average_checkpoints(dirs: &[PathBuf], params: &mut Params) -> Result<()> {
    average_checkpoints_on(&Cpu, dirs, params)
}

/// [`average_checkpoints`] into a model's parameters on backend `be` (averaged on the host).
pub fn average_checkpoints_on<B: Backend>(
    be: &B,
    dirs: &[PathBuf],
    params: &mut Params<B>,
) -> Result<()> {
    if dirs.is_empty() {
        return Err(Error::Config("no checkpoints to average".into()));
    }
    let n = params.len();
    let Params { specs, data, .. } = params;
    be.host_mut(be.grow(data, n), &mut |data| {
        let mut sum = vec![0.0f64; n];
        for dir in dirs {
            checkpoint::load_named(&dir.join(checkpoint::MODEL_FILE), specs, data)?;
            sum.iter_mut()
                .zip(data.iter())
                .for_each(|(s, &p)| *s += p as f64);
        }
        let inv = 1.0 / dirs.len() as f64;
        data.iter_mut()
            .zip(&sum)
            .for_each(|(p, &s)| *p = (s * inv) as f32);
        Ok(())
    })
}
