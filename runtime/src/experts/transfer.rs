//! The upload queue: a background thread that reads prefetched experts from the mapped
//! checkpoint, so that this host work (and, with an emulated link, the transfer time) overlaps
//! the layers computing meanwhile. Where the pool uploads through Ferry's staging ring, the
//! thread writes the expert straight from the memory map (or from its converted form) into a
//! mapped staging buffer lent with the request, and the compute thread only records the copy;
//! otherwise it hands over the converted expert. The GPU copy is recorded on the compute thread
//! when the expert is first used (CubeCL's queue is per thread).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Instant;

use super::cache::{finite_upload, source};
use super::slots::Upload;
use super::staging::Ticket;
use super::store::ExpertStore;
use crate::options::LinkModel;

/// A prefetched expert ready to upload: converted (or quantised) in host memory, or already in
/// a staging buffer.
pub struct StagedExpert {
    pub layer: usize,
    pub expert: usize,
    pub weights: Upload<'static>,
}

/// Job: an expert, and the staging buffer to write it into if one was lent.
type Job = (usize, usize, Option<Ticket>);

/// The background stager. Dropping it stops the thread.
pub struct UploadQueue {
    jobs: Option<Sender<Job>>,
    done: Receiver<StagedExpert>,
    worker: Option<JoinHandle<()>>,
}

impl UploadQueue {
    pub fn start(store: Arc<ExpertStore>, link: Option<LinkModel>, slot_bytes: u64) -> Self {
        let (jobs, job_rx) = channel::<Job>();
        let (done_tx, done) = channel();
        let worker = std::thread::Builder::new()
            .name("ferry-upload".into())
            .spawn(move || {
                for (layer, expert, ticket) in job_rx {
                    let start = Instant::now();
                    let weights = match ticket.and_then(|t| fill(&store, layer, expert, t)) {
                        Some(ticket) => Upload::Ring(ticket),
                        None => Upload::Host(store.host(layer, expert)),
                    };
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

    /// Queues an expert, with a staging buffer to fill if one was free; false if the worker is
    /// gone (the caller then uploads on demand).
    pub fn request(&self, layer: usize, expert: usize, ticket: Option<Ticket>) -> bool {
        self.worker.is_some() && self.jobs.as_ref().is_some_and(|j| j.send((layer, expert, ticket)).is_ok())
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

/// Writes the expert into the lent staging buffer: the checkpoint's bytes where they are what
/// the slot holds, else its converted form. None (the ticket goes back to the ring) for a
/// non-finite weight, which the compute thread then reports as for any upload, or a failed map.
fn fill(store: &ExpertStore, layer: usize, expert: usize, mut ticket: Ticket) -> Option<Ticket> {
    let upload = source(store, layer, expert);
    finite_upload((layer, expert), &upload, store.dtype()).ok()?;
    ticket.fill(upload.parts()?).ok()?;
    Some(ticket)
}

impl Drop for UploadQueue {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
