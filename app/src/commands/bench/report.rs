//! What `ferry bench` reports: each mode's figures from its median run, the roofline, and the
//! tables or JSON.

use ferry_runtime::Gpu;
use ferry_runtime::engine::GenerateStats;
use ferry_runtime::lut::LutHeader;
use ferry_runtime::measure::UploadMeasurement;
use ferry_runtime::measure::roofline::{DecodeBytes, MemoryBandwidth, ceiling_tokens_per_second};
use ferry_runtime::options::{
    DenseDtype, EvictionPolicy, ExpertDtype, Importance, LinkModel, MissPolicy, PrefetchMode, Routing, VramBudget,
};
use ferry_runtime::spec::ModelSpec;

use super::measure::{Measured, Run};
use super::plan::{Mode, ModeKind};

/// A mode's prefetch, experts (with its importance) and expert format, for the tables.
fn label(r: &ModeReport) -> String {
    let experts = match r.importance {
        Some(i) => format!("{}:{i}", r.experts),
        None => r.experts.to_string(),
    };
    let projections = if r.dense_dtype == DenseDtype::F32 { String::new() } else { format!("/{}-proj", r.dense_dtype) };
    let miss = if r.miss_policy == MissPolicy::Upload { String::new() } else { format!("/miss-{}", r.miss_policy) };
    let routing = if r.routing == Routing::Auto { String::new() } else { format!("/route-{}", r.routing) };
    format!("{:?}/{experts}/{}{projections}{miss}{routing}", r.prefetch, r.expert_dtype).to_lowercase()
}

/// One measured mode.
#[derive(serde::Serialize)]
pub struct ModeReport {
    mode: ModeKind,
    /// How routed experts were stored (f32 is exact).
    expert_dtype: ExpertDtype,
    /// How projection matrices were stored (f32 is exact).
    dense_dtype: DenseDtype,
    #[serde(serialize_with = "display")]
    vram_budget: VramBudget,
    policy: EvictionPolicy,
    prefetch: PrefetchMode,
    /// Upload misses (exact) or compute them on the host (`cpu`, `auto`: float rounding).
    miss_policy: MissPolicy,
    /// Where routing ran (`--route-on`; device and host differ by float rounding).
    routing: Routing,
    /// Over decode steps: experts computed on the host per token, the share of decode time the
    /// host kernel ran, the weight bytes it read per second of its run, and that rate over the
    /// host's measured RAM read bandwidth.
    host_computed_per_token: f64,
    host_time_fraction: f64,
    host_kernel_bytes_per_second: f64,
    host_bandwidth_fraction: f64,
    /// `auto`'s decisions per decode token: uploads cheaper this step, uploads paid by expected
    /// reuse, host computations, first tries.
    auto_uploads_per_token: f64,
    auto_uploads_for_reuse_per_token: f64,
    auto_uploads_paid_for_per_token: f64,
    auto_host_per_token: f64,
    auto_probes_per_token: f64,
    /// "full" or "big-little".
    experts: &'static str,
    /// Big-little: its importance score; share of (token, layer) choices that were big;
    /// fallbacks per token.
    importance: Option<Importance>,
    big_share: Option<f64>,
    fallbacks_per_token: f64,
    /// Big-little with pre-gating: share of predicted big/little modes that were right, and
    /// predicted-little tokens that chose big, per token.
    mode_prediction_accuracy: Option<f64>,
    big_predicted_little_per_token: f64,
    /// Experts computed per token and MoE layer.
    experts_per_token_layer: f64,
    /// GB/s of the emulated host-to-GPU link; None: uploads as fast as this adapter takes them.
    emulated_link_gb_per_s: Option<f64>,
    slots: usize,
    total_experts: usize,
    /// GPU bytes the budget plans (resident weights, KV cache, expert slots).
    gpu_bytes: u64,
    /// GPU memory measured through wgpu's allocator after the mode ran, device-wide (every model
    /// copy alive in the process, burn's pools, staging); None where the backend keeps no report.
    gpu_memory: Option<ferry_runtime::device::GpuMemory>,
    prefill_tokens_per_second: f64,
    /// The median of `decode_tokens_per_second_runs` (the run every other figure comes from).
    decode_tokens_per_second: f64,
    /// Every round's decode tokens/s (`--rounds`).
    decode_tokens_per_second_runs: Vec<f64>,
    time_to_first_token_seconds: f64,
    /// Over decode steps.
    hit_rate: f64,
    misses_per_token: f64,
    bytes_uploaded_per_token: f64,
    /// Decode time spent waiting on uploads.
    stall_fraction: f64,
    /// Decode tokens/s relative to all-resident in this run.
    decode_ratio_to_resident: f64,
    prefill_uploaded_bytes: u64,
    /// Experts requested by predictions, per decoded token.
    prefetched_per_token: f64,
    wasted_prefetch_bytes_per_token: f64,
    /// Prefetched experts per decoded token that the upload thread wrote into a staging buffer
    /// straight from the memory map (the compute thread only recorded their copies).
    staged_by_thread_per_token: f64,
    /// Per MoE layer after the first: share of real top-k choices that had been predicted.
    recall_per_layer: Vec<Option<f64>>,
    /// MoLE lookup tables, over decode steps: rows fetched, bytes read from the mapped table
    /// (page cache or disk) and bytes uploaded per token (zero for other models).
    lookup_rows_per_token: f64,
    lookup_bytes_read_per_token: f64,
    lookup_bytes_uploaded_per_token: f64,
    /// Per decode step: launches of Ferry's own kernels (ferry-shaders; burn's element-wise ops
    /// and prefill matmuls are not counted) and host read-backs (router logits per MoE layer,
    /// LM-head blocks).
    launches_per_token: f64,
    host_reads_per_token: f64,
    /// Units (invocations) per launch of those kernels, and of the matrix kernels (matrix-vector,
    /// grouped experts) alone, with the weight bytes each of their units reads: the parallelism
    /// a GPU is offered, whatever the hardware.
    units_per_launch: f64,
    matrix_units_per_launch: f64,
    weight_bytes_per_matrix_unit: f64,
    /// Matrix launches per decode step that started fewer than 32,768 units (a GPU needs about
    /// that many 16-byte loads in flight), and the smallest launch's units (lower bound, a power
    /// of two).
    small_matrix_launches_per_token: f64,
    smallest_matrix_launch_units: u64,
    /// Bytes a decode step reads from GPU memory (weights, computed experts, KV cache at the
    /// middle of the generation), f32.
    decode_bytes_read_per_token: u64,
    /// Decode tokens/s if reading those bytes at the measured memory bandwidth and uploading the
    /// missed experts at the measured upload rate were all a step did.
    roofline_tokens_per_second: f64,
    /// Measured decode tokens/s over the roofline.
    roofline_fraction: f64,
    ids: Vec<u32>,
}

/// Serialises a value as its display text (a budget as the user writes it).
fn display<T: std::fmt::Display, S: serde::Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

impl ModeReport {
    /// The figures of a mode's median run (by decode rate), with every round's decode rate.
    /// `resident` is the all-resident decode rate of this run: the first mode reported sets it.
    pub fn new(measured: Measured, resident: &mut Option<f64>, moe_layers: usize, gpu: &Gpu) -> Self {
        let Measured { mode, mut runs } = measured;
        let decode_runs: Vec<f64> = runs.iter().map(|r| r.output.stats.decode_tokens_per_second).collect();
        runs.sort_by(|a, b| {
            a.output.stats.decode_tokens_per_second.total_cmp(&b.output.stats.decode_tokens_per_second)
        });
        let Run { output, recall_per_layer, plan } = runs.swap_remove(runs.len() / 2);
        let Mode { kind, dtype, dense, budget, policy, prefetch, big_little, link, miss, routing } = mode;
        let s: &GenerateStats = &output.stats;
        // Forward passes after the prompt's: every new token but the last is run once.
        let decode_tokens = s.new_tokens.saturating_sub(1).max(1) as f64;
        let d = s.decode_experts;
        let resident = *resident.get_or_insert(s.decode_tokens_per_second);
        Self {
            mode: kind,
            expert_dtype: dtype,
            dense_dtype: dense,
            vram_budget: budget,
            policy,
            prefetch,
            miss_policy: miss,
            routing,
            host_computed_per_token: d.host_computed as f64 / decode_tokens,
            host_time_fraction: d.host_seconds / s.decode_seconds.max(1e-9),
            host_kernel_bytes_per_second: d.host_bytes_read as f64 / d.host_seconds.max(1e-9),
            host_bandwidth_fraction: 0.0,
            auto_uploads_per_token: d.auto_uploads as f64 / decode_tokens,
            auto_uploads_for_reuse_per_token: d.auto_uploads_for_reuse as f64 / decode_tokens,
            auto_uploads_paid_for_per_token: d.auto_uploads_paid_for as f64 / decode_tokens,
            auto_host_per_token: d.auto_host as f64 / decode_tokens,
            auto_probes_per_token: d.auto_probes as f64 / decode_tokens,
            experts: if big_little.is_some() { "big-little" } else { "full" },
            importance: big_little.map(|b| b.importance),
            big_share: big_little.map(|_| d.big as f64 / (d.big + d.little).max(1) as f64),
            fallbacks_per_token: d.fallbacks as f64 / decode_tokens,
            mode_prediction_accuracy: d.mode_prediction_accuracy(),
            big_predicted_little_per_token: d.big_predicted_little as f64 / decode_tokens,
            experts_per_token_layer: (d.hits + d.misses) as f64 / decode_tokens / moe_layers as f64,
            emulated_link_gb_per_s: link.map(|l| l.bytes_per_second / 1e9),
            slots: plan.slots,
            total_experts: plan.total_experts,
            gpu_bytes: plan.gpu_bytes(),
            gpu_memory: gpu.memory(),
            prefill_tokens_per_second: s.prefill_tokens_per_second,
            decode_tokens_per_second: s.decode_tokens_per_second,
            decode_tokens_per_second_runs: decode_runs,
            time_to_first_token_seconds: s.time_to_first_token_seconds,
            hit_rate: d.hit_rate(),
            misses_per_token: d.misses as f64 / decode_tokens,
            bytes_uploaded_per_token: d.bytes_uploaded as f64 / decode_tokens,
            stall_fraction: d.stall_seconds / s.decode_seconds.max(1e-9),
            decode_ratio_to_resident: s.decode_tokens_per_second / resident,
            prefill_uploaded_bytes: s.prefill_experts.bytes_uploaded,
            prefetched_per_token: d.prefetched as f64 / decode_tokens,
            wasted_prefetch_bytes_per_token: d.wasted_prefetch_bytes as f64 / decode_tokens,
            staged_by_thread_per_token: d.staged_by_thread as f64 / decode_tokens,
            recall_per_layer,
            lookup_rows_per_token: s.decode_lookup.rows_fetched as f64 / decode_tokens,
            lookup_bytes_read_per_token: s.decode_lookup.bytes_read as f64 / decode_tokens,
            lookup_bytes_uploaded_per_token: s.decode_lookup.bytes_uploaded as f64 / decode_tokens,
            launches_per_token: s.decode_kernels.launches as f64 / decode_tokens,
            host_reads_per_token: s.decode_kernels.host_reads as f64 / decode_tokens,
            units_per_launch: s.decode_kernels.units as f64 / s.decode_kernels.launches.max(1) as f64,
            matrix_units_per_launch: s.decode_kernels.matrix_units as f64
                / s.decode_kernels.matrix_launches.max(1) as f64,
            weight_bytes_per_matrix_unit: s.decode_kernels.weight_bytes as f64
                / s.decode_kernels.matrix_units.max(1) as f64,
            small_matrix_launches_per_token: s.decode_kernels.small_matrix_launches as f64 / decode_tokens,
            smallest_matrix_launch_units: s.decode_kernels.smallest_matrix_launch_units,
            decode_bytes_read_per_token: 0,
            roofline_tokens_per_second: 0.0,
            roofline_fraction: 0.0,
            ids: output.ids,
        }
    }

    /// Fills in the roofline: the bytes a decode step reads at `context` tokens, at the measured
    /// memory bandwidth, plus this mode's uploads at `upload_rate`.
    pub fn set_roofline(&mut self, spec: &ModelSpec, context: usize, memory: &MemoryBandwidth, upload_rate: f64) {
        let read =
            DecodeBytes::of(spec, context, self.experts_per_token_layer, self.expert_dtype, self.dense_dtype).total();
        self.decode_bytes_read_per_token = read;
        self.roofline_tokens_per_second =
            ceiling_tokens_per_second(read, memory.bytes_per_second, self.bytes_uploaded_per_token, upload_rate);
        self.roofline_fraction = self.decode_tokens_per_second / self.roofline_tokens_per_second;
        self.host_bandwidth_fraction = self.host_kernel_bytes_per_second / memory.host_read_bytes_per_second.max(1.0);
    }
}

/// Whether every exact mode (full experts, f32 experts and projections) generated the same
/// greedy tokens as the first exact mode routed the same way (device and host routing differ by
/// float rounding).
pub fn exact_modes_agree(reports: &[ModeReport]) -> bool {
    let exact: Vec<&ModeReport> = reports
        .iter()
        .filter(|r| {
            r.experts == "full"
                && r.expert_dtype == ExpertDtype::F32
                && r.dense_dtype == DenseDtype::F32
                && r.miss_policy == MissPolicy::Upload
        })
        .collect();
    exact.iter().all(|r| exact.iter().find(|first| first.routing == r.routing).is_none_or(|first| r.ids == first.ids))
}

/// Everything a run measured, for the tables and the JSON.
pub struct Summary<'a> {
    pub folder: &'a std::path::Path,
    pub spec: &'a ModelSpec,
    pub gpu: &'a Gpu,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub links: &'a [Option<LinkModel>],
    pub checkpoint_bytes: usize,
    pub lookup_table: Option<LutHeader>,
    pub reports: &'a [ModeReport],
    pub uploads: &'a [UploadMeasurement],
    pub memory: &'a MemoryBandwidth,
    pub upload_rate: f64,
    /// The measured path `upload_rate` is of: the one the expert cache takes.
    pub upload_method: &'static str,
    /// `--decode-split` and `--upload` as given.
    pub decode_split: ferry_runtime::options::DecodeSplit,
    pub upload: ferry_runtime::options::UploadPath,
}

impl Summary<'_> {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "model": self.folder,
            "family": self.spec.family,
            "adapter": self.gpu.adapter,
            "prompt_len": self.prompt_len,
            "gen_len": self.gen_len,
            "link": self.links.iter().map(|link| match link {
                Some(l) => format!("emulated {} GB/s host-to-GPU link", l.bytes_per_second / 1e9),
                None => "not emulated: uploads run at this adapter's speed".to_string(),
            }).collect::<Vec<_>>(),
            "greedy_tokens_identical_across_exact_modes": exact_modes_agree(self.reports),
            "checkpoint_bytes": self.checkpoint_bytes,
            "lookup_table": self.lookup_table,
            "peak_rss_bytes": ferry_runtime::measure::memory::peak_rss_bytes(),
            "modes": self.reports,
            "uploads": self.uploads,
            "memory_bandwidth": self.memory,
            "decode_split": self.decode_split,
            "upload": self.upload,
            "upload_bytes_per_second": self.upload_rate,
            "upload_method": self.upload_method,
        })
    }

    /// The human-readable tables.
    pub fn print(&self) {
        let Self { folder, gpu, links, reports, uploads, memory, upload_rate, upload_method, .. } = *self;
        let exact = exact_modes_agree(reports);
        println!(
            "{} on {} — prompt {} tokens, {} generated",
            folder.display(),
            gpu.describe(),
            self.prompt_len,
            self.gen_len
        );
        if links.iter().any(Option::is_some) {
            println!("offloaded modes with a link in GB/s run over an EMULATED host-to-GPU link");
        }
        println!(
            "{:<9} {:>5} {:>7} {:>11} {:>36} {:>6} {:>11} {:>10} {:>8} {:>12} {:>8} {:>9} {:>7}",
            "mode",
            "link",
            "budget",
            "policy",
            "prefetch/experts/dtype",
            "slots",
            "prefill t/s",
            "decode t/s",
            "hit %",
            "MiB/token",
            "stall %",
            "vs res.",
            "recall"
        );
        for r in reports {
            let recalls: Vec<f64> = r.recall_per_layer.iter().flatten().copied().collect();
            let recall = if recalls.is_empty() {
                "-".to_string()
            } else {
                format!("{:.0}%", 100.0 * recalls.iter().sum::<f64>() / recalls.len() as f64)
            };
            println!(
                "{:<9} {:>5} {:>7} {:>11} {:>36} {:>6} {:>11.1} {:>10.2} {:>8.1} {:>12.3} {:>8.1} {:>9.2} {:>7}",
                r.mode.name(),
                r.emulated_link_gb_per_s.map_or("-".to_string(), |g| format!("{g}")),
                r.vram_budget.to_string(),
                r.policy.to_string(),
                label(r),
                r.slots,
                r.prefill_tokens_per_second,
                r.decode_tokens_per_second,
                100.0 * r.hit_rate,
                r.bytes_uploaded_per_token / (1024.0 * 1024.0),
                100.0 * r.stall_fraction,
                r.decode_ratio_to_resident,
                recall
            );
        }
        println!(
            "greedy tokens identical across exact (full) modes: {exact} (decode split: {}, uploads: {})",
            self.decode_split, self.upload
        );
        if let Some(peak) = reports.iter().filter_map(|r| r.gpu_memory).max_by_key(|m| m.reserved_bytes) {
            println!(
                "GPU memory (wgpu allocator, device-wide, largest after any mode): {:.1} MiB allocated, {:.1} MiB reserved",
                peak.allocated_bytes as f64 / 1048576.0,
                peak.reserved_bytes as f64 / 1048576.0
            );
        }
        let gib = |b: f64| b / (1u64 << 30) as f64;
        println!(
            "roofline: memory {:.2} GiB/s (a streaming-read kernel over {} MiB, the faster of grid-stride {:.2} and \
             runs {:.2}; elementwise read+write {:.2} GiB/s; the host's cores read RAM at {:.2} GiB/s), uploads {:.2} \
             GiB/s ({upload_method})",
            gib(memory.bytes_per_second),
            memory.bytes >> 20,
            gib(memory.grid_stride_bytes_per_second),
            gib(memory.runs_bytes_per_second),
            gib(memory.elementwise_bytes_per_second),
            gib(memory.host_read_bytes_per_second),
            gib(upload_rate)
        );
        for r in reports {
            println!(
                "roofline {:<9} {:>5} {:>7} {:>36}: reads {:>8.2} MiB/token, uploads {:>7.3} MiB/token -> ceiling {:>9.1} tok/s, achieved {:>5.1}%",
                r.mode.name(),
                r.emulated_link_gb_per_s.map_or("-".to_string(), |g| format!("{g}")),
                r.vram_budget.to_string(),
                label(r),
                r.decode_bytes_read_per_token as f64 / 1048576.0,
                r.bytes_uploaded_per_token / 1048576.0,
                r.roofline_tokens_per_second,
                100.0 * r.roofline_fraction
            );
        }
        for r in reports {
            println!(
                "kernels  {:<9} {:>5} {:>7} {:>36}: {:>5.1} launches and {:>4.1} host reads per token; matrix \
                 launches {:>7.0} units and {:>6.0} weight bytes per unit on average, {:>4.1} per token under 32768 \
                 units, smallest >= {}",
                r.mode.name(),
                r.emulated_link_gb_per_s.map_or("-".to_string(), |g| format!("{g}")),
                r.vram_budget.to_string(),
                label(r),
                r.launches_per_token,
                r.host_reads_per_token,
                r.matrix_units_per_launch,
                r.weight_bytes_per_matrix_unit,
                r.small_matrix_launches_per_token,
                r.smallest_matrix_launch_units
            );
        }
        for r in reports.iter().filter(|r| r.miss_policy != MissPolicy::Upload) {
            println!(
                "host     {:<9} {:>5} {:>7} {:>36}: {:>5.2} experts per token on the host, {:>5.1}% of decode time, \
                 {:>6.2} GiB/s ({:>5.1}% of the host's RAM read rate); auto per token: {:.2} uploads, {:.2} for \
                 reuse, {:.2} into free slots, {:.2} on host, {:.2} tries",
                r.mode.name(),
                r.emulated_link_gb_per_s.map_or("-".to_string(), |g| format!("{g}")),
                r.vram_budget.to_string(),
                label(r),
                r.host_computed_per_token,
                100.0 * r.host_time_fraction,
                gib(r.host_kernel_bytes_per_second),
                100.0 * r.host_bandwidth_fraction,
                r.auto_uploads_per_token,
                r.auto_uploads_for_reuse_per_token,
                r.auto_uploads_paid_for_per_token,
                r.auto_host_per_token,
                r.auto_probes_per_token
            );
        }
        if let (Some(table), Some(r)) = (self.lookup_table, reports.first()) {
            println!(
                "lookup table: {:.2} MiB ({:?}); per decoded token {:.1} rows, {:.1} KiB read, {:.1} KiB uploaded",
                table.file_bytes() as f64 / 1048576.0,
                table.dtype,
                r.lookup_rows_per_token,
                r.lookup_bytes_read_per_token / 1024.0,
                r.lookup_bytes_uploaded_per_token / 1024.0
            );
        }
        for u in uploads {
            println!(
                "upload {:<20} {:>9.2} MiB: {:>8.2} GiB/s (median of {})",
                u.method,
                u.bytes as f64 / 1048576.0,
                u.bytes_per_second / (1u64 << 30) as f64,
                u.uploads
            );
        }
        if let Some(rss) = ferry_runtime::measure::memory::peak_rss_bytes() {
            println!(
                "peak host RSS {:.1} MiB; checkpoint {:.1} MiB",
                rss as f64 / 1048576.0,
                self.checkpoint_bytes as f64 / 1048576.0
            );
        }
    }
}
