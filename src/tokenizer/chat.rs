//! Chat templates: Hugging Face's Jinja templates rendered with minijinja, with the
//! settings and globals transformers gives them.

use std::fmt::Write;
use std::path::Path;

use minijinja::{Environment, ErrorKind};

use crate::error::{Error, Result};
use crate::file_limits::{read_limited, CONFIG_FILE_LIMIT};

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// The template from `chat_template.jinja`, a processor's `chat_template.json` (LLaVA's) or
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}`
    /// whose `default` entry is used).
    pub fn from_model_dir(dir: &Path, config: &serde_json::Value) -> Result<Option<Self>> {
        let file = dir.join("chat_template.jinja");
        if let Ok(source) = read_limited(&file, CONFIG_FILE_LIMIT) {
            return Self::new(source).map(Some);
        }
        let processor = dir.join("chat_template.json");
        if let Ok(text) = read_limited(&processor, CONFIG_FILE_LIMIT) {
            let parsed: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                Error::InvalidModel(format!("{} is not valid JSON: {e}", processor.display()))
            })?;
            let source = parsed["chat_template"].as_str().ok_or_else(|| {
                Error::InvalidModel(format!("{} has no chat_template string", processor.display()))
            })?;
            return Self::new(source.to_string()).map(Some);
        }
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t["name"] == "default")
                .or(list.first())
                .and_then(|t| t["template"].as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::InvalidModel("tokenizer_config.json's chat_template list has no template".into())
                })?,
            _ => return Ok(None),
        };
        Self::new(source).map(Some)
    }

    /// Compiles `source` with transformers' settings (trim_blocks, lstrip_blocks, loop
    /// controls, Python string methods, `raise_exception`, `strftime_now`).
    pub fn new(source: String) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::InvalidModel(format!("template syntax: {e}")))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| -> std::result::Result<String, minijinja::Error> {
            // chrono's `to_string` panics on a bad format; writing reports it instead.
            let mut text = String::new();
            write!(text, "{}", chrono::Local::now().format(&format)).map_err(|_| {
                minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: {format:?} is not a valid date format"),
                )
            })?;
            Ok(text)
        });
        env.add_template_owned(NAME, without_generation_tags(&source))
            .map_err(|e| Error::InvalidModel(format!("invalid chat template: {e:#}")))?;
        Ok(Self { env })
    }

    /// Renders the template for `messages`.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        if !messages.is_array() {
            return Err(Error::InvalidArgument("messages must be a list".into()));
        }
        let mut context = extra.clone();
        context.insert("messages".into(), messages.clone());
        context.insert("add_generation_prompt".into(), add_generation_prompt.into());
        context.insert("bos_token".into(), bos_token.unwrap_or_default().into());
        context.insert("eos_token".into(), eos_token.unwrap_or_default().into());
        if let Some(tools) = tools {
            context.insert("tools".into(), tools.clone());
        }
        let template = self.env.get_template(NAME).map_err(|e| Error::InvalidModel(e.to_string()))?;
        template.render(minijinja::Value::from(minijinja::value::Serde(&context))).map_err(|e| {
            Error::InvalidArgument(format!("chat template failed: {}", e.detail().unwrap_or(&e.to_string())))
        })
    }
}

/// `source` with transformers' `{% generation %}` / `{% endgeneration %}` tags (which mark the
/// assistant's text for training masks and render their body as is) as an always-true `if`
/// block, each tag keeping its whitespace control.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else { break };
        let tag = &rest[start..start + len + 2];
        let inner = tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        let replacement = match inner {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(word) => out.push_str(&tag.replacen(inner, word, 1)),
            None => out.push_str(tag),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// The text of a message content given as a string or a list of `{"type": "text", "text"}`
/// parts (other parts are dropped), for templates that expect plain strings.
pub fn flatten_content(content: &serde_json::Value) -> String {
    match content {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(parts) => parts
            .iter()
            .filter(|p| p["type"] == "text")
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const LLAMA: &str =
        "{{- bos_token }}{%- for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n\
        {{ m['content'] | trim }}<|eot_id|>{%- endfor %}\
        {%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}";

    fn render(source: &str, messages: serde_json::Value) -> Result<String> {
        ChatTemplate::new(source.into())?.render(
            &messages,
            true,
            None,
            Some("<s>"),
            Some("</s>"),
            &serde_json::Map::new(),
        )
    }

    #[test]
    fn renders_llama_style_prompt() {
        let text = render(LLAMA, json!([{"role": "user", "content": "  hi  "}])).unwrap();
        // `{%-` strips the newlines before it, exactly as Python's jinja2 does.
        assert_eq!(text, "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>");
    }

    #[test]
    fn python_string_methods_and_loop_controls_work() {
        let source = "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}\
                      {{ m.content.strip().upper() }}{% if m.content.startswith(' a') %}!{% endif %}{% endfor %}";
        let text =
            render(source, json!([{"role": "system", "content": "x"}, {"role": "user", "content": " ab "}]))
                .unwrap();
        assert_eq!(text, "AB!");
    }

    #[test]
    fn raise_exception_and_strftime_now() {
        let err = render("{{ raise_exception('roles must alternate') }}", json!([])).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
        let year = render("{{ strftime_now('%Y') }}", json!([])).unwrap();
        assert_eq!(year.len(), 4);
        assert!(year.starts_with("20"));
        // A format chrono cannot write is the template's error, not a panic (found by fuzzing).
        let err = render("{{ strftime_now('%Q') }}", json!([])).unwrap_err();
        assert!(err.to_string().contains("not a valid date format"), "{err}");
    }

    #[test]
    fn bad_templates_and_messages_are_clear_errors() {
        assert!(ChatTemplate::new("{% for %}".into()).is_err());
        assert!(render(LLAMA, json!({"role": "user"})).is_err());
    }

    #[test]
    fn llava_templates_select_image_and_text_parts_and_render_generation_blocks() {
        // llava-hf/llava-1.5-7b-hf's template, as its chat_template.json holds it.
        let llava = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}\
            {% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}\
            {% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}\
            {% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{%- generation -%}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}\
            {% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";
        let messages = json!([
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        ]);
        let text = render(llava, messages).unwrap();
        assert_eq!(text, "USER: <image>\nWhat is this? ASSISTANT: A cat. USER: Sure? ASSISTANT:");
        assert_eq!(
            without_generation_tags("{% generation %}x{%- endgeneration +%}"),
            "{% if true %}x{%- endif +%}"
        );
    }

    #[test]
    fn list_content_flattens_to_text() {
        let parts = json!([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": "x"}, {"type": "text", "text": "b"}]);
        assert_eq!(flatten_content(&parts), "ab");
        assert_eq!(flatten_content(&json!("plain")), "plain");
    }
}
