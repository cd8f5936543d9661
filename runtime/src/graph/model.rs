//! The whole model: load every resident tensor, then run tokens through it.

use std::sync::Arc;

use burn::tensor::{Device, Tensor};

use super::attention::Attention;
use super::blocked::KEY_BLOCK;
use super::ffn::SwiGlu;
use super::kv_cache::KvCache;
use super::linear::Loader;
use super::mla::MlaAttention;
use super::moe::{MoeBlock, MoeOutput, MoePass, PreGate};
use super::mole::{MoleBlock, upload_rows};
use super::mole_table::lookup_header;
use super::predictor::{LoadedPredictor, PREDICTOR_FILE, load_predictor};
use super::rope::Rope;
use super::vocab::{Embedding, LmHead};
use crate::error::{FerryError, Result};
use crate::experts::{ExpertCache, ExpertStore, SlotPlan};
use crate::lut::{LUT_FILE, LookupStats, LookupTable, LutDtype, LutHeader};
use crate::options::{DecodeSplit, DenseDtype, ExpertOptions, MissPolicy, PrefetchMode, Routing, VramBudget};
use crate::spec::{FfnKind, ModelSpec};
use crate::weights::WeightStore;
use ferry_shaders::flash::BLOCK;
use ferry_shaders::norm::{add_rms_norm, rms_norm};
use ferry_shaders::split::Split;

/// The KV cache the budget counts: the model's context, at most this many tokens.
const DEFAULT_KV_TOKENS: usize = 4096;

enum Ffn {
    Dense(Box<SwiGlu>),
    Moe(Box<MoeBlock>),
    Mole(Box<MoleBlock>),
}

/// Grouped-query attention, or DeepSeek's multi-head latent attention.
enum AttentionBlock {
    Standard(Box<Attention>),
    Latent(Box<MlaAttention>),
}

impl AttentionBlock {
    fn forward(
        &self,
        x: Tensor<2>,
        layer: usize,
        cache: &mut KvCache,
        rope_tables: &(Tensor<3>, Tensor<3>),
        want_received: bool,
        device: &Device,
    ) -> (Tensor<2>, Option<Tensor<2>>) {
        match self {
            Self::Standard(a) => a.forward(x, layer, cache, rope_tables, want_received, device),
            Self::Latent(a) => a.forward(x, layer, cache, rope_tables, want_received, device),
        }
    }
}

struct Layer {
    input_norm: Tensor<1>,
    attention: AttentionBlock,
    post_attention_norm: Tensor<1>,
    ffn: Ffn,
}

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    Last,
    All,
}

/// Logits per requested position (`[vocab]` each) and the experts each token was routed to,
/// per layer (empty for dense layers).
pub struct ForwardOutput {
    pub logits: Vec<Vec<f32>>,
    pub routing: Vec<Vec<Vec<u32>>>,
    /// Times the pass waited for the device to read a result back (each MoE layer's router
    /// logits, each LM-head block's logits).
    pub host_reads: usize,
}

pub struct Model {
    spec: ModelSpec,
    device: Device,
    /// Rows read from the checkpoint per forward pass (nothing on the GPU).
    embed: Embedding,
    layers: Vec<Layer>,
    final_norm: Tensor<1>,
    /// `[vocab, hidden]` in blocks that fit a binding (the embedding's values when tied).
    lm_head: LmHead,
    rope: Rope,
    /// Routed experts: host store plus GPU slot cache.
    experts: ExpertCache,
    /// Experts predicted per token for the next layer; None when not prefetching.
    prefetch_k: Option<usize>,
    /// MoLE in table mode: the memory-mapped lookup table (`mole_lut.bin` in the model folder).
    lookup: Option<LookupTable>,
    /// How the projection matrices were stored at load.
    dense_dtype: DenseDtype,
    /// The largest GPU buffer asked for at load (`ExpertOptions::page_bytes`), for KV pages.
    page_bytes: Option<u64>,
    /// Most tokens per forward pass.
    prefill_chunk: usize,
    /// Positions of KV cache reserved in GPU memory: what the budget counted under a budget in
    /// bytes or an explicit `--max-context`, else the model's context.
    context_limit: usize,
    /// The model folder (where `--prefetch learned` finds its predictor).
    folder: std::path::PathBuf,
    /// Per MoE layer followed by another: its own predictor (the next router, or a trained
    /// pre-gate), and the fitted one once `--prefetch learned` has loaded it.
    pregates: Vec<(usize, PreGate)>,
    learned: Option<Vec<LoadedPredictor>>,
    using_learned: bool,
    /// `--pregate-routing`: each MoE layer after the first routes by its predecessor's predictor.
    pregate_routing: bool,
    /// How decode kernels split on this adapter, for projections loaded later (the predictor).
    split: Split,
}

impl Model {
    /// Uploads all weights with every expert resident, checking each tensor's shape.
    pub fn load(spec: ModelSpec, store: &Arc<WeightStore>, device: &Device) -> Result<Self> {
        Self::load_with(spec, store, device, ExpertOptions::default())
    }

    /// Uploads the resident weights and as many experts as the budget gives slots for.
    pub fn load_with(
        spec: ModelSpec,
        store: &Arc<WeightStore>,
        device: &Device,
        options: ExpertOptions,
    ) -> Result<Self> {
        let kv_tokens = options.kv_tokens.unwrap_or(spec.max_position_embeddings.min(DEFAULT_KV_TOKENS));
        let plan = slot_plan(&spec, kv_tokens, &options)?;
        let expert_store = ExpertStore::new(Arc::clone(store), &spec, options.expert_dtype)?;
        if options.dense_dtype == DenseDtype::F16 && !supports_f16(device)? {
            return Err(FerryError::flag(
                "--dense-dtype",
                "f16 projections need an adapter with shader-f16; this one has none (use f32)",
            ));
        }
        let loader = Loader {
            store,
            device,
            dense: options.dense_dtype,
            limit: max_buffer_bytes(device, options.page_bytes)?,
            split: decode_split(device, options.decode_split)?,
            route_on_device: route_on_device(device, options.routing)?,
        };
        let names = &spec.names;
        let (v, h) = (spec.vocab_size, spec.hidden_size);
        let embed = Embedding::open(store, &names.embed, v, h)?;
        // A MoLE folder with a lookup table runs from the table; without one, from the FFNs.
        let lookup = if spec.layers.contains(&FfnKind::Mole) && store.folder().join(LUT_FILE).exists() {
            let expected = lookup_header(&spec, LutDtype::F32)?;
            Some(LookupTable::open(&store.folder().join(LUT_FILE), &expected)?)
        } else {
            None
        };
        let head_name = if spec.tie_word_embeddings { &names.embed } else { &names.lm_head };
        let lm_head = LmHead::load(&loader, head_name, v, h, max_buffer_bytes(device, options.page_bytes)?)?;
        let final_norm = loader.vector(&names.final_norm, h)?;
        let layers = spec
            .layers
            .iter()
            .enumerate()
            .map(|(l, kind)| {
                let ffn = match *kind {
                    FfnKind::Dense { intermediate_size } => {
                        let base = names.layer(l, &names.dense_mlp);
                        let p = &names.expert_projections;
                        let prefixes =
                            [format!("{base}.{}", p[0]), format!("{base}.{}", p[1]), format!("{base}.{}", p[2])];
                        Ffn::Dense(Box::new(SwiGlu::load(
                            &loader,
                            [&prefixes[0], &prefixes[1], &prefixes[2]],
                            h,
                            intermediate_size,
                        )?))
                    }
                    FfnKind::Moe => Ffn::Moe(Box::new(MoeBlock::load(&loader, &spec, l)?)),
                    FfnKind::Mole => Ffn::Mole(Box::new(MoleBlock::load(&loader, &spec, l, lookup.is_some())?)),
                };
                Ok(Layer {
                    input_norm: loader.vector(&names.layer(l, &names.input_norm), h)?,
                    attention: match &spec.attention.mla {
                        None => AttentionBlock::Standard(Box::new(Attention::load(&loader, &spec, l)?)),
                        Some(m) => AttentionBlock::Latent(Box::new(MlaAttention::load(&loader, &spec, m, l)?)),
                    },
                    post_attention_norm: loader.vector(&names.layer(l, &names.post_attention_norm), h)?,
                    ffn,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut layers = layers;
        let pregates = link_pregates(&mut layers, &loader, &spec)?;
        let rope = Rope::new(&spec.rope, spec.attention.rope_dim());
        let mut experts = ExpertCache::new(expert_store, device, plan, options.policy, options.page_bytes)?;
        experts.set_link(options.link);
        experts.set_upload(options.upload);
        experts.set_miss_policy(options.miss_policy, options.cpu_threads, device)?;
        experts.set_big_little(options.big_little);
        experts.preload()?;
        let prefetch_k = prefetch_k(&spec, &options);
        let context_limit = reserved_context(&spec, kv_tokens, &options);
        let split = loader.split;
        let mut model = Self {
            spec,
            device: device.clone(),
            embed,
            layers,
            final_norm,
            lm_head,
            rope,
            experts,
            prefetch_k,
            lookup,
            dense_dtype: options.dense_dtype,
            page_bytes: options.page_bytes,
            prefill_chunk: options.prefill_chunk.max(1),
            context_limit,
            folder: store.folder().to_path_buf(),
            pregates,
            learned: None,
            using_learned: false,
            pregate_routing: false,
            split,
        };
        model.choose_predictor(options.prefetch)?;
        model.pregate_routing = model.checked_pregate_routing(&options)?;
        Ok(model)
    }

    /// `--pregate-routing` needs a predictor: a MoE layer followed by another.
    fn checked_pregate_routing(&self, options: &ExpertOptions) -> Result<bool> {
        if options.pregate_routing && self.pregates.is_empty() {
            return Err(FerryError::flag(
                "--pregate-routing",
                "this model has fewer than two MoE layers, so no layer's experts can be chosen by a predecessor",
            ));
        }
        Ok(options.pregate_routing)
    }

    /// Gives each MoE layer the predictor `--prefetch` asks for: the fitted one for `learned`
    /// (loaded from the folder's `predictor.safetensors` the first time), else its own.
    fn choose_predictor(&mut self, prefetch: PrefetchMode) -> Result<()> {
        let learn = prefetch == PrefetchMode::Learned;
        if learn == self.using_learned {
            return Ok(());
        }
        if learn && self.learned.is_none() {
            let path = self.folder.join(PREDICTOR_FILE);
            if !path.exists() {
                return Err(FerryError::flag(
                    "--prefetch",
                    format!(
                        "learned needs a fitted predictor at {}; make one with `ferry predictor fit --model {} --text FILE`",
                        path.display(),
                        self.folder.display()
                    ),
                ));
            }
            let pairs: Vec<(usize, usize)> = self.pregates.iter().map(|(from, p)| (*from, p.target)).collect();
            let limit = max_buffer_bytes(&self.device, self.page_bytes)?;
            let (hidden, experts) = (self.spec.hidden_size, self.spec.moe.num_experts);
            self.learned = Some(load_predictor(
                &path,
                &pairs,
                (hidden, experts),
                &self.device,
                self.dense_dtype,
                limit,
                self.split,
            )?);
        }
        let learned = self.learned.as_ref().filter(|_| learn);
        for (i, (from, own)) in self.pregates.iter().enumerate() {
            let pregate = match learned {
                Some(learned) => PreGate {
                    router: learned[i].linear.clone(),
                    trained: false,
                    head: learned[i].head.clone(),
                    ..own.clone()
                },
                None => own.clone(),
            };
            if let Ffn::Moe(block) = &mut self.layers[*from].ffn {
                block.set_pregate(pregate)?;
            }
        }
        self.using_learned = learn;
        Ok(())
    }

    /// Row blocks the LM head is split into (one unless it exceeds a binding).
    pub fn lm_head_blocks(&self) -> usize {
        self.lm_head.blocks()
    }

    /// The lookup table's header when this MoLE model runs from one.
    pub fn lookup_table(&self) -> Option<LutHeader> {
        self.lookup.as_ref().map(|t| *t.header())
    }

    /// Lookup-table traffic so far (zero without a table).
    pub fn lookup_stats(&self) -> LookupStats {
        self.lookup.as_ref().map(LookupTable::stats).unwrap_or_default()
    }

    /// Sizes the host row cache of the lookup table (`--lut-cache`), in bytes of f32 rows.
    pub fn set_lookup_cache(&mut self, bytes: u64) {
        if let Some(t) = &mut self.lookup {
            t.set_cache_bytes(bytes);
        }
    }

    /// Whether layer `layer` predicts its successor with a trained pre-gate (else plug-and-play).
    pub fn has_trained_pregate(&self, layer: usize) -> bool {
        match self.layers.get(layer).map(|l| &l.ffn) {
            Some(Ffn::Moe(block)) => block.pregate().is_some_and(|p| p.trained),
            _ => false,
        }
    }

    /// The expert cache, for statistics between forward passes.
    pub fn experts(&self) -> &ExpertCache {
        &self.experts
    }

    /// The expert cache, to clear, pin or inspect between forward passes.
    pub fn experts_mut(&mut self) -> &mut ExpertCache {
        &mut self.experts
    }

    /// Changes the VRAM budget and policy without reloading; all-resident budgets preload.
    pub fn set_expert_options(&mut self, options: ExpertOptions) -> Result<()> {
        let kv_tokens = options.kv_tokens.unwrap_or(self.spec.max_position_embeddings.min(DEFAULT_KV_TOKENS));
        let experts = &mut self.experts;
        if options.expert_dtype != experts.dtype() {
            return Err(FerryError::flag(
                "--expert-dtype",
                format!(
                    "experts were loaded as {}; changing to {} needs a reload",
                    experts.dtype(),
                    options.expert_dtype
                ),
            ));
        }
        if options.dense_dtype != self.dense_dtype {
            return Err(FerryError::flag(
                "--dense-dtype",
                format!(
                    "projections were loaded as {}; changing to {} needs a reload",
                    self.dense_dtype, options.dense_dtype
                ),
            ));
        }
        let plan = slot_plan(&self.spec, kv_tokens, &options)?;
        self.choose_predictor(options.prefetch)?;
        self.pregate_routing = self.checked_pregate_routing(&options)?;
        let experts = &mut self.experts;
        experts.reconfigure(plan, options.policy);
        experts.set_link(options.link);
        experts.set_upload(options.upload);
        experts.set_miss_policy(options.miss_policy, options.cpu_threads, &self.device)?;
        experts.set_big_little(options.big_little);
        self.prefetch_k = prefetch_k(&self.spec, &options);
        self.context_limit = reserved_context(&self.spec, kv_tokens, &options);
        experts.preload()?;
        let on_device = route_on_device(&self.device, options.routing)?;
        for layer in &mut self.layers {
            if let Ffn::Moe(block) = &mut layer.ffn {
                block.set_route_on_device(on_device);
            }
        }
        Ok(())
    }

    /// The longest sequence (prompt and new tokens) a generation may hold: the KV cache reserved
    /// in GPU memory (see `reserved_context`).
    pub fn context_limit(&self) -> usize {
        self.context_limit
    }

    /// The error for `tokens` positions beyond `context_limit`, with the KV bytes per token.
    pub(crate) fn beyond_reserve(&self, tokens: usize) -> FerryError {
        let per_token = self.spec.attention.kv_elements(self.spec.num_layers(), 1) as u64 * 4;
        FerryError::ContextBeyondReserve { prompt: tokens, limit: self.context_limit, per_token }
    }

    /// Tokens per forward pass from now on (`--prefill-chunk`; at least 1).
    pub fn set_prefill_chunk(&mut self, tokens: usize) {
        self.prefill_chunk = tokens.max(1);
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// How the projection matrices are stored (`--dense-dtype`).
    pub fn dense_dtype(&self) -> DenseDtype {
        self.dense_dtype
    }

    /// An empty KV cache for up to `capacity` tokens (at most the model's context).
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        let context = self.spec.max_position_embeddings;
        if capacity > context {
            return Err(FerryError::ContextExceeded { prompt: capacity, new: 0, context });
        }
        if capacity > self.context_limit {
            return Err(self.beyond_reserve(capacity));
        }
        let a = &self.spec.attention;
        // One page holds a whole number of attention blocks and fits one binding.
        let [heads, width] = match &a.mla {
            Some(m) => [1, m.kv_lora_rank + m.qk_rope_head_dim],
            None => [a.num_kv_heads, a.head_dim],
        };
        let per_position = (heads * width * 4) as u64;
        let adapter = max_buffer_bytes(&self.device, None)?;
        if per_position * BLOCK as u64 > adapter {
            return Err(FerryError::Gpu(format!(
                "a KV cache page of {BLOCK} positions takes {} bytes, more than this adapter's largest buffer ({adapter} bytes)",
                per_position * BLOCK as u64
            )));
        }
        // A page size asked for (tests) still holds one block.
        let limit = max_buffer_bytes(&self.device, self.page_bytes)?;
        let page = ((limit / per_position.max(1)).min(usize::MAX as u64) as usize / BLOCK).max(1) * BLOCK;
        if a.mla.is_some() {
            return Ok(KvCache::joint(self.layers.len(), [heads, width], capacity, page, &self.device));
        }
        let windows = (0..self.layers.len()).map(|l| a.window(l)).collect();
        Ok(KvCache::new(windows, [heads, width], [heads, width], capacity, page, &self.device))
    }

    /// Checks that an f32 tensor of `dims` fits in one GPU buffer; otherwise the error names
    /// `what`, the bytes needed and the adapter's limit (the launch would fail later, inside a
    /// read-back).
    fn fits_one_buffer(&self, what: &str, dims: impl AsRef<[usize]>, advice: &str) -> Result<()> {
        let bytes = dims.as_ref().iter().try_fold(4u64, |acc, &d| acc.checked_mul(d as u64));
        let limit = max_buffer_bytes(&self.device, None)?;
        match bytes {
            Some(bytes) if bytes <= limit => Ok(()),
            _ => Err(FerryError::Gpu(format!(
                "{what}: {} bytes in one buffer, more than this adapter's largest ({limit} bytes); {advice}",
                bytes.map_or_else(|| "more than 2^64".to_string(), |b| b.to_string())
            ))),
        }
    }

    /// Runs `ids` at the positions after what `cache` holds, appending their keys and values.
    pub fn forward(&mut self, ids: &[u32], cache: &mut KvCache, logits_for: LogitsFor) -> Result<ForwardOutput> {
        let tokens = ids.len();
        if tokens == 0 {
            return Err(FerryError::Empty("no tokens to run".into()));
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.spec.vocab_size) {
            return Err(FerryError::TokenOutOfRange { id, vocab: self.spec.vocab_size });
        }
        if cache.len() + tokens > cache.capacity() {
            return Err(FerryError::ContextExceeded {
                prompt: cache.len() + tokens,
                new: 0,
                context: cache.capacity(),
            });
        }
        let start = cache.len();
        if tokens > 1 {
            // A prefill's largest attention buffer: one block of keys' scores for a pass.
            let queries = tokens.min(self.prefill_chunk);
            self.fits_one_buffer(
                &format!("attention scores for a pass of {queries} tokens over one block of {KEY_BLOCK} keys"),
                [self.spec.attention.num_heads, queries, KEY_BLOCK],
                "use a smaller --prefill-chunk",
            )?;
        }
        if tokens > 1 && self.experts.wants_received_attention() {
            // The probabilities `[heads, queries, keys]` that `--importance attention` reads are
            // the one buffer of a pass that grows with the context: checked for the last pass
            // before the first runs.
            let queries = tokens.min(self.prefill_chunk);
            self.fits_one_buffer(
                &format!("attention probabilities for {queries} tokens over {} positions", start + tokens),
                [self.spec.attention.num_heads, queries, start + tokens],
                "use a shorter prompt, a smaller --prefill-chunk, or another --importance",
            )?;
        }
        let passes = passes(tokens, self.prefill_chunk);
        let chunks = passes.len();
        let mut out = ForwardOutput { logits: Vec::new(), routing: vec![Vec::new(); self.layers.len()], host_reads: 0 };
        for (i, range) in passes.into_iter().enumerate() {
            let chunk = &ids[range];
            let wanted = match logits_for {
                LogitsFor::All => Some(LogitsFor::All),
                LogitsFor::Last => (i + 1 == chunks).then_some(LogitsFor::Last),
            };
            let part = match self.forward_chunk(chunk, cache, wanted) {
                Ok(part) => part,
                Err(e) => {
                    // The cache holds what it held before the call, as after a failed pass.
                    cache.rewind(start);
                    return Err(e);
                }
            };
            out.logits.extend(part.logits);
            for (all, layer) in out.routing.iter_mut().zip(part.routing) {
                all.extend(layer);
            }
            out.host_reads += part.host_reads;
        }
        Ok(out)
    }

    /// One pass of at most `prefill_chunk` tokens; logits for `logits_for`, none for None.
    fn forward_chunk(
        &mut self,
        ids: &[u32],
        cache: &mut KvCache,
        logits_for: Option<LogitsFor>,
    ) -> Result<ForwardOutput> {
        let tokens = ids.len();
        let device = &self.device;
        let eps = self.spec.rms_norm_eps;
        let mut x = self.embed.rows(ids, device)?;
        let embedded = x.clone();
        // MoLE: each token's whole row (all layers and experts) is read and uploaded once,
        // before layer 0, since the token id is all it depends on.
        let rows = match &mut self.lookup {
            Some(t) => Some(upload_rows(t.rows(ids)?, tokens, device)),
            None => None,
        };
        let mut mole_layer = 0;
        let rope_tables = self.rope.tables(cache.len(), tokens, device);
        let mut routing = Vec::with_capacity(self.layers.len());
        let mut host_reads = 0;
        // MoE layers whose routes stayed on the device: (layer, top-k, routes), read after the
        // logits in one go.
        let mut on_device = Vec::new();
        let prefetch_k = self.prefetch_k;
        let pregate_routing = self.pregate_routing;
        // Under --pregate-routing: the routes the previous MoE layer's predictor chose.
        let mut carried: Option<Vec<crate::routing::TokenRoute>> = None;
        let experts = &mut self.experts;
        // Big-little's attention importance: what each token receives, for the MoE layers only.
        let attention_importance = experts.wants_received_attention();
        // Each block's output joins the residual stream in the same launch that normalises the
        // stream for the next block (the next layer's input norm, or the final norm).
        let norm_after = |l: usize| self.layers.get(l + 1).map_or(&self.final_norm, |next| &next.input_norm);
        let mut h = rms_norm(x.clone(), self.layers.first().map_or(&self.final_norm, |l| &l.input_norm), eps);
        for (l, layer) in self.layers.iter().enumerate() {
            if matches!(layer.ffn, Ffn::Moe(_)) && experts.traces_inputs() {
                // Calibration only: a pre-attention predictor is fitted on the block's input.
                experts.trace_block_input(l, super::read_f32(h.clone(), "a block input")?);
            }
            let want_received = attention_importance && matches!(layer.ffn, Ffn::Moe(_));
            let (attended, received) = layer.attention.forward(h, l, cache, &rope_tables, want_received, device);
            let h_ffn;
            (x, h_ffn) = add_rms_norm(x, attended, 1, &layer.post_attention_norm, eps);
            // The block's output rows, `parts` per token (a MoE block's ranks, summed in the norm).
            let (y, parts) = match &layer.ffn {
                Ffn::Dense(mlp) => {
                    routing.push(Vec::new());
                    (mlp.forward(h_ffn), 1)
                }
                Ffn::Moe(block) => {
                    let pass = MoePass { prefetch_k, received, routes: carried.take(), pregate_routing };
                    let MoeOutput { rows, parts, routes, next, device_routes } =
                        block.forward(h_ffn, experts, pass, device)?;
                    routing.push(routes.into_iter().map(|r| r.experts).collect());
                    carried = next;
                    match device_routes {
                        Some(routes) => on_device.push((l, block.top_k(), routes)),
                        None => host_reads += 1,
                    }
                    (rows, parts)
                }
                Ffn::Mole(block) => {
                    routing.push(Vec::new());
                    let layer_rows = rows.as_ref().map(|r| {
                        let (experts, d) =
                            (self.spec.mole.as_ref().map_or(0, |m| m.num_experts), self.spec.hidden_size);
                        let span = experts * d;
                        r.clone()
                            .slice([0..tokens, mole_layer * span..(mole_layer + 1) * span])
                            .reshape([tokens, experts, d])
                    });
                    mole_layer += 1;
                    (block.forward(h_ffn, &embedded, layer_rows, eps)?, 1)
                }
            };
            (x, h) = add_rms_norm(x, y, parts, norm_after(l), eps);
        }
        cache.advance(tokens);

        // `h` is the final norm of every position.
        let logits = match logits_for {
            None => Vec::new(),
            Some(wanted) => {
                let h = match wanted {
                    LogitsFor::All => h,
                    LogitsFor::Last => h.slice([tokens - 1..tokens, 0..self.spec.hidden_size]),
                };
                host_reads += self.lm_head.blocks();
                self.lm_head.logits(h)?
            }
        };
        if !on_device.is_empty() {
            // The device is idle by now: one read settles every layer's bookkeeping.
            host_reads += 1;
            let experts = &mut self.experts;
            let tables: Vec<Tensor<2>> = on_device.iter().map(|(_, _, r)| r.clone()).collect();
            let values = super::read_f32(Tensor::cat(tables, 1), "routes")?;
            let row = values.len() / tokens.max(1);
            let mut at = 0;
            for (l, k, _) in on_device {
                let chosen: Vec<Vec<u32>> = values
                    .chunks_exact(row)
                    .flat_map(|r| ferry_shaders::route::parse(&r[at..at + 2 * k], k))
                    .map(|(e, _)| e)
                    .collect();
                at += 2 * k;
                experts.count_device_routes(l, &chosen)?;
                routing[l] = chosen;
            }
        }
        self.experts.end_forward();
        Ok(ForwardOutput { logits, routing, host_reads })
    }
}

/// The passes a prompt of `tokens` runs in: `chunk` tokens each, the last shorter, except that a
/// prompt is never left with a one-token pass (a decode step's kernels differ from a prefill's
/// in summation order): the pass before it gives it one of its tokens.
fn passes(tokens: usize, chunk: usize) -> Vec<std::ops::Range<usize>> {
    let mut bounds: Vec<usize> = (0..tokens).step_by(chunk.max(1)).chain([tokens]).collect();
    let n = bounds.len();
    if n > 2 && bounds[n - 1] - bounds[n - 2] == 1 && bounds[n - 2] - bounds[n - 3] > 1 {
        bounds[n - 2] -= 1;
    }
    bounds.windows(2).map(|w| w[0]..w[1]).collect()
}

/// Whether the adapter computes with half precision (`shader-f16`).
fn supports_f16(device: &Device) -> Result<bool> {
    let probe = ferry_shaders::cube_float(Tensor::<1>::zeros([1], device))?;
    Ok(probe.client.properties().supports_type(cubecl::ir::ElemType::Float(cubecl::ir::FloatKind::F16)))
}

/// The largest GPU buffer a vocabulary or projection block may take: what the adapter can bind,
/// or the smaller `page_bytes` asked for (tests split the head and projections that way).
pub(crate) fn max_buffer_bytes(device: &Device, page_bytes: Option<u64>) -> Result<u64> {
    let probe = ferry_shaders::cube_float(Tensor::<1>::zeros([1], device))?;
    let adapter = probe.client.properties().memory.max_page_size;
    Ok(page_bytes.map_or(adapter, |p| p.min(adapter)))
}

/// Whether MoE layers route with the device kernel on this adapter (`--route-on`).
pub(crate) fn route_on_device(device: &Device, choice: Routing) -> Result<bool> {
    Ok(match choice {
        Routing::Device => true,
        Routing::Host => false,
        Routing::Auto => {
            let probe = ferry_shaders::cube_float(Tensor::<1>::zeros([1], device))?;
            !ferry_shaders::bridge::cpu_adapter(&probe.client)
        }
    })
}

/// How this adapter's decode kernels split their dot products (see `ferry_shaders::split`).
pub(crate) fn decode_split(device: &Device, choice: DecodeSplit) -> Result<Split> {
    match choice {
        DecodeSplit::Auto => {
            let probe = ferry_shaders::cube_float(Tensor::<1>::zeros([1], device))?;
            Ok(Split::for_client(&probe.client))
        }
        DecodeSplit::Ways(n) => Split::at_most(n)
            .ok_or_else(|| FerryError::flag("--decode-split", format!("{n} is not a power of two from 1 to 64"))),
    }
}

/// Positions of KV cache a generation may fill: the `kv_tokens` the budget counted when the
/// budget is in bytes (more would overrun it) or `--max-context` set them; otherwise the model's
/// context, as far as the adapter's memory goes.
fn reserved_context(spec: &ModelSpec, kv_tokens: usize, options: &ExpertOptions) -> usize {
    let context = spec.max_position_embeddings;
    let reserved = options.kv_tokens.is_some() || matches!(options.budget, VramBudget::Bytes(_));
    if reserved { kv_tokens.min(context) } else { context }
}

fn prefetch_k(spec: &ModelSpec, options: &ExpertOptions) -> Option<usize> {
    (options.prefetch != PrefetchMode::None).then_some(spec.moe.top_k + options.prefetch_extra)
}

/// Gives each MoE layer a predictor of the next MoE layer: the trained pre-gate
/// `model.layers.N.mlp.pre_gate.weight` `[experts, hidden]` when the checkpoint has one, else the
/// next layer's own router applied to this layer's router input.
fn link_pregates(layers: &mut [Layer], loader: &Loader, spec: &ModelSpec) -> Result<Vec<(usize, PreGate)>> {
    let moe: Vec<usize> = (0..layers.len()).filter(|&l| matches!(layers[l].ffn, Ffn::Moe(_))).collect();
    let mut linked = Vec::new();
    for pair in moe.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let trained_name = spec.names.layer(from, "mlp.pre_gate");
        let Ffn::Moe(target) = &layers[to].ffn else { continue };
        let score_bias = target.score_bias().map(<[f32]>::to_vec);
        let (router, trained) = if loader.store.contains(&format!("{trained_name}.weight")) {
            (loader.linear(&trained_name, spec.hidden_size, spec.moe.num_experts, false)?, true)
        } else {
            (target.router().clone(), false)
        };
        let pregate = PreGate { target: to, router, trained, score_bias, head: None };
        if let Ffn::Moe(block) = &mut layers[from].ffn {
            block.set_pregate(pregate.clone())?;
        }
        linked.push((from, pregate));
    }
    Ok(linked)
}

/// The budget's slot plan; a plan without slots (`--vram-budget 0%`) needs a miss policy that can
/// compute on the host.
fn slot_plan(spec: &ModelSpec, kv_tokens: usize, options: &ExpertOptions) -> Result<SlotPlan> {
    let plan = options.budget.plan_for(spec, kv_tokens, options.expert_dtype, options.dense_dtype)?;
    if plan.slots == 0 && plan.total_experts > 0 && options.miss_policy == MissPolicy::Upload {
        return Err(FerryError::flag(
            "--vram-budget",
            format!(
                "{} keeps no expert slot on the GPU, so every routed expert must be computed on the host: add \
                 --miss-policy cpu (or auto)",
                options.budget
            ),
        ));
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::passes;

    #[test]
    fn a_prompt_runs_in_chunks_and_never_ends_on_a_one_token_pass() {
        assert_eq!(passes(10, 4), [0..4, 4..8, 8..10]);
        assert_eq!(passes(9, 4), [0..4, 4..7, 7..9]);
        assert_eq!(passes(8, 4), [0..4, 4..8]);
        assert_eq!(passes(1, 4).len(), 1);
        assert_eq!(passes(5, 1), [0..1, 1..2, 2..3, 3..4, 4..5]);
        assert_eq!(passes(3, 2), [0..1, 1..3]);
    }
}
