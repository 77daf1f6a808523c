//! Fitting a run to its time limit. A job tuned on one machine runs 2× slower on another;
//! stopping at the limit there would leave the schedule half done (a cosine still at its
//! peak rate). Instead the trainer measures the seconds per update after warm-up and one
//! validation, and ends the schedule at the last update that fits. Machines drift (a shared
//! host: the default job measured 1.02 s/update over its first updates and 1.15 later), so
//! the horizon is fitted again as the run goes, from the recent updates, until its cooldown
//! begins; from then on it stays.

use std::collections::VecDeque;
use std::time::Instant;

/// Updates of each process that are not timed: the first ones allocate every buffer.
const WARMUP_UPDATES: u64 = 5;
/// Timed updates before the horizon is fitted (about 4% of the default job's).
const TIMED_UPDATES: u64 = 30;
/// Updates the speed is averaged over: recent enough to follow a drifting machine, long
/// enough to average over batch lengths.
const WINDOW: usize = 100;
/// Share of the time left kept back for what the estimate misses: checkpoint writes (well
/// under a second each for the default job's model) and the variance of batch lengths.
const MARGIN: f64 = 0.03;

/// Seconds per update after warm-up, and tokens per second over the last few seconds.
pub(super) struct Speed {
    start_step: u64,
    /// Seconds of the last `WINDOW` timed updates.
    recent: VecDeque<f64>,
    timed: u64,
    last_s: f64,
    window_start: Instant,
    window_tokens: usize,
    tokens_per_s: f64,
}

impl Speed {
    pub(super) fn new(start_step: u64) -> Self {
        Self {
            start_step,
            recent: VecDeque::with_capacity(WINDOW),
            timed: 0,
            last_s: 0.0,
            window_start: Instant::now(),
            window_tokens: 0,
            tokens_per_s: 0.0,
        }
    }

    /// Update `step` took `seconds` for `tokens` targets.
    pub(super) fn record(&mut self, step: u64, seconds: f64, tokens: usize) {
        self.last_s = seconds;
        if step > self.start_step + WARMUP_UPDATES {
            if self.recent.len() == WINDOW {
                self.recent.pop_front();
            }
            self.recent.push_back(seconds);
            self.timed += 1;
        }
        self.window_tokens += tokens;
        let window = self.window_start.elapsed().as_secs_f64();
        self.tokens_per_s = self.window_tokens as f64 / window.max(1e-9);
        if window > 5.0 {
            self.window_start = Instant::now();
            self.window_tokens = 0;
        }
    }

    /// Enough updates timed to fit a horizon.
    pub(super) fn ready(&self) -> bool {
        self.timed >= TIMED_UPDATES
    }

    /// Mean over the recent timed updates (the last one before any is timed).
    pub(super) fn seconds_per_update(&self) -> f64 {
        if self.recent.is_empty() {
            self.last_s
        } else {
            self.recent.iter().sum::<f64>() / self.recent.len() as f64
        }
    }

    pub(super) fn tokens_per_s(&self) -> f64 {
        self.tokens_per_s
    }
}

/// What the rest of a run costs, per update and at its end.
#[derive(Clone, Copy, Debug)]
pub(super) struct Costs {
    pub update_s: f64,
    pub validation_s: f64,
    pub valid_every: u64,
    /// Validations at the end: the final one, and the checkpoint average's.
    pub final_validations: u32,
}

impl Costs {
    /// The last update that fits into `seconds_left` when the run is at `step`.
    pub(super) fn horizon(&self, step: u64, seconds_left: f64) -> u64 {
        let per_update = self.update_s
            + if self.valid_every > 0 {
                self.validation_s / self.valid_every as f64
            } else {
                0.0
            };
        let reserve = self.final_validations as f64 * self.validation_s;
        let usable = seconds_left * (1.0 - MARGIN) - reserve;
        if !(usable > 0.0 && per_update > 0.0) {
            return step;
        }
        step + (usable / per_update).floor() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_horizon_leaves_room_for_validations_and_the_end() {
        let c = Costs {
            update_s: 0.8,
            validation_s: 6.0,
            valid_every: 300,
            final_validations: 1,
        };
        // 780 s at step 36, 30 s spent: 750 s · 0.97 − 6 s left, 0.82 s per update.
        let h = c.horizon(36, 750.0);
        assert_eq!(h, 36 + ((750.0 * 0.97 - 6.0) / 0.82f64).floor() as u64);
        assert_eq!(h, 915);
        // No time left: the run ends where it is.
        assert_eq!(c.horizon(36, 3.0), 36);
        let no_valid = Costs {
            valid_every: 0,
            ..c
        };
        assert!(no_valid.horizon(0, 100.0) > c.horizon(0, 100.0));
    }
}
