//! The Qwen3 tokenizer built into the binary, for built-in model names (dummy weights) that
//! come without a model folder.

use std::io::Read;

use crate::tokenizer::Tokenizer;
use nanovllm_utils::{Error, Result};

const TOKENIZER_JSON_GZ: &[u8] =
    include_bytes!("../tests/fixtures/qwen3-tokenizer/tokenizer.json.gz");
const TOKENIZER_CONFIG_GZ: &[u8] =
    include_bytes!("../tests/fixtures/qwen3-tokenizer/tokenizer_config.json.gz");

fn gunzip(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| Error::Tokenizer(format!("built-in {what}: {e}")))?;
    Ok(out)
}

/// The Qwen3 tokenizer (151,643 BPE tokens + special tokens) with its chat template.
pub fn qwen3_tokenizer() -> Result<Tokenizer> {
    let json = gunzip(TOKENIZER_JSON_GZ, "tokenizer.json")?;
    let config = gunzip(TOKENIZER_CONFIG_GZ, "tokenizer_config.json")?;
    Tokenizer::from_bytes(&json, Some(&config))
}
