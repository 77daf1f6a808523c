//! Checkpoint averaging (§6.1: "averaging the last 5 checkpoints").

use crate::checkpoint;
use crate::error::{Error, Result};
use crate::params::Params;
use std::path::PathBuf;

/// Average the parameters of several checkpoints of one model into `params`, in f64.
pub fn average_checkpoints(dirs: &[PathBuf], params: &mut Params) -> Result<()> {
    if dirs.is_empty() {
        return Err(Error::Config("no checkpoints to average".into()));
    }
    let mut sum = vec![0.0f64; params.len()];
    for dir in dirs {
        checkpoint::load_params(&dir.join(checkpoint::MODEL_FILE), params)?;
        sum.iter_mut()
            .zip(&params.data)
            .for_each(|(s, &p)| *s += p as f64);
    }
    let inv = 1.0 / dirs.len() as f64;
    params
        .data
        .iter_mut()
        .zip(&sum)
        .for_each(|(p, &s)| *p = (s * inv) as f32);
    Ok(())
}
