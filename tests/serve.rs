//! `ferry serve` as its clients see it, over HTTP on 127.0.0.1: answers equal to `ferry
//! generate` with the same seed (alone and under concurrent load), streaming, every error path
//! with its status and JSON shape, the queue and connection bounds, and a client that leaves
//! cancelling its generation. The official Python client is exercised by
//! `tests/client/openai_stream.py` (run by scripts/test.sh).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cli::{ferry, json_of};

/// A `ferry serve` child on a free port, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ferry serve starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Reads the address from the start line, then keeps draining stderr.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("listening on http://") {
                    let rest = &line[at + "listening on http://".len()..];
                    let address = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(Ok(address));
                } else if line.starts_with("error:") {
                    let _ = tx.send(Err(line));
                }
            }
        });
        let address = match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(Ok(address)) => address,
            Ok(Err(line)) => panic!("ferry serve failed: {line}"),
            Err(_) => {
                let _ = child.kill();
                panic!("ferry serve did not say where it listens");
            }
        };
        Self { child, base: format!("http://{address}") }
    }

    fn address(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// A fresh agent per request: pooled idle connections would count against the server's
    /// connection limit.
    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_idle_connections(0)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into()
    }

    fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value) {
        let mut response = Self::agent()
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .send(body)
            .expect("the server answers");
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().expect("a body");
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string().as_bytes())
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut response = Self::agent().get(format!("{}{path}", self.base)).call().expect("the server answers");
        (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
    }

    fn metrics(&self) -> Value {
        serde_json::from_str(&self.get("/metrics?format=json").1).unwrap()
    }

    /// The `data:` payloads of a streamed request, up to `[DONE]`.
    fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let mut response =
            Self::agent().post(format!("{}{path}", self.base)).send_json(body).expect("the server answers");
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response.headers().get("content-type").unwrap().to_str().unwrap().to_string();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        let mut events = Vec::new();
        for line in BufReader::new(response.body_mut().as_reader()).lines() {
            let line = line.unwrap();
            let Some(data) = line.strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                return events;
            }
            events.push(serde_json::from_str(data).unwrap());
        }
        panic!("the stream ended without data: [DONE]");
    }

    /// Opens a streaming request on a raw socket and reads until its first text arrives: the
    /// request is then running and holds its turn and its connection until `stream` is dropped.
    fn hold(&self, body: &Value) -> TcpStream {
        let mut stream = TcpStream::connect(self.address()).unwrap();
        let body = body.to_string();
        write!(
            stream,
            "POST /v1/completions HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            self.address(),
            body.len()
        )
        .unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("\"text\":") {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "the stream closed early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
        stream
    }

    /// Waits until the metrics satisfy `ok` (bounded).
    fn wait_for(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let m = self.metrics();
            if ok(&m) {
                return m;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {m}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `ferry generate` writes for the same prompt and settings.
fn generated_text(prompt: &str, chat: bool, seed: u64, max_tokens: usize, stop: Option<&str>) -> Value {
    let (seed, max) = (seed.to_string(), max_tokens.to_string());
    let mut args = vec![
        "generate",
        "--prompt",
        prompt,
        "--temperature",
        "0.75",
        "--seed",
        &seed,
        "--max-new-tokens",
        &max,
        "--json",
    ];
    if chat {
        args.push("--chat");
    }
    if let Some(stop) = stop {
        args.extend(["--stop", stop]);
    }
    json_of(&ferry(&args))
}

fn error_of(status: u16, value: &Value, expected: u16) -> String {
    assert_eq!(status, expected, "{value}");
    let error = &value["error"];
    assert!(error["type"].is_string(), "{value}");
    assert!(error.get("param").is_some() && error.get("code").is_some(), "{value}");
    error["message"].as_str().expect("an error message").to_string()
}

const MODEL: &str = "ferry-default";

/// Whether the server answered an idle socket (the connection-limit refusal) or closed it.
fn was_refused(socket: &TcpStream) -> bool {
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 32];
    match socket.peek(&mut buf) {
        Ok(0) => true,
        Ok(n) => String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 503"),
        // Nothing to read within the timeout: the server holds it open.
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

#[test]
fn serve_answers_as_generate_does_alone_and_under_concurrent_load() {
    let cases = [
        ("The king said", false, 7u64, None),
        ("Tell me a story", true, 11, None),
        ("And the Lord", false, 3, Some(",")),
    ];
    let expected: Vec<Value> =
        cases.iter().map(|(prompt, chat, seed, stop)| generated_text(prompt, *chat, *seed, 12, *stop)).collect();
    let server = Server::start(&["--parallel", "2", "--max-queue", "16"]);
    let request = |i: usize, stream: bool| {
        let (prompt, chat, seed, stop) = cases[i];
        let mut body = json!({"model": MODEL, "temperature": 0.75, "seed": seed, "max_tokens": 12, "stream": stream});
        if chat {
            body["messages"] = json!([{"role": "user", "content": prompt}]);
        } else {
            body["prompt"] = json!(prompt);
        }
        if let Some(stop) = stop {
            body["stop"] = json!(stop);
        }
        (if chat { "/v1/chat/completions" } else { "/v1/completions" }, body)
    };
    // The text of one answer, streamed or whole, with its usage.
    let answer = |i: usize, stream: bool| -> (String, Value, String) {
        let (path, mut body) = request(i, stream);
        let chat = cases[i].1;
        if stream {
            body["stream_options"] = json!({"include_usage": true});
            let events = server.stream(path, &body);
            let mut text = String::new();
            let mut finish = String::new();
            for e in &events[..events.len() - 1] {
                let choice = &e["choices"][0];
                let piece = if chat { &choice["delta"]["content"] } else { &choice["text"] };
                text.push_str(piece.as_str().unwrap_or(""));
                if let Some(reason) = choice["finish_reason"].as_str() {
                    finish = reason.into();
                }
            }
            let last = events.last().unwrap();
            assert_eq!(last["choices"], json!([]), "the usage chunk comes last");
            (text, last["usage"].clone(), finish)
        } else {
            let (status, value) = server.post(path, &body);
            assert_eq!(status, 200, "{value}");
            let choice = &value["choices"][0];
            let text = if chat { &choice["message"]["content"] } else { &choice["text"] };
            (
                text.as_str().unwrap().to_string(),
                value["usage"].clone(),
                choice["finish_reason"].as_str().unwrap().into(),
            )
        }
    };
    for (i, want) in expected.iter().enumerate() {
        for stream in [false, true] {
            let (text, usage, finish) = answer(i, stream);
            assert_eq!(text, want["text"].as_str().unwrap(), "case {i}, stream {stream}");
            let prompt_tokens = want["prompt_ids"].as_array().unwrap().len();
            let new_tokens = want["ids"].as_array().unwrap().len();
            assert_eq!(usage["prompt_tokens"], prompt_tokens, "case {i}");
            assert_eq!(usage["completion_tokens"], new_tokens, "case {i}");
            assert_eq!(usage["total_tokens"], prompt_tokens + new_tokens);
            let stopped = want["stats"]["stop_reason"].as_str().unwrap();
            assert_eq!(finish, if stopped == "max_new_tokens" { "length" } else { "stop" }, "case {i}");
        }
    }
    // Four clients, three requests each, at once: every answer is its own request's.
    let started = Instant::now();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|client| {
                let answer = &answer;
                scope.spawn(move || {
                    (0..3)
                        .map(|r| {
                            let i = (client + r) % cases.len();
                            (i, answer(i, (client + r) % 2 == 0).0)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            for (i, text) in handle.join().unwrap() {
                assert_eq!(text, expected[i]["text"].as_str().unwrap(), "case {i} under load");
            }
        }
    });
    assert!(started.elapsed() < Duration::from_secs(600));
    let m = server.wait_for("an idle server", |m| m["active"] == 0 && m["queued"] == 0);
    assert_eq!(m["requests_finished"], 6 + 12, "{m}");
    assert_eq!(m["requests_failed"], 0, "{m}");

    // A streaming client that leaves: its generation is cancelled, the server goes idle.
    let held = server
        .hold(&json!({"model": MODEL, "prompt": "And", "max_tokens": 100000, "ignore_eos": true, "stream": true}));
    drop(held);
    let m = server.wait_for("the cancellation", |m| m["requests_cancelled"] == 1 && m["active"] == 0);
    assert!(m["completion_tokens"].as_u64().unwrap() < 100_000, "{m}");
    // And one that leaves while waiting for a whole (non-streamed) answer.
    let mut waiting = TcpStream::connect(server.address()).unwrap();
    let body = json!({"model": MODEL, "prompt": "And", "max_tokens": 100000, "ignore_eos": true}).to_string();
    write!(waiting, "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    server.wait_for("the request to run", |m| m["active"] == 1);
    drop(waiting);
    server.wait_for("the second cancellation", |m| m["requests_cancelled"] == 2 && m["active"] == 0);

    // A prompt beyond the default model's 1024-token context: 413 before any work.
    let (status, value) = server.post("/v1/completions", &json!({"model": MODEL, "prompt": vec![5; 1024]}));
    let message = error_of(status, &value, 413);
    assert!(message.contains("1024"), "{message}");
    assert_eq!(value["error"]["code"], "context_length_exceeded");
    let long = "word ".repeat(200_000);
    let (status, value) =
        server.post("/v1/chat/completions", &json!({"model": MODEL, "messages": [{"role": "user", "content": long}]}));
    error_of(status, &value, 413);
}

#[test]
fn serve_refuses_bad_requests_with_the_api_error_shape() {
    let server =
        Server::start(&["--parallel", "1", "--max-queue", "0", "--max-connections", "3", "--max-body", "4KiB"]);
    let (status, health) = server.get("/health");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&health).unwrap()["status"], "ok");
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(server.get(&format!("/v1/models/{MODEL}")).0, 200);
    assert_eq!(server.get("/v1/models/other").0, 404);

    let chat = |extra: Value| {
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        server.post("/v1/chat/completions", &body)
    };
    // Each bad field is named, in `param` and in the message.
    for (extra, param) in [
        (json!({"model": null}), "model"),
        (json!({"messages": null}), "messages"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": [{"role": "wizard", "content": "x"}]}), "messages[0].role"),
        (json!({"messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
        (json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "messages[0].content[0]"),
        (json!({"temperature": 3.5}), "temperature"),
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"max_tokens": -1}), "max_tokens"),
        (json!({"seed": 1.5}), "seed"),
        (json!({"n": 2}), "n"),
        (json!({"logprobs": true}), "logprobs"),
        (json!({"presence_penalty": 0.5}), "presence_penalty"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"stream": "yes"}), "stream"),
    ] {
        let (status, value) = chat(extra.clone());
        let message = error_of(status, &value, 400);
        assert_eq!(value["error"]["param"], param, "{extra}: {value}");
        assert!(message.contains(param.split('[').next().unwrap()), "{extra}: {message}");
    }
    let (status, value) = chat(json!({"model": "gpt-4"}));
    assert!(error_of(status, &value, 404).contains("gpt-4"));
    let (status, value) = server.post_raw("/v1/chat/completions", b"{not json");
    error_of(status, &value, 400);
    let (status, value) = server.post_raw("/v1/chat/completions", b"[1, 2]");
    error_of(status, &value, 400);
    let (status, value) = server.post("/v1/completions", &json!({"model": MODEL}));
    assert_eq!(error_of(status, &value, 400), "prompt is required");
    let (status, value) = server.post("/v1/completions", &json!({"model": MODEL, "prompt": [1, 2, 999999]}));
    assert!(error_of(status, &value, 400).contains("999999"));
    let (status, value) = server.post("/v1/completions", &json!({"model": MODEL, "prompt": ["a", "b"]}));
    error_of(status, &value, 400);
    // A body beyond --max-body.
    let big = json!({"model": MODEL, "prompt": "x".repeat(5000)});
    let (status, value) = server.post("/v1/completions", &big);
    assert!(error_of(status, &value, 413).contains("--max-body"));
    // Unknown paths and methods.
    let (status, value) = server.post("/v1/nothing", &json!({}));
    error_of(status, &value, 404);
    let mut response = Server::agent().get(format!("{}/v1/completions", server.base)).call().unwrap();
    assert_eq!(response.status().as_u16(), 405);
    let value: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    error_of(405, &value, 405);

    // One request runs (--parallel 1) and none may wait (--max-queue 0): the next is 503.
    let held = server
        .hold(&json!({"model": MODEL, "prompt": "And", "max_tokens": 100000, "ignore_eos": true, "stream": true}));
    let (status, value) = chat(json!({}));
    assert!(error_of(status, &value, 503).contains("queue"));
    // Three connections at most: with the held stream and two idle sockets open, a fourth
    // connection is answered 503 and closed. The server frees the last request's connection
    // when it sees it close, which on a loaded machine can come after an idle socket was
    // accepted and refused in its place; only such a round is retried.
    for round in 0.. {
        let idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(server.address()).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(300));
        let (status, value) = server.post("/v1/completions", &json!({"model": MODEL, "prompt": "x"}));
        let message = error_of(status, &value, 503);
        if message.contains("connections") {
            break;
        }
        assert!(idle.iter().any(was_refused), "a fourth connection was let in: {message}");
        assert!(round < 20, "idle sockets kept being refused");
    }
    drop(held);
    server.wait_for("the held request to end", |m| m["active"] == 0 && m["requests_cancelled"] == 1);
    // With room again, requests are answered.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, value) = chat(json!({}));
        if status == 200 {
            assert_eq!(value["object"], "chat.completion");
            break;
        }
        assert!(Instant::now() < deadline, "never answered again: {value}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, text) = server.get("/metrics");
    assert_eq!(status, 200);
    for name in
        ["ferry_queue_length", "ferry_decode_tokens_per_second", "ferry_expert_hit_rate", "ferry_bytes_uploaded_total"]
    {
        assert!(text.contains(&format!("\n{name} ")), "{name} missing from {text}");
    }
}

#[test]
fn serve_refuses_a_port_in_use_in_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = ferry(&["serve", "--port", &port]);
    let line = crate::cli::error_line(&out);
    assert!(line.contains("--port") && line.contains(&port), "{line}");
}

#[test]
fn bench_streams_drives_the_server_scheduler_at_each_count() {
    // The largest seed: each stream's prompt seed wraps rather than overflowing.
    let out = json_of(&ferry(&[
        "bench",
        "--streams",
        "1,2",
        "--prompt-len",
        "4",
        "--gen-len",
        "3",
        "--seed",
        "18446744073709551615",
        "--json",
    ]));
    assert_eq!(out["budget"], "25%");
    let points = out["streams"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    for (point, n) in points.iter().zip([1, 2]) {
        assert_eq!(point["streams"], n);
        assert_eq!(point["new_tokens"], 3 * n, "{point}");
        // A quarter of the experts resident: some were uploaded.
        assert!(point["bytes_uploaded_per_token"].as_f64().unwrap() > 0.0, "{point}");
        assert!(point["aggregate_tokens_per_second"].as_f64().unwrap() > 0.0);
    }
}
