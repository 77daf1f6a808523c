//! Prometheus metrics of the service, in the text exposition format.
//!
//! Written by hand rather than with a metrics crate: five series, one mutex, and the format is
//! a few lines of text; a registry would add more code than it saves.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

#[derive(Clone, Debug, Default)]
struct Histogram {
    /// Cumulative counts per bucket bound (`le`), then +Inf is `count`.
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; bounds.len()];
        }
        for (b, &le) in self.buckets.iter_mut().zip(bounds) {
            if v <= le {
                *b += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, &le) in bounds.iter().enumerate() {
            let n = self.buckets.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    /// (endpoint, status) → count
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    batch_size: Histogram,
    input_tokens: u64,
    output_tokens: u64,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Jobs waiting for the model worker.
    pub queued: AtomicUsize,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counters inconsistent enough to
        // matter; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn request(&self, endpoint: &str, status: u16, elapsed: Duration) {
        let mut m = self.lock();
        *m.requests
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
        m.latency
            .entry(endpoint.to_string())
            .or_default()
            .observe(&LATENCY_BUCKETS, elapsed.as_secs_f64());
    }

    pub fn batch(&self, inputs: usize) {
        self.lock()
            .batch_size
            .observe(&BATCH_BUCKETS, inputs as f64);
    }

    pub fn tokens(&self, input: usize, output: usize) {
        let mut m = self.lock();
        m.input_tokens += input as u64;
        m.output_tokens += output as u64;
    }

    pub fn render(&self) -> String {
        let m = self.lock();
        let mut out = String::new();
        out.push_str("# HELP qkv_requests_total HTTP requests by endpoint and status code.\n");
        out.push_str("# TYPE qkv_requests_total counter\n");
        for ((endpoint, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "qkv_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP qkv_request_duration_seconds Request latency by endpoint.\n");
        out.push_str("# TYPE qkv_request_duration_seconds histogram\n");
        for (endpoint, h) in &m.latency {
            h.write(
                &mut out,
                "qkv_request_duration_seconds",
                &format!("endpoint=\"{endpoint}\""),
                &LATENCY_BUCKETS,
            );
        }
        out.push_str("# HELP qkv_batch_size Inputs per model forward pass.\n");
        out.push_str("# TYPE qkv_batch_size histogram\n");
        m.batch_size
            .write(&mut out, "qkv_batch_size", "", &BATCH_BUCKETS);
        out.push_str("# HELP qkv_tokens_total Tokens read and produced by the model.\n");
        out.push_str("# TYPE qkv_tokens_total counter\n");
        let _ = writeln!(
            out,
            "qkv_tokens_total{{direction=\"input\"}} {}",
            m.input_tokens
        );
        let _ = writeln!(
            out,
            "qkv_tokens_total{{direction=\"output\"}} {}",
            m.output_tokens
        );
        out.push_str("# HELP qkv_queue_length Requests waiting for the model.\n");
        out.push_str("# TYPE qkv_queue_length gauge\n");
        let _ = writeln!(
            out,
            "qkv_queue_length {}",
            self.queued.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_rendered() {
        let m = Metrics::default();
        m.request("classify", 200, Duration::from_millis(7));
        m.request("classify", 200, Duration::from_millis(300));
        m.request("classify", 429, Duration::from_millis(1));
        m.batch(3);
        let text = m.render();
        assert!(text.contains("qkv_requests_total{endpoint=\"classify\",status=\"200\"} 2"));
        assert!(text.contains("qkv_requests_total{endpoint=\"classify\",status=\"429\"} 1"));
        assert!(text
            .contains("qkv_request_duration_seconds_bucket{endpoint=\"classify\",le=\"0.01\"} 2"));
        assert!(text
            .contains("qkv_request_duration_seconds_bucket{endpoint=\"classify\",le=\"0.5\"} 3"));
        assert!(text.contains("qkv_batch_size_bucket{le=\"2\"} 0"));
        assert!(text.contains("qkv_batch_size_bucket{le=\"4\"} 1"));
        assert!(text.contains("qkv_batch_size_count 1"));
    }
}
