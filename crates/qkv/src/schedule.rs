//! Learning-rate schedules.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    Constant {
        lr: f32,
    },
    /// The paper's schedule (§5.3, Eq. 3) scaled to a peak: linear warmup to `peak` at
    /// `warmup` steps, then decay ∝ 1/√step.
    InverseSqrt {
        peak: f32,
        warmup: u64,
    },
    /// Linear warmup, then cosine decay to `min` at `total` steps.
    Cosine {
        peak: f32,
        min: f32,
        warmup: u64,
        total: u64,
    },
}

impl Default for Schedule {
    /// The paper's schedule (§5.3) with its 4,000 warm-up updates, peaking at 7e-4.
    fn default() -> Self {
        Schedule::InverseSqrt {
            peak: 7e-4,
            warmup: 4000,
        }
    }
}

impl Schedule {
    /// Reject rates that are not positive finite numbers, naming the field.
    pub fn validate(&self) -> Result<()> {
        let rates: &[(&str, f32)] = match self {
            Schedule::Constant { lr } => &[("lr", *lr)],
            Schedule::InverseSqrt { peak, .. } => &[("peak", *peak)],
            Schedule::Cosine { peak, min, .. } => &[("peak", *peak), ("min", *min)],
        };
        for &(name, v) in rates {
            if !(v >= 0.0 && v.is_finite()) || (name != "min" && v == 0.0) {
                return Err(Error::Config(format!(
                    "schedule.{name} must be a positive learning rate, got {v}"
                )));
            }
        }
        Ok(())
    }

    /// This schedule for a run that ends after `horizon` updates instead of `max_steps`: a
    /// cosine's warm-up and decay are scaled by `horizon / max_steps`, so its shape over the
    /// run is kept and the decay ends where the run does. The others have no end to move.
    pub fn for_horizon(&self, horizon: u64, max_steps: u64) -> Schedule {
        match *self {
            Schedule::Cosine {
                peak,
                min,
                warmup,
                total,
            } if horizon < max_steps => {
                let scale = |n: u64| (n as f64 * horizon as f64 / max_steps as f64).round() as u64;
                Schedule::Cosine {
                    peak,
                    min,
                    warmup: scale(warmup).max(1),
                    total: scale(total).max(1),
                }
            }
            ref other => other.clone(),
        }
    }

    /// Learning rate for the 1-based `step`.
    pub fn lr(&self, step: u64) -> f32 {
        let step = step.max(1);
        match *self {
            Schedule::Constant { lr } => lr,
            Schedule::InverseSqrt { peak, warmup } => {
                let w = warmup.max(1) as f32;
                let s = step as f32;
                peak * (s / w).min((w / s).sqrt())
            }
            Schedule::Cosine {
                peak,
                min,
                warmup,
                total,
            } => {
                if step <= warmup {
                    return peak * step as f32 / warmup.max(1) as f32;
                }
                let progress =
                    ((step - warmup) as f32 / total.saturating_sub(warmup).max(1) as f32).min(1.0);
                min + 0.5 * (peak - min) * (1.0 + (std::f32::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn inverse_sqrt_peaks_at_warmup_and_decays() {
        let s = Schedule::InverseSqrt {
            peak: 1e-3,
            warmup: 100,
        };
        assert!((s.lr(100) - 1e-3).abs() < 1e-9);
        assert!((s.lr(50) - 5e-4).abs() < 1e-9);
        assert!((s.lr(400) - 5e-4).abs() < 1e-9);
    }
    #[test]
    fn a_shorter_horizon_compresses_a_cosine() {
        let s = Schedule::Cosine {
            peak: 1.0,
            min: 0.1,
            warmup: 250,
            total: 1800,
        };
        let short = s.for_horizon(900, 1800);
        assert_eq!(
            short,
            Schedule::Cosine {
                peak: 1.0,
                min: 0.1,
                warmup: 125,
                total: 900
            }
        );
        assert!((short.lr(900) - 0.1).abs() < 1e-6);
        assert_eq!(s.for_horizon(1800, 1800), s);
        let inv = Schedule::default();
        assert_eq!(inv.for_horizon(10, 1800), inv);
    }

    #[test]
    fn cosine_ends_at_min() {
        let s = Schedule::Cosine {
            peak: 1.0,
            min: 0.1,
            warmup: 10,
            total: 110,
        };
        assert!((s.lr(10) - 1.0).abs() < 1e-6);
        assert!((s.lr(60) - 0.55).abs() < 1e-6);
        assert!((s.lr(110) - 0.1).abs() < 1e-6);
    }
}
