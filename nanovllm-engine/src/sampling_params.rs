//! Per-request sampling parameters: how the next token is drawn and when generation stops.
//!
//! A request carries one [`SamplingParams`] from `LLMEngine::add_request` into its
//! [`Sequence`](crate::sequence::Sequence); the scheduler reads the stop conditions
//! (`max_tokens`, `ignore_eos`, `stop_token_ids`) in `postprocess`, and the model runner's sampler
//! reads the rest (`temperature`, `top_k`, `top_p`, the resolved seed).
//!
//! nano-vLLM's `SamplingParams` has `temperature`, `max_tokens` and `ignore_eos` and forbids
//! greedy decoding; here `temperature == 0` means greedy, and top-k, top-p, stop token ids and a
//! per-request seed are added.

use nanovllm_utils::{Error, Result};

/// How to sample the tokens of one request and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature. `0.0` is greedy (argmax); must be finite and not negative.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens before sampling; `0` turns the filter off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probabilities add up to `top_p`; must lie in
    /// `(0, 1]`, and `1.0` turns the filter off.
    pub top_p: f32,
    /// The most tokens to generate (at least 1). The engine lowers it when the prompt leaves less
    /// room than this in `max_model_len`.
    pub max_tokens: usize,
    /// Keep generating after an end-of-sequence token (benchmarks use it to get exactly
    /// `max_tokens` tokens). Tokens of `stop_token_ids` still stop the request.
    pub ignore_eos: bool,
    /// Extra token ids that end the request, whatever `ignore_eos` says.
    pub stop_token_ids: Vec<u32>,
    /// Seed of this request's random stream; `None` lets the engine derive one from the
    /// sequence id, so runs are reproducible either way.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_tokens: 64,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Whether sampling is greedy (argmax), i.e. `temperature == 0`.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field's range.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming the parameter and its value when `temperature` is negative
    /// or not finite, `top_p` is outside `(0, 1]` (or NaN), or `max_tokens` is 0.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::InvalidRequest(format!(
                "sampling parameter `temperature` is {}, expected a finite value >= 0 (0 = greedy)",
                self.temperature
            )));
        }
        // Written so that NaN fails too.
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidRequest(format!(
                "sampling parameter `top_p` is {}, expected a value in (0, 1] (1 = off)",
                self.top_p
            )));
        }
        if self.max_tokens == 0 {
            return Err(Error::InvalidRequest(
                "sampling parameter `max_tokens` is 0, expected at least 1".to_string(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(p: SamplingParams, needle: &str) {
        match p.validate() {
            Err(Error::InvalidRequest(msg)) => {
                assert!(msg.contains(needle), "message `{msg}` lacks `{needle}`")
            }
            other => panic!("expected InvalidRequest naming {needle}, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_match_nano_vllm() {
        let p = SamplingParams::default();
        p.validate().unwrap();
        assert_eq!(p.temperature, 1.0);
        assert_eq!(p.max_tokens, 64);
        assert!(!p.ignore_eos);
        assert!(!p.is_greedy());
    }

    #[test]
    fn greedy_is_allowed() {
        let p = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        p.validate().unwrap();
        assert!(p.is_greedy());
    }

    #[test]
    fn out_of_range_values_are_refused_by_name() {
        let d = SamplingParams::default;
        refused(
            SamplingParams {
                temperature: -0.5,
                ..d()
            },
            "`temperature` is -0.5",
        );
        refused(
            SamplingParams {
                temperature: f32::NAN,
                ..d()
            },
            "`temperature` is NaN",
        );
        refused(
            SamplingParams {
                temperature: f32::INFINITY,
                ..d()
            },
            "`temperature` is inf",
        );
        refused(SamplingParams { top_p: 0.0, ..d() }, "`top_p` is 0");
        refused(SamplingParams { top_p: 1.5, ..d() }, "`top_p` is 1.5");
        refused(
            SamplingParams {
                top_p: f32::NAN,
                ..d()
            },
            "`top_p` is NaN",
        );
        refused(
            SamplingParams {
                max_tokens: 0,
                ..d()
            },
            "`max_tokens` is 0",
        );
    }
}
