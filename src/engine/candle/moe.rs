//! Mixture-of-experts MLPs (Qwen3-MoE, Mixtral, DeepSeek-V2): a router picks each token's
//! top-k experts from a softmax over its logits (DeepSeek-V2: optionally only within its best
//! groups of experts), and the token's output is the weighted sum of those experts' gated SiLU
//! MLPs, plus DeepSeek's shared experts, which every token goes through. Only routed experts are multiplied: the rows of a step are
//! grouped by expert, so each chosen expert's matrices stream once per step, and experts no
//! row chose are never read (on the host, float experts and GGUF experts of the host kernels'
//! block types stay in place in the mapped file).

use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use super::linear::Linear;
use super::tensors::ShardTensors;
use crate::error::Result;

/// How a family names its experts' tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Naming {
    /// `mlp.gate`, `mlp.experts.N.{gate_proj,up_proj,down_proj}`.
    Qwen,
    /// `block_sparse_moe.gate`, `block_sparse_moe.experts.N.{w1,w3,w2}` (gate, up, down).
    Mixtral,
}

impl Naming {
    fn block(self) -> &'static str {
        match self {
            Self::Qwen => "mlp",
            Self::Mixtral => "block_sparse_moe",
        }
    }

    /// Gate, up and down projections' names inside an expert.
    fn projections(self) -> [&'static str; 3] {
        match self {
            Self::Qwen => ["gate_proj", "up_proj", "down_proj"],
            Self::Mixtral => ["w1", "w3", "w2"],
        }
    }
}

/// How a router chooses among the softmax of its logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// The `top_k` largest of all experts (DeepSeek's `greedy`, Qwen's and Mixtral's way).
    Greedy,
    /// DeepSeek's `group_limited_greedy`: the experts fall into `groups` equal groups, each
    /// scored by its best expert; the `top_k` largest are taken from the `top_groups` best.
    GroupLimited {
        /// Groups of consecutive experts.
        groups: usize,
        /// Groups a token's experts may come from.
        top_groups: usize,
    },
}

/// The mixture-of-experts settings of a config.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    /// Experts per sparse layer.
    pub experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Width of each expert's hidden layer.
    pub intermediate: usize,
    /// Whether the top-k weights are renormalised to sum to one.
    pub renormalize: bool,
    /// How the top-k are chosen.
    pub selection: Selection,
    /// Multiplier of the chosen experts' weights (DeepSeek's `routed_scaling_factor`).
    pub scaling: f32,
    /// Width of the shared experts' one MLP (DeepSeek), if any.
    pub shared_intermediate: Option<usize>,
    naming: Naming,
    sparse_step: usize,
    dense_layers: Vec<usize>,
}

impl MoeSpec {
    /// The config's experts: `None` for dense families, an error for inconsistent settings.
    pub fn of(config: &ModelConfig) -> std::result::Result<Option<Self>, String> {
        if config.is_deepseek() {
            return deepseek_spec(config).map(Some);
        }
        let naming = match config.model_type.as_str() {
            "qwen3_moe" => Naming::Qwen,
            "mixtral" => Naming::Mixtral,
            other => {
                return match config.num_experts.filter(|&n| n > 1) {
                    Some(n) => Err(format!("model_type {other:?} with {n} experts is not supported")),
                    None => Ok(None),
                }
            }
        };
        let experts = config.num_experts.unwrap_or(if naming == Naming::Mixtral { 8 } else { 128 });
        let top_k = config.num_experts_per_tok.unwrap_or(if naming == Naming::Mixtral { 2 } else { 8 });
        if experts == 0 || top_k == 0 || top_k > experts {
            return Err(format!("{top_k} experts per token cannot be chosen from {experts}"));
        }
        let intermediate = match naming {
            Naming::Qwen => config.moe_intermediate_size.unwrap_or(768),
            Naming::Mixtral => config.intermediate_size,
        };
        let sparse_step = config.decoder_sparse_step.unwrap_or(1);
        if sparse_step == 0 {
            return Err("decoder_sparse_step must be positive".into());
        }
        Ok(Some(Self {
            experts,
            top_k,
            intermediate,
            renormalize: naming == Naming::Mixtral || config.norm_topk_prob.unwrap_or(false),
            selection: Selection::Greedy,
            scaling: 1.0,
            shared_intermediate: None,
            naming,
            sparse_step: if naming == Naming::Qwen { sparse_step } else { 1 },
            dense_layers: match naming {
                Naming::Qwen => config.mlp_only_layers.clone().unwrap_or_default(),
                Naming::Mixtral => Vec::new(),
            },
        }))
    }

    /// Whether `layer` has experts (else a dense MLP of `intermediate_size`).
    /// (DeepSeek's first dense layers are listed among the dense ones.)
    pub fn is_sparse(&self, layer: usize) -> bool {
        !self.dense_layers.contains(&layer) && (layer + 1).is_multiple_of(self.sparse_step)
    }

    /// `model.layers.{layer}.mlp` or `.block_sparse_moe`.
    fn block_prefix(&self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.naming.block())
    }

    /// The tensors of `layer`'s experts and router with their shapes.
    pub fn tensors(&self, layer: usize, hidden: usize) -> Vec<(String, Vec<usize>)> {
        let p = self.block_prefix(layer);
        let [gate, up, down] = self.naming.projections();
        let inter = self.intermediate;
        let mut entries = vec![(format!("{p}.gate.weight"), vec![self.experts, hidden])];
        for e in 0..self.experts {
            entries.push((format!("{p}.experts.{e}.{gate}.weight"), vec![inter, hidden]));
            entries.push((format!("{p}.experts.{e}.{up}.weight"), vec![inter, hidden]));
            entries.push((format!("{p}.experts.{e}.{down}.weight"), vec![hidden, inter]));
        }
        if let Some(shared) = self.shared_intermediate {
            entries.push((format!("{p}.shared_experts.gate_proj.weight"), vec![shared, hidden]));
            entries.push((format!("{p}.shared_experts.up_proj.weight"), vec![shared, hidden]));
            entries.push((format!("{p}.shared_experts.down_proj.weight"), vec![hidden, shared]));
        }
        entries
    }

    /// Weights a token reads in a sparse layer's MLP: the router and its chosen experts.
    pub fn active_weights(&self, hidden: usize) -> f64 {
        let (hidden, inter) = (hidden as f64, self.intermediate as f64);
        let shared = self.shared_intermediate.unwrap_or(0) as f64;
        self.experts as f64 * hidden + (self.top_k as f64 * inter + shared) * 3.0 * hidden
    }

    /// Weights a token reads in the MLPs of an average layer (sparse and dense ones).
    pub fn mean_layer_cost(&self, config: &ModelConfig) -> f64 {
        let layers = config.num_hidden_layers.max(1);
        let sparse = (0..layers).filter(|&l| self.is_sparse(l)).count() as f64;
        let dense = 3.0 * config.hidden_size as f64 * config.intermediate_size as f64;
        let active = self.active_weights(config.hidden_size);
        (sparse * active + (layers as f64 - sparse) * dense) / layers as f64
    }
}

/// DeepSeek-V2's experts: `n_routed_experts` routed ones in every layer from
/// `first_k_dense_replace` on, chosen by `topk_method`, and `n_shared_experts` shared ones.
fn deepseek_spec(config: &ModelConfig) -> std::result::Result<MoeSpec, String> {
    let fields = &config.deepseek;
    let experts = config.num_experts.unwrap_or(64);
    let top_k = config.num_experts_per_tok.ok_or("deepseek_v2 needs num_experts_per_tok")?;
    if experts == 0 || top_k == 0 || top_k > experts {
        return Err(format!("{top_k} experts per token cannot be chosen from {experts}"));
    }
    let selection = match fields.topk_method.as_deref().unwrap_or("greedy") {
        "greedy" => Selection::Greedy,
        "group_limited_greedy" => {
            let (groups, top_groups) = (fields.n_group.unwrap_or(0), fields.topk_group.unwrap_or(0));
            if groups == 0 || !experts.is_multiple_of(groups) || top_groups == 0 || top_groups > groups {
                return Err(format!(
                    "group_limited_greedy needs n_group dividing the {experts} experts and topk_group \
                     between 1 and n_group (got {:?} and {:?})",
                    fields.n_group, fields.topk_group
                ));
            }
            if top_k > top_groups * (experts / groups) {
                return Err(format!("{top_k} experts per token cannot come from {top_groups} groups"));
            }
            Selection::GroupLimited { groups, top_groups }
        }
        other => {
            return Err(format!(
                "topk_method {other:?} is not supported (greedy and group_limited_greedy are)"
            ))
        }
    };
    let intermediate = config.moe_intermediate_size.unwrap_or(1407);
    let shared = fields.n_shared_experts.unwrap_or(2);
    Ok(MoeSpec {
        experts,
        top_k,
        intermediate,
        renormalize: false,
        selection,
        scaling: fields.routed_scaling_factor.unwrap_or(1.0) as f32,
        shared_intermediate: (shared > 0).then_some(shared * intermediate),
        naming: Naming::Qwen,
        sparse_step: 1,
        dense_layers: (0..fields.first_k_dense_replace.unwrap_or(0)).collect(),
    })
}

/// One expert: gate and up as one stacked (or split) layer, then down.
#[derive(Debug, Clone)]
struct Expert {
    gate_up: Linear,
    down: Linear,
}

/// A layer's router and experts.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    router: Linear,
    experts: Vec<Expert>,
    top_k: usize,
    intermediate: usize,
    renormalize: bool,
    selection: Selection,
    scaling: f32,
    /// DeepSeek's shared experts as one MLP, and its width (boxed: most layers have none).
    shared: Option<Box<(Expert, usize)>>,
}

/// A token's chosen experts, best first, with their weights.
pub type Route = Vec<(usize, f32)>;

impl SparseMoe {
    /// Loads `layer`'s router and experts. The router stays in its stored dtype (never
    /// quantized at load time: its choices must not move). On the host, experts are multiplied
    /// in place from the mapped file where their format allows
    /// ([`ShardTensors::in_place_linear`]), so unrouted experts are never read.
    pub fn load(
        weights: &ShardTensors,
        spec: &MoeSpec,
        layer: usize,
        hidden: usize,
        device: &Device,
    ) -> Result<Self> {
        let p = spec.block_prefix(layer);
        let router = match weights {
            ShardTensors::Safetensors { weights: stored, .. }
                if !stored.is_affine(&format!("{p}.gate.weight")) =>
            {
                let name = format!("{p}.gate.weight");
                if device.is_cpu() {
                    Linear::new(stored.matrix(&name, spec.experts, hidden)?, None)?
                } else {
                    Linear::on_device(stored.device_matrix(&[(name, spec.experts)], hidden, device)?, None)?
                }
            }
            _ => weights.linear(&p, &[("gate", spec.experts)], hidden, false, device)?,
        };
        let [gate, up, down] = spec.naming.projections();
        let inter = spec.intermediate;
        let experts = (0..spec.experts)
            .map(|e| {
                let prefix = format!("{p}.experts.{e}");
                let in_place = |proj: &str, rows, cols| {
                    weights.in_place_linear(&format!("{prefix}.{proj}.weight"), rows, cols, device)
                };
                let (gate_w, up_w, down_w) = (
                    in_place(gate, inter, hidden)?,
                    in_place(up, inter, hidden)?,
                    in_place(down, hidden, inter)?,
                );
                if let (Some(gate_w), Some(up_w), Some(down_w)) = (gate_w, up_w, down_w) {
                    return Ok(Expert { gate_up: Linear::Split(vec![gate_w, up_w]), down: down_w });
                }
                Ok(Expert {
                    gate_up: weights.linear(&prefix, &[(gate, inter), (up, inter)], hidden, false, device)?,
                    down: weights.linear(&prefix, &[(down, hidden)], inter, false, device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = match spec.shared_intermediate {
            Some(width) => {
                let prefix = format!("{p}.shared_experts");
                let gate_up = [("gate_proj", width), ("up_proj", width)];
                let expert = Expert {
                    gate_up: weights.linear(&prefix, &gate_up, hidden, false, device)?,
                    down: weights.linear(&prefix, &[("down_proj", hidden)], width, false, device)?,
                };
                Some(Box::new((expert, width)))
            }
            None => None,
        };
        Ok(Self {
            router,
            experts,
            top_k: spec.top_k,
            intermediate: inter,
            renormalize: spec.renormalize,
            selection: spec.selection,
            scaling: spec.scaling,
            shared,
        })
    }

    /// Each row's chosen experts for `x` `[.., hidden]`: softmax over the router's logits, the
    /// `top_k` largest probabilities (ties to the lower index) among the experts the selection
    /// allows, renormalised if configured, times the scaling factor.
    pub fn route(&self, x: &Tensor) -> Result<Vec<Route>> {
        let logits = self.router.forward(x)?;
        let experts = self.experts.len();
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(logits.chunks_exact(experts).map(|row| self.choose(row)).collect())
    }

    fn choose(&self, logits: &[f32]) -> Route {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        let probs: Vec<f32> = exps.iter().map(|&e| e / sum).collect();
        let mut order = self.candidates(&probs);
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut chosen: Route = order[..self.top_k].iter().map(|&e| (e, probs[e])).collect();
        if self.renormalize {
            let total: f32 = chosen.iter().map(|&(_, w)| w).sum();
            for (_, w) in &mut chosen {
                *w /= total;
            }
        }
        if self.scaling != 1.0 {
            for (_, w) in &mut chosen {
                *w *= self.scaling;
            }
        }
        chosen
    }

    /// The experts a row may be routed to: all, or those of its best groups (each group
    /// scored by its largest probability, ties to the lower group).
    fn candidates(&self, probs: &[f32]) -> Vec<usize> {
        let Selection::GroupLimited { groups, top_groups } = self.selection else {
            return (0..probs.len()).collect();
        };
        let size = probs.len() / groups;
        let best =
            |g: usize| probs[g * size..(g + 1) * size].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut order: Vec<usize> = (0..groups).collect();
        order.sort_by(|&a, &b| best(b).total_cmp(&best(a)).then(a.cmp(&b)));
        order[..top_groups].iter().flat_map(|&g| g * size..(g + 1) * size).collect()
    }

    /// The layer's output for `x` `[.., hidden]`, and each row's route.
    pub fn forward_routed(&self, x: &Tensor) -> Result<(Tensor, Vec<Route>)> {
        let dims = x.dims().to_vec();
        let hidden = *dims.last().expect("activations have a feature axis");
        let rows = x.elem_count() / hidden.max(1);
        let flat = x.reshape((rows, hidden))?;
        let routes = self.route(&flat)?;
        // Rows per expert, in row order, with their weights.
        let mut assigned: Vec<Vec<(u32, f32)>> = vec![Vec::new(); self.experts.len()];
        for (row, route) in routes.iter().enumerate() {
            for &(expert, weight) in route {
                assigned[expert].push((row as u32, weight));
            }
        }
        let mut output = vec![0f32; rows * hidden];
        // Experts in index order, each adding its weighted rows (transformers' order of sums).
        for (expert, chosen) in self.experts.iter().zip(&assigned) {
            if chosen.is_empty() {
                continue;
            }
            let input = if chosen.len() == rows {
                flat.clone()
            } else {
                let ids: Vec<u32> = chosen.iter().map(|&(row, _)| row).collect();
                let ids = Tensor::from_vec(ids, chosen.len(), flat.device())?;
                flat.index_select(&ids, 0)?
            };
            let [gate, up]: [Tensor; 2] = expert
                .gate_up
                .forward_parts(&input, &[self.intermediate, self.intermediate])?
                .try_into()
                .expect("two parts were asked for");
            let out = expert.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)?;
            let out: Vec<f32> = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            for (&(row, weight), values) in chosen.iter().zip(out.chunks_exact(hidden)) {
                let target = &mut output[row as usize * hidden..(row as usize + 1) * hidden];
                for (t, v) in target.iter_mut().zip(values) {
                    *t += v * weight;
                }
            }
        }
        let routed = Tensor::from_vec(output, dims, x.device())?;
        let Some((shared, width)) = self.shared.as_deref() else { return Ok((routed, routes)) };
        let [gate, up]: [Tensor; 2] =
            shared.gate_up.forward_parts(x, &[*width, *width])?.try_into().expect("two parts were asked for");
        let shared = shared.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)?;
        Ok(((routed + shared.to_dtype(DType::F32)?)?, routes))
    }

    /// The layer's output for `x` `[.., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_routed(x)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ModelConfig {
        serde_json::from_str(json).unwrap()
    }

    const QWEN3_MOE: &str = r#"{"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 256, "num_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "norm_topk_prob": true, "decoder_sparse_step": 2,
        "mlp_only_layers": [3]}"#;

    #[test]
    fn sparse_layers_follow_the_step_and_the_dense_list() {
        let spec = MoeSpec::of(&config(QWEN3_MOE)).unwrap().unwrap();
        let sparse: Vec<bool> = (0..4).map(|l| spec.is_sparse(l)).collect();
        assert_eq!(sparse, [false, true, false, false]);
        assert!(spec.renormalize);
        assert_eq!((spec.experts, spec.top_k, spec.intermediate), (8, 2, 32));
        let names = spec.tensors(1, 64);
        assert_eq!(names[0], ("model.layers.1.mlp.gate.weight".to_string(), vec![8, 64]));
        assert_eq!(names[3].0, "model.layers.1.mlp.experts.0.down_proj.weight");
        assert_eq!(names.len(), 1 + 8 * 3);
    }

    #[test]
    fn mixtral_names_and_always_renormalises() {
        let json =
            QWEN3_MOE.replace("qwen3_moe", "mixtral").replace("\"num_experts\"", "\"num_local_experts\"");
        let json = json.replace("\"norm_topk_prob\": true", "\"norm_topk_prob\": false");
        let spec = MoeSpec::of(&config(&json)).unwrap().unwrap();
        assert!(spec.renormalize);
        assert!((0..4).all(|l| spec.is_sparse(l)), "Mixtral has no dense layers");
        assert_eq!(spec.intermediate, 128);
        assert_eq!(spec.tensors(0, 64)[1].0, "model.layers.0.block_sparse_moe.experts.0.w1.weight");
    }

    #[test]
    fn bad_settings_are_errors() {
        let json = QWEN3_MOE.replace("\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 9");
        assert!(MoeSpec::of(&config(&json)).unwrap_err().contains("9 experts per token"));
        let llama = QWEN3_MOE.replace("qwen3_moe", "llama");
        assert!(MoeSpec::of(&config(&llama)).unwrap_err().contains("8 experts"));
        let dense = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 256}"#;
        assert_eq!(MoeSpec::of(&config(dense)).unwrap(), None);
    }

    #[test]
    fn choosing_takes_the_largest_probabilities() {
        let router =
            Linear::on_device(Tensor::zeros((4, 2), DType::F32, &Device::Cpu).unwrap(), None).unwrap();
        let expert = Expert { gate_up: router.clone(), down: router.clone() };
        let mut moe = SparseMoe {
            router,
            experts: vec![expert; 4],
            top_k: 2,
            intermediate: 1,
            renormalize: false,
            selection: Selection::Greedy,
            scaling: 1.0,
            shared: None,
        };
        let route = moe.choose(&[0.0, 2.0, 1.0, 2.0]);
        assert_eq!(route.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 3], "ties go to the lower index");
        let z = 1.0 + 2.0 * 2f32.exp() + 1f32.exp();
        assert!((route[0].1 - 2f32.exp() / z).abs() < 1e-6);
        moe.renormalize = true;
        let route = moe.choose(&[0.0, 2.0, 1.0, 3.0]);
        assert_eq!(route.iter().map(|r| r.0).collect::<Vec<_>>(), [3, 1]);
        assert!((route[0].1 + route[1].1 - 1.0).abs() < 1e-6);
        assert!((route[0].1 / route[1].1 - 1f32.exp()).abs() < 1e-5);
    }

    #[test]
    fn group_limited_choice_stays_in_the_best_groups_and_scales() {
        let router =
            Linear::on_device(Tensor::zeros((6, 2), DType::F32, &Device::Cpu).unwrap(), None).unwrap();
        let expert = Expert { gate_up: router.clone(), down: router.clone() };
        let moe = SparseMoe {
            router,
            experts: vec![expert; 6],
            top_k: 2,
            intermediate: 1,
            renormalize: false,
            selection: Selection::GroupLimited { groups: 3, top_groups: 1 },
            scaling: 2.0,
            shared: None,
        };
        // Groups {0, 1}, {2, 3}, {4, 5}: the best single expert (4) picks its group, so the
        // second choice is 5 although 0 and 1 score higher.
        let logits = [2.0, 2.5, 0.0, 0.0, 3.0, -1.0];
        let route = moe.choose(&logits);
        assert_eq!(route.iter().map(|r| r.0).collect::<Vec<_>>(), [4, 5]);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((route[0].1 - 2.0 * 3f32.exp() / z).abs() < 1e-6, "weights are scaled, not renormalised");
    }

    #[test]
    fn deepseek_layers_and_shared_experts() {
        let json = r#"{"model_type": "deepseek_v2", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 256, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 24, "n_shared_experts": 2, "first_k_dense_replace": 1,
            "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
            "routed_scaling_factor": 16.0}"#;
        let spec = MoeSpec::of(&config(json)).unwrap().unwrap();
        assert_eq!((0..3).map(|l| spec.is_sparse(l)).collect::<Vec<_>>(), [false, true, true]);
        assert_eq!(spec.selection, Selection::GroupLimited { groups: 4, top_groups: 2 });
        assert_eq!((spec.scaling, spec.shared_intermediate), (16.0, Some(48)));
        let names = spec.tensors(1, 64);
        assert_eq!(
            names.last().unwrap(),
            &("model.layers.1.mlp.shared_experts.down_proj.weight".into(), vec![64, 48])
        );
        let err = MoeSpec::of(&config(&json.replace("group_limited_greedy", "noaux_tc"))).unwrap_err();
        assert!(err.contains("noaux_tc"), "{err}");
        let err = MoeSpec::of(&config(&json.replace("\"n_group\": 4", "\"n_group\": 3"))).unwrap_err();
        assert!(err.contains("n_group"), "{err}");
    }
}
