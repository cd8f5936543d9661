//! The one thread that owns the model. Requests wait in a bounded FIFO queue; up to `parallel`
//! of them are generated at once, each stepped one forward pass in turn (round robin), so a
//! long reply does not hold the others back. A request whose client went away is cancelled
//! before its next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use ferry_runtime::chat::ChatTokenizer;
use ferry_runtime::engine::{Event, GenerateRequest, GenerateStats, Generation};
use ferry_runtime::error::FerryError;
use ferry_runtime::graph::Model;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// What the worker tells a request's handler, in this order: `Started` or `Failed`; then text
/// and finally `Finished` or `Failed`.
#[derive(Debug)]
pub enum JobEvent {
    /// The generation was set up (its KV cache allocated) and runs from now on.
    Started,
    /// Newly printable text.
    Text(String),
    /// The generation's statistics (token counts for `usage`, why it stopped).
    Finished(Box<GenerateStats>),
    Failed(FerryError),
}

struct Job {
    request: GenerateRequest,
    events: UnboundedSender<JobEvent>,
}

/// The request could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `parallel` requests run and `max_queue` wait.
    QueueFull,
    /// The worker thread has ended (the model failed).
    Stopped,
}

/// Counters the worker keeps for /metrics and /health.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Metrics {
    pub requests_finished: u64,
    pub requests_cancelled: u64,
    pub requests_failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Wall seconds of prompt passes and of decode steps.
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Decode steps (one token each).
    pub decode_steps: u64,
    pub expert_hits: u64,
    pub expert_misses: u64,
    pub bytes_uploaded: u64,
    pub stall_seconds: f64,
    /// Requests being generated and waiting now.
    pub active: usize,
    pub queued: usize,
}

struct Shared {
    /// Requests queued or running: a new one is refused when this reaches the capacity.
    in_system: AtomicUsize,
    capacity: usize,
    metrics: Mutex<Metrics>,
}

/// The handlers' handle on the worker: cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

impl Scheduler {
    /// Starts the worker thread with the model. `parallel` requests run at once and up to
    /// `max_queue` more wait.
    pub fn start(
        model: Model,
        tokenizer: Option<Arc<ChatTokenizer>>,
        parallel: usize,
        max_queue: usize,
    ) -> std::io::Result<Self> {
        let (jobs, incoming) = mpsc::channel();
        let shared = Arc::new(Shared {
            in_system: AtomicUsize::new(0),
            capacity: parallel.saturating_add(max_queue),
            metrics: Mutex::new(Metrics::default()),
        });
        let worker = Worker { model, tokenizer, incoming, shared: shared.clone(), parallel };
        std::thread::Builder::new().name("ferry-model".into()).spawn(move || worker.run())?;
        Ok(Self { jobs, shared })
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request.
    pub fn submit(&self, request: GenerateRequest) -> Result<UnboundedReceiver<JobEvent>, Refused> {
        let before = self.shared.in_system.fetch_add(1, Ordering::SeqCst);
        if before >= self.shared.capacity {
            self.shared.in_system.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::QueueFull);
        }
        let (events, receiver) = unbounded_channel();
        if self.jobs.send(Job { request, events }).is_err() {
            self.shared.in_system.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Stopped);
        }
        Ok(receiver)
    }

    pub fn metrics(&self) -> Metrics {
        self.shared.metrics.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

struct Running {
    generation: Generation,
    events: UnboundedSender<JobEvent>,
}

struct Worker {
    model: Model,
    /// None: token ids only, no text (benchmarks on random checkpoints).
    tokenizer: Option<Arc<ChatTokenizer>>,
    incoming: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    parallel: usize,
}

impl Worker {
    fn run(mut self) {
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut running: Vec<Running> = Vec::new();
        loop {
            if waiting.is_empty() && running.is_empty() {
                // Idle: sleep until a request comes (or every handle is gone: shut down).
                match self.incoming.recv() {
                    Ok(job) => waiting.push_back(job),
                    Err(_) => return,
                }
            }
            waiting.extend(self.incoming.try_iter());
            // A client that left while waiting never starts.
            let before = waiting.len();
            waiting.retain(|job| !job.events.is_closed());
            let left = before - waiting.len();
            self.done(left, |m| m.requests_cancelled += left as u64);
            while running.len() < self.parallel {
                let Some(job) = waiting.pop_front() else { break };
                match Generation::new(&self.model, job.request) {
                    Ok(generation) => {
                        let _ = job.events.send(JobEvent::Started);
                        running.push(Running { generation, events: job.events });
                    }
                    Err(err) => {
                        let _ = job.events.send(JobEvent::Failed(err));
                        self.done(1, |m| m.requests_failed += 1);
                    }
                }
            }
            self.publish(running.len(), waiting.len());
            // One round: every running request advances by one forward pass.
            running.retain_mut(|run| self.advance(run));
            self.publish(running.len(), waiting.len());
        }
    }

    /// Steps `run` once; false when it has ended (finished, failed or cancelled).
    fn advance(&mut self, run: &mut Running) -> bool {
        if run.events.is_closed() {
            run.generation.cancel(&self.model);
            self.done(1, |m| m.requests_cancelled += 1);
            return false;
        }
        let started = Instant::now();
        let prompt_pass = !run.generation.started();
        match run.generation.step(&mut self.model, self.tokenizer.as_deref()) {
            Err(err) => {
                let _ = run.events.send(JobEvent::Failed(err));
                self.done(1, |m| m.requests_failed += 1);
                false
            }
            Ok(events) => {
                let seconds = started.elapsed().as_secs_f64();
                let mut ended = false;
                for event in events {
                    match event {
                        Event::Token { text, .. } => {
                            self.count(|m| m.completion_tokens += 1);
                            if !text.is_empty() {
                                let _ = run.events.send(JobEvent::Text(text));
                            }
                        }
                        Event::Step(step) => self.count(|m| {
                            m.expert_hits += step.experts.hits;
                            m.expert_misses += step.experts.misses;
                            m.bytes_uploaded += step.experts.bytes_uploaded;
                            m.stall_seconds += step.experts.stall_seconds;
                            if prompt_pass {
                                m.prompt_tokens += step.tokens as u64;
                                m.prefill_seconds += seconds;
                            } else {
                                m.decode_steps += 1;
                                m.decode_seconds += seconds;
                            }
                        }),
                        Event::Finished(stats) => {
                            let _ = run.events.send(JobEvent::Finished(stats));
                            ended = true;
                        }
                    }
                }
                if ended {
                    self.done(1, |m| m.requests_finished += 1);
                }
                !ended
            }
        }
    }

    fn count(&self, f: impl FnOnce(&mut Metrics)) {
        if let Ok(mut m) = self.shared.metrics.lock() {
            f(&mut m);
        }
    }

    /// `n` requests left the system (counted by `f`).
    fn done(&self, n: usize, f: impl FnOnce(&mut Metrics)) {
        if n > 0 {
            self.shared.in_system.fetch_sub(n, Ordering::SeqCst);
            self.count(f);
        }
    }

    fn publish(&self, active: usize, queued: usize) {
        self.count(|m| {
            m.active = active;
            m.queued = queued;
        });
    }
}
