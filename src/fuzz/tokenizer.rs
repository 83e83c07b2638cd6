//! A model directory's tokenizer files: `tokenizer.json` (a small BPE with fields bent),
//! `tokenizer_config.json` (special tokens, the chat template) and `generation_config.json`;
//! then encoding, decoding and rendering a chat with the template.

use proptest::prelude::*;

use super::{assert_clear, bent_object, json_value};
use crate::tokenizer::{ChatTemplate, Tokenizer};

fn tokenizer_json() -> impl Strategy<Value = serde_json::Value> {
    let model = serde_json::json!({"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "<s>": 3},
        "merges": ["a b"], "unk_token": null, "byte_fallback": false});
    let base = serde_json::json!({"version": "1.0", "added_tokens": [{"id": 3, "content": "<s>",
        "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null, "model": model});
    (bent_object(base), bent_object(model)).prop_map(|(mut tokenizer, model)| {
        if tokenizer.get("model").is_some() {
            tokenizer["model"] = model;
        }
        tokenizer
    })
}

/// A template assembled from pieces real templates use, broken ones among them.
fn template() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{{ bos_token }}"),
        Just("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}"),
        Just("{% if add_generation_prompt %}assistant:{% endif %}"),
        Just("{{ raise_exception('no system messages') }}"),
        Just("{{ strftime_now('%d %B %Y') }}"),
        Just("{{ strftime_now('%Q %') }}"),
        Just("{{ messages[0].content.split(' ') | join(',') }}"),
        Just("{{ messages | tojson }}"),
        Just("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"),
        Just("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"),
        Just("{{ messages[99] }}"),
        Just("{{ 1 / 0 }}"),
        Just("{% for %}"),
        Just("{{"),
    ];
    prop_oneof![
        4 => prop::collection::vec(piece, 0..4).prop_map(|pieces| pieces.concat()),
        1 => ".{0,24}",
    ]
}

fn messages() -> impl Strategy<Value = serde_json::Value> {
    let message = bent_object(serde_json::json!({"role": "user", "content": "a b ab"}));
    prop_oneof![
        4 => prop::collection::vec(message, 0..3).prop_map(serde_json::Value::from),
        1 => json_value(),
    ]
}

proptest! {
    #[test]
    fn fuzz_tokenizer_files(
        tokenizer in tokenizer_json(),
        config in bent_object(serde_json::json!({"bos_token": "<s>", "eos_token": {"content": "b"}, "chat_template": "{{ messages }}"})),
        generation in bent_object(serde_json::json!({"eos_token_id": [1, 2]})),
        chat_template in prop::option::of(template()),
        messages in messages(),
    ) {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string())?;
        let mut config = config;
        if let Some(source) = &chat_template {
            config["chat_template"] = source.clone().into();
        }
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string())?;
        std::fs::write(dir.path().join("generation_config.json"), generation.to_string())?;
        let tokenizer = match Tokenizer::from_dir(dir.path()) {
            Ok(tokenizer) => tokenizer,
            Err(error) => return assert_clear(&error),
        };
        match tokenizer.encode("ab a b <s>", true) {
            Ok(ids) => {
                if let Err(error) = tokenizer.decode(&ids, false) {
                    assert_clear(&error)?;
                }
            }
            Err(error) => assert_clear(&error)?,
        }
        if let Err(error) = tokenizer.apply_chat_template(&messages, true, None, &serde_json::Map::new()) {
            assert_clear(&error)?;
        }
    }

    #[test]
    fn fuzz_chat_template(source in template(), messages in messages(), tools in prop::option::of(json_value())) {
        let template = match ChatTemplate::new(source) {
            Ok(template) => template,
            Err(error) => return assert_clear(&error),
        };
        let rendered = template.render(&messages, true, tools.as_ref(), Some("<s>"), None, &serde_json::Map::new());
        if let Err(error) = rendered {
            assert_clear(&error)?;
        }
    }
}
