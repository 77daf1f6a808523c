//! Optional per-kernel wall-clock accounting, enabled with `QKV_PROFILE=1`.
//! Kernels are called from one driving thread (their parallelism is inside), so one global
//! table suffices; when disabled a scope costs one relaxed atomic load.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicU8 = AtomicU8::new(2); // 2 = not yet read from the environment
static TABLE: Mutex<Vec<(&'static str, f64, u64)>> = Mutex::new(Vec::new());

pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        2 => {
            let on = std::env::var("QKV_PROFILE").is_ok_and(|v| v != "0" && !v.is_empty());
            ENABLED.store(on as u8, Ordering::Relaxed);
            on
        }
        v => v == 1,
    }
}

/// Records the time until drop under `name`.
pub struct Scope {
    name: &'static str,
    start: Option<Instant>,
}

pub fn scope(name: &'static str) -> Scope {
    Scope {
        name,
        start: enabled().then(Instant::now),
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(s) = self.start {
            let ms = s.elapsed().as_secs_f64() * 1e3;
            let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
            match t.iter_mut().find(|e| e.0 == self.name) {
                Some(e) => {
                    e.1 += ms;
                    e.2 += 1;
                }
                None => t.push((self.name, ms, 1)),
            }
        }
    }
}

/// Clear the table (e.g. after warm-up).
pub fn reset() {
    TABLE.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// (name, total ms, calls), largest first.
pub fn report() -> Vec<(&'static str, f64, u64)> {
    let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    t.sort_by(|a, b| b.1.total_cmp(&a.1));
    t
}
