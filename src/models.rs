//! The model registry (exo classic's `model_cards`): model id → number of layers, a repository
//! per inference engine class, a pretty name. Hugging Face repo ids (`org/name`) and local
//! model directories work beside the registry without being listed in it.

/// Engine class name of the candle engine.
pub const CANDLE: &str = "CandleInferenceEngine";
/// Engine class name of exo classic's MLX engine.
pub const MLX: &str = "MLXDynamicShardInferenceEngine";
/// Engine class name of exo classic's tinygrad engine.
pub const TINYGRAD: &str = "TinygradDynamicShardInferenceEngine";
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
    /// (engine class name, repository) pairs.
    pub repos: &'static [(&'static str, &'static str)],
}

const fn card(
    id: &'static str,
    layers: i32,
    pretty_name: Option<&'static str>,
    repos: &'static [(&'static str, &'static str)],
) -> ModelCard {
    ModelCard { id, layers, pretty_name, repos }
}

/// Every registry entry, in exo classic's order (Mistral 7B and Qwen 3 added). Candle uses
/// the safetensors repositories classic gave tinygrad, and the official repositories of the
/// Qwen, DeepSeek distill, Nemotron and Mistral models. `qwen-2.5-0.5b` has the 24 layers of
/// its config (classic listed 28).
pub static MODEL_CARDS: &[ModelCard] = &[
    card(
        "llama-3.3-70b",
        80,
        Some("Llama 3.3 70B"),
        &[
            (CANDLE, "unsloth/Llama-3.3-70B-Instruct"),
            (MLX, "mlx-community/Llama-3.3-70B-Instruct-4bit"),
            (TINYGRAD, "unsloth/Llama-3.3-70B-Instruct"),
        ],
    ),
    card(
        "llama-3.2-1b",
        16,
        Some("Llama 3.2 1B"),
        &[
            (CANDLE, "unsloth/Llama-3.2-1B-Instruct"),
            (MLX, "mlx-community/Llama-3.2-1B-Instruct-4bit"),
            (TINYGRAD, "unsloth/Llama-3.2-1B-Instruct"),
        ],
    ),
    card(
        "llama-3.2-1b-8bit",
        16,
        Some("Llama 3.2 1B (8-bit)"),
        &[
            (CANDLE, "unsloth/Llama-3.2-1B-Instruct"),
            (MLX, "mlx-community/Llama-3.2-1B-Instruct-8bit"),
            (TINYGRAD, "unsloth/Llama-3.2-1B-Instruct"),
        ],
    ),
    card(
        "llama-3.2-3b",
        28,
        Some("Llama 3.2 3B"),
        &[
            (CANDLE, "unsloth/Llama-3.2-3B-Instruct"),
            (MLX, "mlx-community/Llama-3.2-3B-Instruct-4bit"),
            (TINYGRAD, "unsloth/Llama-3.2-3B-Instruct"),
        ],
    ),
    card(
        "llama-3.2-3b-8bit",
        28,
        Some("Llama 3.2 3B (8-bit)"),
        &[
            (CANDLE, "unsloth/Llama-3.2-3B-Instruct"),
            (MLX, "mlx-community/Llama-3.2-3B-Instruct-8bit"),
            (TINYGRAD, "unsloth/Llama-3.2-3B-Instruct"),
        ],
    ),
    card(
        "llama-3.2-3b-bf16",
        28,
        Some("Llama 3.2 3B (BF16)"),
        &[
            (CANDLE, "unsloth/Llama-3.2-3B-Instruct"),
            (MLX, "mlx-community/Llama-3.2-3B-Instruct"),
            (TINYGRAD, "unsloth/Llama-3.2-3B-Instruct"),
        ],
    ),
    card(
        "llama-3.1-8b",
        32,
        Some("Llama 3.1 8B"),
        &[
            (CANDLE, "mlabonne/Meta-Llama-3.1-8B-Instruct-abliterated"),
            (MLX, "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit"),
            (TINYGRAD, "mlabonne/Meta-Llama-3.1-8B-Instruct-abliterated"),
        ],
    ),
    card(
        "llama-3.1-70b",
        80,
        Some("Llama 3.1 70B"),
        &[
            (CANDLE, "NousResearch/Meta-Llama-3.1-70B-Instruct"),
            (MLX, "mlx-community/Meta-Llama-3.1-70B-Instruct-4bit"),
            (TINYGRAD, "NousResearch/Meta-Llama-3.1-70B-Instruct"),
        ],
    ),
    card(
        "llama-3.1-70b-bf16",
        80,
        Some("Llama 3.1 70B (BF16)"),
        &[
            (CANDLE, "NousResearch/Meta-Llama-3.1-70B-Instruct"),
            (MLX, "mlx-community/Meta-Llama-3.1-70B-Instruct-bf16-CORRECTED"),
            (TINYGRAD, "NousResearch/Meta-Llama-3.1-70B-Instruct"),
        ],
    ),
    card(
        "llama-3-8b",
        32,
        Some("Llama 3 8B"),
        &[
            (CANDLE, "TriAiExperiments/SFR-Iterative-DPO-LLaMA-3-8B-R"),
            (MLX, "mlx-community/Meta-Llama-3-8B-Instruct-4bit"),
            (TINYGRAD, "TriAiExperiments/SFR-Iterative-DPO-LLaMA-3-8B-R"),
        ],
    ),
    card(
        "llama-3-70b",
        80,
        Some("Llama 3 70B"),
        &[
            (CANDLE, "TriAiExperiments/SFR-Iterative-DPO-LLaMA-3-70B-R"),
            (MLX, "mlx-community/Meta-Llama-3-70B-Instruct-4bit"),
            (TINYGRAD, "TriAiExperiments/SFR-Iterative-DPO-LLaMA-3-70B-R"),
        ],
    ),
    card("llama-3.1-405b", 126, Some("Llama 3.1 405B"), &[(MLX, "mlx-community/Meta-Llama-3.1-405B-4bit")]),
    card(
        "llama-3.1-405b-8bit",
        126,
        Some("Llama 3.1 405B (8-bit)"),
        &[(MLX, "mlx-community/Meta-Llama-3.1-405B-Instruct-8bit")],
    ),
    card(
        "mistral-nemo",
        40,
        Some("Mistral Nemo"),
        &[
            (CANDLE, "unsloth/Mistral-Nemo-Instruct-2407"),
            (MLX, "mlx-community/Mistral-Nemo-Instruct-2407-4bit"),
        ],
    ),
    card(
        "mistral-large",
        88,
        Some("Mistral Large"),
        &[
            (CANDLE, "mistralai/Mistral-Large-Instruct-2407"),
            (MLX, "mlx-community/Mistral-Large-Instruct-2407-4bit"),
        ],
    ),
    card(
        "mistral-7b",
        32,
        Some("Mistral 7B"),
        &[(MLX, "mlx-community/Mistral-7B-Instruct-v0.3-4bit"), (CANDLE, "unsloth/mistral-7b-instruct-v0.3")],
    ),
    card(
        "deepseek-coder-v2-lite",
        27,
        Some("Deepseek Coder V2 Lite"),
        &[(MLX, "mlx-community/DeepSeek-Coder-V2-Lite-Instruct-4bit-mlx")],
    ),
    card(
        "deepseek-coder-v2.5",
        60,
        Some("Deepseek Coder V2.5"),
        &[(MLX, "mlx-community/DeepSeek-V2.5-MLX-AQ4_1_64")],
    ),
    card("deepseek-v3", 61, Some("Deepseek V3 (4-bit)"), &[(MLX, "mlx-community/DeepSeek-V3-4bit")]),
    card("deepseek-v3-3bit", 61, Some("Deepseek V3 (3-bit)"), &[(MLX, "mlx-community/DeepSeek-V3-3bit")]),
    card("deepseek-r1", 61, Some("Deepseek R1 (4-bit)"), &[(MLX, "mlx-community/DeepSeek-R1-4bit")]),
    card("deepseek-r1-3bit", 61, Some("Deepseek R1 (3-bit)"), &[(MLX, "mlx-community/DeepSeek-R1-3bit")]),
    card(
        "deepseek-r1-distill-qwen-1.5b",
        28,
        Some("DeepSeek R1 Distill Qwen 1.5B"),
        &[
            (CANDLE, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
            (MLX, "mlx-community/deepseek-r1-distill-qwen-1.5b"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-1.5b-3bit",
        28,
        Some("DeepSeek R1 Distill Qwen 1.5B (3-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-1.5B-3bit")],
    ),
    card(
        "deepseek-r1-distill-qwen-1.5b-6bit",
        28,
        Some("DeepSeek R1 Distill Qwen 1.5B (6-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-1.5B-6bit")],
    ),
    card(
        "deepseek-r1-distill-qwen-1.5b-8bit",
        28,
        Some("DeepSeek R1 Distill Qwen 1.5B (8-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-1.5B-8bit")],
    ),
    card(
        "deepseek-r1-distill-qwen-1.5b-bf16",
        28,
        Some("DeepSeek R1 Distill Qwen 1.5B (BF16)"),
        &[
            (CANDLE, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-1.5B-bf16"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-7b",
        28,
        Some("DeepSeek R1 Distill Qwen 7B"),
        &[
            (CANDLE, "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-4bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-7b-3bit",
        28,
        Some("DeepSeek R1 Distill Qwen 7B (3-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-3bit")],
    ),
    card(
        "deepseek-r1-distill-qwen-7b-6bit",
        28,
        Some("DeepSeek R1 Distill Qwen 7B (6-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-6bit")],
    ),
    card(
        "deepseek-r1-distill-qwen-7b-8bit",
        28,
        Some("DeepSeek R1 Distill Qwen 7B (8-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-8bit")],
    ),
    card(
        "deepseek-r1-distill-qwen-7b-bf16",
        28,
        Some("DeepSeek R1 Distill Qwen 7B (BF16)"),
        &[
            (CANDLE, "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-7B-bf16"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-14b",
        48,
        Some("DeepSeek R1 Distill Qwen 14B"),
        &[
            (CANDLE, "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-4bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-14b-3bit",
        48,
        Some("DeepSeek R1 Distill Qwen 14B (3-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-3bit")],
    ),
    card(
        "deepseek-r1-distill-qwen-14b-6bit",
        48,
        Some("DeepSeek R1 Distill Qwen 14B (6-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-6bit")],
    ),
    card(
        "deepseek-r1-distill-qwen-14b-8bit",
        48,
        Some("DeepSeek R1 Distill Qwen 14B (8-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-8bit")],
    ),
    card(
        "deepseek-r1-distill-qwen-14b-bf16",
        48,
        Some("DeepSeek R1 Distill Qwen 14B (BF16)"),
        &[
            (CANDLE, "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-14B-bf16"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-32b",
        64,
        Some("DeepSeek R1 Distill Qwen 32B"),
        &[
            (CANDLE, "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-4bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-qwen-32b-3bit",
        64,
        Some("DeepSeek R1 Distill Qwen 32B (3-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-3bit")],
    ),
    card(
        "deepseek-r1-distill-qwen-32b-6bit",
        64,
        Some("DeepSeek R1 Distill Qwen 32B (6-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-6bit")],
    ),
    card(
        "deepseek-r1-distill-qwen-32b-8bit",
        64,
        Some("DeepSeek R1 Distill Qwen 32B (8-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-MLX-8Bit")],
    ),
    card(
        "deepseek-r1-distill-qwen-32b-bf16",
        64,
        Some("DeepSeek R1 Distill Qwen 32B (BF16)"),
        &[
            (CANDLE, "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Qwen-32B-bf16"),
        ],
    ),
    card(
        "deepseek-r1-distill-llama-8b",
        32,
        Some("DeepSeek R1 Distill Llama 8B"),
        &[
            (CANDLE, "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Llama-8B-4bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-llama-8b-3bit",
        32,
        Some("DeepSeek R1 Distill Llama 8B (3-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Llama-8B-3bit")],
    ),
    card(
        "deepseek-r1-distill-llama-8b-6bit",
        32,
        Some("DeepSeek R1 Distill Llama 8B (6-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Llama-8B-6bit")],
    ),
    card(
        "deepseek-r1-distill-llama-8b-8bit",
        32,
        Some("DeepSeek R1 Distill Llama 8B (8-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Llama-8B-8bit")],
    ),
    card(
        "deepseek-r1-distill-llama-8b-bf16",
        32,
        Some("DeepSeek R1 Distill Llama 8B (BF16)"),
        &[
            (CANDLE, "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Llama-8B-bf16"),
        ],
    ),
    card(
        "deepseek-r1-distill-llama-70b",
        80,
        Some("DeepSeek R1 Distill Llama 70B"),
        &[
            (CANDLE, "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"),
            (MLX, "mlx-community/DeepSeek-R1-Distill-Llama-70B-4bit"),
        ],
    ),
    card(
        "deepseek-r1-distill-llama-70b-3bit",
        80,
        Some("DeepSeek R1 Distill Llama 70B (3-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Llama-70B-3bit")],
    ),
    card(
        "deepseek-r1-distill-llama-70b-6bit",
        80,
        Some("DeepSeek R1 Distill Llama 70B (6-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Llama-70B-6bit")],
    ),
    card(
        "deepseek-r1-distill-llama-70b-8bit",
        80,
        Some("DeepSeek R1 Distill Llama 70B (8-bit)"),
        &[(MLX, "mlx-community/DeepSeek-R1-Distill-Llama-70B-8bit")],
    ),
    card("llava-1.5-7b-hf", 32, Some("LLaVa 1.5 7B (Vision Model)"), &[(MLX, "llava-hf/llava-1.5-7b-hf")]),
    card(
        "qwen-2.5-0.5b",
        24,
        Some("Qwen 2.5 0.5B"),
        &[(CANDLE, "Qwen/Qwen2.5-0.5B-Instruct"), (MLX, "mlx-community/Qwen2.5-0.5B-Instruct-4bit")],
    ),
    card(
        "qwen-2.5-1.5b",
        28,
        Some("Qwen 2.5 1.5B"),
        &[(CANDLE, "Qwen/Qwen2.5-1.5B-Instruct"), (MLX, "mlx-community/Qwen2.5-1.5B-Instruct-4bit")],
    ),
    card(
        "qwen-2.5-coder-1.5b",
        28,
        Some("Qwen 2.5 Coder 1.5B"),
        &[
            (CANDLE, "Qwen/Qwen2.5-Coder-1.5B-Instruct"),
            (MLX, "mlx-community/Qwen2.5-Coder-1.5B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-3b",
        36,
        Some("Qwen 2.5 3B"),
        &[(CANDLE, "Qwen/Qwen2.5-3B-Instruct"), (MLX, "mlx-community/Qwen2.5-3B-Instruct-4bit")],
    ),
    card(
        "qwen-2.5-coder-3b",
        36,
        Some("Qwen 2.5 Coder 3B"),
        &[(CANDLE, "Qwen/Qwen2.5-Coder-3B-Instruct"), (MLX, "mlx-community/Qwen2.5-Coder-3B-Instruct-4bit")],
    ),
    card(
        "qwen-2.5-7b",
        28,
        Some("Qwen 2.5 7B"),
        &[(CANDLE, "Qwen/Qwen2.5-7B-Instruct"), (MLX, "mlx-community/Qwen2.5-7B-Instruct-4bit")],
    ),
    card(
        "qwen-2.5-coder-7b",
        28,
        Some("Qwen 2.5 Coder 7B"),
        &[(CANDLE, "Qwen/Qwen2.5-Coder-7B-Instruct"), (MLX, "mlx-community/Qwen2.5-Coder-7B-Instruct-4bit")],
    ),
    card(
        "qwen-2.5-math-7b",
        28,
        Some("Qwen 2.5 7B (Math)"),
        &[(CANDLE, "Qwen/Qwen2.5-Math-7B-Instruct"), (MLX, "mlx-community/Qwen2.5-Math-7B-Instruct-4bit")],
    ),
    card(
        "qwen-2.5-14b",
        48,
        Some("Qwen 2.5 14B"),
        &[(CANDLE, "Qwen/Qwen2.5-14B-Instruct"), (MLX, "mlx-community/Qwen2.5-14B-Instruct-4bit")],
    ),
    card(
        "qwen-2.5-coder-14b",
        48,
        Some("Qwen 2.5 Coder 14B"),
        &[
            (CANDLE, "Qwen/Qwen2.5-Coder-14B-Instruct"),
            (MLX, "mlx-community/Qwen2.5-Coder-14B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-32b",
        64,
        Some("Qwen 2.5 32B"),
        &[(CANDLE, "Qwen/Qwen2.5-32B-Instruct"), (MLX, "mlx-community/Qwen2.5-32B-Instruct-4bit")],
    ),
    card(
        "qwen-2.5-coder-32b",
        64,
        Some("Qwen 2.5 Coder 32B"),
        &[
            (CANDLE, "Qwen/Qwen2.5-Coder-32B-Instruct"),
            (MLX, "mlx-community/Qwen2.5-Coder-32B-Instruct-4bit"),
        ],
    ),
    card(
        "qwen-2.5-72b",
        80,
        Some("Qwen 2.5 72B"),
        &[(CANDLE, "Qwen/Qwen2.5-72B-Instruct"), (MLX, "mlx-community/Qwen2.5-72B-Instruct-4bit")],
    ),
    card(
        "qwen-2.5-math-72b",
        80,
        Some("Qwen 2.5 72B (Math)"),
        &[(CANDLE, "Qwen/Qwen2.5-Math-72B-Instruct"), (MLX, "mlx-community/Qwen2.5-Math-72B-Instruct-4bit")],
    ),
    card(
        "qwen-3-0.6b",
        28,
        Some("Qwen 3 0.6B"),
        &[(MLX, "mlx-community/Qwen3-0.6B-4bit"), (CANDLE, "Qwen/Qwen3-0.6B")],
    ),
    card(
        "qwen-3-1.7b",
        28,
        Some("Qwen 3 1.7B"),
        &[(MLX, "mlx-community/Qwen3-1.7B-4bit"), (CANDLE, "Qwen/Qwen3-1.7B")],
    ),
    card(
        "qwen-3-4b",
        36,
        Some("Qwen 3 4B"),
        &[(MLX, "mlx-community/Qwen3-4B-4bit"), (CANDLE, "Qwen/Qwen3-4B")],
    ),
    card(
        "qwen-3-8b",
        36,
        Some("Qwen 3 8B"),
        &[(MLX, "mlx-community/Qwen3-8B-4bit"), (CANDLE, "Qwen/Qwen3-8B")],
    ),
    card(
        "qwen-3-14b",
        40,
        Some("Qwen 3 14B"),
        &[(MLX, "mlx-community/Qwen3-14B-4bit"), (CANDLE, "Qwen/Qwen3-14B")],
    ),
    card(
        "qwen-3-32b",
        64,
        Some("Qwen 3 32B"),
        &[(MLX, "mlx-community/Qwen3-32B-4bit"), (CANDLE, "Qwen/Qwen3-32B")],
    ),
    card(
        "nemotron-70b",
        80,
        Some("Nemotron 70B"),
        &[
            (CANDLE, "nvidia/Llama-3.1-Nemotron-70B-Instruct-HF"),
            (MLX, "mlx-community/nvidia_Llama-3.1-Nemotron-70B-Instruct-HF_4bit"),
        ],
    ),
    card(
        "nemotron-70b-bf16",
        80,
        Some("Nemotron 70B (BF16)"),
        &[
            (CANDLE, "nvidia/Llama-3.1-Nemotron-70B-Instruct-HF"),
            (MLX, "mlx-community/Llama-3.1-Nemotron-70B-Instruct-HF-bf16"),
        ],
    ),
    card("gemma2-9b", 42, Some("Gemma2 9B"), &[(MLX, "mlx-community/gemma-2-9b-it-4bit")]),
    card("gemma2-27b", 46, Some("Gemma2 27B"), &[(MLX, "mlx-community/gemma-2-27b-it-4bit")]),
    card(
        "stable-diffusion-2-1-base",
        31,
        Some("Stable Diffusion 2.1"),
        &[(MLX, "stabilityai/stable-diffusion-2-1-base")],
    ),
    card("phi-3.5-mini", 32, Some("Phi-3.5 Mini"), &[(MLX, "mlx-community/Phi-3.5-mini-instruct-4bit")]),
    card("phi-4", 40, Some("Phi-4"), &[(MLX, "mlx-community/phi-4-4bit")]),
    card("dummy", 8, None, &[(DUMMY, "dummy")]),
];

/// Short engine names (`--inference-engine`) and the class names they stand for.
pub const ENGINE_CLASSES: &[(&str, &str)] =
    &[("candle", CANDLE), ("mlx", MLX), ("tinygrad", TINYGRAD), ("dummy", DUMMY)];

/// The registry entry of `model_id`.
pub fn model_card(model_id: &str) -> Option<&'static ModelCard> {
    MODEL_CARDS.iter().find(|c| c.id == model_id)
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

/// Whether an engine class loads weights from model repositories (so takes any repo id).
fn engine_takes_repos(engine_class: &str) -> bool {
    matches!(engine_class, CANDLE | MLX | TINYGRAD)
}

/// The repository of `model_id` for `engine_class` (classic's `get_repo`): the registry's, or
/// `model_id` itself when it is a local model directory or a Hugging Face repo id and the
/// engine loads repositories.
pub fn get_repo(model_id: &str, engine_class: &str) -> Option<String> {
    if let Some(card) = model_card(model_id) {
        return card.repos.iter().find(|(e, _)| *e == engine_class).map(|(_, r)| r.to_string());
    }
    let takes_id = is_local_model(model_id) || is_hub_repo_id(model_id) || hub_gguf_file(model_id).is_some();
    (takes_id && engine_takes_repos(engine_class)).then(|| model_id.to_string())
}

/// The display name of a registry model.
pub fn get_pretty_name(model_id: &str) -> Option<&'static str> {
    model_card(model_id).and_then(|c| c.pretty_name)
}

/// The registry's models that, for every list in `engine_lists`, have a repository for at
/// least one engine of that list (names or class names); all models when no list is given.
pub fn get_supported_models(engine_lists: &[Vec<String>]) -> Vec<&'static str> {
    let has_any = |card: &ModelCard, list: &[String]| {
        list.iter().any(|e| card.repos.iter().any(|(class, _)| *class == engine_class(e)))
    };
    MODEL_CARDS
        .iter()
        .filter(|card| engine_lists.iter().all(|list| has_any(card, list)))
        .map(|card| card.id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn repos_follow_the_engine_class() {
        assert_eq!(get_repo("llama-3.2-1b", CANDLE).as_deref(), Some("unsloth/Llama-3.2-1B-Instruct"));
        assert_eq!(
            get_repo("llama-3.2-1b", MLX).as_deref(),
            Some("mlx-community/Llama-3.2-1B-Instruct-4bit")
        );
        assert_eq!(get_repo("dummy", DUMMY).as_deref(), Some("dummy"));
        assert_eq!(get_repo("dummy", CANDLE), None);
        assert_eq!(get_repo("deepseek-v3", CANDLE), None);
        assert_eq!(get_repo("qwen-3-0.6b", CANDLE).as_deref(), Some("Qwen/Qwen3-0.6B"));
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
        assert_eq!(all.len(), MODEL_CARDS.len());
        let candle = get_supported_models(&[vec!["candle".into()]]);
        assert!(candle.contains(&"llama-3.2-1b") && !candle.contains(&"deepseek-v3"));
        let both = get_supported_models(&[vec!["candle".into()], vec![MLX.into()]]);
        assert!(both.contains(&"qwen-2.5-7b") && !both.contains(&"dummy"));
        assert_eq!(get_supported_models(&[vec!["dummy".into()]]), ["dummy"]);
        assert!(get_supported_models(&[vec!["unknown".into()]]).is_empty());
    }
}
