//! The GGUF name of each Hugging Face tensor name the engine asks for, as llama.cpp's converter
//! (gguf-py's tensor map) names them per architecture. Experts are named one at a time,
//! `blk.N.ffn_gate.E.weight` (the older converters' layout); [`super::gguf::GgufFile`] gives the
//! same name to each expert's slice of a stacked `blk.N.ffn_gate_exps.weight`.

/// Norms that llama.cpp's Gemma architectures name apart from Llama's: the attention's output
/// norm holds Hugging Face's `post_attention_layernorm`, and the MLP's input norm is `ffn_norm`.
fn gemma_norm(module: &str) -> Option<&'static str> {
    match module {
        "post_attention_layernorm" => Some("post_attention_norm"),
        "pre_feedforward_layernorm" => Some("ffn_norm"),
        "post_feedforward_layernorm" => Some("post_ffw_norm"),
        _ => None,
    }
}

/// The GGUF part of a layer's module name.
fn layer_part(module: &str) -> Option<&'static str> {
    Some(match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "self_attn.q_a_proj" => "attn_q_a",
        "self_attn.q_a_layernorm" => "attn_q_a_norm",
        "self_attn.q_b_proj" => "attn_q_b",
        "self_attn.kv_a_proj_with_mqa" => "attn_kv_a_mqa",
        "self_attn.kv_a_layernorm" => "attn_kv_a_norm",
        "self_attn.kv_b_proj" => "attn_kv_b",
        "self_attn.k_b_proj" => "attn_k_b",
        "self_attn.v_b_proj" => "attn_v_b",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" | "block_sparse_moe.gate" => "ffn_gate_inp",
        "mlp.shared_experts.gate_proj" => "ffn_gate_shexp",
        "mlp.shared_experts.up_proj" => "ffn_up_shexp",
        "mlp.shared_experts.down_proj" => "ffn_down_shexp",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    })
}

/// `(expert, part)` of an expert's module: `mlp.experts.E.gate_proj` (Qwen3-MoE, DeepSeek) or
/// `block_sparse_moe.experts.E.w1` (Mixtral's w1, w3, w2: gate, up, down).
fn expert_part(module: &str) -> Option<(usize, &'static str)> {
    let rest =
        module.strip_prefix("mlp.experts.").or_else(|| module.strip_prefix("block_sparse_moe.experts."))?;
    let (expert, projection) = rest.split_once('.')?;
    let part = match projection {
        "gate_proj" | "w1" => "ffn_gate",
        "up_proj" | "w3" => "ffn_up",
        "down_proj" | "w2" => "ffn_down",
        _ => return None,
    };
    Some((expert.parse().ok()?, part))
}

/// The GGUF name of the tensor `hf_name` in a file of llama.cpp's architecture `arch`; `None`
/// for names GGUF lacks.
pub fn gguf_name(hf_name: &str, arch: &str) -> Option<String> {
    let fixed = match hf_name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.into());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    if let Some((expert, part)) = expert_part(module) {
        return Some(format!("blk.{layer}.{part}.{expert}.{kind}"));
    }
    let gemma = arch.starts_with("gemma");
    let part = gemma.then(|| gemma_norm(module)).flatten().or_else(|| layer_part(module))?;
    Some(format!("blk.{layer}.{part}.{kind}"))
}

/// The stacked tensor that holds the expert tensor `name` (`blk.N.ffn_up.E.weight` →
/// `blk.N.ffn_up_exps.weight`); `None` for other names.
pub fn stacked_expert_name(name: &str) -> Option<String> {
    let (rest, kind) = name.rsplit_once('.')?;
    let (part, expert) = rest.rsplit_once('.')?;
    expert.parse::<usize>().ok()?;
    Some(format!("{part}_exps.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_translate_to_gguf() {
        let llama = |name| gguf_name(name, "llama").unwrap();
        assert_eq!(llama("model.layers.3.self_attn.q_proj.weight"), "blk.3.attn_q.weight");
        assert_eq!(llama("model.layers.0.self_attn.k_proj.bias"), "blk.0.attn_k.bias");
        assert_eq!(llama("model.layers.12.mlp.down_proj.weight"), "blk.12.ffn_down.weight");
        assert_eq!(llama("model.layers.1.post_attention_layernorm.weight"), "blk.1.ffn_norm.weight");
        assert_eq!(llama("lm_head.weight"), "output.weight");
        assert!(gguf_name("model.layers.1.mlp.experts.weight", "llama").is_none());
        assert!(gguf_name("model.layers.1.vision.weight", "llama").is_none());
    }

    #[test]
    fn gemma_names_its_four_norms() {
        let gemma = |name| gguf_name(name, "gemma2").unwrap();
        assert_eq!(gemma("model.layers.2.input_layernorm.weight"), "blk.2.attn_norm.weight");
        assert_eq!(
            gemma("model.layers.2.post_attention_layernorm.weight"),
            "blk.2.post_attention_norm.weight"
        );
        assert_eq!(gemma("model.layers.2.pre_feedforward_layernorm.weight"), "blk.2.ffn_norm.weight");
        assert_eq!(gemma("model.layers.2.post_feedforward_layernorm.weight"), "blk.2.post_ffw_norm.weight");
        assert_eq!(
            gguf_name("model.layers.0.self_attn.q_norm.weight", "gemma3").unwrap(),
            "blk.0.attn_q_norm.weight"
        );
    }

    #[test]
    fn fused_projections_and_experts_have_their_names() {
        let phi3 = |name| gguf_name(name, "phi3").unwrap();
        assert_eq!(phi3("model.layers.0.self_attn.qkv_proj.weight"), "blk.0.attn_qkv.weight");
        assert_eq!(phi3("model.layers.0.mlp.gate_up_proj.weight"), "blk.0.ffn_up.weight");
        let moe = |name| gguf_name(name, "qwen3moe").unwrap();
        assert_eq!(moe("model.layers.1.mlp.gate.weight"), "blk.1.ffn_gate_inp.weight");
        assert_eq!(moe("model.layers.1.mlp.experts.7.up_proj.weight"), "blk.1.ffn_up.7.weight");
        assert_eq!(
            gguf_name("model.layers.3.block_sparse_moe.experts.2.w2.weight", "llama").unwrap(),
            "blk.3.ffn_down.2.weight"
        );
        assert_eq!(
            gguf_name("model.layers.3.block_sparse_moe.gate.weight", "llama").unwrap(),
            "blk.3.ffn_gate_inp.weight"
        );
        assert_eq!(stacked_expert_name("blk.3.ffn_down.2.weight").unwrap(), "blk.3.ffn_down_exps.weight");
        assert!(stacked_expert_name("blk.3.ffn_down.weight").is_none());
    }
}
