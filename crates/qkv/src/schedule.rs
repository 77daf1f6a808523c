//! Learning-rate schedules.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
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

impl Schedule {
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
