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
//! A free slot evicts nobody, so filling it needs no forecast: an expert computed on the host
//! takes one once the host time it has cost beyond the device's, since it last held a slot,
//! pays for the upload (ski rental: renting until the rent equals the price never pays more than
//! twice the better of the two in hindsight).
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
    /// `auto` with a slot free: the host's extra time on this expert so far, with now, pays for
    /// the upload.
    UploadPaidFor,
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

/// What `Hybrid::decide` weighs for one missed expert.
#[derive(Debug, Clone, Copy, Default)]
pub struct Miss {
    /// Tokens that need it this step, and its slot bytes.
    pub tokens: usize,
    pub bytes: u64,
    /// Uses it is expected to see while it would stay resident.
    pub reuse: f64,
    /// Uses the expert its upload would evict is expected to see (when no slot is free).
    pub displaced_reuse: f64,
    /// Seconds the host has spent on it beyond the device's since it last held a slot
    /// (`Hybrid::excess`, summed).
    pub paid: f64,
    /// Slots there are, and whether one is free.
    pub slots: usize,
    pub free: bool,
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

    /// Where `miss` goes.
    pub fn decide(&self, miss: &Miss) -> Decision {
        if miss.slots == 0 && self.policy != MissPolicy::Upload {
            return Decision::HostNoSlot;
        }
        match self.policy {
            MissPolicy::Upload => Decision::Upload,
            // Like a static placement: the first experts used take the slots and keep them.
            MissPolicy::Cpu if miss.free => Decision::UploadIntoFree,
            MissPolicy::Cpu => Decision::Host,
            MissPolicy::Auto => {
                let (Some(link), Some(host)) = (self.link, self.host) else {
                    return Decision::Probe { host: self.link.is_some() };
                };
                let (bytes, passes) = (miss.bytes as f64, miss.tokens.div_ceil(TOKENS_PER_PASS) as f64);
                let device = self.device.unwrap_or(0.0);
                let (host_now, device_now) = (bytes * host * passes, bytes * device * passes);
                let upload_now = bytes * link + device_now;
                // What the later uses gain from a slot (each costs the device's read rather than
                // the host's), less what the expert it displaces loses; negative where the device
                // reads slower than the host.
                let displaced = if miss.free { 0.0 } else { miss.displaced_reuse };
                let later = (miss.reuse - displaced) * bytes * (host - device);
                if upload_now <= host_now + later.min(0.0) {
                    Decision::Upload
                } else if miss.free && upload_now <= host_now + miss.paid {
                    Decision::UploadPaidFor
                } else if upload_now <= host_now + later {
                    Decision::UploadForReuse
                } else {
                    Decision::Host
                }
            }
        }
    }

    /// What computing `tokens` tokens of an expert of `bytes` on the host costs beyond the
    /// device reading it from a slot, seconds (0 while a rate is unmeasured, or where the device
    /// reads no faster than the host).
    pub fn excess(&self, tokens: usize, bytes: u64) -> f64 {
        let Some(host) = self.host else { return 0.0 };
        let passes = tokens.div_ceil(TOKENS_PER_PASS) as f64;
        bytes as f64 * passes * (host - self.device.unwrap_or(0.0)).max(0.0)
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

    /// A miss of a 100-byte expert with four slots.
    fn miss(tokens: usize, reuse: f64, free: bool) -> Miss {
        Miss { tokens, bytes: 100, reuse, slots: 4, free, ..Miss::default() }
    }

    #[test]
    fn auto_probes_each_side_then_weighs_link_host_tokens_and_reuse() {
        let mut h = Hybrid { policy: MissPolicy::Auto, ..Hybrid::default() };
        assert_eq!(h.decide(&miss(1, 0.0, false)), Decision::Probe { host: false });
        h.record_upload(100, 1.0); // 0.01 s per byte
        assert_eq!(h.decide(&miss(1, 0.0, false)), Decision::Probe { host: true });
        h.record_host(100, 0.5); // 0.005 s per byte and pass
        // One token: the host (0.5 s) beats the link (1 s), free slot or not.
        assert_eq!(h.decide(&miss(1, 0.0, false)), Decision::Host);
        assert_eq!(h.decide(&miss(1, 0.0, true)), Decision::Host);
        // Eight tokens are two passes: the host's 1 s ties the link, which wins ties.
        assert_eq!(h.decide(&miss(8, 0.0, false)), Decision::Upload);
        // One token now and one expected use later: the upload saves 1 s of host work...
        assert_eq!(h.decide(&miss(1, 1.0, false)), Decision::UploadForReuse);
        assert_eq!(h.decide(&Miss { slots: 0, ..miss(1, 1.0, false) }), Decision::HostNoSlot);
        // ...unless the expert it evicts expects as many uses, which would then go to the host;
        // the same loss makes eight tokens' upload dearer than the host.
        let displacing = |tokens, reuse| Miss { displaced_reuse: 1.0, ..miss(tokens, reuse, false) };
        assert_eq!(h.decide(&displacing(1, 1.0)), Decision::Host);
        assert_eq!(h.decide(&displacing(8, 0.0)), Decision::Host);
        assert_eq!(h.decide(&displacing(8, 1.0)), Decision::Upload);
        // A free slot displaces nobody.
        assert_eq!(h.decide(&Miss { displaced_reuse: 1.0, ..miss(1, 1.0, true) }), Decision::UploadForReuse);
        // With a slot free, the host's extra time on the expert so far counts too: one token's
        // 0.5 s of it, with this token's 0.5 s, pays for the 1 s upload; a full cache ignores it
        // (an upload would evict another expert).
        assert_eq!(h.excess(1, 100), 0.5);
        assert_eq!(h.decide(&Miss { paid: 0.4, ..miss(1, 0.0, true) }), Decision::Host);
        assert_eq!(h.decide(&Miss { paid: h.excess(1, 100), ..miss(1, 0.0, true) }), Decision::UploadPaidFor);
        assert_eq!(h.decide(&Miss { paid: 0.5, ..miss(1, 0.0, false) }), Decision::Host);
        // A device that reads as slowly as the host (a CPU adapter) saves nothing on later
        // uses, and pays its own reads now.
        h.set_device_rate(0.005);
        assert_eq!(h.decide(&miss(1, 1.0, false)), Decision::Host);
        assert_eq!(h.excess(1, 100), 0.0);
        assert_eq!(h.decide(&miss(64, 9.0, false)), Decision::Host);
        h.set_device_rate(0.0);
        // Rates are running averages: a slower link moves the choice, not a single sample.
        h.record_upload(100, 2.0);
        assert!((h.link.unwrap() - 0.012).abs() < 1e-12);
        h.policy = MissPolicy::Upload;
        assert_eq!(h.decide(&miss(1, 0.0, false)), Decision::Upload);
        h.policy = MissPolicy::Cpu;
        assert_eq!(h.decide(&miss(64, 9.0, false)), Decision::Host);
        assert_eq!(h.decide(&miss(1, 0.0, true)), Decision::UploadIntoFree);
        assert_eq!(h.decide(&Miss { slots: 0, ..miss(1, 0.0, true) }), Decision::HostNoSlot);
    }
}
