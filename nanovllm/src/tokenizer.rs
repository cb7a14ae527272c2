//! Text in and text out: the tokenizer, the chat template and streaming detokenization.
//!
//! This sits at both ends of the flow. Before a request reaches the scheduler, [`Tokenizer`]
//! turns a prompt (or a chat rendered by [`Tokenizer::apply_chat_template`]) into token ids;
//! after the sampler, [`IncrementalDecoder`] turns each sequence's growing list of output ids
//! back into text, one piece per step, for streaming. [`Tokenizer::eos_token_ids`] gives the
//! scheduler the ids that finish a sequence.
//!
//! Tokenization is the Hugging Face `tokenizers` crate over the model folder's `tokenizer.json`.
//! The chat template is the Jinja template of `tokenizer_config.json`, rendered with `minijinja`
//! set up as transformers sets up Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls, a
//! `raise_exception` function, Python string methods through `minijinja-contrib`'s `pycompat`,
//! Python's spelling of `True`/`False`/`None`), so that the prompt is byte for byte what
//! `tokenizer.apply_chat_template(..., tokenize=False)` returns. Not reproduced: transformers'
//! `tojson` (Python's `json.dumps` spacing) and `strftime_now`, used only by templates rendering
//! tools or dates, which [`ChatMessage`] does not carry.

use std::path::Path;

use minijinja::value::ValueKind;
use minijinja::{Environment, ErrorKind};
use nanovllm_utils::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// Name of the chat template inside the tokenizer's template environment.
const CHAT_TEMPLATE: &str = "chat_template";

/// Stop tokens used by Qwen-family models, added to the end-of-sequence ids when the vocabulary
/// holds them: `<|im_end|>` closes a chat turn, `<|endoftext|>` ends a document.
const EXTRA_EOS_TOKENS: [&str; 2] = ["<|im_end|>", "<|endoftext|>"];

/// One turn of a conversation, as the `messages` list of a chat template sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks: `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// What they say.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A model's tokenizer: `tokenizer.json` for encoding and decoding, plus what
/// `tokenizer_config.json` adds (special tokens, chat template).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The compiled chat template, when the model has one.
    chat_template: Option<Environment<'static>>,
    /// Special tokens handed to the chat template (`bos_token`, `eos_token`, ...).
    special_tokens: serde_json::Map<String, Json>,
    eos_token_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_token_ids", &self.eos_token_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads the tokenizer of a model folder: `tokenizer.json`, and `tokenizer_config.json` when
    /// present. A chat template stored apart in `chat_template.jinja` (as recent transformers
    /// save it) is used when `tokenizer_config.json` has none, and `generation_config.json`'s
    /// `eos_token_id` joins the end-of-sequence ids.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = dir.join("tokenizer_config.json");
        let mut tok = Self::from_files(
            &dir.join("tokenizer.json"),
            config.is_file().then_some(config.as_path()),
        )?;
        if tok.chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                let source = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
                tok.chat_template = Some(compile_chat_template_from(source, &jinja)?);
            }
        }
        let generation = dir.join("generation_config.json");
        if generation.is_file() {
            let json = read_json(&generation)?;
            let ids = match json.get("eos_token_id") {
                None | Some(Json::Null) => Vec::new(),
                Some(Json::Array(ids)) => ids.iter().collect(),
                Some(id) => vec![id],
            };
            for id in ids {
                let id = id
                    .as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| Error::Config {
                        file: generation.clone(),
                        msg: format!("`eos_token_id`: expected token ids, found {id}"),
                    })?;
                tok.push_eos(id);
            }
        }
        Ok(tok)
    }

    /// Loads a tokenizer from a `tokenizer.json` and, optionally, the `tokenizer_config.json`
    /// that carries its special tokens and chat template.
    pub fn from_files(tokenizer_json: &Path, tokenizer_config_json: Option<&Path>) -> Result<Self> {
        let json = std::fs::read(tokenizer_json).map_err(|e| Error::io(tokenizer_json, e))?;
        let config = match tokenizer_config_json {
            Some(path) => Some((std::fs::read(path).map_err(|e| Error::io(path, e))?, path)),
            None => None,
        };
        Self::load(
            &json,
            tokenizer_json,
            config
                .as_ref()
                .map(|(bytes, path)| (bytes.as_slice(), *path)),
        )
    }

    /// Builds a tokenizer from the contents of a `tokenizer.json` and, optionally, of a
    /// `tokenizer_config.json` (e.g. files embedded in the binary).
    pub fn from_bytes(tokenizer_json: &[u8], tokenizer_config_json: Option<&[u8]>) -> Result<Self> {
        Self::load(
            tokenizer_json,
            Path::new("tokenizer.json"),
            tokenizer_config_json.map(|bytes| (bytes, Path::new("tokenizer_config.json"))),
        )
    }

    /// Builds the tokenizer; the paths only name the sources in error messages.
    fn load(json: &[u8], json_path: &Path, config: Option<(&[u8], &Path)>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| {
            Error::Tokenizer(format!(
                "{}: not a valid tokenizer.json: {e}",
                json_path.display()
            ))
        })?;
        let mut tok = Tokenizer {
            inner,
            chat_template: None,
            special_tokens: serde_json::Map::new(),
            eos_token_ids: Vec::new(),
        };

        if let Some((bytes, path)) = config {
            let config = parse_json(bytes, path)?;
            let Json::Object(config) = config else {
                return Err(Error::Config {
                    file: path.to_path_buf(),
                    msg: "expected a JSON object at the top level".into(),
                });
            };
            for key in [
                "bos_token",
                "eos_token",
                "unk_token",
                "sep_token",
                "pad_token",
                "cls_token",
                "mask_token",
            ] {
                if let Some(token) = special_token(&config, key, path)? {
                    tok.special_tokens.insert(key.into(), Json::String(token));
                }
            }
            if let Some(Json::String(eos)) = tok.special_tokens.get("eos_token") {
                let id = tok.inner.token_to_id(eos).ok_or_else(|| Error::Config {
                    file: path.to_path_buf(),
                    msg: format!("`eos_token` {eos:?} is not in the vocabulary"),
                })?;
                tok.push_eos(id);
            }
            if let Some(source) = chat_template_source(&config, path)? {
                tok.chat_template = Some(compile_chat_template_from(source, path)?);
            }
        }
        for token in EXTRA_EOS_TOKENS {
            if let Some(id) = tok.inner.token_to_id(token) {
                tok.push_eos(id);
            }
        }
        Ok(tok)
    }

    fn push_eos(&mut self, id: u32) {
        if !self.eos_token_ids.contains(&id) {
            self.eos_token_ids.push(id);
        }
    }

    /// Token ids of `text`. With `add_special_tokens`, the tokenizer's post-processor adds what
    /// the model expects around a sequence (nothing for Qwen3). Special tokens written in the
    /// text, such as `<|im_start|>`, become their single ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("encode of a {}-byte text: {e}", text.len())))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; with `skip_special_tokens`, special tokens are left out. Bytes that do not
    /// form valid UTF-8 come out as U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| {
            Error::Tokenizer(format!(
                "decode of {} ids (vocabulary of {}): {e}",
                ids.len(),
                self.vocab_size()
            ))
        })
    }

    /// Number of tokens, added tokens included (the model's embedding may be padded larger).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token given as its vocabulary string (e.g. `"<|im_end|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids that end generation: `tokenizer_config.json`'s `eos_token` first, then `<|im_end|>`
    /// and `<|endoftext|>` when the vocabulary has them, then `generation_config.json`'s
    /// `eos_token_id` (with [`Tokenizer::from_dir`]); no duplicates.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Replaces the chat template (as transformers' `apply_chat_template(chat_template=...)`
    /// does for one call); fails when `template` does not compile.
    pub fn set_chat_template(&mut self, template: &str) -> Result<()> {
        let env = compile_chat_template(template.to_string())
            .map_err(|e| Error::Tokenizer(format!("chat template does not compile: {e:#}")))?;
        self.chat_template = Some(env);
        Ok(())
    }

    /// Whether the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the model's chat template into the prompt text, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...,
    /// enable_thinking=...)` does. `add_generation_prompt` opens an assistant turn at the end;
    /// `enable_thinking = false` asks Qwen3 to answer without a reasoning block.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: bool,
    ) -> Result<String> {
        let env = self.chat_template.as_ref().ok_or_else(|| {
            Error::Tokenizer(
                "the model has no chat template (no `chat_template` in tokenizer_config.json \
                 and no chat_template.jinja); pass the prompt as plain text"
                    .into(),
            )
        })?;
        let template = env
            .get_template(CHAT_TEMPLATE)
            .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        let mut ctx = self.special_tokens.clone();
        let num_messages = messages.len();
        let messages = serde_json::to_value(messages)
            .map_err(|e| Error::Tokenizer(format!("chat template: messages: {e}")))?;
        ctx.insert("messages".into(), messages);
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        ctx.insert("enable_thinking".into(), Json::Bool(enable_thinking));
        ctx.insert("tools".into(), Json::Null);
        ctx.insert("documents".into(), Json::Null);
        template.render(ctx).map_err(|e| {
            Error::Tokenizer(format!("chat template of {num_messages} messages: {e:#}"))
        })
    }
}

/// Reads and parses a JSON file, naming it in the error.
fn read_json(path: &Path) -> Result<Json> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_json(&bytes, path)
}

/// Parses JSON read from `path`, naming it in the error.
fn parse_json(bytes: &[u8], path: &Path) -> Result<Json> {
    serde_json::from_slice(bytes).map_err(|e| Error::Config {
        file: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })
}

/// A special token of `tokenizer_config.json`: a string, an added-token object with a
/// `content` field, or null / absent.
fn special_token(
    config: &serde_json::Map<String, Json>,
    key: &str,
    file: &Path,
) -> Result<Option<String>> {
    match config.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(obj)) => match obj.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::Config {
                file: file.to_path_buf(),
                msg: format!("`{key}`: expected an object with a string `content`"),
            }),
        },
        Some(other) => Err(Error::Config {
            file: file.to_path_buf(),
            msg: format!("`{key}`: expected a string or an object, found {other}"),
        }),
    }
}

/// The `chat_template` of `tokenizer_config.json`: one string, or a list of named templates of
/// which the one named `default` is used.
fn chat_template_source(
    config: &serde_json::Map<String, Json>,
    file: &Path,
) -> Result<Option<String>> {
    let bad = |msg: String| Error::Config {
        file: file.to_path_buf(),
        msg,
    };
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(named)) => {
            for entry in named {
                if entry.get("name").and_then(Json::as_str) == Some("default") {
                    return match entry.get("template") {
                        Some(Json::String(s)) => Ok(Some(s.clone())),
                        _ => Err(bad(
                            "`chat_template`: the `default` entry has no string `template`".into(),
                        )),
                    };
                }
            }
            Err(bad(format!(
                "`chat_template`: a list of {} named templates without one named `default`",
                named.len()
            )))
        }
        Some(other) => Err(bad(format!(
            "`chat_template`: expected a string or a list, found {other}"
        ))),
    }
}

/// Compiles a chat template in an environment that behaves like transformers' Jinja2 one.
fn compile_chat_template(
    source: String,
) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    // transformers renders with Jinja2's trim_blocks and lstrip_blocks on, and the default
    // keep_trailing_newline off; templates are written for exactly that whitespace handling.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    // Python string, list and dict methods (startswith, split, strip, items, ...).
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // Jinja2 prints Python values: `True`, `False`, `None` where minijinja would print
    // `true`, `false`, `none`.
    env.set_formatter(|out, state, value| match value.kind() {
        ValueKind::Bool if value.is_true() => out.write_str("True").map_err(Into::into),
        ValueKind::Bool => out.write_str("False").map_err(Into::into),
        ValueKind::None => out.write_str("None").map_err(Into::into),
        _ => minijinja::escape_formatter(out, state, value),
    });
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template_owned(CHAT_TEMPLATE, source)?;
    Ok(env)
}

/// [`compile_chat_template`] for a template read from `file`, naming it in the error.
fn compile_chat_template_from(source: String, file: &Path) -> Result<Environment<'static>> {
    compile_chat_template(source).map_err(|e| Error::Config {
        file: file.to_path_buf(),
        msg: format!("`chat_template` does not compile: {e:#}"),
    })
}

/// Turns a stream of token ids into text as it grows, for streaming output.
///
/// A byte-level tokenizer may split one character (a Chinese character, an emoji) over several
/// tokens, and a token's text can depend on its neighbours. So each step decodes a small window:
/// the tokens from `prefix_offset` up to `read_offset` were already emitted, those after it are
/// new. The new text is the decoded window minus the decoded prefix, and it is held back while it
/// ends with U+FFFD (an incomplete UTF-8 sequence). On emission the window slides forward, so
/// each step costs two decodes of a few tokens, not of the whole sequence.
#[derive(Debug)]
pub struct IncrementalDecoder<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the window: the first already-emitted token decoded again for context.
    prefix_offset: usize,
    /// Tokens before this index have been emitted as text.
    read_offset: usize,
}

impl<'a> IncrementalDecoder<'a> {
    /// A decoder for a new stream; `skip_special_tokens` as in [`Tokenizer::decode`].
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        IncrementalDecoder {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Adds the next token; returns the text it completes, or `None` while that text is still
    /// part of an unfinished character (or the token decodes to nothing, e.g. a skipped special
    /// token).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self.tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let text = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') {
            let new = new_suffix(&prefix, &text).to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(Some(new));
        }
        Ok(None)
    }

    /// Flushes the text of the tokens not emitted yet, incomplete characters included (as
    /// U+FFFD). Empty when everything was emitted.
    pub fn finish(self) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = self.tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let text = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        Ok(new_suffix(&prefix, &text).to_string())
    }
}

/// The part of `text` after `prefix`. The window's text starts with the prefix's text whenever
/// the prefix ends on a complete character, which is how the window is moved; should a decoder
/// ever rewrite the prefix, the text after the longest common prefix is returned instead of
/// slicing inside a character.
fn new_suffix<'t>(prefix: &str, text: &'t str) -> &'t str {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest;
    }
    let common = prefix
        .char_indices()
        .zip(text.chars())
        .find(|((_, a), b)| a != b)
        .map_or(prefix.len().min(text.len()), |((i, _), _)| i);
    // `common` is a char boundary of `prefix` where both agree so far, hence one of `text` too.
    text.get(common..).unwrap_or("")
}
