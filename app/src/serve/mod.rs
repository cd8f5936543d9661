//! `ferry serve`: the OpenAI-style HTTP API that other programs (Open WebUI, editors, agents,
//! the `openai` Python package) speak. axum answers on tokio; one worker thread owns the model
//! and steps the running requests in turn (`worker`). Bounds: the body size (413), the queue
//! (503), open connections (503, `listener`); a prompt beyond the context is 413.

mod api;
mod error;
mod listener;
pub mod worker;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ferry_runtime::chat::ChatTokenizer;
use ferry_runtime::engine::{GenerateStats, StopReason};
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use self::api::{Body, Defaults, Prepared};
use self::error::ApiError;
use self::worker::{JobEvent, Refused, Scheduler};
use crate::args::ServeArgs;
use crate::load;

/// What every handler shares.
struct AppState {
    scheduler: Scheduler,
    tokenizer: Arc<ChatTokenizer>,
    /// The name clients use for the model.
    model_id: String,
    /// The model's context (max_position_embeddings) and vocabulary.
    context: usize,
    vocab: usize,
    defaults: Defaults,
    /// When the server started (Unix seconds), `created` of the model object.
    created: u64,
    next_id: AtomicU64,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let model_id = args.served_model_name.clone().unwrap_or_else(|| match &args.model.model {
        Some(name) => name.display().to_string(),
        None => "ferry-default".into(),
    });
    let defaults = Defaults {
        sampling: crate::commands::sampling_config(&args.sampling)?,
        max_new_tokens: args.sampling.max_new_tokens,
        stop: args.sampling.stop.clone(),
        stop_at_eos: !args.sampling.ignore_eos,
    };
    // Bind before loading: a port in use is the first thing to hear about.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    let address = format!("{}:{}", args.host, args.port);
    let tcp = runtime
        .block_on(tokio::net::TcpListener::bind(&address))
        .with_context(|| format!("--host {} --port {}: cannot listen there", args.host, args.port))?;
    let local = tcp.local_addr().context("reading the bound address")?;

    let loaded = load::engine(&args.model, true)?;
    let mut engine = loaded.engine;
    let tokenizer = Arc::new(engine.tokenizer.take().context("ferry serve needs tokenizer.json in the model folder")?);
    let spec = engine.model.spec();
    let (context, vocab) = (spec.max_position_embeddings, spec.vocab_size);
    let scheduler = Scheduler::start(engine.model, Some(tokenizer.clone()), args.parallel, args.max_queue)
        .context("starting the model thread")?;
    let state = Arc::new(AppState {
        scheduler,
        tokenizer,
        model_id,
        context,
        vocab,
        defaults,
        created: now(),
        next_id: AtomicU64::new(1),
    });
    let app = router(state.clone(), args.max_body.0);
    eprintln!(
        "ferry serve: {} on {}; listening on http://{local} (OpenAI API at http://{local}/v1)",
        state.model_id,
        loaded.gpu.describe()
    );
    let limited = listener::Limited::new(tcp, args.max_connections);
    runtime.block_on(async move {
        axum::serve(limited, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving HTTP")
    })
}

fn router(state: Arc<AppState>, max_body: u64) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "this endpoint does not take that method")
        })
        .layer(DefaultBodyLimit::max(usize::try_from(max_body).unwrap_or(usize::MAX)))
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let m = state.scheduler.metrics();
    axum::Json(json!({"status": "ok", "model": state.model_id, "active": m.active, "queued": m.queued})).into_response()
}

#[derive(serde::Deserialize)]
struct MetricsQuery {
    format: Option<String>,
}

/// Prometheus text, or JSON with `?format=json`.
async fn metrics(State(state): State<Arc<AppState>>, Query(q): Query<MetricsQuery>) -> Response {
    let m = state.scheduler.metrics();
    let tokens_per_second = m.decode_steps as f64 / m.decode_seconds.max(1e-9);
    let uses = m.expert_hits + m.expert_misses;
    let hit_rate = if uses == 0 { 1.0 } else { m.expert_hits as f64 / uses as f64 };
    if q.format.as_deref() == Some("json") {
        let mut value = serde_json::to_value(&m).unwrap_or(Value::Null);
        value["decode_tokens_per_second"] = json!(tokens_per_second);
        value["expert_hit_rate"] = json!(hit_rate);
        return axum::Json(value).into_response();
    }
    let lines = [
        ("ferry_requests_finished_total", "counter", "Requests answered to the end.", m.requests_finished as f64),
        ("ferry_requests_cancelled_total", "counter", "Requests whose client went away.", m.requests_cancelled as f64),
        (
            "ferry_requests_failed_total",
            "counter",
            "Requests that failed after being queued.",
            m.requests_failed as f64,
        ),
        ("ferry_prompt_tokens_total", "counter", "Prompt tokens processed.", m.prompt_tokens as f64),
        ("ferry_completion_tokens_total", "counter", "Tokens generated.", m.completion_tokens as f64),
        ("ferry_decode_tokens_per_second", "gauge", "Decode steps per second of decode time.", tokens_per_second),
        ("ferry_expert_hits_total", "counter", "Expert uses served by a resident slot.", m.expert_hits as f64),
        (
            "ferry_expert_misses_total",
            "counter",
            "Expert uses not served by a resident slot (uploaded or computed on the host).",
            m.expert_misses as f64,
        ),
        ("ferry_expert_hit_rate", "gauge", "Expert cache hit rate since start.", hit_rate),
        ("ferry_bytes_uploaded_total", "counter", "Expert bytes copied to the GPU.", m.bytes_uploaded as f64),
        ("ferry_upload_stall_seconds_total", "counter", "Seconds passes waited on uploads.", m.stall_seconds),
        ("ferry_requests_active", "gauge", "Requests being generated.", m.active as f64),
        ("ferry_queue_length", "gauge", "Requests waiting for a turn.", m.queued as f64),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in lines {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn model_object(state: &AppState) -> Value {
    json!({"id": state.model_id, "object": "model", "created": state.created, "owned_by": "ferry"})
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(json!({"object": "list", "data": [model_object(&state)]})).into_response()
}

async fn model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if id == state.model_id {
        axum::Json(model_object(&state)).into_response()
    } else {
        ApiError::unknown_model(&id, &state.model_id).into_response()
    }
}

/// Which endpoint: they differ in their object names and in how a choice holds its text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let prepared = (|| {
        let body = read_body(body)?;
        check_model(&state, &body)?;
        let messages = body.chat_messages()?;
        let ids = api::chat_ids(&state.tokenizer, &messages, state.context)?;
        prepare(&state, &body, ids)
    })();
    respond(state, prepared, Kind::Chat).await
}

async fn completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let prepared = (|| {
        let body = read_body(body)?;
        check_model(&state, &body)?;
        let ids = body.completion_ids(&state.tokenizer, state.vocab, state.context)?;
        prepare(&state, &body, ids)
    })();
    respond(state, prepared, Kind::Completion).await
}

fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Body, ApiError> {
    let bytes = body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(status, "the request body is larger than this server takes (--max-body)")
        } else {
            ApiError::new(status, format!("reading the request body: {rejection}"))
        }
    })?;
    api::parse(&bytes)
}

fn check_model(state: &AppState, body: &Body) -> Result<(), ApiError> {
    match &body.model {
        None => Err(ApiError::bad_request(Some("model"), "model is required")),
        Some(name) if *name != state.model_id => Err(ApiError::unknown_model(name, &state.model_id)),
        Some(_) => Ok(()),
    }
}

fn prepare(state: &AppState, body: &Body, ids: Vec<u32>) -> Result<Prepared, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::bad_request(Some("prompt"), "the prompt has no tokens"));
    }
    api::check_length(ids.len(), true, state.context)?;
    body.prepare(ids, &state.defaults)
}

/// Queues the request and answers it, streamed or whole.
async fn respond(state: Arc<AppState>, prepared: Result<Prepared, ApiError>, kind: Kind) -> Response {
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let mut events = match state.scheduler.submit(prepared.request) {
        Ok(events) => events,
        Err(Refused::QueueFull) => {
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the queue is full; try again shortly")
                .into_response();
        }
        Err(Refused::Stopped) => {
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model worker has stopped").into_response();
        }
    };
    // The status line waits for the request's turn: a request that cannot start (its KV cache
    // does not fit) gets its error status rather than a stream that fails.
    match events.recv().await {
        Some(JobEvent::Started) => {}
        Some(JobEvent::Failed(err)) => return ApiError::from_ferry(&err).into_response(),
        _ => return worker_gone().into_response(),
    }
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat { "chatcmpl" } else { "cmpl" },
        state.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let shape =
        Shape { id, created: now(), model: state.model_id.clone(), kind, include_usage: prepared.include_usage };
    if prepared.stream { stream_response(shape, events) } else { whole_response(shape, events).await }
}

fn worker_gone() -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the model worker ended before the reply did")
}

/// The fixed fields of one reply's objects.
struct Shape {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    include_usage: bool,
}

fn finish_reason(stats: &GenerateStats) -> &'static str {
    match stats.stop_reason {
        StopReason::Eos | StopReason::StopString | StopReason::Cancelled => "stop",
        StopReason::MaxNewTokens | StopReason::Context => "length",
    }
}

fn usage(stats: &GenerateStats) -> Value {
    json!({
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.new_tokens,
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
    })
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn wrap(&self, chunk: bool, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices})
    }

    /// One streamed choice carrying `text` (and the finish reason on the last).
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                }
                if let Some(text) = text {
                    delta["content"] = json!(text);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        let mut value = self.wrap(true, json!([choice]));
        if self.include_usage {
            value["usage"] = Value::Null;
        }
        value
    }
}

fn sse(value: &Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

/// Server-sent events, ending with `data: [DONE]`. When the client goes away the stream is
/// dropped, and with it the receiver, which cancels the generation.
fn stream_response(shape: Shape, events: UnboundedReceiver<JobEvent>) -> Response {
    let shape = Arc::new(shape);
    let opening = match shape.kind {
        Kind::Chat => vec![sse(&shape.chunk(Some(""), true, None))],
        Kind::Completion => Vec::new(),
    };
    let body = stream::unfold((Some(events), shape), |(events, shape)| async move {
        let mut events = events?;
        let mut out = match events.recv().await {
            Some(JobEvent::Text(text)) => {
                return Some((vec![sse(&shape.chunk(Some(&text), false, None))], (Some(events), shape)));
            }
            Some(JobEvent::Started) => return Some((Vec::new(), (Some(events), shape))),
            Some(JobEvent::Finished(stats)) => {
                let mut out = vec![sse(&shape.chunk(None, false, Some(finish_reason(&stats))))];
                if shape.include_usage {
                    let mut value = shape.wrap(true, json!([]));
                    value["usage"] = usage(&stats);
                    out.push(sse(&value));
                }
                out
            }
            Some(JobEvent::Failed(err)) => vec![sse(&ApiError::from_ferry(&err).body())],
            None => vec![sse(&worker_gone().body())],
        };
        out.push(SseEvent::default().data("[DONE]"));
        Some((out, (None, shape)))
    })
    .flat_map(|batch| stream::iter(batch.into_iter().map(Ok::<_, Infallible>)));
    let body = stream::iter(opening.into_iter().map(Ok::<_, Infallible>)).chain(body);
    // Comments every few seconds also tell a reply whose text is held back (a possible stop
    // string) that its client has gone.
    Sse::new(body).keep_alive(KeepAlive::new().interval(Duration::from_secs(5))).into_response()
}

/// The whole reply as one object. If the client goes away, this future is dropped, and with
/// it the receiver, which cancels the generation.
async fn whole_response(shape: Shape, mut events: UnboundedReceiver<JobEvent>) -> Response {
    let mut text = String::new();
    let stats = loop {
        match events.recv().await {
            Some(JobEvent::Text(t)) => text.push_str(&t),
            Some(JobEvent::Started) => {}
            Some(JobEvent::Finished(stats)) => break stats,
            Some(JobEvent::Failed(err)) => return ApiError::from_ferry(&err).into_response(),
            None => return worker_gone().into_response(),
        }
    };
    let reason = finish_reason(&stats);
    let choice = match shape.kind {
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": reason,
        }),
        Kind::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason}),
    };
    let mut value = shape.wrap(false, json!([choice]));
    value["usage"] = usage(&stats);
    axum::Json(value).into_response()
}
