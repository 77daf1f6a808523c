//! `qkv serve`: an HTTP inference service (axum on tokio) with dynamic batching.
//!
//! Handlers read the body (size limit), parse JSON and tokenize each input once, refusing one
//! over the input limit (the smaller of `--max-input-tokens` and what the model reads) with a
//! 422 naming it; then they put the token ids on a bounded queue (full → 429) for the model
//! worker (`worker.rs`), which batches concurrent requests into one forward pass and answers
//! with token ids or rows. Every error is a JSON `{"error": …}` with a 4xx status for bad
//! requests. SIGTERM or Ctrl-C stops accepting connections and lets in-flight requests finish.
//!
//! Endpoints: `POST /v1/translate`, `/v1/classify`, `/v1/generate`, `/v1/embed` (whichever the
//! loaded model supports; the others answer 404), `GET /health`, `GET /metrics`.

pub mod load;
mod metrics;
mod worker;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics::Metrics;
use qkv::decode::{argmax, Choice, DecodeConfig};
use qkv::model::AnyModel;
use qkv::model_dir::{ModelDir, ModelFiles};
use qkv::tasks::{classify, lm, translate};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use worker::{BatchPolicy, Reply, Request, Work};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model directory (a qkv checkpoint or a Hugging Face BERT-family encoder).
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Inputs per batch at most; 1 turns dynamic batching off.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// How long a request waits for others to share its batch, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub batch_window_ms: u64,
    /// Requests waiting for the model at most; more are refused with 429.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Request body size limit in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Tokens per input text at most (422 beyond); the model's own limit applies too.
    #[arg(long, default_value_t = 512)]
    pub max_input_tokens: usize,
    /// Texts per request at most (422 beyond).
    #[arg(long, default_value_t = 64)]
    pub max_texts: usize,
    /// Largest `max_new_tokens` a generate request may ask for (422 beyond).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Largest beam a translate request may ask for (422 beyond).
    #[arg(long, default_value_t = 8)]
    pub max_beam: usize,
    /// Time a request may take, queueing included, in milliseconds (408 beyond).
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
    #[command(flatten)]
    pub precision: crate::args::PrecisionArgs,
    /// Where the model runs: the CPU, or the first NVIDIA GPU (its copy there, made before
    /// the server listens).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: crate::args::DeviceArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Translate,
    Classify,
    Generate,
    Embed,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Translate => "translate",
            Endpoint::Classify => "classify",
            Endpoint::Generate => "generate",
            Endpoint::Embed => "embed",
        }
    }
}

struct AppState {
    queue: SyncSender<Request>,
    metrics: Arc<Metrics>,
    /// Tokenizers, labels and the model's decoding defaults.
    files: ModelFiles,
    endpoints: Vec<Endpoint>,
    family: &'static str,
    /// The model's context (language models: prompt and continuation together).
    max_len: usize,
    limits: Limits,
}

#[derive(Clone, Copy)]
struct Limits {
    max_body_bytes: usize,
    /// The one input limit: `--max-input-tokens` or the model's, whichever is smaller.
    max_input_tokens: usize,
    max_texts: usize,
    max_new_tokens: usize,
    max_beam: usize,
    timeout: Duration,
}

/// An error answered as `{"error": message}` with its status.
struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
    fn invalid(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::UNPROCESSABLE_ENTITY, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.max_batch == 0 || a.queue == 0 || a.max_texts == 0 || a.max_beam == 0 {
        anyhow::bail!("--max-batch, --queue, --max-texts and --max-beam must be at least 1");
    }
    let mut dir = ModelDir::load(&a.model)?;
    a.precision.apply_to(&mut dir.model)?;
    let max_len = dir.model.config().max_len;
    // What one input may hold: a translation source leaves room for EOS, a prompt for the
    // start token and one new token.
    let (endpoints, family, model_limit) = match &dir.model {
        AnyModel::Seq2Seq(m) => (
            vec![Endpoint::Translate],
            "seq2seq",
            translate::source_limit(m),
        ),
        AnyModel::Classifier(m) if m.head.is_some() => (
            vec![Endpoint::Classify, Endpoint::Embed],
            "classifier",
            max_len,
        ),
        AnyModel::Classifier(_) => (vec![Endpoint::Embed], "encoder", max_len),
        AnyModel::Lm(_) => (vec![Endpoint::Generate], "lm", max_len.saturating_sub(2)),
    };
    // The model's GPU copy, made before anything listens.
    let gpu = match a.device {
        crate::args::DeviceArg::Cpu => None,
        crate::args::DeviceArg::Cuda => {
            Some(dir.model.to_backend(crate::args::first_gpu(a.precision)?)?)
        }
    };
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = sync_channel::<Request>(a.queue);
    let state = Arc::new(AppState {
        queue: tx,
        metrics: metrics.clone(),
        files: dir.files.clone(),
        endpoints,
        family,
        max_len,
        limits: Limits {
            max_body_bytes: a.max_body_bytes,
            max_input_tokens: a.max_input_tokens.min(model_limit),
            max_texts: a.max_texts,
            max_new_tokens: a.max_new_tokens,
            max_beam: a.max_beam,
            timeout: Duration::from_millis(a.timeout_ms),
        },
    });
    let precision = a.precision;
    let policy = BatchPolicy {
        max_batch: a.max_batch,
        window: Duration::from_millis(a.batch_window_ms),
    };
    let worker = std::thread::Builder::new()
        .name("qkv-model".into())
        .spawn(move || {
            // The precision is per thread, and this thread runs every forward pass.
            let _precision = precision.apply();
            match gpu {
                Some(model) => worker::run(model, dir.files, rx, policy, metrics),
                None => worker::run(dir.model, dir.files, rx, policy, metrics),
            }
        })
        .context("starting the model worker")?;

    // Two threads for HTTP; the cores' compute belongs to the model's rayon pool.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.addr)
            .await
            .with_context(|| format!("binding {}", a.addr))?;
        let addr = listener.local_addr()?;
        let on = match a.device {
            crate::args::DeviceArg::Cpu => "",
            crate::args::DeviceArg::Cuda => ", on the GPU",
        };
        eprintln!(
            "serving {} ({family}{on}) on http://{addr}",
            a.model.display()
        );
        let app = router(state);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving")?;
        eprintln!("shut down: in-flight requests finished");
        anyhow::Ok(())
    })?;
    // The router (and with it the queue's sender) is gone: the worker drains and stops.
    let _ = worker.join();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: finishing in-flight requests");
}

fn router(state: Arc<AppState>) -> Router {
    let endpoint = |e: Endpoint| {
        post(
            move |State(s): State<Arc<AppState>>, body: Body| async move {
                let start = Instant::now();
                let resp = handle(&s, e, body).await;
                let resp = match resp {
                    Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
                    Err(err) => err.into_response(),
                };
                s.metrics
                    .request(e.name(), resp.status().as_u16(), start.elapsed());
                resp
            },
        )
    };
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/translate", endpoint(Endpoint::Translate))
        .route("/v1/classify", endpoint(Endpoint::Classify))
        .route("/v1/generate", endpoint(Endpoint::Generate))
        .route("/v1/embed", endpoint(Endpoint::Embed))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        // Bodies are read with our own limit, so that its error is JSON too.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let endpoints: Vec<String> = s
        .endpoints
        .iter()
        .map(|e| format!("/v1/{}", e.name()))
        .collect();
    axum::Json(json!({"status": "ok", "model": s.family, "endpoints": endpoints})).into_response()
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

/// `{"text": "…"}` or `{"texts": ["…", …]}`, plus a beam for translation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TextsRequest {
    text: Option<String>,
    texts: Option<Vec<String>>,
    beam: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateRequest {
    prompt: String,
    max_new_tokens: Option<usize>,
    /// Pick the most likely token instead of sampling.
    #[serde(default)]
    greedy: bool,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    #[serde(default)]
    seed: u64,
}

async fn handle(s: &AppState, e: Endpoint, body: Body) -> Result<Value, ApiError> {
    if !s.endpoints.contains(&e) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "/v1/{} is not served by this model ({}); it serves {}",
                e.name(),
                s.family,
                s.endpoints
                    .iter()
                    .map(|e| format!("/v1/{}", e.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let bytes = axum::body::to_bytes(body, s.limits.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds {} bytes", s.limits.max_body_bytes),
            )
        })?;
    let (work, single) = match e {
        Endpoint::Generate => (generate_work(s, parse(&bytes)?)?, true),
        _ => texts_work(s, e, parse(&bytes)?)?,
    };
    let input_tokens = work.tokens();
    let reply = submit(s, work).await?;
    let (body, output_tokens) = reply_json(s, e, reply, single)?;
    s.metrics.tokens(input_tokens, output_tokens);
    Ok(body)
}

/// A generation request as token ids: the prompt within the input limit, `max_new_tokens`
/// within the server's limit and the model's context, the sampling settings checked.
fn generate_work(s: &AppState, r: GenerateRequest) -> Result<Work, ApiError> {
    let prefix = tokenize(s, std::slice::from_ref(&r.prompt), |tok, t, _| {
        lm::encode_prompts(tok, t, usize::MAX)
    })?
    .remove(0);
    let d = &s.files.decode;
    let max_new = r
        .max_new_tokens
        .unwrap_or(d.max_new_tokens.min(s.limits.max_new_tokens));
    if max_new == 0 || max_new > s.limits.max_new_tokens {
        return Err(ApiError::invalid(format!(
            "max_new_tokens must be in 1..={} (got {max_new})",
            s.limits.max_new_tokens
        )));
    }
    let choice = if r.greedy {
        Choice::Greedy
    } else {
        let sampling = DecodeConfig {
            temperature: r.temperature.unwrap_or(d.temperature),
            top_k: r.top_k.or(d.top_k),
            top_p: r.top_p.or(d.top_p),
            ..d.clone()
        }
        .sampling(r.seed);
        sampling
            .validate()
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        Choice::Sample(sampling)
    };
    Ok(Work::Generate {
        max_new: max_new.min(s.max_len - prefix.len()),
        prefix,
        choice,
    })
}

/// A translate, classify or embed request as token ids, one row per text.
fn texts_work(s: &AppState, e: Endpoint, r: TextsRequest) -> Result<(Work, bool), ApiError> {
    let (texts, single) = match (r.text, r.texts) {
        (Some(t), None) => (vec![t], true),
        (None, Some(ts)) => (ts, false),
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of `text` (a string) or `texts` (a list of strings)",
            ))
        }
    };
    if texts.is_empty() || texts.len() > s.limits.max_texts {
        return Err(ApiError::invalid(format!(
            "`texts` must hold 1..={} strings (got {})",
            s.limits.max_texts,
            texts.len()
        )));
    }
    let work = match e {
        Endpoint::Translate => {
            let beam = r.beam.unwrap_or(s.files.decode.beam);
            if beam == 0 || beam > s.limits.max_beam {
                return Err(ApiError::invalid(format!(
                    "beam must be in 1..={} (got {beam})",
                    s.limits.max_beam
                )));
            }
            let ids = tokenize(s, &texts, |tok, t, limit| {
                translate::encode_sources(tok, t, limit, None)
            })?;
            Work::Translate { ids, beam }
        }
        _ if r.beam.is_some() => {
            return Err(ApiError::invalid("`beam` applies to /v1/translate only"))
        }
        _ => {
            let ids = tokenize(s, &texts, |tok, t, limit| {
                classify::encode_texts(tok, t, limit, None)
            })?;
            match e {
                Endpoint::Classify => Work::Classify { ids },
                _ => Work::Embed { ids },
            }
        }
    };
    Ok((work, single))
}

/// Tokenize each text once with `encode` (a task's encoder, refusing a text over the limit).
/// Empty inputs and absurdly long ones (before tokenizing them) are refused too.
fn tokenize(
    s: &AppState,
    texts: &[String],
    encode: impl Fn(&qkv::data::Tokenizer, &[String], usize) -> qkv::Result<Vec<Vec<u32>>>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let limit = s.limits.max_input_tokens;
    for (index, text) in texts.iter().enumerate() {
        if text.trim().is_empty() {
            return Err(ApiError::invalid(format!("input {index} is empty")));
        }
        // No tokenizer packs 64 bytes into a token.
        if text.len() > 64 * limit {
            return Err(ApiError::invalid(format!(
                "input {index} is {} bytes, far beyond the limit of {limit} tokens",
                text.len()
            )));
        }
    }
    let ids = encode(&s.files.tokenizer, texts, limit).map_err(|e| match e {
        qkv::Error::InputTooLong { index, len, .. } => ApiError::invalid(format!(
            "input {index} has {len} tokens; the limit is {limit}"
        )),
        e => ApiError::invalid(e.to_string()),
    })?;
    // A prompt is encoded without a limit of its own (its start token is not the user's).
    if let Some((index, len)) = ids
        .iter()
        .map(|i| i.len().saturating_sub(1))
        .enumerate()
        .find(|&(_, n)| n > limit)
    {
        return Err(ApiError::invalid(format!(
            "input {index} has {len} tokens; the limit is {limit}"
        )));
    }
    Ok(ids)
}

/// The JSON answer and the output tokens it holds.
fn reply_json(
    s: &AppState,
    e: Endpoint,
    reply: Reply,
    single: bool,
) -> Result<(Value, usize), ApiError> {
    let internal = |msg: String| ApiError(StatusCode::INTERNAL_SERVER_ERROR, msg);
    let mut output_tokens = 0;
    let body = match (e, reply) {
        (Endpoint::Translate | Endpoint::Generate, Reply::Texts(outputs)) => {
            let tok = s.files.target_tokenizer();
            let mut texts = Vec::with_capacity(outputs.len());
            for (prefix, new) in outputs {
                output_tokens += new.len();
                texts.push(
                    lm::decode_completion(tok, &prefix, &new)
                        .map_err(|e| internal(e.to_string()))?,
                );
            }
            let key = if e == Endpoint::Translate {
                "translation"
            } else {
                "text"
            };
            if single {
                json!({ key: texts[0] })
            } else {
                json!({ format!("{key}s"): texts })
            }
        }
        (Endpoint::Classify, Reply::Rows(rows)) => {
            let names = &s
                .files
                .labels
                .as_ref()
                .ok_or_else(|| internal("the model has no labels".into()))?
                .0;
            let one = |p: &Vec<f32>| {
                let k = argmax(p);
                let probs: serde_json::Map<String, Value> = names
                    .iter()
                    .zip(p)
                    .map(|(n, v)| (n.clone(), json!(v)))
                    .collect();
                json!({"label": names[k], "probability": p[k], "probabilities": probs})
            };
            if single {
                one(&rows[0])
            } else {
                json!({ "results": rows.iter().map(one).collect::<Vec<_>>() })
            }
        }
        (Endpoint::Embed, Reply::Rows(rows)) => {
            if single {
                json!({ "embedding": rows[0] })
            } else {
                json!({ "embeddings": rows })
            }
        }
        (_, other) => return Err(internal(format!("unexpected model reply {other:?}"))),
    };
    Ok((body, output_tokens))
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad("empty request body: expected a JSON object"));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad(format!("invalid JSON request: {e}")))
}

async fn submit(s: &AppState, work: Work) -> Result<Reply, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    s.metrics.queued.fetch_add(1, Ordering::Relaxed);
    match s.queue.try_send(Request { work, reply: tx }) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            s.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                "the request queue is full; retry later".into(),
            ));
        }
        Err(TrySendError::Disconnected(_)) => {
            s.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model worker has stopped".into(),
            ));
        }
    }
    match tokio::time::timeout(s.limits.timeout, rx).await {
        Err(_) => Err(ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request took longer than {} ms",
                s.limits.timeout.as_millis()
            ),
        )),
        Ok(Err(_)) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model worker has stopped".into(),
        )),
        Ok(Ok(Err(msg))) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, msg)),
        Ok(Ok(Ok(reply))) => Ok(reply),
    }
}
