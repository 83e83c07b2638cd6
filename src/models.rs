//! The model registry (exo classic's `model_cards`): model id → number of layers, the
//! architecture of its weights, a repository per inference engine class, a pretty name. Hugging
//! Face repo ids (`org/name`), GGUF files in them and local models work beside the registry
//! without being listed in it. Cards set at run time ([`set_model_card`], from `exo.models.model_cards`
//! edits) add ids or shadow built-in ones; [`remove_model_card`] hides an id.

use std::sync::RwLock;

use crate::engine::candle::MODEL_TYPES;
use crate::error::{Error, Result};

/// Engine class name of the candle engine.
pub const CANDLE: &str = "CandleInferenceEngine";
/// Engine class name of exo classic's MLX engine.
pub const MLX: &str = "MLXDynamicShardInferenceEngine";
/// Engine class name of exo classic's tinygrad engine.
pub const TINYGRAD: &str = "TinygradDynamicShardInferenceEngine";
/// Engine class name of xotorch's PyTorch engine; its repositories are tinygrad's (the
/// original Hugging Face checkpoints), as in xotorch's registry.
pub const TORCH: &str = "TorchDynamicShardInferenceEngine";
/// Engine class name of the RKLLM engine (exo's RKLLM fork); its repositories hold only the
/// tokenizer, as the weights are `.rkllm` files on the RKLLAMA server.
pub const RKLLM: &str = "RKLLMInferenceEngine";
/// Engine class name of the deterministic test engine.
pub const DUMMY: &str = "DummyInferenceEngine";

/// One registry entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelCard {
    /// The id users name the model by (`llama-3.2-1b`).
    pub id: &'static str,
    /// Number of decoder layers.
    pub layers: i32,
    /// Display name, where the registry has one.
    pub pretty_name: Option<&'static str>,
    /// The `model_type` of the weights' `config.json` (`llama`, `qwen2`, `deepseek_v3`, ...); None for a
    /// card set at run time, whose weights' `config.json` decides.
    pub architecture: Option<&'static str>,
    /// (engine class name, repository) pairs.
    pub repos: &'static [(&'static str, &'static str)],
    /// The model's name on an RKLLAMA server (its directory in `~/RKLLAMA/models`), for the
    /// RKLLM builds.
    pub rkllm_name: Option<&'static str>,
}

impl ModelCard {
    /// This model's repository for `engine_class` (xotorch's torch engine takes tinygrad's).
    pub fn repo(&self, engine_class: &str) -> Option<&'static str> {
        let listed_as = if engine_class == TORCH { TINYGRAD } else { engine_class };
        self.repos.iter().find(|(class, _)| *class == listed_as).map(|(_, repo)| *repo)
    }
}

const fn card(
    id: &'static str,
    layers: i32,
    pretty_name: Option<&'static str>,
    architecture: &'static str,
    repos: &'static [(&'static str, &'static str)],
) -> ModelCard {
    ModelCard { id, layers, pretty_name, architecture: Some(architecture), repos, rkllm_name: None }
}

/// An RKLLM build of exo's RKLLM fork: its tokenizer's repository and its name on the server.
const fn rkllm_card(
    id: &'static str,
    layers: i32,
    pretty_name: &'static str,
    architecture: &'static str,
    repos: &'static [(&'static str, &'static str)],
    server_name: &'static str,
) -> ModelCard {
    ModelCard {
        id,
        layers,
        pretty_name: Some(pretty_name),
        architecture: Some(architecture),
        repos,
        rkllm_name: Some(server_name),
    }
}

/// Every registry entry, in exo classic's order, with classic's MLX and tinygrad repositories
/// (Mistral 7B and Qwen 3 added). Candle loads the MLX repository wherever it runs the
/// architecture, so an id means the same weights as in classic: `llama-3.2-1b` the 4-bit
/// quantization, `llama-3.2-1b-8bit` the 8-bit one, `-bf16` the unquantized model.
/// `qwen-2.5-0.5b` has the 24 layers of its config (classic listed 28).
pub static MODEL_CARDS: &[ModelCard] = &[
    card(
        "llama-3.3-70b",
        80,
        Some("Llama 3.3 70B"),
        "llama",
        &[
            (CANDLE, "mlx-community/Llama-3.3-70B-Instruct-4bit"),
            (MLX, "mlx-community/Llama-3.3-70B-Instruct-4bit"),
            (TINYGRAD, "unsloth/Llama-3.3-70B-Instruct"),
        ],
    ),
    card(
        "llama-3.2-1b",
        16,
        Some("Llama 3.2 1B"),
        "llama",
        &[
            (CANDLE, "mlx-community/Llama-3.2-1B-Instruct-4bit"),
            (MLX, "mlx-community/Llama-3.2-1B-Instruct-4bit"),
            (TINYGRAD, "unsloth/Llama-3.2-1B-Instruct"),
        ],
    ),
    card(
        "llama-3.2-1b-8bit",
        16,
        Some("Llama 3.2 1B (8-bit)"),
        "llama",
        &[
            (CANDLE, "mlx-community/Llama-3.2-1B-Instruct-8bit"),
            (MLX, "mlx-community/Llama-3.2-1B-Instruct-8bit"),
            (TINYGRAD, "unsloth/Llama-3.2-1B-Instruct"),
        ],
    ),
    card(
        "llama-3.2-3b",
        28,
        Some("Llama 3.2 3B"),
        "llama",
        &[
            (CANDLE, "mlx-community/Llama-3.2-3B-Instruct-4bit"),
            (MLX, "mlx-community/Llama-3.2-3B-Instruct-4bit"),
            (TINYGRAD, "unsloth/Llama-3.2-3B-Instruct"),
        ],
    ),
    card(
        "llama-3.2-3b-8bit",
        28,
        Some("Llama 3.2 3B (8-bit)"),
        "llama",
        &[
            (CANDLE, "mlx-community/Llama-3.2-3B-Instruct-8bit"),
            (MLX, "mlx-community/Llama-3.2-3B-Instruct-8bit"),
            (TINYGRAD, "unsloth/Llama-3.2-3B-Instruct"),
        ],
    ),
    card(
        "llama-3.2-3b-bf16",
        28,
        Some("Llama 3.2 3B (BF16)"),
        "llama",
        &[
            (CANDLE, "mlx-community/Llama-3.2-3B-Instruct"),
            (MLX, "mlx-community/Llama-3.2-3B-Instruct"),
            (TINYGRAD, "unsloth/Llama-3.2-3B-Instruct"),
        ],
    ),
    card(
        "llama-3.1-8b",
        32,
        Some("Llama 3.1 8B"),
        "llama",
        &[
            (CANDLE, "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit"),
            (MLX, "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit"),
            (TINYGRAD, "mlabonne/Meta-Llama-3.1-8B-Instruct-abliterated"),
        ],
    ),
    card(
        "llama-3.1-70b",
        80,
        Some("Llama 3.1 70B"),
        "llama",
        &[
            (CANDLE, "mlx-community/Meta-Llama-3.1-70B-Instruct-4bit"),
            (MLX, "mlx-community/Meta-Llama-3.1-70B-Instruct-4bit"),
            (TINYGRAD, "NousResearch/Meta-Llama-3.1-70B-Instruct"),
        ],
    ),
    card(
        "llama-3.1-70b-bf16",
        80,
        Some("Llama 3.1 70B (BF16)"),
        "llama",
        &[
            (CANDLE, "mlx-community/Meta-Llama-3.1-70B-Instruct-bf16-CORRECTED"),
            (MLX, "mlx-community/Meta-Llama-3.1-70B-Instruct-bf16-CORRECTED"),
            (TINYGRAD, "NousResearch/Meta-Llama-3.1-70B-Instruct"),
        ],
    ),
    card(
        "llama-3-8b",
        32,
        Some("Llama 3 8B"),
        "llama",
        &[
            (CANDLE, "mlx-community/Meta-Llama-3-8B-Instruct-4bit"),
            (MLX, "mlx-community/Meta-Llama-3-8B-Instruct-4bit"),
            (TINYGRAD, "TriAiExperiments/SFR-Iterative-DPO-LLaMA-3-8B-R"),
        ],
    ),
    card(
        "llama-3-70b",
        80,
        Some("Llama 3 70B"),
        "llama",
        &[
            (CANDLE, "mlx-community/Meta-Llama-3-70B-Instruct-4bit"),
            (MLX, "mlx-community/Meta-Llama-3-70B-Instruct-4bit"),
            (TINYGRAD, "TriAiExperiments/SFR-Iterative-DPO-LLaMA-3-70B-R"),
        ],
    ),
    card(
        "llama-3.1-405b",
        126,
        Some("Llama 3.1 405B"),
        "llama",
        &[
            (CANDLE, "mlx-community/Meta-Llama-3.1-405B-4bit"),
            (MLX, "mlx-community/Meta-Llama-3.1-405B-4bit"),
        ],
    ),
    card(
        "llama-3.1-405b-8bit",
        126,
        Some("Llama 3.1 405B (8-bit)"),
        "llama",
        &[
            (CANDLE, "mlx-community/Meta-Llama-3.1-405B-Instruct-8bit"),
            (MLX, "mlx-community/Meta-Llama-3.1-405B-Instruct-8bit"),
        ],
    ),
    card(
        "mistral-nemo",
        40,
        Some("Mistral Nemo"),
        "mistral",
        &[
            (CANDLE, "mlx-community/Mistral-Nemo-Instruct-2407-4bit"),
            (MLX, "mlx-community/Mistral-Nemo-Instruct-2407-4bit"),
        ],
    ),
    card(
        "mistral-large",
        88,
        Some("Mistral Large"),
        "mistral",
        &[
            (CANDLE, "mlx-community/Mistral-Large-Instruct-2407-4bit"),
            (MLX, "mlx-community/Mistral-Large-Instruct-2407-4bit"),
        ],
    ),
    card(
        "mistral-7b",
        32,
        Some("Mistral 7B"),
        "mistral",
        &[
            (CANDLE, "mlx-community/Mistral-7B-Instruct-v0.3-4bit"),
            (MLX, "mlx-community/Mistral-7B-Instruct-v0.3-4bit"),
        ],
    ),
    card(
        "deepseek-coder-v2-lite",
        27,
        Some("Deepseek Coder V2 Lite"),
        "deepseek_v2",
        &[
            (CANDLE, "mlx-community/DeepSeek-Coder-V2-Lite-Instruct-4bit-mlx"),
            (MLX, "mlx-community/DeepSeek-Coder-V2-Lite-Instruct-4bit-mlx"),
        ],
    ),
    card(
        "deepseek-coder-v2.5",
        60,
        Some("Deepseek Coder V2.5"),
        "deepseek_v2",
        &[
            (CANDLE, "mlx-community/DeepSeek-V2.5-MLX-AQ4_1_64"),
            (MLX, "mlx-community/DeepSeek-V2.5-MLX-AQ4_1_64"),
        ],
    ),
    card(
        "deepseek-v3",
        61,
        Some("Deepseek V3 (4-bit)"),
        "deepseek_v3",
        &[(MLX, "mlx-community/DeepSeek-V3-4bit")],
    ),
    card(
        "deepseek-v3-3bit",
        61,
        Some("Deepseek V3 (3-bit)"),
        "deepseek_v3",
        &[(MLX, "mlx-community/DeepSeek-V3-3bit")],
    ),
    card(
        "deepseek-r1",
        61,
        Some("Deepseek R1 (4-bit)"),
        "deepseek_v3",
        &[(MLX, "mlx-community/DeepSeek-R1-4bit")],
    ),
    card(
        "deepseek-r1-3bit",
        61,
        Some("Deepseek R1 (3-bit)"),
        "deepseek_v3",
        &[(MLX, "mlx-community/DeepSeek-R1-3bit")],
    ),
    card(
        "deepseek-r1-distill-qwen-1.5b",
        28,
        Some("DeepSeek R1 Distill Qwen 1.5B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/deepseek-r1-distill-qwen-1.5b"),
            (MLX, "mlx-community/deepseek-r1-distill-qwen-1.5b"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-1.5b-3bit",
        28,
        Some("DeepSeek R1 Distill Qwen 1.5B (3-bit)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-1.5B-3bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-1.5B-3bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-1.5b-6bit",
        28,
        Some("DeepSeek R1 Distill Qwen 1.5B (6-bit)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-1.5B-6bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-1.5B-6bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-1.5b-8bit",
        28,
        Some("DeepSeek R1 Distill Qwen 1.5B (8-bit)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-1.5B-8bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-1.5B-8bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-1.5b-bf16",
        28,
        Some("DeepSeek R1 Distill Qwen 1.5B (BF16)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-1.5B-bf16"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-1.5B-bf16"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-7b",
        28,
        Some("DeepSeek R1 Distill Qwen 7B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-4bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-4bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-7b-3bit",
        28,
        Some("DeepSeek R1 Distill Qwen 7B (3-bit)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-3bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-3bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-7b-6bit",
        28,
        Some("DeepSeek R1 Distill Qwen 7B (6-bit)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-6bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-6bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-7b-8bit",
        28,
        Some("DeepSeek R1 Distill Qwen 7B (8-bit)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-8bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-8bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-7b-bf16",
        28,
        Some("DeepSeek R1 Distill Qwen 7B (BF16)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-bf16"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-bf16"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-14b",
        48,
        Some("DeepSeek R1 Distill Qwen 14B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-4bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-4bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-14b-3bit",
        48,
        Some("DeepSeek R1 Distill Qwen 14B (3-bit)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-3bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-3bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-14b-6bit",
        48,
        Some("DeepSeek R1 Distill Qwen 14B (6-bit)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-6bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-6bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-14b-8bit",
        48,
        Some("DeepSeek R1 Distill Qwen 14B (8-bit)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-8bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-8bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-14b-bf16",
        48,
        Some("DeepSeek R1 Distill Qwen 14B (BF16)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-bf16"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-bf16"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-32b",
        64,
        Some("DeepSeek R1 Distill Qwen 32B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-4bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-4bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-32b-3bit",
        64,
        Some("DeepSeek R1 Distill Qwen 32B (3-bit)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-3bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-3bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-32b-6bit",
        64,
        Some("DeepSeek R1 Distill Qwen 32B (6-bit)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-6bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-6bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-32b-8bit",
        64,
        Some("DeepSeek R1 Distill Qwen 32B (8-bit)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-MLX-8Bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-MLX-8Bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-32b-bf16",
        64,
        Some("DeepSeek R1 Distill Qwen 32B (BF16)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-bf16"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-bf16"),
        ],
    ),
    card(
        "deepseek-r1-distill-llama-8b",
        32,
        Some("DeepSeek R1 Distill Llama 8B"),
        "llama",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Llama-8B-4bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Llama-8B-4bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-llama-8b-3bit",
        32,
        Some("DeepSeek R1 Distill Llama 8B (3-bit)"),
        "llama",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Llama-8B-3bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Llama-8B-3bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-llama-8b-6bit",
        32,
        Some("DeepSeek R1 Distill Llama 8B (6-bit)"),
        "llama",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Llama-8B-6bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Llama-8B-6bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-llama-8b-8bit",
        32,
        Some("DeepSeek R1 Distill Llama 8B (8-bit)"),
        "llama",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Llama-8B-8bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Llama-8B-8bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-llama-8b-bf16",
        32,
        Some("DeepSeek R1 Distill Llama 8B (BF16)"),
        "llama",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Llama-8B-bf16"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Llama-8B-bf16"),
        ],
    ),
    card(
        "deepseek-r1-distill-llama-70b",
        80,
        Some("DeepSeek R1 Distill Llama 70B"),
        "llama",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Llama-70B-4bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Llama-70B-4bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-llama-70b-3bit",
        80,
        Some("DeepSeek R1 Distill Llama 70B (3-bit)"),
        "llama",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Llama-70B-3bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Llama-70B-3bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-llama-70b-6bit",
        80,
        Some("DeepSeek R1 Distill Llama 70B (6-bit)"),
        "llama",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Llama-70B-6bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Llama-70B-6bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-llama-70b-8bit",
        80,
        Some("DeepSeek R1 Distill Llama 70B (8-bit)"),
        "llama",
        &[
            (CANDLE, "mlx-community/DeepSeek-R1-Distill-Llama-70B-8bit"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Llama-70B-8bit"),
        ],
    ),
    card(
        "llava-1.5-7b-hf",
        32,
        Some("LLaVa 1.5 7B (Vision Model)"),
        "llava",
        &[(CANDLE, "llava-hf/llava-1.5-7b-hf"), (MLX, "llava-hf/llava-1.5-7b-hf")],
    ),
    card(
        "qwen-2.5-0.5b",
        24,
        Some("Qwen 2.5 0.5B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/Qwen2.5-0.5B-Instruct-4bit"),
            (MLX, "mlx-community/Qwen2.5-0.5B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-1.5b",
        28,
        Some("Qwen 2.5 1.5B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/Qwen2.5-1.5B-Instruct-4bit"),
            (MLX, "mlx-community/Qwen2.5-1.5B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-coder-1.5b",
        28,
        Some("Qwen 2.5 Coder 1.5B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/Qwen2.5-Coder-1.5B-Instruct-4bit"),
            (MLX, "mlx-community/Qwen2.5-Coder-1.5B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-3b",
        36,
        Some("Qwen 2.5 3B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/Qwen2.5-3B-Instruct-4bit"),
            (MLX, "mlx-community/Qwen2.5-3B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-coder-3b",
        36,
        Some("Qwen 2.5 Coder 3B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/Qwen2.5-Coder-3B-Instruct-4bit"),
            (MLX, "mlx-community/Qwen2.5-Coder-3B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-7b",
        28,
        Some("Qwen 2.5 7B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/Qwen2.5-7B-Instruct-4bit"),
            (MLX, "mlx-community/Qwen2.5-7B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-coder-7b",
        28,
        Some("Qwen 2.5 Coder 7B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/Qwen2.5-Coder-7B-Instruct-4bit"),
            (MLX, "mlx-community/Qwen2.5-Coder-7B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-math-7b",
        28,
        Some("Qwen 2.5 7B (Math)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/Qwen2.5-Math-7B-Instruct-4bit"),
            (MLX, "mlx-community/Qwen2.5-Math-7B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-14b",
        48,
        Some("Qwen 2.5 14B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/Qwen2.5-14B-Instruct-4bit"),
            (MLX, "mlx-community/Qwen2.5-14B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-coder-14b",
        48,
        Some("Qwen 2.5 Coder 14B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/Qwen2.5-Coder-14B-Instruct-4bit"),
            (MLX, "mlx-community/Qwen2.5-Coder-14B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-32b",
        64,
        Some("Qwen 2.5 32B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/Qwen2.5-32B-Instruct-4bit"),
            (MLX, "mlx-community/Qwen2.5-32B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-coder-32b",
        64,
        Some("Qwen 2.5 Coder 32B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/Qwen2.5-Coder-32B-Instruct-4bit"),
            (MLX, "mlx-community/Qwen2.5-Coder-32B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-72b",
        80,
        Some("Qwen 2.5 72B"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/Qwen2.5-72B-Instruct-4bit"),
            (MLX, "mlx-community/Qwen2.5-72B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-math-72b",
        80,
        Some("Qwen 2.5 72B (Math)"),
        "qwen2",
        &[
            (CANDLE, "mlx-community/Qwen2.5-Math-72B-Instruct-4bit"),
            (MLX, "mlx-community/Qwen2.5-Math-72B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-3-0.6b",
        28,
        Some("Qwen 3 0.6B"),
        "qwen3",
        &[(CANDLE, "mlx-community/Qwen3-0.6B-4bit"), (MLX, "mlx-community/Qwen3-0.6B-4bit")],
    ),
    card(
        "qwen-3-1.7b",
        28,
        Some("Qwen 3 1.7B"),
        "qwen3",
        &[(CANDLE, "mlx-community/Qwen3-1.7B-4bit"), (MLX, "mlx-community/Qwen3-1.7B-4bit")],
    ),
    card(
        "qwen-3-4b",
        36,
        Some("Qwen 3 4B"),
        "qwen3",
        &[(CANDLE, "mlx-community/Qwen3-4B-4bit"), (MLX, "mlx-community/Qwen3-4B-4bit")],
    ),
    card(
        "qwen-3-8b",
        36,
        Some("Qwen 3 8B"),
        "qwen3",
        &[(CANDLE, "mlx-community/Qwen3-8B-4bit"), (MLX, "mlx-community/Qwen3-8B-4bit")],
    ),
    card(
        "qwen-3-14b",
        40,
        Some("Qwen 3 14B"),
        "qwen3",
        &[(CANDLE, "mlx-community/Qwen3-14B-4bit"), (MLX, "mlx-community/Qwen3-14B-4bit")],
    ),
    card(
        "qwen-3-32b",
        64,
        Some("Qwen 3 32B"),
        "qwen3",
        &[(CANDLE, "mlx-community/Qwen3-32B-4bit"), (MLX, "mlx-community/Qwen3-32B-4bit")],
    ),
    card(
        "nemotron-70b",
        80,
        Some("Nemotron 70B"),
        "llama",
        &[
            (CANDLE, "mlx-community/nvidia_Llama-3.1-Nemotron-70B-Instruct-HF_4bit"),
            (MLX, "mlx-community/nvidia_Llama-3.1-Nemotron-70B-Instruct-HF_4bit"),
        ],
    ),
    card(
        "nemotron-70b-bf16",
        80,
        Some("Nemotron 70B (BF16)"),
        "llama",
        &[
            (CANDLE, "mlx-community/Llama-3.1-Nemotron-70B-Instruct-HF-bf16"),
            (MLX, "mlx-community/Llama-3.1-Nemotron-70B-Instruct-HF-bf16"),
        ],
    ),
    card(
        "gemma2-9b",
        42,
        Some("Gemma2 9B"),
        "gemma2",
        &[(CANDLE, "mlx-community/gemma-2-9b-it-4bit"), (MLX, "mlx-community/gemma-2-9b-it-4bit")],
    ),
    card(
        "gemma2-27b",
        46,
        Some("Gemma2 27B"),
        "gemma2",
        &[(CANDLE, "mlx-community/gemma-2-27b-it-4bit"), (MLX, "mlx-community/gemma-2-27b-it-4bit")],
    ),
    card(
        "stable-diffusion-2-1-base",
        31,
        Some("Stable Diffusion 2.1"),
        "stable_diffusion",
        &[(MLX, "stabilityai/stable-diffusion-2-1-base")],
    ),
    card(
        "phi-3.5-mini",
        32,
        Some("Phi-3.5 Mini"),
        "phi3",
        &[
            (MLX, "mlx-community/Phi-3.5-mini-instruct-4bit"),
            (CANDLE, "mlx-community/Phi-3.5-mini-instruct-4bit"),
        ],
    ),
    card(
        "phi-4",
        40,
        Some("Phi-4"),
        "phi3",
        &[(MLX, "mlx-community/phi-4-4bit"), (CANDLE, "mlx-community/phi-4-4bit")],
    ),
    // exo's RKLLM fork's ids; `qwen2.5-7b-rkllm` has the server name the fork derives from the id.
    rkllm_card(
        "deepseek-r1-1.5b-rkllm",
        28,
        "DeepSeek R1 1.5B (RKLLM)",
        "qwen2",
        &[(RKLLM, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")],
        "DeepSeek-R1-1.5B",
    ),
    rkllm_card(
        "qwen2.5-1.5b-rkllm",
        28,
        "Qwen 2.5 1.5B (RKLLM)",
        "qwen2",
        &[(RKLLM, "Qwen/Qwen2.5-1.5B-Instruct")],
        "Qwen2.5-1.5B",
    ),
    rkllm_card(
        "qwen2.5-1.5b-instruct-rkllm",
        28,
        "Qwen 2.5 1.5B Instruct (RKLLM)",
        "qwen2",
        &[(RKLLM, "Qwen/Qwen2.5-1.5B-Instruct")],
        "Qwen2.5-1.5B-Instruct",
    ),
    rkllm_card(
        "qwen2.5-3b-rkllm",
        36,
        "Qwen 2.5 3B (RKLLM)",
        "qwen2",
        &[(RKLLM, "Qwen/Qwen2.5-3B-Instruct")],
        "Qwen2.5-3B",
    ),
    rkllm_card(
        "qwen2.5-7b-rkllm",
        28,
        "Qwen 2.5 7B (RKLLM)",
        "qwen2",
        &[(RKLLM, "Qwen/Qwen2.5-7B-Instruct")],
        "Qwen2.5-7b",
    ),
    rkllm_card(
        "phi-3-mini-rkllm",
        32,
        "Phi-3 Mini (RKLLM)",
        "phi3",
        &[(RKLLM, "microsoft/Phi-3-mini-4k-instruct")],
        "Phi-3-mini",
    ),
    card("dummy", 8, None, "dummy", &[(DUMMY, "dummy")]),
];

/// Short engine names (`--inference-engine`) and the class names they stand for.
pub const ENGINE_CLASSES: &[(&str, &str)] =
    &[("candle", CANDLE), ("mlx", MLX), ("tinygrad", TINYGRAD), ("rkllm", RKLLM), ("dummy", DUMMY)];

/// Edits of the table made at run time, in the order they were made: `Some` adds an id or replaces a
/// built-in card, `None` hides an id.
struct Edits(Vec<(&'static str, Option<&'static ModelCard>)>);

impl Edits {
    /// Records the card of `model_id` (`None`: hidden).
    fn set(&mut self, model_id: &str, card: Option<&'static ModelCard>) {
        match self.0.iter_mut().find(|(id, _)| *id == model_id) {
            Some(entry) => entry.1 = card,
            None => self.0.push((card.map_or_else(|| leak(model_id), |c| c.id), card)),
        }
    }

    /// The card of `model_id`: the edited one, else the built-in one.
    fn card(&self, model_id: &str) -> Option<&'static ModelCard> {
        match self.0.iter().find(|(id, _)| *id == model_id) {
            Some((_, card)) => *card,
            None => MODEL_CARDS.iter().find(|c| c.id == model_id),
        }
    }

    /// The built-in cards in their order (as edited, hidden ones left out), then the added ids in
    /// the order they were added.
    fn table(&self) -> Vec<&'static ModelCard> {
        let built_in = MODEL_CARDS.iter().filter_map(|card| self.card(card.id));
        let is_built_in = |id: &str| MODEL_CARDS.iter().any(|c| c.id == id);
        let added = self.0.iter().filter(|(id, _)| !is_built_in(id)).filter_map(|(_, card)| *card);
        built_in.chain(added).collect()
    }
}

static EDITS: RwLock<Edits> = RwLock::new(Edits(Vec::new()));

fn edits() -> std::sync::RwLockReadGuard<'static, Edits> {
    EDITS.read().unwrap_or_else(|e| e.into_inner())
}

fn edits_mut() -> std::sync::RwLockWriteGuard<'static, Edits> {
    EDITS.write().unwrap_or_else(|e| e.into_inner())
}

fn leak(text: &str) -> &'static str {
    Box::leak(text.to_string().into_boxed_str())
}

/// A card set at run time (see [`set_model_card`]), checked; it is never freed.
fn user_card(
    model_id: &str,
    layers: i32,
    repos: &[(String, String)],
    pretty_name: Option<&str>,
) -> Result<&'static ModelCard> {
    let invalid = |what: String| Err(Error::InvalidConfig(format!("model card '{model_id}': {what}")));
    if model_id.is_empty() {
        return Err(Error::InvalidConfig("a model card's id must not be empty".into()));
    }
    if layers < 1 {
        return invalid(format!("layers must be a positive number, not {layers}"));
    }
    if repos.is_empty() {
        return invalid("repo must name a repository for at least one engine class".into());
    }
    if let Some((class, _)) = repos.iter().find(|(class, repo)| class.is_empty() || repo.is_empty()) {
        return invalid(format!(
            "repo has an empty engine class name or repository (engine class '{class}')"
        ));
    }
    let mut pairs: Vec<(&'static str, &'static str)> =
        repos.iter().map(|(class, repo)| (leak(class), leak(repo))).collect();
    fn listed(pairs: &[(&'static str, &'static str)], class: &str) -> Option<&'static str> {
        pairs.iter().find(|(c, _)| *c == class).map(|(_, repo)| *repo)
    }
    // A built-in id set again with its own repositories keeps its architecture.
    let architecture = MODEL_CARDS
        .iter()
        .find(|c| c.id == model_id)
        .filter(|built_in| repos.iter().all(|(_, repo)| built_in.repos.iter().any(|(_, r)| r == repo)))
        .and_then(|built_in| built_in.architecture);
    let candle_runs = architecture.is_none_or(|a| MODEL_TYPES.contains(&a));
    if candle_runs && listed(&pairs, CANDLE).is_none() {
        if let Some(repo) = listed(&pairs, MLX).or_else(|| listed(&pairs, TINYGRAD)) {
            pairs.push((CANDLE, repo));
        }
    }
    Ok(Box::leak(Box::new(ModelCard {
        id: leak(model_id),
        layers,
        pretty_name: pretty_name.map(leak),
        architecture,
        repos: Box::leak(pairs.into_boxed_slice()),
        rkllm_name: None,
    })))
}

/// Adds `model_id` to the table, or replaces its card (a built-in one included), as classic's
/// `model_cards[model_id] = {"layers": layers, "repo": repos}` does. `repos` are (engine class name,
/// repository) pairs; class names the registry does not know are kept, as classic keeps them. Without
/// a `CandleInferenceEngine` repository, the candle engine loads the MLX one (else tinygrad's), as
/// for built-in cards; the weights' `config.json` decides the architecture. A card is never freed
/// (the table hands out `&'static` cards), so edits are meant to be few, made before the node starts.
pub fn set_model_card(
    model_id: &str,
    layers: i32,
    repos: &[(String, String)],
    pretty_name: Option<&str>,
) -> Result<()> {
    let card = user_card(model_id, layers, repos, pretty_name)?;
    edits_mut().set(model_id, Some(card));
    Ok(())
}

/// Removes `model_id` from the table (classic's `del model_cards[model_id]`), a built-in id
/// included; false when the table did not have it.
pub fn remove_model_card(model_id: &str) -> bool {
    let mut edits = edits_mut();
    let present = edits.card(model_id).is_some();
    if present {
        edits.set(model_id, None);
    }
    present
}

/// Drops every edit made at run time: the table is the built-in one again.
pub fn reset_model_cards() {
    edits_mut().0.clear();
}

/// The registry entry of `model_id`: the one set at run time, else the built-in one.
pub fn model_card(model_id: &str) -> Option<&'static ModelCard> {
    edits().card(model_id)
}

/// Every card of the table: the built-in ones in their order (as replaced at run time, removed ones
/// left out), then the ids added at run time in the order they were added.
pub fn model_table() -> Vec<&'static ModelCard> {
    edits().table()
}

/// The class name an engine name stands for (`candle` → `CandleInferenceEngine`); other names
/// are taken as class names already.
pub fn engine_class(name: &str) -> &str {
    ENGINE_CLASSES.iter().find(|(short, _)| *short == name).map_or(name, |(_, class)| class)
}

/// Whether `part` may be one part of a repo id or of a path in a repository.
fn is_name_part(part: &str) -> bool {
    !part.is_empty()
        && !part.starts_with(['.', '-'])
        && !part.contains("..")
        && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Whether `id` has the shape of a Hugging Face repo id (`org/name`).
pub fn is_hub_repo_id(id: &str) -> bool {
    let Some((org, name)) = id.split_once('/') else { return false };
    is_name_part(org) && is_name_part(name)
}

/// The repository and file of a GGUF model id on the hub, `org/name/path/file.gguf` (a split
/// GGUF by its first part, `-00001-of-0000N.gguf`): `("org/name", "path/file.gguf")`.
pub fn hub_gguf_file(id: &str) -> Option<(&str, &str)> {
    let (org, rest) = id.split_once('/')?;
    let (name, path) = rest.split_once('/')?;
    let repo = &id[..org.len() + 1 + name.len()];
    let is_gguf = path.len() > ".gguf".len() && path.to_ascii_lowercase().ends_with(".gguf");
    (is_hub_repo_id(repo) && is_gguf && path.split('/').all(is_name_part)).then_some((repo, path))
}

pub use crate::engine::is_local_model;

/// A model's name on the RKLLAMA server: the registry's; for a card added at run time, the last
/// part of its RKLLM repository; for a model id the registry does not list (a repo id or a
/// directory), the last part of the id.
pub fn rkllm_server_name(model_id: &str) -> Result<String> {
    let last_part = |id: &str| id.trim_end_matches('/').rsplit('/').next().unwrap_or(id).to_string();
    match model_card(model_id) {
        Some(card) => {
            card.rkllm_name.map(str::to_string).or_else(|| card.repo(RKLLM).map(last_part)).ok_or_else(|| {
                Error::InvalidModel(format!(
                    "The model '{model_id}' has no RKLLM build; the rkllm engine runs the -rkllm ids"
                ))
            })
        }
        None => Ok(last_part(model_id)),
    }
}

/// Whether an engine class loads models from repositories (so takes any repo id); RKLLM takes
/// its tokenizer from one, and the repository's or directory's name is the model's on the server.
fn engine_takes_repos(engine_class: &str) -> bool {
    matches!(engine_class, CANDLE | MLX | TINYGRAD | TORCH | RKLLM)
}

/// The repository of `model_id` for `engine_class` (classic's `get_repo`): the registry's, or
/// `model_id` itself when it is a local model directory or a Hugging Face repo id and the
/// engine loads repositories.
pub fn get_repo(model_id: &str, engine_class: &str) -> Option<String> {
    if let Some(card) = model_card(model_id) {
        return card.repo(engine_class).map(str::to_string);
    }
    let takes_id = is_local_model(model_id) || is_hub_repo_id(model_id) || hub_gguf_file(model_id).is_some();
    (takes_id && engine_takes_repos(engine_class)).then(|| model_id.to_string())
}

/// An engine as messages name it: `the candle engine (CandleInferenceEngine)`.
fn engine_label(engine_class: &str) -> String {
    match ENGINE_CLASSES.iter().find(|(_, class)| *class == engine_class) {
        Some((short, class)) => format!("the {short} engine ({class})"),
        None => format!("the engine {engine_class}"),
    }
}

/// Why `model_id` names no repository for engine class `class`, in a sentence that names both.
fn missing_repo_reason(model_id: &str, class: &str) -> String {
    let label = engine_label(class);
    let Some(card) = model_card(model_id) else {
        if !engine_takes_repos(class) {
            return format!("The model '{model_id}' is not one of the registry's models for {label}.");
        }
        return format!(
            "The model '{model_id}' does not exist for {label}: it is neither a registry id, a Hugging Face \
             repo id (org/name), a GGUF file in one (org/name/file.gguf) nor a local model directory or GGUF file."
        );
    };
    if let Some(architecture) = card.architecture.filter(|a| class == CANDLE && !MODEL_TYPES.contains(a)) {
        let runs = MODEL_TYPES.join(", ");
        return format!(
            "The model '{model_id}' is a {architecture} model, and {label} runs only {runs} models."
        );
    }
    format!("The model '{model_id}' has no repository for {label}.")
}

/// Why `model_id` names nothing `engine` (a name or class name) can load, in a sentence that
/// names the model and the engine; `None` when [`get_repo`] finds it a repository.
pub fn unavailable_reason(model_id: &str, engine: &str) -> Option<String> {
    let class = engine_class(engine);
    get_repo(model_id, class).is_none().then(|| missing_repo_reason(model_id, class))
}

/// [`get_repo`] for an engine name or class name, or an [`Error::InvalidModel`] saying why
/// there is none.
pub fn require_repo(model_id: &str, engine: &str) -> Result<String> {
    let class = engine_class(engine);
    get_repo(model_id, class).ok_or_else(|| Error::InvalidModel(missing_repo_reason(model_id, class)))
}

/// The display name of a registry model.
pub fn get_pretty_name(model_id: &str) -> Option<&'static str> {
    model_card(model_id).and_then(|c| c.pretty_name)
}

/// The registry's models that, for every list in `engine_lists`, have a repository for at
/// least one engine of that list (names or class names); all models when no list is given.
pub fn get_supported_models(engine_lists: &[Vec<String>]) -> Vec<&'static str> {
    let has_any =
        |card: &ModelCard, list: &[String]| list.iter().any(|e| card.repo(engine_class(e)).is_some());
    model_table()
        .into_iter()
        .filter(|card| engine_lists.iter().all(|list| has_any(card, list)))
        .map(|card| card.id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rkllm_server_names_come_from_the_registry() {
        assert_eq!(rkllm_server_name("deepseek-r1-1.5b-rkllm").unwrap(), "DeepSeek-R1-1.5B");
        assert_eq!(rkllm_server_name("qwen2.5-1.5b-instruct-rkllm").unwrap(), "Qwen2.5-1.5B-Instruct");
        assert!(rkllm_server_name("llama-3.2-1b").is_err());
        assert_eq!(rkllm_server_name("Qwen/My-Model").unwrap(), "My-Model");
    }

    #[test]
    fn registry_ids_are_unique_and_every_model_has_layers() {
        let mut ids: Vec<_> = MODEL_CARDS.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        let before = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), before);
        assert!(MODEL_CARDS.iter().all(|c| c.layers > 0 && !c.repos.is_empty()));
    }

    #[test]
    fn candle_loads_classic_mlx_weights_of_every_architecture_it_runs() {
        for card in MODEL_CARDS {
            let (candle, mlx) = (card.repo(CANDLE), card.repo(MLX));
            if card.rkllm_name.is_some() {
                // An RKLLM build's weights are `.rkllm` files on its server: only the rkllm engine runs it.
                assert_eq!((candle, mlx), (None, None), "{}", card.id);
            } else if card.architecture.is_some_and(|a| MODEL_TYPES.contains(&a)) {
                assert!(candle.is_some() && candle == mlx, "{}: candle {candle:?}, mlx {mlx:?}", card.id);
            } else {
                assert_eq!(candle, None, "{}", card.id);
            }
        }
    }

    #[test]
    fn an_id_picks_the_same_weights_as_in_classic() {
        let repo = |id| get_repo(id, CANDLE);
        assert_eq!(repo("llama-3.2-1b").as_deref(), Some("mlx-community/Llama-3.2-1B-Instruct-4bit"));
        assert_eq!(repo("llama-3.2-1b-8bit").as_deref(), Some("mlx-community/Llama-3.2-1B-Instruct-8bit"));
        assert_eq!(repo("llama-3.2-3b-bf16").as_deref(), Some("mlx-community/Llama-3.2-3B-Instruct"));
        assert_eq!(
            repo("deepseek-r1-distill-qwen-7b-3bit").as_deref(),
            Some("mlx-community/DeepSeek-R1-Distill-Qwen-7B-3bit")
        );
        assert_eq!(repo("qwen-3-0.6b").as_deref(), Some("mlx-community/Qwen3-0.6B-4bit"));
        assert_eq!(get_repo("llama-3.2-1b-8bit", TINYGRAD).as_deref(), Some("unsloth/Llama-3.2-1B-Instruct"));
        assert_eq!(get_repo("llama-3.2-1b", TORCH).as_deref(), Some("unsloth/Llama-3.2-1B-Instruct"));
        assert!(get_supported_models(&[vec![TORCH.to_string()]]).contains(&"llama-3.2-3b"));
    }

    #[test]
    fn an_id_the_engine_cannot_load_is_explained_by_id_and_engine() {
        assert_eq!(unavailable_reason("llama-3.2-1b-8bit", "candle"), None);
        assert_eq!(unavailable_reason("org/model", CANDLE), None);
        let reason = unavailable_reason("deepseek-v3", "candle").unwrap();
        assert_eq!(
            reason,
            "The model 'deepseek-v3' is a deepseek_v3 model, and the candle engine (CandleInferenceEngine) runs \
             only llama, mistral, qwen2, qwen3, phi3, qwen3_moe, mixtral, gemma2, gemma3_text, deepseek_v2, \
             llava models."
        );
        let reason = unavailable_reason("no-such-model", CANDLE).unwrap();
        assert!(
            reason.starts_with("The model 'no-such-model' does not exist for the candle engine"),
            "{reason}"
        );
        let reason = unavailable_reason("llama-3.2-1b", DUMMY).unwrap();
        assert_eq!(
            reason,
            "The model 'llama-3.2-1b' has no repository for the dummy engine (DummyInferenceEngine)."
        );
        let err = require_repo("stable-diffusion-2-1-base", "candle").unwrap_err();
        assert!(
            matches!(&err, Error::InvalidModel(m) if m.contains("'stable-diffusion-2-1-base' is a stable_diffusion model")),
            "{err}"
        );
        assert_eq!(require_repo("dummy", "dummy").unwrap(), "dummy");
    }

    #[test]
    fn repos_follow_the_engine_class() {
        assert_eq!(
            get_repo("llama-3.2-1b", MLX).as_deref(),
            Some("mlx-community/Llama-3.2-1B-Instruct-4bit")
        );
        assert_eq!(get_repo("dummy", DUMMY).as_deref(), Some("dummy"));
        assert_eq!(get_repo("dummy", CANDLE), None);
        assert_eq!(get_repo("deepseek-v3", CANDLE), None);
        assert_eq!(get_pretty_name("llama-3.1-8b"), Some("Llama 3.1 8B"));
        assert_eq!(get_pretty_name("nope"), None);
    }

    #[test]
    fn hub_repo_ids_and_local_directories_need_no_registry_entry() {
        assert_eq!(get_repo("org/some-model_1.5", CANDLE).as_deref(), Some("org/some-model_1.5"));
        assert_eq!(get_repo("org/some-model", DUMMY), None);
        for bad in ["org", "/abs", "a/b/c", "../x", "org/..", "org/na me", ""] {
            assert!(!is_hub_repo_id(bad), "{bad}");
        }
        assert_eq!(hub_gguf_file("org/m-GGUF/m-Q4_K_M.gguf"), Some(("org/m-GGUF", "m-Q4_K_M.gguf")));
        assert_eq!(
            hub_gguf_file("org/m/Q8_0/m-00001-of-00002.gguf"),
            Some(("org/m", "Q8_0/m-00001-of-00002.gguf"))
        );
        assert_eq!(get_repo("org/m/m.gguf", CANDLE).as_deref(), Some("org/m/m.gguf"));
        for bad in
            ["org/m", "org/m/m.bin", "org/m/.gguf", "org/m/../m.gguf", "org/m//m.gguf", "/org/m/m.gguf"]
        {
            assert!(hub_gguf_file(bad).is_none(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap().to_string();
        assert_eq!(get_repo(&path, CANDLE), None);
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        assert_eq!(get_repo(&path, CANDLE), Some(path));
    }

    #[test]
    fn supported_models_match_every_engine_list() {
        let all = get_supported_models(&[]);
        assert!(MODEL_CARDS.iter().all(|card| all.contains(&card.id)));
        let candle = get_supported_models(&[vec!["candle".into()]]);
        assert!(candle.contains(&"llama-3.2-1b") && candle.contains(&"llama-3.1-405b-8bit"));
        assert!(candle.contains(&"phi-3.5-mini") && candle.contains(&"phi-4"));
        assert!(candle.contains(&"gemma2-9b") && candle.contains(&"gemma2-27b"));
        assert!(candle.contains(&"deepseek-coder-v2-lite") && candle.contains(&"deepseek-coder-v2.5"));
        assert!(candle.contains(&"llava-1.5-7b-hf"));
        for other in ["deepseek-v3", "deepseek-r1", "dummy"] {
            assert!(!candle.contains(&other), "{other}");
        }
        let both = get_supported_models(&[vec!["candle".into()], vec![MLX.into()]]);
        assert!(both.contains(&"qwen-2.5-7b") && !both.contains(&"dummy"));
        assert_eq!(get_supported_models(&[vec!["dummy".into()]]), ["dummy"]);
        assert!(get_supported_models(&[vec!["unknown".into()]]).is_empty());
    }

    fn repos(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(class, repo)| (class.to_string(), repo.to_string())).collect()
    }

    #[test]
    fn a_malformed_card_is_refused_naming_the_id_and_the_field() {
        let message = |id, layers, pairs: &[(&str, &str)]| match user_card(id, layers, &repos(pairs), None) {
            Err(Error::InvalidConfig(m)) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            message("m", 0, &[(MLX, "org/m")]),
            "model card 'm': layers must be a positive number, not 0"
        );
        assert!(message("m", 4, &[]).starts_with("model card 'm': repo must name"));
        assert!(message("m", 4, &[(MLX, "")]).contains("engine class 'MLXDynamicShardInferenceEngine'"));
        assert!(message("", 4, &[(MLX, "org/m")]).contains("id must not be empty"));
    }

    #[test]
    fn a_card_set_at_run_time_gives_candle_the_mlx_or_tinygrad_repository() {
        let card =
            user_card("m", 4, &repos(&[(TINYGRAD, "org/full"), (MLX, "org/4bit")]), Some("M")).unwrap();
        assert_eq!(
            (card.repo(CANDLE), card.repo(TORCH), card.pretty_name),
            (Some("org/4bit"), Some("org/full"), Some("M"))
        );
        assert_eq!(card.architecture, None);
        let card = user_card("m", 4, &repos(&[(TINYGRAD, "org/full")]), None).unwrap();
        assert_eq!(card.repo(CANDLE), Some("org/full"));
        let card =
            user_card("m", 4, &repos(&[(CANDLE, "org/c"), (MLX, "org/4bit"), ("MyEngine", "x")]), None)
                .unwrap();
        assert_eq!((card.repo(CANDLE), card.repo("MyEngine")), (Some("org/c"), Some("x")));
        assert_eq!(user_card("m", 4, &repos(&[(DUMMY, "dummy")]), None).unwrap().repo(CANDLE), None);
        let deepseek = repos(&[(MLX, "mlx-community/DeepSeek-V3-4bit")]);
        let card = user_card("deepseek-v3", 61, &deepseek, Some("DS")).unwrap();
        assert_eq!((card.architecture, card.repo(CANDLE)), (Some("deepseek_v3"), None));
        let card = user_card("deepseek-v3", 61, &repos(&[(MLX, "org/elsewhere")]), None).unwrap();
        assert_eq!((card.architecture, card.repo(CANDLE)), (None, Some("org/elsewhere")));
    }

    #[test]
    fn edits_add_replace_and_hide_ids() {
        let mut edits = Edits(Vec::new());
        let added = user_card("my-model", 4, &repos(&[(MLX, "org/my")]), None).unwrap();
        let replaced = user_card("llama-3.2-1b", 20, &repos(&[(CANDLE, "org/other")]), None).unwrap();
        edits.set("my-model", Some(added));
        edits.set("llama-3.2-1b", Some(replaced));
        edits.set("deepseek-v3", None);
        assert_eq!(edits.card("my-model").map(|c| c.layers), Some(4));
        assert_eq!(edits.card("llama-3.2-1b").and_then(|c| c.repo(CANDLE)), Some("org/other"));
        assert_eq!(edits.card("llama-3.2-1b").and_then(|c| c.repo(MLX)), None);
        assert_eq!(edits.card("deepseek-v3"), None);
        assert_eq!(edits.card("llama-3.2-3b").map(|c| c.layers), Some(28));
        let ids: Vec<&str> = edits.table().iter().map(|c| c.id).collect();
        assert_eq!(ids.len(), MODEL_CARDS.len());
        assert_eq!(ids.last(), Some(&"my-model"));
        assert_eq!(ids.iter().position(|id| *id == "llama-3.2-1b"), Some(1));
        assert!(!ids.contains(&"deepseek-v3"));
        edits.set("my-model", None);
        edits.set("deepseek-v3", Some(MODEL_CARDS.iter().find(|c| c.id == "deepseek-v3").unwrap()));
        let ids: Vec<&str> = edits.table().iter().map(|c| c.id).collect();
        assert!(!ids.contains(&"my-model") && ids.contains(&"deepseek-v3"));
    }

    #[test]
    fn the_registry_consults_cards_set_at_run_time() {
        let id = "test-run-time-card";
        set_model_card(id, 6, &repos(&[(MLX, "org/run-time-4bit")]), Some("Run Time")).unwrap();
        assert_eq!(get_repo(id, CANDLE).as_deref(), Some("org/run-time-4bit"));
        assert_eq!(unavailable_reason(id, "candle"), None);
        assert_eq!(get_pretty_name(id), Some("Run Time"));
        assert!(get_supported_models(&[vec!["candle".into()]]).contains(&id));
        assert!(!get_supported_models(&[vec!["dummy".into()]]).contains(&id));
        assert!(matches!(set_model_card(id, -1, &repos(&[(MLX, "x")]), None), Err(Error::InvalidConfig(_))));
        assert_eq!(model_card(id).map(|c| c.layers), Some(6));
        assert!(remove_model_card(id));
        assert!(!remove_model_card(id));
        assert_eq!(get_repo(id, CANDLE), None);
        assert!(unavailable_reason(id, "candle").unwrap().contains("does not exist"));
    }

    #[test]
    fn a_card_added_for_rkllm_takes_its_server_name_from_its_repository() {
        let id = "test-run-time-rkllm-card";
        set_model_card(id, 4, &repos(&[(RKLLM, "/boards/models/My-Npu-Model/")]), None).unwrap();
        assert_eq!(rkllm_server_name(id).unwrap(), "My-Npu-Model");
        assert_eq!(get_repo(id, CANDLE), None);
        assert!(remove_model_card(id));
    }
}
