//! The Mixture-of-Lookup-Experts feed-forward (Jie et al., ICML 2025):
//! `y = FFN_shared(h) + sum_j g_j * FFN_j(e)`, with `h` the post-attention-norm hidden state,
//! `g = softmax(router(h))` over all experts (no top-k), and `e = RMSNorm_expert(embedding(id))`.
//!
//! The routed experts read only the token's embedding, so `FFN_j(e)` depends only on the token
//! id: `ferry convert mole-to-lut` evaluates them once per vocabulary entry (`LookupFfns` below,
//! shared by both paths so they compute the same values) and inference reads one table row per
//! token instead of computing them.

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

use super::ffn::SwiGlu;
use super::linear::{Linear, Loader};
use crate::error::{FerryError, Result};
use crate::spec::{ModelSpec, MoleSpec};
use ferry_shaders::norm::rms_norm;

/// One layer's lookup experts as FFNs on the normed embedding (training-time form).
pub struct LookupFfns {
    norm: Tensor<1>,
    ffns: Vec<SwiGlu>,
}

impl LookupFfns {
    pub fn load(loader: &Loader, spec: &ModelSpec, mole: &MoleSpec, layer: usize) -> Result<Self> {
        let h = spec.hidden_size;
        let norm = loader.vector(&spec.names.layer(layer, &mole.names.expert_norm), h)?;
        let ffns = (0..mole.num_experts)
            .map(|e| {
                let prefixes =
                    mole.expert_weights(&spec.names, layer, e).map(|w| w.trim_end_matches(".weight").to_string());
                SwiGlu::load(loader, [&prefixes[0], &prefixes[1], &prefixes[2]], h, mole.expert_intermediate_size)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { norm, ffns })
    }

    /// `[tokens, experts, hidden]`: every expert applied to the embeddings `[tokens, hidden]`.
    pub fn forward(&self, embedded: Tensor<2>, eps: f32) -> Tensor<3> {
        let e = rms_norm(embedded, &self.norm, eps);
        Tensor::stack(self.ffns.iter().map(|f| f.forward(e.clone())).collect(), 1)
    }
}

/// Where a MoLE layer's expert outputs come from.
enum ExpertSource {
    /// Computed from the FFNs (a training checkpoint).
    Ffn(Box<LookupFfns>),
    /// Read from the lookup table; the caller passes this layer's rows.
    Table,
}

pub struct MoleBlock {
    router: Linear,
    shared: SwiGlu,
    experts: ExpertSource,
}

impl MoleBlock {
    /// Loads layer `layer`; with `table`, the expert FFNs are not loaded (nor needed).
    pub fn load(loader: &Loader, spec: &ModelSpec, layer: usize, table: bool) -> Result<Self> {
        let mole = mole_spec(spec)?;
        let h = spec.hidden_size;
        let router = loader.linear(&spec.names.layer(layer, &mole.names.router), h, mole.num_experts, false)?;
        let base = spec.names.layer(layer, &mole.names.shared);
        let p = &spec.names.expert_projections;
        let prefixes = [format!("{base}.{}", p[0]), format!("{base}.{}", p[1]), format!("{base}.{}", p[2])];
        let shared =
            SwiGlu::load(loader, [&prefixes[0], &prefixes[1], &prefixes[2]], h, mole.shared_intermediate_size)?;
        let experts = if table {
            ExpertSource::Table
        } else {
            ExpertSource::Ffn(Box::new(LookupFfns::load(loader, spec, mole, layer)?))
        };
        Ok(Self { router, shared, experts })
    }

    /// `h`: post-attention-norm hidden states `[tokens, hidden]`; `embedded`: the tokens' raw
    /// embeddings; `rows`: this layer's table rows `[tokens, experts, hidden]` in table mode.
    pub fn forward(&self, h: Tensor<2>, embedded: &Tensor<2>, rows: Option<Tensor<3>>, eps: f32) -> Result<Tensor<2>> {
        let expert_out = match (&self.experts, rows) {
            (ExpertSource::Ffn(ffns), _) => ffns.forward(embedded.clone(), eps),
            (ExpertSource::Table, Some(rows)) => rows,
            (ExpertSource::Table, None) => return Err(FerryError::Gpu("MoLE layer in table mode got no rows".into())),
        };
        let [tokens, experts, hidden] = expert_out.dims();
        let gates = softmax(self.router.forward(h.clone()), 1).reshape([tokens, experts, 1]);
        let mixed = (expert_out * gates).sum_dim(1).reshape([tokens, hidden]);
        Ok(self.shared.forward(h) + mixed)
    }
}

pub fn mole_spec(spec: &ModelSpec) -> Result<&MoleSpec> {
    spec.mole.as_ref().ok_or_else(|| FerryError::Config {
        path: "config.json".into(),
        message: format!("architecture {} has MoLE layers but no MoLE shape", spec.architecture),
    })
}

/// The table rows of `ids` as one `[tokens, row_len]` GPU tensor.
pub fn upload_rows(values: Vec<f32>, tokens: usize, device: &Device) -> Tensor<2> {
    let row_len = values.len() / tokens.max(1);
    Tensor::from_data(TensorData::new(values, [tokens, row_len]), device)
}
