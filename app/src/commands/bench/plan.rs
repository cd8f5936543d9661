//! Which modes `ferry bench` measures: all-resident, then every offloaded combination of the
//! flags, repeated for each expert and projection format.

use ferry_runtime::options::{
    BigFallback, BigLittle, DenseDtype, EvictionPolicy, ExpertDtype, ExpertsMode, Importance, LinkModel, MissPolicy,
    PrefetchMode, Routing, VramBudget,
};
use ferry_runtime::spec::{FfnKind, ModelSpec};

use crate::args::BenchArgs;

/// Whether a mode keeps every expert on the GPU or offloads under a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeKind {
    Resident,
    Offload,
}

impl ModeKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Resident => "resident",
            Self::Offload => "offload",
        }
    }
}

/// One mode to measure.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    pub kind: ModeKind,
    pub dtype: ExpertDtype,
    /// How projection matrices are stored.
    pub dense: DenseDtype,
    pub budget: VramBudget,
    pub policy: EvictionPolicy,
    pub prefetch: PrefetchMode,
    pub big_little: Option<BigLittle>,
    /// Emulated host-to-GPU link (None: the adapter's own speed).
    pub link: Option<LinkModel>,
    /// Upload misses or compute them on the host (`--miss-policy`).
    pub miss: MissPolicy,
    /// Where routing runs (`--route-on`).
    pub routing: Routing,
}

/// The modes of one format: they share a copy of the model, and the rounds interleave them.
pub struct Group {
    pub dtype: ExpertDtype,
    pub dense: DenseDtype,
    pub modes: Vec<Mode>,
}

/// Everything one run measures, in the order it is measured and reported.
pub struct Plan {
    /// The links the offloaded modes run over (None: not emulated).
    pub links: Vec<Option<LinkModel>>,
    /// The all-resident f32 group comes first: it is the baseline of every ratio.
    pub groups: Vec<Group>,
}

/// The modes the flags ask for on this model (a model without routed experts measures
/// all-resident only).
pub fn plan(args: &BenchArgs, spec: &ModelSpec) -> Result<Plan, ferry_runtime::options::OptionError> {
    let links: Vec<Option<LinkModel>> =
        if args.link_gbps.is_empty() { vec![None] } else { args.link_gbps.iter().map(|l| l.0).collect() };
    let has_experts = spec.layers.contains(&FfnKind::Moe);
    let mut dtypes = vec![ExpertDtype::F32];
    let asked =
        if args.compare { &[ExpertDtype::F16, ExpertDtype::Int8, ExpertDtype::Int4][..] } else { &args.expert_dtypes };
    for &dtype in asked {
        if !dtypes.contains(&dtype) && has_experts {
            dtypes.push(dtype);
        }
    }
    let (prefetches, experts_modes) = if args.compare {
        (vec![PrefetchMode::None, PrefetchMode::Pregate], vec![ExpertsMode::Full, ExpertsMode::BigLittle])
    } else {
        (args.prefetch.clone(), args.experts.clone())
    };
    let budgets = match (&args.vram_budgets[..], args.compare) {
        (_, _) if !has_experts => Vec::new(),
        ([], true) => vec![VramBudget::FractionOfExperts(0.25)],
        ([], false) => vec![VramBudget::FractionOfExperts(0.5)],
        (given, _) => given.to_vec(),
    };
    let mut denses = vec![DenseDtype::F32];
    for &dense in &args.dense_dtypes {
        if !denses.contains(&dense) {
            denses.push(dense);
        }
    }
    let mut modes = vec![Mode {
        kind: ModeKind::Resident,
        dtype: ExpertDtype::F32,
        dense: DenseDtype::F32,
        budget: VramBudget::All,
        policy: EvictionPolicy::Lru,
        prefetch: PrefetchMode::None,
        big_little: None,
        link: None,
        miss: MissPolicy::Upload,
        routing: Routing::Auto,
    }];
    for &link in &links {
        for &budget in &budgets {
            for &policy in &args.expert_policies {
                for &prefetch in &prefetches {
                    for &experts in &experts_modes {
                        for importance in importances(experts, &args.importances) {
                            let big_little =
                                BigLittle::from_mode(experts, importance, args.big_fraction, BigFallback::Fetch)?;
                            for &miss in &args.miss_policies {
                                // Uploading needs slots: a 0% budget is measured with the host policies.
                                if budget == VramBudget::FractionOfExperts(0.0) && miss == MissPolicy::Upload {
                                    continue;
                                }
                                modes.push(Mode {
                                    kind: ModeKind::Offload,
                                    dtype: ExpertDtype::F32,
                                    dense: DenseDtype::F32,
                                    budget,
                                    policy,
                                    prefetch,
                                    big_little,
                                    link,
                                    miss,
                                    routing: Routing::Auto,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    // Every mode under each `--route-on`, one routing after the other.
    let modes: Vec<Mode> =
        args.route_on.iter().flat_map(|&routing| modes.iter().map(move |m| Mode { routing, ..*m })).collect();
    let groups = denses
        .iter()
        .flat_map(|&dense| dtypes.iter().map(move |&dtype| (dense, dtype)))
        .map(|(dense, dtype)| Group {
            dtype,
            dense,
            modes: modes.iter().map(|m| Mode { dtype, dense, ..*m }).collect(),
        })
        .collect();
    Ok(Plan { links, groups })
}

/// Full mode has no importance: it is measured once, whatever `--importance` lists.
fn importances(experts: ExpertsMode, given: &[Importance]) -> Vec<Importance> {
    match experts {
        ExpertsMode::Full => vec![given.first().copied().unwrap_or_default()],
        ExpertsMode::BigLittle => given.to_vec(),
    }
}
