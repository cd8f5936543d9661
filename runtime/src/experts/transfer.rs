//! The upload queue: a background thread that reads prefetched experts from the mapped
//! checkpoint and converts them to the GPU's f32, so that this host work (and, with an emulated
//! link, the transfer time) overlaps the layers computing meanwhile. The GPU copy itself is
//! issued on the compute thread when the expert is first used (burn's queue is per thread).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Instant;

use super::store::{ExpertStore, HostExpert};
use crate::options::LinkModel;

/// An expert's weights in host memory, converted (or quantised) and ready to upload.
pub struct StagedExpert {
    pub layer: usize,
    pub expert: usize,
    pub weights: HostExpert,
}

/// The background stager. Dropping it stops the thread.
pub struct UploadQueue {
    jobs: Option<Sender<(usize, usize)>>,
    done: Receiver<StagedExpert>,
    worker: Option<JoinHandle<()>>,
}

impl UploadQueue {
    pub fn start(store: Arc<ExpertStore>, link: Option<LinkModel>, slot_bytes: u64) -> Self {
        let (jobs, job_rx) = channel::<(usize, usize)>();
        let (done_tx, done) = channel();
        let worker = std::thread::Builder::new()
            .name("ferry-upload".into())
            .spawn(move || {
                for (layer, expert) in job_rx {
                    let start = Instant::now();
                    let weights = store.host(layer, expert);
                    if let Some(link) = link {
                        link.wait_out(slot_bytes, start.elapsed());
                    }
                    if done_tx.send(StagedExpert { layer, expert, weights }).is_err() {
                        break;
                    }
                }
            })
            .ok();
        Self { jobs: Some(jobs), done, worker }
    }

    /// Queues an expert; false if the worker is gone (the caller then uploads on demand).
    pub fn request(&self, layer: usize, expert: usize) -> bool {
        self.worker.is_some() && self.jobs.as_ref().is_some_and(|j| j.send((layer, expert)).is_ok())
    }

    /// The next staged expert, waiting for it.
    pub fn next(&self) -> Option<StagedExpert> {
        self.done.recv().ok()
    }

    /// A staged expert if one has arrived, without waiting.
    pub fn try_next(&self) -> Option<StagedExpert> {
        self.done.try_recv().ok()
    }
}

impl Drop for UploadQueue {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
