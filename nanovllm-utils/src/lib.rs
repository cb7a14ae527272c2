//! Ground floor of the nanovllm workspace: the error type every crate returns, model and
//! engine configuration, and safetensors weight loading.
//!
//! Nothing here touches a GPU; every other crate depends on this one.
//!
//! ```
//! use nanovllm_utils::{EngineConfig, ModelConfig};
//!
//! let model = ModelConfig::builtin("qwen3-0.6b")?;
//! assert_eq!((model.num_attention_heads, model.num_key_value_heads), (16, 8));
//! let mut engine = EngineConfig::default();
//! engine.validate(&model)?; // caps max_model_len by max_position_embeddings, checks the rest
//! assert_eq!(engine.kvcache_block_size, 256);
//! # Ok::<(), nanovllm_utils::Error>(())
//! ```
#![deny(missing_docs)]

pub mod config;
pub mod error;
pub mod weights;

pub use config::{EngineConfig, GenerationConfig, ModelConfig};
pub use error::{Error, Result};
pub use weights::Weights;

/// An on/off switch from the environment variable `name`: `default` when it is unset or empty,
/// off when it is `0`, on for any other value. Every `NANOVLLM_*` switch reads this way.
pub fn env_switch(name: &str, default: bool) -> bool {
    parse_switch(std::env::var(name).ok().as_deref(), default)
}

/// A count from the environment variable `name`: `default` when it is unset or empty, else its
/// number; a value that is not a number is an error naming the variable and `what` it counts.
pub fn env_count(name: &str, default: usize, what: &str) -> Result<usize> {
    parse_count(name, std::env::var(name).ok().as_deref(), default, what)
}

fn parse_count(name: &str, value: Option<&str>, default: usize, what: &str) -> Result<usize> {
    match value.map(str::trim) {
        None | Some("") => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| Error::Other(format!("{name}={v:?} is not a number of {what}"))),
    }
}

fn parse_switch(value: Option<&str>, default: bool) -> bool {
    match value.map(str::trim) {
        None | Some("") => default,
        Some(v) => v != "0",
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_count, parse_switch};

    #[test]
    fn counts_read_unset_and_empty_as_the_default_and_refuse_what_is_not_a_number() {
        assert_eq!(parse_count("N", None, 7, "rows").unwrap(), 7);
        assert_eq!(parse_count("N", Some(" "), 7, "rows").unwrap(), 7);
        assert_eq!(parse_count("N", Some(" 64 "), 7, "rows").unwrap(), 64);
        let err = parse_count("N", Some("lots"), 7, "rows")
            .unwrap_err()
            .to_string();
        assert!(err.contains("N=\"lots\"") && err.contains("rows"), "{err}");
    }

    #[test]
    fn switches_read_unset_and_empty_as_the_default_and_0_as_off() {
        for default in [false, true] {
            assert_eq!(parse_switch(None, default), default);
            assert_eq!(parse_switch(Some(""), default), default);
            assert!(!parse_switch(Some("0"), default));
            assert!(!parse_switch(Some(" 0 "), default));
            assert!(parse_switch(Some("1"), default));
        }
    }
}
