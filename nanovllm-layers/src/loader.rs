//! Where a layer's weights come from (nano-vLLM's `utils/loader.py`, seen from the layer side).
//!
//! Each layer's `load` asks a [`WeightSource`] for exactly the slice of a checkpoint tensor its
//! rank owns (a narrow along the sharded dimension, as `weight_loader` does in nano-vLLM), so a
//! rank never reads or holds the other ranks' shards. Two sources exist: the safetensors files
//! of a model folder ([`Weights`]) and the models crate's seeded dummy weights.

use std::path::PathBuf;

use half::bf16;
use nanovllm_utils::weights::Weights;
use nanovllm_utils::{Error, Result};

/// A set of named bf16 tensors a model can be loaded from.
pub trait WeightSource {
    /// Where the tensors come from (the model folder), for error messages.
    fn location(&self) -> PathBuf;

    /// Whether a tensor called `name` exists.
    fn contains(&self, name: &str) -> bool;

    /// The whole tensor `name`, row-major, after checking that its shape is `shape`.
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<bf16>>;

    /// Tensor `name` (whose full shape must be `shape`) narrowed to indices
    /// `start..start + len` along dimension `dim`, row-major in the narrowed shape.
    fn load_narrow(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<Vec<bf16>>;

    /// [`WeightSource::load_narrow`] into `out`, which must have exactly the narrowed number of
    /// elements: how the fused layers place each part of their weight without another copy.
    fn load_narrow_into(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        start: usize,
        len: usize,
        out: &mut [bf16],
    ) -> Result<()> {
        let data = self.load_narrow(name, shape, dim, start, len)?;
        if data.len() != out.len() {
            return Err(Error::Weights {
                file: self.location(),
                msg: format!(
                    "`{name}`: {} values for a slice of {} (shape {shape:?}, dim {dim}, \
                     {start}..{start}+{len})",
                    data.len(),
                    out.len()
                ),
            });
        }
        out.copy_from_slice(&data);
        Ok(())
    }
}

/// A host buffer of `len` zeros for a weight shard about to be read. The memory comes zeroed
/// from the allocator (no pass over it here), so whoever fills it first - in parallel, for the
/// dummy weights - also takes the page faults.
pub fn host_zeros(len: usize) -> Result<Vec<bf16>> {
    bytemuck::allocation::try_zeroed_vec(len).map_err(|()| {
        Error::OutOfMemory(format!(
            "{len} bf16 values of host memory to stage a weight shard"
        ))
    })
}

impl WeightSource for Weights {
    fn location(&self) -> PathBuf {
        self.dir().to_path_buf()
    }

    fn contains(&self, name: &str) -> bool {
        Weights::contains(self, name)
    }

    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<bf16>> {
        self.load_bf16(name, shape)
    }

    fn load_narrow(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<Vec<bf16>> {
        self.load_bf16_narrow(name, shape, dim, start, len)
    }
}

/// Test-only tensors held in memory, narrowed by plain index arithmetic.
#[cfg(test)]
pub(crate) mod host {
    use super::*;
    use std::collections::HashMap;

    /// Named full tensors in host memory.
    #[derive(Default)]
    pub struct HostWeights(pub HashMap<String, (Vec<usize>, Vec<bf16>)>);

    impl HostWeights {
        pub fn insert(&mut self, name: &str, shape: &[usize], data: Vec<bf16>) {
            assert_eq!(shape.iter().product::<usize>(), data.len());
            self.0.insert(name.to_string(), (shape.to_vec(), data));
        }

        fn get(&self, name: &str, shape: &[usize]) -> Result<&[bf16]> {
            let err = |msg: String| Error::Weights {
                file: "<memory>".into(),
                msg,
            };
            let (s, d) = self
                .0
                .get(name)
                .ok_or_else(|| err(format!("missing tensor `{name}`")))?;
            if s != shape {
                return Err(err(format!("`{name}`: shape {s:?}, expected {shape:?}")));
            }
            Ok(d)
        }
    }

    impl WeightSource for HostWeights {
        fn location(&self) -> PathBuf {
            "<memory>".into()
        }

        fn contains(&self, name: &str) -> bool {
            self.0.contains_key(name)
        }

        fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<bf16>> {
            self.get(name, shape).map(<[bf16]>::to_vec)
        }

        fn load_narrow(
            &self,
            name: &str,
            shape: &[usize],
            dim: usize,
            start: usize,
            len: usize,
        ) -> Result<Vec<bf16>> {
            let d = self.get(name, shape)?;
            let outer: usize = shape[..dim].iter().product();
            let inner: usize = shape[dim + 1..].iter().product();
            let mut out = Vec::with_capacity(outer * len * inner);
            for o in 0..outer {
                let base = (o * shape[dim] + start) * inner;
                out.extend_from_slice(&d[base..base + len * inner]);
            }
            Ok(out)
        }
    }
}
