//! The benchmark workload of nano-vLLM's `bench.py`, reproduced bit for bit.
//!
//! `bench.py` draws its prompts and output lengths from Python's `random` module after
//! `random.seed(0)`. To compare throughput with nano-vLLM and vLLM on exactly the same requests,
//! [`PyRandom`] re-implements the parts of CPython's `random.Random` that the script touches: the
//! MT19937 generator seeded through `init_by_array` with the key CPython derives from an integer
//! seed, `getrandbits`, `_randbelow_with_getrandbits` and `randint`. [`Workload::bench_py`] then
//! replays the script's draws in its order. The `nanovllm bench` command and `benches/` feed the
//! result to the engine as token-id prompts (no tokenizer involved).

use nanovllm_utils::{Error, Result};

/// Number of 32-bit words in the MT19937 state.
const N: usize = 624;
/// MT19937's middle word offset.
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// CPython's `random.Random`, restricted to what `bench.py` uses: a Mersenne Twister (MT19937)
/// seeded as `random.seed(n)` seeds it for a non-negative integer `n`, with `getrandbits` and
/// `randint` returning the same numbers as CPython for the same seed.
#[derive(Clone)]
pub struct PyRandom {
    state: [u32; N],
    index: usize,
}

impl std::fmt::Debug for PyRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyRandom")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl PyRandom {
    /// A generator in the state CPython's `random.seed(seed)` leaves it in.
    pub fn new(seed: u64) -> Self {
        let mut rng = PyRandom {
            state: [0; N],
            index: N,
        };
        rng.seed(seed);
        rng
    }

    /// Re-seeds like `random.seed(seed)`: CPython splits the absolute value of an integer seed
    /// into 32-bit words, least significant first (at least one word, so 0 gives the key `[0]`),
    /// and feeds them to MT19937's `init_by_array`.
    pub fn seed(&mut self, seed: u64) {
        let low = seed as u32;
        let high = (seed >> 32) as u32;
        if high == 0 {
            self.init_by_array(&[low]);
        } else {
            self.init_by_array(&[low, high]);
        }
    }

    /// MT19937's `init_genrand`: fills the state from one 32-bit seed.
    fn init_genrand(&mut self, s: u32) {
        self.state[0] = s;
        for i in 1..N {
            let prev = self.state[i - 1];
            self.state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        self.index = N;
    }

    /// MT19937's `init_by_array`, as in CPython's `_randommodule.c`.
    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19_650_218);
        let mt = &mut self.state;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = mt[i - 1];
            mt[i] = (mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = mt[i - 1];
            mt[i] =
                (mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
        }
        // Assures a non-zero initial state.
        mt[0] = 0x8000_0000;
        self.index = N;
    }

    /// Regenerates the 624 words of state (MT19937's "twist").
    fn twist(&mut self) {
        let mt = &mut self.state;
        for kk in 0..N {
            let y = (mt[kk] & UPPER_MASK) | (mt[(kk + 1) % N] & LOWER_MASK);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            mt[kk] = mt[(kk + M) % N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// The next tempered 32-bit output of MT19937 (`genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// Python's `random.getrandbits(k)` for `k <= 64`: an integer of `k` random bits. As in
    /// CPython, `k <= 32` takes the top `k` bits of one output; a wider `k` fills 32-bit words
    /// least significant first and keeps the top bits of the last one.
    pub fn getrandbits(&mut self, k: u32) -> Result<u64> {
        match k {
            0 => Ok(0),
            1..=32 => Ok(u64::from(self.next_u32() >> (32 - k))),
            33..=64 => {
                let low = u64::from(self.next_u32());
                let high = u64::from(self.next_u32() >> (64 - k));
                Ok(low | (high << 32))
            }
            _ => Err(Error::Other(format!(
                "PyRandom::getrandbits: k = {k} bits requested, at most 64 are supported"
            ))),
        }
    }

    /// Python's `Random._randbelow_with_getrandbits(n)`: a uniform integer in `[0, n)` by
    /// rejection sampling on `n.bit_length()` random bits. `n` must be positive.
    pub fn randbelow(&mut self, n: u64) -> Result<u64> {
        if n == 0 {
            return Err(Error::Other(
                "PyRandom::randbelow: empty range, n must be at least 1".into(),
            ));
        }
        let k = u64::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(k)?;
            if r < n {
                return Ok(r);
            }
        }
    }

    /// Python's `random.randint(a, b)`: a uniform integer in `[a, b]`, both ends included.
    pub fn randint(&mut self, a: i64, b: i64) -> Result<i64> {
        if b < a {
            return Err(Error::Other(format!(
                "PyRandom::randint: empty range [{a}, {b}], b must be at least a"
            )));
        }
        // randint(a, b) = randrange(a, b + 1) = a + _randbelow(b + 1 - a).
        let width = (i128::from(b) - i128::from(a) + 1) as u128;
        let width = u64::try_from(width).map_err(|_| {
            Error::Other(format!(
                "PyRandom::randint: range [{a}, {b}] is wider than 2^64"
            ))
        })?;
        let r = self.randbelow(width)?;
        Ok((i128::from(a) + i128::from(r)) as i64)
    }
}

/// A list of token-id prompts with the number of tokens to generate for each, as `bench.py`
/// feeds `LLM.generate` (with `ignore_eos`, so each sequence produces exactly `max_tokens`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Prompt token ids, one list per sequence.
    pub prompts: Vec<Vec<u32>>,
    /// Tokens to generate per sequence (`SamplingParams.max_tokens`).
    pub max_tokens: Vec<usize>,
}

impl Workload {
    /// Largest prompt token id `bench.py` draws (`randint(0, 10000)`, both ends included).
    pub const BENCH_MAX_TOKEN_ID: i64 = 10_000;

    /// Replays `bench.py`'s draws with Python's `random` seeded with `seed`:
    ///
    /// ```python
    /// prompt_token_ids = [[randint(0, 10000) for _ in range(randint(min_input_len, max_input_len))]
    ///                     for _ in range(num_seqs)]
    /// max_tokens = [randint(min_output_len, max_output_len) for _ in range(num_seqs)]
    /// ```
    ///
    /// `bench_py(256, 100, 1024, 100, 1024, 0)` is nano-vLLM's benchmark: 142,827 prompt tokens
    /// and 133,966 output tokens. Fails when a minimum exceeds its maximum.
    pub fn bench_py(
        num_seqs: usize,
        min_input_len: usize,
        max_input_len: usize,
        min_output_len: usize,
        max_output_len: usize,
        seed: u64,
    ) -> Result<Workload> {
        let range = |option: &'static str, lo: usize, hi: usize| -> Result<(i64, i64)> {
            let to_i64 = |v: usize| {
                i64::try_from(v).map_err(|_| Error::EngineConfig {
                    option,
                    msg: format!("{v} is too large"),
                })
            };
            if lo > hi {
                return Err(Error::EngineConfig {
                    option,
                    msg: format!("minimum {lo} is larger than maximum {hi}"),
                });
            }
            Ok((to_i64(lo)?, to_i64(hi)?))
        };
        let (in_lo, in_hi) = range("input_len", min_input_len, max_input_len)?;
        let (out_lo, out_hi) = range("output_len", min_output_len, max_output_len)?;

        let mut rng = PyRandom::new(seed);
        let mut prompts = Vec::with_capacity(num_seqs);
        for _ in 0..num_seqs {
            let len = rng.randint(in_lo, in_hi)? as usize;
            let mut prompt = Vec::with_capacity(len);
            for _ in 0..len {
                prompt.push(rng.randint(0, Self::BENCH_MAX_TOKEN_ID)? as u32);
            }
            prompts.push(prompt);
        }
        let mut max_tokens = Vec::with_capacity(num_seqs);
        for _ in 0..num_seqs {
            max_tokens.push(rng.randint(out_lo, out_hi)? as usize);
        }
        Ok(Workload {
            prompts,
            max_tokens,
        })
    }

    /// `bench.py` exactly: 256 sequences, prompts of 100..=1024 tokens, 100..=1024 output
    /// tokens, seed 0.
    pub fn bench_py_default() -> Workload {
        // The constant arguments are valid ranges, so this cannot fail.
        Self::bench_py(256, 100, 1024, 100, 1024, 0).expect("bench.py's constant ranges are valid")
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// Whether the workload has no sequence.
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// Sum of the prompt lengths.
    pub fn total_prompt_tokens(&self) -> usize {
        self.prompts.iter().map(Vec::len).sum()
    }

    /// Sum of `max_tokens`: the tokens generated when EOS is ignored.
    pub fn total_output_tokens(&self) -> usize {
        self.max_tokens.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from CPython 3.11:
    /// `python3 -c "import random; random.seed(0); print([random.getrandbits(32) for _ in range(5)], random.randint(100,1024))"`
    /// prints `[3626764237, 1654615998, 3255389356, 3823568514, 1806341205] 141`.
    #[test]
    fn matches_cpython_seed0_getrandbits_and_randint() {
        let mut rng = PyRandom::new(0);
        let words: Vec<u64> = (0..5).map(|_| rng.getrandbits(32).unwrap()).collect();
        assert_eq!(
            words,
            [3626764237, 1654615998, 3255389356, 3823568514, 1806341205]
        );
        assert_eq!(rng.randint(100, 1024).unwrap(), 141);
    }

    /// `python3 -c "import random; random.seed(0); print(random.getrandbits(64), random.getrandbits(1), random.getrandbits(33), random.getrandbits(0), random.randint(0,10000), random.randint(-5,5), random.randint(7,7))"`
    /// prints `7106521602475165645 1 3823568514 0 663 -1 7`.
    #[test]
    fn matches_cpython_wide_narrow_and_signed_draws() {
        let mut rng = PyRandom::new(0);
        assert_eq!(rng.getrandbits(64).unwrap(), 7106521602475165645);
        assert_eq!(rng.getrandbits(1).unwrap(), 1);
        assert_eq!(rng.getrandbits(33).unwrap(), 3823568514);
        assert_eq!(rng.getrandbits(0).unwrap(), 0);
        assert_eq!(rng.randint(0, 10000).unwrap(), 663);
        assert_eq!(rng.randint(-5, 5).unwrap(), -1);
        assert_eq!(rng.randint(7, 7).unwrap(), 7);
    }

    /// Seeds wider than one 32-bit word give CPython a two-word key:
    /// `python3 -c "import random; random.seed(12345678901234); print([random.getrandbits(32) for _ in range(3)]); random.seed(2**32+5); print([random.getrandbits(32) for _ in range(3)])"`
    /// prints `[107551873, 2403399316, 624174316]` and `[675479763, 2085189291, 1213270837]`.
    #[test]
    fn matches_cpython_two_word_seeds() {
        let mut rng = PyRandom::new(12345678901234);
        let words: Vec<u64> = (0..3).map(|_| rng.getrandbits(32).unwrap()).collect();
        assert_eq!(words, [107551873, 2403399316, 624174316]);
        rng.seed((1 << 32) + 5);
        let words: Vec<u64> = (0..3).map(|_| rng.getrandbits(32).unwrap()).collect();
        assert_eq!(words, [675479763, 2085189291, 1213270837]);
    }

    /// A power-of-two width takes `n.bit_length()` bits (11 for 1024), not those of `n - 1`:
    /// `python3 -c "import random; random.seed(0); print([random.randint(0, 1023) for _ in range(6)], random.randint(1, 2))"`
    /// prints `[788, 861, 82, 530, 995, 829] 2`.
    #[test]
    fn matches_cpython_power_of_two_widths() {
        let mut rng = PyRandom::new(0);
        let draws: Vec<i64> = (0..6).map(|_| rng.randint(0, 1023).unwrap()).collect();
        assert_eq!(draws, [788, 861, 82, 530, 995, 829]);
        assert_eq!(rng.randint(1, 2).unwrap(), 2);
    }

    #[test]
    fn refuses_bad_ranges() {
        let mut rng = PyRandom::new(0);
        assert!(rng.randint(5, 4).is_err());
        assert!(rng.randbelow(0).is_err());
        assert!(rng.getrandbits(65).is_err());
        assert!(rng.randint(i64::MIN, i64::MAX).is_err());
        let err = Workload::bench_py(4, 10, 5, 1, 2, 0).unwrap_err();
        assert!(err.to_string().contains("input_len"), "{err}");
    }
}
