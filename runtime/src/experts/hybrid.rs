//! `--miss-policy`: whether a missed expert is uploaded or computed on the host, and the
//! measured costs `auto` decides from.
//!
//! `auto` compares, per (expert, step), what each side costs now and over the uses the expert is
//! expected to see while it would stay resident:
//! - upload: the link (conversion, link and copy, measured per byte on this run's uploads), then
//!   the device reading the weights for this step and each later use (the device's streaming
//!   read rate, measured once when `auto` is chosen);
//! - host: the host kernel reading them now and for each later use (measured per byte and pass
//!   over the weights; a pass serves up to `TOKENS_PER_PASS` tokens).
//!
//! On a GPU the device's reads are nearly free and the link decides; on a CPU adapter such as
//! lavapipe the "device" reads RAM as the host does, so uploads rarely pay. Until the link and
//! host rates are measured it tries each once.

use crate::options::MissPolicy;

/// Tokens the host kernel serves per pass over an expert's weights, in the cost model: one
/// decode token is a matrix-vector product (memory-bound); a prompt's many tokens make the host
/// compute-bound, which this counts as more passes.
pub const TOKENS_PER_PASS: usize = 4;

/// Weight of a new measurement in the running rates.
const EWMA: f64 = 0.2;

/// Why an expert went where it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `upload`, or `auto` when uploading costs less than computing it on the host this step.
    Upload,
    /// `cpu` with a slot still free: slots fill with experts as they are first used, and stay.
    UploadIntoFree,
    /// `auto`: uploading costs more now, but less than now plus the host work its expected
    /// reuse would need.
    UploadForReuse,
    /// `cpu`, or `auto` when the host costs less.
    Host,
    /// No slot can hold it (`--vram-budget 0%`).
    HostNoSlot,
    /// `auto`, one of the rates not measured yet: tries that side once.
    Probe { host: bool },
}

impl Decision {
    pub fn on_host(self) -> bool {
        matches!(self, Self::Host | Self::HostNoSlot | Self::Probe { host: true })
    }
}

/// The policy, the host kernel's threads and the running cost rates.
pub struct Hybrid {
    pub policy: MissPolicy,
    pool: Option<rayon::ThreadPool>,
    threads: Option<usize>,
    /// Seconds per byte of an on-demand upload.
    link: Option<f64>,
    /// Seconds per byte and pass of the host kernel.
    host: Option<f64>,
    /// Seconds per byte of the device streaming weights (None: not measured, taken as free).
    device: Option<f64>,
}

impl Default for Hybrid {
    fn default() -> Self {
        Self { policy: MissPolicy::Upload, pool: None, threads: None, link: None, host: None, device: None }
    }
}

impl Hybrid {
    /// Sets the policy and the host threads (None: every core); the rates measured so far stay.
    pub fn configure(&mut self, policy: MissPolicy, threads: Option<usize>) -> std::io::Result<()> {
        self.policy = policy;
        if self.pool.is_none() || threads != self.threads {
            let mut builder = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("ferry-host-expert-{i}"));
            if let Some(n) = threads {
                builder = builder.num_threads(n);
            }
            self.pool = Some(builder.build().map_err(std::io::Error::other)?);
            self.threads = threads;
        }
        Ok(())
    }

    /// Runs `work` on the host kernel's threads.
    pub fn install<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(work),
            None => work(),
        }
    }

    /// Where a missed expert of `bytes` goes when `tokens` tokens need it this step, it is
    /// expected to be used `reuse` more times while it would stay resident, `slots` slots exist
    /// and one of them is `free`.
    pub fn decide(&self, tokens: usize, bytes: u64, reuse: f64, slots: usize, free: bool) -> Decision {
        if slots == 0 && self.policy != MissPolicy::Upload {
            return Decision::HostNoSlot;
        }
        match self.policy {
            MissPolicy::Upload => Decision::Upload,
            // Like a static placement: the first experts used take the slots and keep them.
            MissPolicy::Cpu if free => Decision::UploadIntoFree,
            MissPolicy::Cpu => Decision::Host,
            MissPolicy::Auto => {
                let (Some(link), Some(host)) = (self.link, self.host) else {
                    return Decision::Probe { host: self.link.is_some() };
                };
                let (bytes, passes) = (bytes as f64, tokens.div_ceil(TOKENS_PER_PASS) as f64);
                let device = self.device.unwrap_or(0.0);
                let (host_now, device_now) = (bytes * host * passes, bytes * device * passes);
                let upload_now = bytes * link + device_now;
                // What each later use costs on the host rather than from a slot.
                let saved_later = reuse * bytes * (host - device);
                if upload_now <= host_now {
                    Decision::Upload
                } else if upload_now <= host_now + saved_later {
                    Decision::UploadForReuse
                } else {
                    Decision::Host
                }
            }
        }
    }

    /// Whether the device's read rate is still to be measured.
    pub fn wants_device_rate(&self) -> bool {
        self.policy == MissPolicy::Auto && self.device.is_none()
    }

    /// The device streams weights at `seconds_per_byte`.
    pub fn set_device_rate(&mut self, seconds_per_byte: f64) {
        self.device = Some(seconds_per_byte);
    }

    /// An upload of `bytes` took `seconds` of the forward pass.
    pub fn record_upload(&mut self, bytes: u64, seconds: f64) {
        if bytes > 0 {
            self.link = Some(blend(self.link, seconds / bytes as f64));
        }
    }

    /// The host kernel made `byte_passes` (weight bytes times passes over them) in `seconds`.
    pub fn record_host(&mut self, byte_passes: u64, seconds: f64) {
        if byte_passes > 0 {
            self.host = Some(blend(self.host, seconds / byte_passes as f64));
        }
    }
}

fn blend(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| o + EWMA * (new - o))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_probes_each_side_then_weighs_link_host_tokens_and_reuse() {
        let mut h = Hybrid { policy: MissPolicy::Auto, ..Hybrid::default() };
        assert_eq!(h.decide(1, 100, 0.0, 4, false), Decision::Probe { host: false });
        h.record_upload(100, 1.0); // 0.01 s per byte
        assert_eq!(h.decide(1, 100, 0.0, 4, false), Decision::Probe { host: true });
        h.record_host(100, 0.5); // 0.005 s per byte and pass
        // One token: the host (0.5 s) beats the link (1 s), free slot or not.
        assert_eq!(h.decide(1, 100, 0.0, 4, false), Decision::Host);
        assert_eq!(h.decide(1, 100, 0.0, 4, true), Decision::Host);
        // Eight tokens are two passes: the host's 1 s ties the link, which wins ties.
        assert_eq!(h.decide(8, 100, 0.0, 4, false), Decision::Upload);
        // One token now and one expected use later: the upload saves 1 s of host work.
        assert_eq!(h.decide(1, 100, 1.0, 4, false), Decision::UploadForReuse);
        assert_eq!(h.decide(1, 100, 1.0, 0, false), Decision::HostNoSlot);
        // A device that reads as slowly as the host (a CPU adapter) saves nothing on later
        // uses, and pays its own reads now.
        h.set_device_rate(0.005);
        assert_eq!(h.decide(1, 100, 1.0, 4, false), Decision::Host);
        assert_eq!(h.decide(64, 100, 9.0, 4, false), Decision::Host);
        h.set_device_rate(0.0);
        // Rates are running averages: a slower link moves the choice, not a single sample.
        h.record_upload(100, 2.0);
        assert!((h.link.unwrap() - 0.012).abs() < 1e-12);
        h.policy = MissPolicy::Upload;
        assert_eq!(h.decide(1, 100, 0.0, 4, false), Decision::Upload);
        h.policy = MissPolicy::Cpu;
        assert_eq!(h.decide(64, 100, 9.0, 4, false), Decision::Host);
        assert_eq!(h.decide(1, 100, 0.0, 4, true), Decision::UploadIntoFree);
        assert_eq!(h.decide(1, 100, 0.0, 0, true), Decision::HostNoSlot);
    }
}
