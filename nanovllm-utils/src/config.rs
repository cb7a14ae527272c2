//! Configuration: what the model is (`config.json`), how it likes to sample
//! (`generation_config.json`) and how the engine should run it (nano-vLLM's `Config`).
//!
//! This is the first thing read when a model folder is opened: the engine sizes its KV cache,
//! batches and tensor-parallel split from [`ModelConfig`] and [`EngineConfig`], the model crate
//! builds its layers from [`ModelConfig`], and the facade takes default sampling parameters and
//! stop tokens from [`GenerationConfig`].
//!
//! Both spellings of Hugging Face's `config.json` are read: transformers 4.x (`rope_theta` and
//! `torch_dtype` at the top level) and transformers 5.x (`rope_parameters: {rope_theta,
//! rope_type}` and `dtype`). [`ModelConfig::to_json`] writes the 4.x spelling, which both read.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Architectures (the `architectures` entry of `config.json`) this workspace can run.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["Qwen3ForCausalLM"];

/// Model dtypes (`torch_dtype` / `dtype`) accepted in `config.json`.
pub const SUPPORTED_DTYPES: &[&str] = &["bfloat16", "float16", "float32"];

/// Built-in configurations: (name, embedded `config.json`). Copies of the Qwen3 checkpoints'
/// own files, so that dummy-weight model folders can be made without a download.
const BUILTIN_CONFIGS: &[(&str, &str)] = &[
    ("qwen3-0.6b", include_str!("../configs/qwen3-0.6b.json")),
    ("qwen3-1.7b", include_str!("../configs/qwen3-1.7b.json")),
    ("qwen3-4b", include_str!("../configs/qwen3-4b.json")),
    ("qwen3-8b", include_str!("../configs/qwen3-8b.json")),
];

/// The model's shape and numerics, read from a Hugging Face `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Model classes the checkpoint declares (e.g. `["Qwen3ForCausalLM"]`).
    pub architectures: Vec<String>,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's gate/up projections.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA); divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Width of one attention head (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Longest position the model was trained for; caps `EngineConfig::max_model_len`.
    pub max_position_embeddings: usize,
    /// Vocabulary size (rows of the embedding and of the LM head).
    pub vocab_size: usize,
    /// Whether the LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// The checkpoint's dtype name: one of [`SUPPORTED_DTYPES`].
    pub dtype: String,
    /// Beginning-of-sequence token, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s) from `eos_token_id` (an int or a list in the file).
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads and checks a `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and checks the text of a `config.json`; `file` is only used in error messages.
    pub fn from_json_str(text: &str, file: &Path) -> Result<Self> {
        let root = parse_object(text, file)?;
        let f = Fields::new(&root, file, "");

        let architectures = f.string_list_req("architectures")?;
        if !architectures
            .iter()
            .any(|a| SUPPORTED_ARCHITECTURES.contains(&a.as_str()))
        {
            return Err(f.error(format!(
                "field `architectures`: unsupported architecture {architectures:?}; supported: {}",
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }

        let hidden_size = f.usize_req("hidden_size")?;
        let intermediate_size = f.usize_req("intermediate_size")?;
        let num_hidden_layers = f.usize_req("num_hidden_layers")?;
        let num_attention_heads = f.usize_req("num_attention_heads")?;
        let num_key_value_heads = f
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None => {
                f.positive("num_attention_heads", num_attention_heads)?;
                if !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(f.error(format!(
                        "field `head_dim` is absent and `hidden_size` ({hidden_size}) is not a \
                         multiple of `num_attention_heads` ({num_attention_heads})"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        let rms_norm_eps = f.f64_req("rms_norm_eps")?;
        let rope_theta = read_rope_theta(&f)?;
        let max_position_embeddings = f.usize_req("max_position_embeddings")?;
        let vocab_size = f.usize_req("vocab_size")?;
        let tie_word_embeddings = f.bool_opt("tie_word_embeddings")?.unwrap_or(false);
        // transformers 5.x writes `dtype`, 4.x `torch_dtype`; prefer the newer spelling.
        let (dtype_key, dtype) = match f.str_opt("dtype")? {
            Some(d) => ("dtype", d),
            None => (
                "torch_dtype",
                f.str_opt("torch_dtype")?.unwrap_or("bfloat16"),
            ),
        };
        if !SUPPORTED_DTYPES.contains(&dtype) {
            return Err(f.error(format!(
                "field `{dtype_key}`: unsupported dtype \"{dtype}\"; expected one of {}",
                SUPPORTED_DTYPES.join(", ")
            )));
        }
        let bos_token_id = f.u32_opt("bos_token_id")?;
        let eos_token_ids = f.token_ids("eos_token_id")?;

        let config = ModelConfig {
            architectures,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            vocab_size,
            tie_word_embeddings,
            dtype: dtype.to_string(),
            bos_token_id,
            eos_token_ids,
        };
        config.check(&f)?;
        Ok(config)
    }

    /// One of the embedded configurations, by name (case-insensitive): see
    /// [`ModelConfig::builtin_names`].
    pub fn builtin(name: &str) -> Result<ModelConfig> {
        let Some((key, text)) = BUILTIN_CONFIGS
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
        else {
            return Err(Error::Config {
                file: PathBuf::from(name),
                msg: format!(
                    "no built-in model config named `{name}`; known: {}",
                    Self::builtin_names().join(", ")
                ),
            });
        };
        Self::from_json_str(text, Path::new(&format!("<builtin {key}>/config.json")))
    }

    /// Names accepted by [`ModelConfig::builtin`].
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN_CONFIGS.iter().map(|(key, _)| *key).collect()
    }

    /// Writes this configuration as a transformers-4.x-style `config.json` (keys sorted), with
    /// the constant Qwen3 entries transformers expects (`model_type`, `hidden_act`, ...), so that
    /// both this crate and Hugging Face transformers can load a folder made from it.
    pub fn to_json(&self) -> String {
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => Value::from(*one),
            many => Value::from(many.to_vec()),
        };
        let value = serde_json::json!({
            "architectures": self.architectures,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "model_type": "qwen3",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": null,
            "rope_theta": self.rope_theta,
            "sliding_window": null,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype,
            "transformers_version": "4.51.0",
            "use_cache": true,
            "use_sliding_window": false,
            "vocab_size": self.vocab_size,
        });
        // A `Value` built from plain numbers, strings and bools always serialises.
        serde_json::to_string_pretty(&value).unwrap_or_default()
    }

    /// Consistency checks that a well-typed config can still fail.
    fn check(&self, f: &Fields<'_>) -> Result<()> {
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("vocab_size", self.vocab_size),
        ] {
            f.positive(field, value)?;
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(f.error(format!(
                "field `num_key_value_heads` ({}) must divide `num_attention_heads` ({})",
                self.num_key_value_heads, self.num_attention_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(f.error(format!(
                "field `head_dim` must be even for rotary embeddings, found {}",
                self.head_dim
            )));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(f.error(format!(
                "field `rms_norm_eps` must be a positive number, found {}",
                self.rms_norm_eps
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(f.error(format!(
                "field `rope_theta` must be a positive number, found {}",
                self.rope_theta
            )));
        }
        for &id in self.bos_token_id.iter().chain(&self.eos_token_ids) {
            if id as usize >= self.vocab_size {
                return Err(f.error(format!(
                    "special token id {id} (`bos_token_id` / `eos_token_id`) is not below \
                     `vocab_size` ({})",
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }
}

/// The built-in Qwen3-0.6B configuration (the model of nano-vLLM's benchmark).
pub fn qwen3_0_6b() -> ModelConfig {
    // The embedded file is fixed at build time and parsed by the tests of this module.
    ModelConfig::builtin("qwen3-0.6b").expect("embedded qwen3-0.6b config.json is valid")
}

/// RoPE base: `rope_parameters.rope_theta` (transformers 5.x) or top-level `rope_theta` (4.x).
/// Scaled RoPE variants (YaRN, linear, dynamic, ...) are refused: the kernels implement plain
/// RoPE only, and running a scaled model with it would silently give wrong outputs.
fn read_rope_theta(f: &Fields<'_>) -> Result<f64> {
    if let Some(params) = f.object_opt("rope_parameters")? {
        let p = Fields::new(params, f.file, "rope_parameters.");
        if let Some(kind) = p.str_opt("rope_type")? {
            if kind != "default" {
                return Err(p.error(format!(
                    "field `rope_parameters.rope_type`: unsupported RoPE type \"{kind}\"; only \
                     \"default\" is implemented"
                )));
            }
        }
        if let Some(theta) = p.f64_opt("rope_theta")? {
            return Ok(theta);
        }
    }
    if let Some(scaling) = f.object_opt("rope_scaling")? {
        let s = Fields::new(scaling, f.file, "rope_scaling.");
        let kind = match s.str_opt("rope_type")? {
            Some(k) => Some(k),
            None => s.str_opt("type")?,
        };
        if kind != Some("default") {
            return Err(f.error(format!(
                "field `rope_scaling`: unsupported RoPE scaling {}; only plain RoPE is implemented",
                show(&Value::Object(scaling.clone()))
            )));
        }
    }
    f.f64_req("rope_theta")
}

/// Default sampling of a checkpoint, from its optional `generation_config.json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    /// Sampling temperature; `Some(0.0)` when the file sets `do_sample: false` (greedy, as in
    /// transformers).
    pub temperature: Option<f32>,
    /// Keep only the `k` most likely tokens; `None` when absent or 0 (transformers' "off").
    pub top_k: Option<usize>,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: Option<f32>,
    /// Stop tokens (`eos_token_id`, an int or a list in the file); empty when absent.
    pub eos_token_ids: Vec<u32>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; a folder without one gives the default (all unset).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        Self::from_file(&path)
    }

    /// Reads and checks a `generation_config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and checks the text of a `generation_config.json`; `file` names it in errors.
    pub fn from_json_str(text: &str, file: &Path) -> Result<Self> {
        let root = parse_object(text, file)?;
        let f = Fields::new(&root, file, "");

        let mut temperature = f.f64_opt("temperature")?.map(|t| t as f32);
        if let Some(t) = temperature {
            if !(t.is_finite() && t >= 0.0) {
                return Err(f.error(format!(
                    "field `temperature` must be a number >= 0, found {t}"
                )));
            }
        }
        if f.bool_opt("do_sample")? == Some(false) {
            temperature = Some(0.0);
        }
        let top_k = f.usize_opt("top_k")?.filter(|&k| k > 0);
        let top_p = f.f64_opt("top_p")?.map(|p| p as f32);
        if let Some(p) = top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(f.error(format!("field `top_p` must be in (0, 1], found {p}")));
            }
        }
        let eos_token_ids = f.token_ids("eos_token_id")?;
        Ok(GenerationConfig {
            temperature,
            top_k,
            top_p,
            eos_token_ids,
        })
    }
}

/// How the engine runs: batch limits, memory budget, parallelism, KV-cache layout.
/// Field names and defaults are nano-vLLM's `Config`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineConfig {
    /// Most tokens in one forward pass (prefill chunk budget). Default 16384.
    pub max_num_batched_tokens: usize,
    /// Most sequences running at once. Default 512.
    pub max_num_seqs: usize,
    /// Longest sequence (prompt + output); capped to the model's `max_position_embeddings`
    /// by [`EngineConfig::validate`]. Default 4096.
    pub max_model_len: usize,
    /// Fraction of device memory the engine may use (weights, activations, KV cache). Default 0.9.
    pub gpu_memory_utilization: f32,
    /// Number of GPUs the model is split over. Default 1.
    pub tensor_parallel_size: usize,
    /// Run every step eagerly, without CUDA graphs. Default false.
    pub enforce_eager: bool,
    /// Tokens per KV-cache block. Default 256.
    pub kvcache_block_size: usize,
    /// Number of KV-cache blocks; `None` sizes the cache from free memory. Default None.
    pub num_kvcache_blocks: Option<usize>,
    /// Reuse KV blocks of identical prompt prefixes. Default true.
    pub enable_prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_batched_tokens: 16384,
            max_num_seqs: 512,
            max_model_len: 4096,
            gpu_memory_utilization: 0.9,
            tensor_parallel_size: 1,
            enforce_eager: false,
            kvcache_block_size: 256,
            num_kvcache_blocks: None,
            enable_prefix_caching: true,
        }
    }
}

impl EngineConfig {
    /// Checks every option against its range and against `model`, and caps `max_model_len` to
    /// the model's `max_position_embeddings` (as nano-vLLM does).
    ///
    /// Unlike nano-vLLM, `kvcache_block_size` may be any power of two up to 256 (nano-vLLM asks
    /// for a multiple of 256), and `max_num_batched_tokens` may be below `max_model_len`
    /// because long prompts are prefilled in chunks.
    pub fn validate(&mut self, model: &ModelConfig) -> Result<()> {
        fn refuse(option: &'static str, msg: String) -> Result<()> {
            Err(Error::EngineConfig { option, msg })
        }

        if self.max_num_batched_tokens == 0 {
            return refuse(
                "max_num_batched_tokens",
                "must be at least 1, found 0".into(),
            );
        }
        if self.max_num_seqs == 0 {
            return refuse("max_num_seqs", "must be at least 1, found 0".into());
        }
        if self.max_model_len == 0 {
            return refuse("max_model_len", "must be at least 1, found 0".into());
        }
        self.max_model_len = self.max_model_len.min(model.max_position_embeddings);

        let u = self.gpu_memory_utilization;
        if !(u > 0.0 && u <= 1.0) {
            return refuse(
                "gpu_memory_utilization",
                format!("must be in (0, 1], found {u}"),
            );
        }

        let tp = self.tensor_parallel_size;
        if !(1..=8).contains(&tp) {
            return refuse(
                "tensor_parallel_size",
                format!("must be in 1..=8, found {tp}"),
            );
        }
        for (field, value) in [
            ("num_attention_heads", model.num_attention_heads),
            ("num_key_value_heads", model.num_key_value_heads),
            ("intermediate_size", model.intermediate_size),
            ("vocab_size", model.vocab_size),
        ] {
            if !value.is_multiple_of(tp) {
                return refuse(
                    "tensor_parallel_size",
                    format!("{tp} does not divide the model's {field} ({value})"),
                );
            }
        }

        let bs = self.kvcache_block_size;
        if !(bs.is_power_of_two() && bs <= 256) {
            return refuse(
                "kvcache_block_size",
                format!("must be a power of two in 1..=256, found {bs}"),
            );
        }
        if self.num_kvcache_blocks == Some(0) {
            return refuse(
                "num_kvcache_blocks",
                "must be at least 1 when set, found 0".into(),
            );
        }
        Ok(())
    }
}

/// Parses `text` as a JSON object, naming `file` on failure.
fn parse_object(text: &str, file: &Path) -> Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(Error::Config {
            file: file.to_path_buf(),
            msg: format!(
                "expected a JSON object at the top level, found {}",
                show(&other)
            ),
        }),
        Err(e) => Err(Error::Config {
            file: file.to_path_buf(),
            msg: format!("invalid JSON: {e}"),
        }),
    }
}

/// A short rendering of a JSON value for error messages.
fn show(value: &Value) -> String {
    let mut s = value.to_string();
    if s.len() > 80 {
        let cut = (0..=77).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// Typed access to the fields of one JSON object, with errors naming the file and the field.
/// A field set to `null` counts as absent, as transformers treats it.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    file: &'a Path,
    /// Prepended to field names in messages (e.g. `rope_parameters.`).
    prefix: &'static str,
}

impl<'a> Fields<'a> {
    fn new(obj: &'a Map<String, Value>, file: &'a Path, prefix: &'static str) -> Self {
        Fields { obj, file, prefix }
    }

    fn error(&self, msg: String) -> Error {
        Error::Config {
            file: self.file.to_path_buf(),
            msg,
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn missing(&self, key: &str) -> Error {
        self.error(format!("missing required field `{}{key}`", self.prefix))
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> Error {
        self.error(format!(
            "field `{}{key}`: expected {expected}, found {}",
            self.prefix,
            show(found)
        ))
    }

    fn positive(&self, key: &str, value: usize) -> Result<()> {
        if value == 0 {
            return Err(self.error(format!("field `{}{key}` must be > 0, found 0", self.prefix)));
        }
        Ok(())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.missing(key))
    }

    fn u32_opt(&self, key: &str) -> Result<Option<u32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.wrong_type(key, "a token id (integer in 0..2^32)", v))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_f64()
            .map(Some)
            .ok_or_else(|| self.wrong_type(key, "a number", v))
    }

    fn f64_req(&self, key: &str) -> Result<f64> {
        self.f64_opt(key)?.ok_or_else(|| self.missing(key))
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_bool()
            .map(Some)
            .ok_or_else(|| self.wrong_type(key, "true or false", v))
    }

    fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_str()
            .map(Some)
            .ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    fn object_opt(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_object()
            .map(Some)
            .ok_or_else(|| self.wrong_type(key, "an object", v))
    }

    fn string_list_req(&self, key: &str) -> Result<Vec<String>> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        let expected = "a list of strings";
        let list = v
            .as_array()
            .ok_or_else(|| self.wrong_type(key, expected, v))?;
        list.iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.wrong_type(key, expected, v))
            })
            .collect()
    }

    /// A token id or a list of them (`eos_token_id`); absent gives an empty list.
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let Some(v) = self.get(key) else {
            return Ok(Vec::new());
        };
        let expected = "a token id or a list of token ids";
        let as_id = |item: &Value| item.as_u64().and_then(|n| u32::try_from(n).ok());
        match v {
            Value::Array(items) => items
                .iter()
                .map(|item| as_id(item).ok_or_else(|| self.wrong_type(key, expected, v)))
                .collect(),
            _ => as_id(v)
                .map(|id| vec![id])
                .ok_or_else(|| self.wrong_type(key, expected, v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(text, Path::new("test/config.json"))
    }

    /// The 0.6B config with `edit` applied to its JSON object.
    fn edited(edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut v: Value = serde_json::from_str(BUILTIN_CONFIGS[0].1).unwrap();
        edit(v.as_object_mut().unwrap());
        v.to_string()
    }

    fn config_error(text: &str) -> String {
        match parse(text) {
            Err(e @ Error::Config { .. }) => e.to_string(),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn every_shipped_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let c = ModelConfig::from_file(&path).unwrap();
            assert_eq!(c.architectures, ["Qwen3ForCausalLM"]);
            assert_eq!(c.head_dim, 128);
            assert_eq!(c.vocab_size, 151936);
            assert_eq!(c.rope_theta, 1_000_000.0);
            assert_eq!(c.rms_norm_eps, 1e-6);
            assert_eq!(c.dtype, "bfloat16");
            assert_eq!(c.bos_token_id, Some(151643));
            assert_eq!(c.eos_token_ids, [151645]);
            // Every shipped file is also reachable by name.
            let name = path.file_stem().unwrap().to_str().unwrap();
            assert_eq!(ModelConfig::builtin(name).unwrap(), c);
            seen += 1;
        }
        assert_eq!(seen, BUILTIN_CONFIGS.len());
    }

    #[test]
    fn qwen3_0_6b_numbers() {
        let c = qwen3_0_6b();
        assert_eq!(c.hidden_size, 1024);
        assert_eq!(c.intermediate_size, 3072);
        assert_eq!(c.num_hidden_layers, 28);
        assert_eq!(c.num_attention_heads, 16);
        assert_eq!(c.num_key_value_heads, 8);
        assert_eq!(c.max_position_embeddings, 40960);
        assert!(c.tie_word_embeddings);
        let c8 = ModelConfig::builtin("Qwen3-8B").unwrap();
        assert_eq!((c8.hidden_size, c8.num_hidden_layers), (4096, 36));
        assert!(!c8.tie_word_embeddings);
    }

    #[test]
    fn unknown_builtin_lists_known_names() {
        let msg = ModelConfig::builtin("llama-7b").unwrap_err().to_string();
        assert!(
            msg.contains("llama-7b") && msg.contains("qwen3-0.6b, qwen3-1.7b"),
            "{msg}"
        );
    }

    #[test]
    fn reads_from_model_dir() {
        let dir = std::env::temp_dir().join(format!("nanovllm-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), BUILTIN_CONFIGS[1].1).unwrap();
        let c = ModelConfig::from_model_dir(&dir).unwrap();
        assert_eq!(c.hidden_size, 2048);
        std::fs::remove_dir_all(&dir).unwrap();
        let err = ModelConfig::from_model_dir(&dir).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(err.to_string().contains("config.json"), "{err}");
    }

    #[test]
    fn transformers_5_spelling() {
        let text = r#"{
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"},
            "max_position_embeddings": 512,
            "vocab_size": 1000,
            "dtype": "float32",
            "eos_token_id": [7, 9],
            "bos_token_id": null
        }"#;
        let c = parse(text).unwrap();
        assert_eq!(c.rope_theta, 5000.0);
        assert_eq!(c.dtype, "float32");
        assert_eq!(c.head_dim, 16, "head_dim defaults to hidden_size / heads");
        assert_eq!(c.eos_token_ids, [7, 9]);
        assert_eq!(c.bos_token_id, None);
        assert!(
            !c.tie_word_embeddings,
            "tie_word_embeddings defaults to false"
        );
    }

    #[test]
    fn defaults_when_fields_are_absent() {
        let c = parse(&edited(|m| {
            m.remove("num_key_value_heads");
            m.remove("head_dim");
            m.remove("torch_dtype");
            m.remove("tie_word_embeddings");
            m.remove("eos_token_id");
        }))
        .unwrap();
        assert_eq!(c.num_key_value_heads, c.num_attention_heads);
        assert_eq!(c.head_dim, 1024 / 16);
        assert_eq!(c.dtype, "bfloat16");
        assert!(!c.tie_word_embeddings);
        assert!(c.eos_token_ids.is_empty());
    }

    #[test]
    fn eos_int_or_list() {
        let one = parse(&edited(|m| {
            m.insert("eos_token_id".into(), 5.into());
        }))
        .unwrap();
        assert_eq!(one.eos_token_ids, [5]);
        let many = parse(&edited(|m| {
            m.insert("eos_token_id".into(), serde_json::json!([151645, 151643]));
        }))
        .unwrap();
        assert_eq!(many.eos_token_ids, [151645, 151643]);
        let msg = config_error(&edited(|m| {
            m.insert("eos_token_id".into(), serde_json::json!([1, "two"]));
        }));
        assert!(msg.contains("`eos_token_id`"), "{msg}");
    }

    #[test]
    fn missing_field_is_named() {
        for field in ["hidden_size", "vocab_size", "architectures", "rms_norm_eps"] {
            let msg = config_error(&edited(|m| {
                m.remove(field);
            }));
            assert!(
                msg.contains(&format!("missing required field `{field}`")),
                "{msg}"
            );
            assert!(msg.contains("test/config.json"), "{msg}");
        }
        let msg = config_error(&edited(|m| {
            m.remove("rope_theta");
        }));
        assert!(msg.contains("`rope_theta`"), "{msg}");
    }

    #[test]
    fn wrong_type_is_named() {
        let msg = config_error(&edited(|m| {
            m.insert("hidden_size".into(), "1024".into());
        }));
        assert!(
            msg.contains("field `hidden_size`: expected a non-negative integer"),
            "{msg}"
        );
        let msg = config_error(&edited(|m| {
            m.insert("tie_word_embeddings".into(), 1.into());
        }));
        assert!(msg.contains("`tie_word_embeddings`"), "{msg}");
        let msg = config_error(&edited(|m| {
            m.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_theta": "big"}),
            );
        }));
        assert!(msg.contains("`rope_parameters.rope_theta`"), "{msg}");
        let msg = config_error("[1, 2]");
        assert!(msg.contains("JSON object"), "{msg}");
        let msg = config_error("{\"hidden_size\": ");
        assert!(msg.contains("invalid JSON"), "{msg}");
    }

    #[test]
    fn unsupported_architecture() {
        let msg = config_error(&edited(|m| {
            m.insert(
                "architectures".into(),
                serde_json::json!(["LlamaForCausalLM"]),
            );
        }));
        assert!(msg.contains("unsupported architecture") && msg.contains("LlamaForCausalLM"));
    }

    #[test]
    fn unsupported_rope_and_dtype() {
        let msg = config_error(&edited(|m| {
            m.insert(
                "rope_scaling".into(),
                serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            );
        }));
        assert!(
            msg.contains("`rope_scaling`") && msg.contains("yarn"),
            "{msg}"
        );
        let msg = config_error(&edited(|m| {
            m.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_type": "yarn", "rope_theta": 1e6}),
            );
        }));
        assert!(msg.contains("`rope_parameters.rope_type`"), "{msg}");
        let msg = config_error(&edited(|m| {
            m.insert("torch_dtype".into(), "int8".into());
        }));
        assert!(
            msg.contains("`torch_dtype`") && msg.contains("int8"),
            "{msg}"
        );
    }

    #[test]
    fn inconsistent_values() {
        let msg = config_error(&edited(|m| {
            m.insert("num_key_value_heads".into(), 3.into());
        }));
        assert!(
            msg.contains("`num_key_value_heads` (3) must divide"),
            "{msg}"
        );
        for field in ["hidden_size", "num_hidden_layers", "vocab_size", "head_dim"] {
            let msg = config_error(&edited(|m| {
                m.insert(field.into(), 0.into());
            }));
            assert!(msg.contains(&format!("`{field}` must be > 0")), "{msg}");
        }
        let msg = config_error(&edited(|m| {
            m.insert("num_attention_heads".into(), 0.into());
            m.remove("head_dim");
        }));
        assert!(msg.contains("`num_attention_heads` must be > 0"), "{msg}");
        let msg = config_error(&edited(|m| {
            m.remove("head_dim");
            m.insert("num_attention_heads".into(), 24.into());
            m.insert("num_key_value_heads".into(), 8.into());
        }));
        assert!(msg.contains("`head_dim` is absent"), "{msg}");
        let msg = config_error(&edited(|m| {
            m.insert("rms_norm_eps".into(), (-1.0).into());
        }));
        assert!(msg.contains("`rms_norm_eps`"), "{msg}");
        let msg = config_error(&edited(|m| {
            m.insert("eos_token_id".into(), 200_000.into());
        }));
        assert!(
            msg.contains("200000") && msg.contains("vocab_size"),
            "{msg}"
        );
    }

    #[test]
    fn to_json_round_trips_and_matches_the_checkpoint_files() {
        for (name, text) in BUILTIN_CONFIGS {
            let c = ModelConfig::builtin(name).unwrap();
            let written = c.to_json();
            assert_eq!(parse(&written).unwrap(), c, "{name}");
            // Every entry of the checkpoint's own file is reproduced (numbers compared as numbers).
            let original: Value = serde_json::from_str(text).unwrap();
            let ours: Value = serde_json::from_str(&written).unwrap();
            for (key, want) in original.as_object().unwrap() {
                let got = &ours[key];
                let same = match (want.as_f64(), got.as_f64()) {
                    (Some(a), Some(b)) => a == b,
                    _ => want == got,
                };
                assert!(same, "{name}: `{key}` was {want}, wrote {got}");
            }
        }
        let mut c = qwen3_0_6b();
        c.eos_token_ids = vec![1, 2];
        c.bos_token_id = None;
        assert_eq!(parse(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn generation_config() {
        let file = Path::new("test/generation_config.json");
        let g = GenerationConfig::from_json_str(
            include_str!("../testdata/qwen3-generation_config.json"),
            file,
        )
        .unwrap();
        assert_eq!(
            g,
            GenerationConfig {
                temperature: Some(0.6),
                top_k: Some(20),
                top_p: Some(0.95),
                eos_token_ids: vec![151645, 151643],
            }
        );
        let greedy = GenerationConfig::from_json_str(
            r#"{"do_sample": false, "temperature": 0.7, "top_k": 0}"#,
            file,
        )
        .unwrap();
        assert_eq!(greedy.temperature, Some(0.0));
        assert_eq!(greedy.top_k, None);
        assert_eq!(greedy.eos_token_ids, Vec::<u32>::new());
        let msg = GenerationConfig::from_json_str(r#"{"top_p": 1.5}"#, file)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`top_p`") && msg.contains("1.5"), "{msg}");
        let msg = GenerationConfig::from_json_str(r#"{"temperature": "hot"}"#, file)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`temperature`"), "{msg}");
    }

    #[test]
    fn generation_config_file_is_optional() {
        let dir = std::env::temp_dir().join(format!("nanovllm-genconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            GenerationConfig::from_model_dir(&dir).unwrap(),
            GenerationConfig::default()
        );
        std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": 3}"#).unwrap();
        let g = GenerationConfig::from_model_dir(&dir).unwrap();
        assert_eq!(g.eos_token_ids, [3]);
        assert_eq!(g.temperature, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn engine_error(edit: impl FnOnce(&mut EngineConfig)) -> (&'static str, String) {
        let mut e = EngineConfig::default();
        edit(&mut e);
        match e.validate(&qwen3_0_6b()) {
            Err(Error::EngineConfig { option, msg }) => (option, msg),
            other => panic!("expected an engine config error, got {other:?}"),
        }
    }

    #[test]
    fn engine_config_defaults_validate() {
        let mut e = EngineConfig::default();
        e.validate(&qwen3_0_6b()).unwrap();
        assert_eq!(e, EngineConfig::default(), "nothing to cap for Qwen3-0.6B");
        let mut small = qwen3_0_6b();
        small.max_position_embeddings = 1000;
        e.validate(&small).unwrap();
        assert_eq!(e.max_model_len, 1000, "capped to max_position_embeddings");
        // Allowed edges.
        let mut e = EngineConfig {
            kvcache_block_size: 1,
            tensor_parallel_size: 8,
            gpu_memory_utilization: 1.0,
            max_num_seqs: 1,
            max_num_batched_tokens: 1,
            num_kvcache_blocks: Some(1),
            ..EngineConfig::default()
        };
        e.validate(&qwen3_0_6b()).unwrap();
    }

    #[test]
    fn engine_config_refusals() {
        type Edit = Box<dyn FnOnce(&mut EngineConfig)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "max_num_batched_tokens",
                Box::new(|e| e.max_num_batched_tokens = 0),
            ),
            ("max_num_seqs", Box::new(|e| e.max_num_seqs = 0)),
            ("max_model_len", Box::new(|e| e.max_model_len = 0)),
            (
                "gpu_memory_utilization",
                Box::new(|e| e.gpu_memory_utilization = 0.0),
            ),
            (
                "gpu_memory_utilization",
                Box::new(|e| e.gpu_memory_utilization = 1.01),
            ),
            (
                "gpu_memory_utilization",
                Box::new(|e| e.gpu_memory_utilization = f32::NAN),
            ),
            (
                "tensor_parallel_size",
                Box::new(|e| e.tensor_parallel_size = 0),
            ),
            (
                "tensor_parallel_size",
                Box::new(|e| e.tensor_parallel_size = 16),
            ),
            (
                "tensor_parallel_size",
                Box::new(|e| e.tensor_parallel_size = 3),
            ),
            ("kvcache_block_size", Box::new(|e| e.kvcache_block_size = 0)),
            (
                "kvcache_block_size",
                Box::new(|e| e.kvcache_block_size = 48),
            ),
            (
                "kvcache_block_size",
                Box::new(|e| e.kvcache_block_size = 512),
            ),
            (
                "num_kvcache_blocks",
                Box::new(|e| e.num_kvcache_blocks = Some(0)),
            ),
        ];
        for (want, edit) in cases {
            let (option, msg) = engine_error(edit);
            assert_eq!(option, want, "{msg}");
        }
        let (_, msg) = engine_error(|e| e.tensor_parallel_size = 3);
        assert!(msg.contains("num_attention_heads (16)"), "{msg}");
        // Every split dimension must divide evenly: the MLP width and the vocabulary too.
        let mut model = qwen3_0_6b();
        model.intermediate_size = 3004;
        let mut e = EngineConfig {
            tensor_parallel_size: 8,
            ..EngineConfig::default()
        };
        let msg = e.validate(&model).unwrap_err().to_string();
        assert!(msg.contains("intermediate_size (3004)"), "{msg}");
        e.tensor_parallel_size = 4;
        e.validate(&model).unwrap();
        model.vocab_size = 151_937;
        let msg = e.validate(&model).unwrap_err().to_string();
        assert!(msg.contains("vocab_size (151937)"), "{msg}");
        let (_, msg) = engine_error(|e| e.kvcache_block_size = 48);
        assert!(msg.contains("found 48"), "{msg}");
    }
}
