//! `qkv bench serve`: a closed-loop load generator for `qkv serve`. N client threads send
//! requests back to back (one HTTP/1.1 connection each, `Connection: close`) until the total is
//! reached, and report throughput and latency percentiles as one JSON line.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct LoadArgs {
    /// Server address, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub addr: String,
    /// Endpoint path.
    #[arg(long, default_value = "/v1/classify")]
    pub path: String,
    /// Request bodies, one JSON document per line; request i sends line i mod lines.
    #[arg(long)]
    pub bodies: PathBuf,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
}

/// One request over a fresh connection; returns the status code and body.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp)?;
    let text_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers in the response"))?;
    let status_line = String::from_utf8_lossy(&resp[..text_end]);
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {status_line}")))?;
    let headers = status_line.to_ascii_lowercase();
    let mut payload = resp[text_end + 4..].to_vec();
    if headers.contains("transfer-encoding: chunked") {
        payload = dechunk(&payload);
    }
    Ok((status, payload))
}

/// Decode an HTTP/1.1 chunked body.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || eol + 2 + size > data.len() {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[(eol + 4 + size).min(data.len())..];
    }
    out
}

pub fn run(a: LoadArgs) -> Result<()> {
    if a.clients == 0 || a.requests == 0 {
        bail!("--clients and --requests must be at least 1");
    }
    let text = std::fs::read_to_string(&a.bodies)
        .with_context(|| format!("reading {}", a.bodies.display()))?;
    let bodies: Arc<Vec<String>> = Arc::new(
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect(),
    );
    if bodies.is_empty() {
        bail!("{}: no request bodies", a.bodies.display());
    }
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::with_capacity(a.requests)));
    let start = Instant::now();
    let threads: Vec<_> = (0..a.clients)
        .map(|_| {
            let (next, results, bodies) = (next.clone(), results.clone(), bodies.clone());
            let (addr, path, total) = (a.addr.clone(), a.path.clone(), a.requests);
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                let status =
                    http_request(&addr, "POST", &path, bodies[i % bodies.len()].as_bytes())
                        .map(|(s, _)| s)
                        .unwrap_or(0);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((status, ms));
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let wall = start.elapsed().as_secs_f64();
    let results = results.lock().unwrap_or_else(|e| e.into_inner());
    let mut lat: Vec<f64> = results.iter().map(|r| r.1).collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((p * (lat.len() - 1) as f64).round() as usize).min(lat.len() - 1)];
    let errors = results.iter().filter(|r| r.0 != 200).count();
    let round = |x: f64| (x * 100.0).round() / 100.0;
    println!(
        "{}",
        serde_json::json!({
            "path": a.path, "clients": a.clients, "requests": results.len(), "errors": errors,
            "statuses": results.iter().map(|r| r.0).filter(|&s| s != 200).collect::<std::collections::BTreeSet<_>>(),
            "throughput_rps": round(results.len() as f64 / wall),
            "p50_ms": round(pct(0.5)), "p99_ms": round(pct(0.99)),
            "mean_ms": round(lat.iter().sum::<f64>() / lat.len() as f64),
        })
    );
    Ok(())
}
