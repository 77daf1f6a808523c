//! `qkv serve` on loopback with tiny random-weight models of each family: every endpoint,
//! dynamic batching under 64 concurrent clients without errors, bad input answered with a 4xx
//! JSON error while the server keeps answering, 404 for endpoints the model does not serve,
//! queue-full (429) and timeout (408) limits, /metrics, and graceful shutdown on SIGTERM.

use qkv::model::Family;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::{tiny_model, TEXTS};

struct Server {
    child: Child,
    addr: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qkv"))
            .args([
                "--threads",
                "2",
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--model",
            ])
            .arg(model)
            .args(extra)
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qkv serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        let addr = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("qkv serve exited: {seen}"))
                .unwrap();
            seen += &line;
            if let Some(rest) = line.split("http://").nth(1) {
                break rest.trim().to_string();
            }
        };
        let stderr = Arc::new(Mutex::new(seen));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(|l| l.ok()) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        Server {
            child,
            addr,
            stderr,
        }
    }

    fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        // The server may answer (413) and close before reading a huge body.
        let _ = s.write_all(body);
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let end = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("response headers");
        let status = String::from_utf8_lossy(&resp[..end])
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        (status, resp[end + 4..].to_vec())
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, bytes) = self.request("POST", path, body.to_string().as_bytes());
        (status, serde_json::from_slice(&bytes).expect("JSON reply"))
    }

    fn healthy(&self) -> bool {
        self.request("GET", "/health", b"").0 == 200
    }

    fn metrics(&self) -> String {
        String::from_utf8(self.request("GET", "/metrics", b"").1).unwrap()
    }

    fn terminate(mut self) -> (bool, String) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let err = self.stderr.lock().unwrap().clone();
        (status.success(), err)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A metric's value from the Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}

#[test]
fn classifier_service_batches_limits_and_survives_bad_input() {
    let dir = tiny_model(Family::Classifier, "cls");
    let server = Server::start(&dir, &["--max-input-tokens", "100"]);
    let (status, health) = server.post("/v1/classify", &json!({"text": TEXTS[0]}));
    assert_eq!(status, 200, "{health}");
    let labels = ["negative", "neutral", "positive"];
    assert!(labels.contains(&health["label"].as_str().unwrap()));
    let total: f64 = labels
        .iter()
        .map(|l| health["probabilities"][l].as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-4);

    // One request with many texts equals the texts asked one by one.
    let (status, many) = server.post("/v1/classify", &json!({"texts": TEXTS}));
    assert_eq!(status, 200);
    for (i, t) in TEXTS.iter().enumerate() {
        let (_, one) = server.post("/v1/classify", &json!({"text": t}));
        let (a, b) = (&many["results"][i], &one);
        assert_eq!(a["label"], b["label"]);
        let d = a["probability"].as_f64().unwrap() - b["probability"].as_f64().unwrap();
        assert!(d.abs() < 1e-5, "{a} vs {b}");
    }
    let (status, emb) = server.post("/v1/embed", &json!({"text": TEXTS[1]}));
    assert_eq!(status, 200);
    let v: Vec<f64> = emb["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(v.len(), 64);
    assert!((v.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-4);

    // Endpoints this model does not serve, and unknown paths.
    for path in ["/v1/translate", "/v1/generate", "/v2/nothing"] {
        let (status, body) = server.post(path, &json!({"text": "x"}));
        assert_eq!(status, 404, "{path}");
        assert!(body["error"].is_string());
    }

    // Bad input: each a 4xx with a JSON error, and the server keeps answering.
    let long = "king ".repeat(400);
    let mut huge = br#"{"text": ""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 10 << 20));
    huge.extend_from_slice(br#""}"#);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("malformed JSON", b"{\"text\": ".to_vec()),
        ("not an object", b"[1, 2]".to_vec()),
        ("wrong field type", br#"{"text": 5}"#.to_vec()),
        ("wrong list type", br#"{"texts": "abc"}"#.to_vec()),
        ("unknown field", br#"{"txt": "abc"}"#.to_vec()),
        ("both fields", br#"{"text": "a", "texts": ["b"]}"#.to_vec()),
        ("empty text", br#"{"text": ""}"#.to_vec()),
        ("blank text", br#"{"text": "   "}"#.to_vec()),
        ("empty list", br#"{"texts": []}"#.to_vec()),
        ("empty body", Vec::new()),
        ("invalid UTF-8", b"{\"text\": \"\xff\xfe\xfd\"}".to_vec()),
        (
            "over-long input",
            json!({ "text": long }).to_string().into_bytes(),
        ),
        ("10 MB body", huge),
        ("beam on classify", br#"{"text": "a", "beam": 2}"#.to_vec()),
    ];
    for (what, body) in cases {
        let (status, reply) = server.request("POST", "/v1/classify", &body);
        assert!((400..500).contains(&status), "{what}: status {status}");
        let reply: Value =
            serde_json::from_slice(&reply).unwrap_or_else(|_| panic!("{what}: reply is not JSON"));
        assert!(reply["error"].is_string(), "{what}: {reply}");
        assert!(server.healthy(), "{what}: server stopped answering");
    }

    // 64 concurrent clients: no errors, and requests share batches.
    let server = Arc::new(server);
    let clients: Vec<_> = (0..64)
        .map(|c| {
            let server = server.clone();
            std::thread::spawn(move || {
                (0..4)
                    .map(|i| {
                        let t = TEXTS[(c + i) % TEXTS.len()];
                        server.post("/v1/classify", &json!({ "text": t })).0
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    for c in clients {
        assert!(c.join().unwrap().iter().all(|&s| s == 200));
    }
    let m = server.metrics();
    let batches = metric(&m, "qkv_batch_size_count");
    let inputs = metric(&m, "qkv_batch_size_sum");
    assert!(
        inputs > batches,
        "no request shared a batch: {inputs} inputs in {batches} batches"
    );
    assert!(
        metric(
            &m,
            "qkv_requests_total{endpoint=\"classify\",status=\"200\"}"
        ) >= 256.0
    );
    assert!(m.contains("qkv_request_duration_seconds_bucket{endpoint=\"classify\",le=\"+Inf\"}"));
    assert!(metric(&m, "qkv_tokens_total{direction=\"input\"}") > 0.0);
    let server = Arc::try_unwrap(server).ok().expect("clients are done");
    let (ok, err) = server.terminate();
    assert!(ok, "{err}");
}

#[test]
fn translation_service_checks_its_options() {
    let dir = tiny_model(Family::Seq2seq, "s2s");
    let server = Server::start(&dir, &[]);
    let (status, reply) = server.post("/v1/translate", &json!({"text": "the king"}));
    assert_eq!(status, 200, "{reply}");
    assert!(reply["translation"].is_string());
    let (status, reply) = server.post("/v1/translate", &json!({"texts": TEXTS, "beam": 2}));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["translations"].as_array().unwrap().len(), TEXTS.len());
    for beam in [0, 100] {
        let (status, reply) = server.post("/v1/translate", &json!({"text": "a", "beam": beam}));
        assert_eq!(status, 422, "beam {beam}: {reply}");
    }
    let (status, _) = server.post("/v1/classify", &json!({"text": "a"}));
    assert_eq!(status, 404);
}

/// The service decodes as the model directory's `decode.json` says, MBR against sampled
/// references included: one request's translations equal `qkv translate`'s, and MBR changed
/// some of them.
#[test]
fn translation_service_decodes_as_the_model_directory_says() {
    let dir = tiny_model(Family::Seq2seq, "s2s-mbr");
    std::fs::write(
        dir.join("decode.json"),
        r#"{"beam": 4, "mbr": 4, "mbr_references": 6, "temperature": 1.5, "max_len_b": 6}"#,
    )
    .unwrap();
    let stdin: String = TEXTS.iter().map(|t| format!("{t}\n")).collect();
    let translate = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["translate", "--model", dir.to_str().unwrap()];
        args.extend(extra);
        let (ok, out, err) = common::qkv(&args, Some(&stdin));
        assert!(ok, "{err}");
        out.lines().map(str::to_string).collect()
    };
    let (with, without) = (translate(&[]), translate(&["--mbr", "0"]));
    assert_eq!(with.len(), TEXTS.len());
    assert_ne!(
        with, without,
        "MBR chose the most probable output everywhere"
    );
    // A long batch window, so that the two concurrent requests below share one batch.
    let server = Server::start(&dir, &["--batch-window-ms", "1500"]);
    let texts = |reply: &Value| -> Vec<String> {
        reply["translations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    let (status, reply) = server.post("/v1/translate", &json!({"texts": TEXTS}));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(texts(&reply), with);

    // The MBR references are seeded by a text's index within its own request, so a request
    // draws what `qkv translate` draws for its texts whatever it is batched with.
    let (first, second) = std::thread::scope(|s| {
        let a = s.spawn(|| server.post("/v1/translate", &json!({"texts": TEXTS[..2]})));
        std::thread::sleep(std::time::Duration::from_millis(100));
        let b = server.post("/v1/translate", &json!({"texts": TEXTS[2..]}));
        (a.join().unwrap(), b)
    });
    assert_eq!((first.0, second.0), (200, 200), "{first:?} {second:?}");
    let alone: String = TEXTS[2..].iter().map(|t| format!("{t}\n")).collect();
    let (ok, out, err) = common::qkv(
        &["translate", "--model", dir.to_str().unwrap()],
        Some(&alone),
    );
    assert!(ok, "{err}");
    let alone: Vec<String> = out.lines().map(str::to_string).collect();
    assert_ne!(
        alone,
        with[2..],
        "the seeds never mattered: the check below could not fail"
    );
    assert_eq!(texts(&first.1), with[..2]);
    assert_eq!(texts(&second.1), alone);
}

#[test]
fn generation_service_limits_and_graceful_shutdown() {
    let dir = tiny_model(Family::Lm, "lm");
    let server = Server::start(&dir, &["--max-new-tokens", "40"]);
    let (status, reply) = server.post(
        "/v1/generate",
        &json!({"prompt": "the king", "max_new_tokens": 5, "greedy": true}),
    );
    assert_eq!(status, 200, "{reply}");
    assert!(reply["text"].as_str().unwrap().starts_with("the king"));
    for bad in [
        json!({"prompt": "a", "max_new_tokens": 41}),
        json!({"prompt": "a", "max_new_tokens": 0}),
        json!({"prompt": "a", "temperature": -1.0}),
        json!({"prompt": "king ".repeat(100)}),
    ] {
        let (status, reply) = server.post("/v1/generate", &bad);
        assert_eq!(status, 422, "{bad}: {reply}");
    }
    let (ok, err) = server.terminate();
    assert!(ok, "{err}");

    // A full queue answers 429; a request over its time limit answers 408.
    let server = Server::start(&dir, &["--queue", "1", "--max-batch", "1"]);
    let server = Arc::new(server);
    let statuses: Vec<u16> = (0..32)
        .map(|_| {
            let server = server.clone();
            std::thread::spawn(move || {
                server
                    .post(
                        "/v1/generate",
                        &json!({"prompt": "the", "max_new_tokens": 60}),
                    )
                    .0
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| [200, 429].contains(s)),
        "{statuses:?}"
    );
    drop(server);
    let server = Server::start(&dir, &["--timeout-ms", "1", "--batch-window-ms", "50"]);
    let (status, reply) = server.post("/v1/generate", &json!({"prompt": "the"}));
    assert_eq!(status, 408, "{reply}");
    drop(server);

    // SIGTERM while a request waits in its batch window: it is answered, then the server exits.
    let server = Arc::new(Server::start(&dir, &["--batch-window-ms", "400"]));
    let client = {
        let server = server.clone();
        std::thread::spawn(move || {
            server.post(
                "/v1/generate",
                &json!({"prompt": "the", "max_new_tokens": 5, "greedy": true}),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(150));
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (status, reply) = client.join().unwrap();
    assert_eq!(status, 200, "in-flight request during shutdown: {reply}");
    let mut server = Arc::try_unwrap(server).ok().expect("client is done");
    assert!(server.child.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(100));
    assert!(server
        .stderr
        .lock()
        .unwrap()
        .contains("in-flight requests finished"));
}
