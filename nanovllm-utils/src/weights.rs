//! Safetensors checkpoints: open a model folder, memory-map each weight file once, and hand out
//! zero-copy views of its tensors or bf16 copies (whole, or narrowed to one tensor-parallel shard).
//!
//! Sits at model load: the model crate walks its parameter names (through its packed-module
//! mapping, q/k/v -> qkv_proj, gate/up -> gate_up_proj) and calls [`Weights::load_bf16`] or
//! [`Weights::load_bf16_narrow`] for each, then uploads the result to the device. Every file is
//! fully validated when opened (header, offsets, sizes), so a truncated or corrupt file is an
//! [`Error::Weights`] naming it before any tensor is read. [`save_bf16`] writes the other way, for
//! dummy-weight folders and tests.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{SafeTensorError, SafeTensors, View};

use crate::error::{Error, Result};

/// Name of the index that maps tensor names to shard files in a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Element type of a stored tensor. Only the floating-point types a checkpoint's weights come in
/// are convertible to bf16; the rest are named so that errors can say what was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// bfloat16.
    BF16,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
    /// Any other safetensors dtype, by its safetensors name (`"I64"`, `"F8_E4M3"`, ...).
    Other(&'static str),
}

impl Dtype {
    fn from_safetensors(dtype: safetensors::Dtype) -> Self {
        use safetensors::Dtype as S;
        match dtype {
            S::BF16 => Dtype::BF16,
            S::F16 => Dtype::F16,
            S::F32 => Dtype::F32,
            S::BOOL => Dtype::Other("BOOL"),
            S::F4 => Dtype::Other("F4"),
            S::F6_E2M3 => Dtype::Other("F6_E2M3"),
            S::F6_E3M2 => Dtype::Other("F6_E3M2"),
            S::U8 => Dtype::Other("U8"),
            S::I8 => Dtype::Other("I8"),
            S::F8_E5M2 => Dtype::Other("F8_E5M2"),
            S::F8_E4M3 => Dtype::Other("F8_E4M3"),
            S::F8_E8M0 => Dtype::Other("F8_E8M0"),
            S::I16 => Dtype::Other("I16"),
            S::U16 => Dtype::Other("U16"),
            S::I32 => Dtype::Other("I32"),
            S::U32 => Dtype::Other("U32"),
            S::F64 => Dtype::Other("F64"),
            S::I64 => Dtype::Other("I64"),
            S::U64 => Dtype::Other("U64"),
            _ => Dtype::Other("unknown"),
        }
    }

    /// Bytes per element for the convertible types; `None` for [`Dtype::Other`].
    pub fn size_in_bytes(self) -> Option<usize> {
        match self {
            Dtype::BF16 | Dtype::F16 => Some(2),
            Dtype::F32 => Some(4),
            Dtype::Other(_) => None,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::F32 => "F32",
            Dtype::Other(name) => name,
        })
    }
}

/// A zero-copy view of one tensor inside a memory-mapped weight file.
#[derive(Clone)]
pub struct TensorRef<'a> {
    /// Element type as stored.
    pub dtype: Dtype,
    /// Shape, outermost dimension first (row-major).
    pub shape: Vec<usize>,
    /// Raw little-endian bytes, exactly `shape.product() * dtype size` long. Not necessarily
    /// aligned to the element size.
    pub data: &'a [u8],
}

impl fmt::Debug for TensorRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bytes can be hundreds of megabytes: show their count, not their values.
        f.debug_struct("TensorRef")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

impl TensorRef<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One memory-mapped weight file.
struct WeightFile {
    path: PathBuf,
    mmap: Mmap,
}

/// Where one tensor lives: its file and its byte range in that file's mapping.
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The tensors of a model folder, each weight file memory-mapped once.
pub struct Weights {
    dir: PathBuf,
    files: Vec<WeightFile>,
    tensors: HashMap<String, Entry>,
}

impl fmt::Debug for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Weights")
            .field("dir", &self.dir)
            .field(
                "files",
                &self.files.iter().map(|w| &w.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Weights {
    /// Opens the checkpoint in `dir`: the shards listed by `model.safetensors.index.json` when
    /// it exists (each tensor it lists must be in the shard it names), otherwise every
    /// `*.safetensors` file of the folder. Every file is mapped and validated here.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let (file_names, weight_map) = if index_path.exists() {
            let weight_map = read_index(&index_path)?;
            let mut names: Vec<String> = weight_map.values().cloned().collect();
            names.sort();
            names.dedup();
            for name in &names {
                if !dir.join(name).is_file() {
                    return Err(Error::Weights {
                        file: index_path.clone(),
                        msg: format!("shard `{name}` listed in the weight_map is missing"),
                    });
                }
            }
            (names, Some(weight_map))
        } else {
            let listing = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            let mut names = Vec::new();
            for entry in listing {
                let entry = entry.map_err(|e| Error::io(dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".safetensors") && entry.path().is_file() {
                    names.push(name);
                }
            }
            names.sort();
            (names, None)
        };
        if file_names.is_empty() {
            return Err(Error::Weights {
                file: dir.to_path_buf(),
                msg: format!("no *.safetensors file (and no {INDEX_FILE}) in this folder"),
            });
        }

        let mut weights = Weights {
            dir: dir.to_path_buf(),
            files: Vec::with_capacity(file_names.len()),
            tensors: HashMap::new(),
        };
        for name in &file_names {
            weights.add_file(&dir.join(name))?;
        }
        if let Some(weight_map) = weight_map {
            weights.check_index(&index_path, &weight_map)?;
        }
        Ok(weights)
    }

    /// Maps `path`, validates it and records its tensors.
    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only and lives as long as `self`. As with every mmap, a
        // process truncating or rewriting the file while it is mapped would change what we read
        // (or fault); checkpoints are not written while a model loads them.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let index = self.files.len();
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| corrupt(path, &e))?;
        // The data section starts after the 8-byte length and the header; `read_metadata` has
        // checked that the offsets tile it exactly up to the end of the file.
        let base = 8 + header_len;
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            let entry = Entry {
                file: index,
                dtype: Dtype::from_safetensors(info.dtype),
                shape: info.shape.clone(),
                start: base + start,
                end: base + end,
            };
            if let Some(previous) = self.tensors.get(&name) {
                return Err(Error::Weights {
                    file: path.to_path_buf(),
                    msg: format!(
                        "tensor `{name}` is also in {}",
                        self.files[previous.file].path.display()
                    ),
                });
            }
            self.tensors.insert(name, entry);
        }
        self.files.push(WeightFile {
            path: path.to_path_buf(),
            mmap,
        });
        Ok(())
    }

    /// Every tensor the index lists must be in the shard it names.
    fn check_index(&self, index_path: &Path, weight_map: &HashMap<String, String>) -> Result<()> {
        let mut listed: Vec<(&String, &String)> = weight_map.iter().collect();
        listed.sort();
        for (tensor, shard) in listed {
            let found_in = self.tensors.get(tensor).map(|e| &self.files[e.file].path);
            if found_in != Some(&self.dir.join(shard)) {
                return Err(Error::Weights {
                    file: index_path.to_path_buf(),
                    msg: match found_in {
                        Some(other) => format!(
                            "tensor `{tensor}` is listed in `{shard}` but found in {}",
                            other.display()
                        ),
                        None => format!("tensor `{tensor}` is listed in `{shard}` but not found"),
                    },
                });
            }
        }
        Ok(())
    }

    /// The folder this checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the checkpoint holds no tensor at all.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Whether a tensor called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A zero-copy view of tensor `name`.
    pub fn view(&self, name: &str) -> Result<TensorRef<'_>> {
        let entry = self.tensors.get(name).ok_or_else(|| Error::Weights {
            file: self.dir.clone(),
            msg: format!("no tensor named `{name}`"),
        })?;
        let file = &self.files[entry.file];
        // In range: `read_metadata` checked that every tensor's offsets lie inside the file.
        let data = &file.mmap[entry.start..entry.end];
        Ok(TensorRef {
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            data,
        })
    }

    /// The file holding tensor `name` (for error messages), or the folder if there is none.
    fn file_of(&self, name: &str) -> &Path {
        self.tensors
            .get(name)
            .map_or(&self.dir, |e| &self.files[e.file].path)
    }

    /// Tensor `name` as bf16, after checking that its shape is `expected_shape`. F32 and F16
    /// are rounded to the nearest bf16; BF16 is copied bit for bit.
    pub fn load_bf16(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<bf16>> {
        let t = self.checked_view(name, expected_shape)?;
        let mut out = Vec::with_capacity(t.numel());
        append_bf16(self.file_of(name), name, t.dtype, t.data, &mut out)?;
        Ok(out)
    }

    /// The slice `start..start + len` along dimension `dim` of tensor `name`, as bf16, after
    /// checking that the whole tensor's shape is `expected_shape`. The result is row-major with
    /// shape `expected_shape` except `len` at `dim`. This is how a tensor-parallel rank takes its
    /// shard: dim 0 for column-parallel weights (output rows), dim 1 for row-parallel weights.
    pub fn load_bf16_narrow(
        &self,
        name: &str,
        expected_shape: &[usize],
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<Vec<bf16>> {
        let t = self.checked_view(name, expected_shape)?;
        let file = self.file_of(name);
        let Some(&extent) = t.shape.get(dim) else {
            return Err(Error::Weights {
                file: file.to_path_buf(),
                msg: format!(
                    "tensor `{name}`: cannot narrow dim {dim} of a {}-D tensor {:?}",
                    t.shape.len(),
                    t.shape
                ),
            });
        };
        if start.checked_add(len).is_none_or(|end| end > extent) {
            return Err(Error::Weights {
                file: file.to_path_buf(),
                msg: format!(
                    "tensor `{name}`: slice {start}..{start}+{len} is outside dim {dim} of shape \
                     {:?}",
                    t.shape
                ),
            });
        }
        let elem = element_size(file, name, t.dtype)?;
        // Row-major: the tensor is `outer` blocks of `extent * inner` elements; from each block
        // we take the contiguous run `start * inner .. (start + len) * inner`.
        let outer: usize = t.shape[..dim].iter().product();
        let inner: usize = t.shape[dim + 1..].iter().product();
        let block = extent * inner * elem;
        let mut out = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            let from = o * block + start * inner * elem;
            let to = from + len * inner * elem;
            append_bf16(file, name, t.dtype, &t.data[from..to], &mut out)?;
        }
        Ok(out)
    }

    /// A view of `name` whose shape must equal `expected_shape`.
    fn checked_view(&self, name: &str, expected_shape: &[usize]) -> Result<TensorRef<'_>> {
        let t = self.view(name)?;
        if t.shape != expected_shape {
            return Err(Error::Weights {
                file: self.file_of(name).to_path_buf(),
                msg: format!(
                    "tensor `{name}`: expected shape {expected_shape:?}, found {:?}",
                    t.shape
                ),
            });
        }
        Ok(t)
    }
}

/// Bytes per element of a dtype convertible to bf16, or an error naming the tensor and dtype.
fn element_size(file: &Path, name: &str, dtype: Dtype) -> Result<usize> {
    dtype.size_in_bytes().ok_or_else(|| Error::Weights {
        file: file.to_path_buf(),
        msg: format!(
            "tensor `{name}`: dtype {dtype} cannot be converted to bf16 \
             (expected BF16, F16 or F32)"
        ),
    })
}

/// Converts little-endian `bytes` of `dtype` to bf16, appending to `out`.
fn append_bf16(
    file: &Path,
    name: &str,
    dtype: Dtype,
    bytes: &[u8],
    out: &mut Vec<bf16>,
) -> Result<()> {
    match dtype {
        Dtype::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))),
        ),
        Dtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_f32(f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())),
        ),
        Dtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        ),
        Dtype::Other(_) => {
            element_size(file, name, dtype)?;
        }
    }
    Ok(())
}

/// Reads the `weight_map` of a `model.safetensors.index.json`.
fn read_index(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::Weights {
        file: path.to_path_buf(),
        msg,
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("missing `weight_map` object".into()))?;
    map.iter()
        .map(|(tensor, shard)| match shard.as_str() {
            Some(s) => Ok((tensor.clone(), s.to_string())),
            None => Err(bad(format!(
                "weight_map entry for `{tensor}`: expected a file name, found {shard}"
            ))),
        })
        .collect()
}

/// An [`Error::Weights`] for a file safetensors could not parse.
fn corrupt(path: &Path, e: &SafeTensorError) -> Error {
    Error::Weights {
        file: path.to_path_buf(),
        msg: format!("not a valid safetensors file (truncated or corrupt?): {e}"),
    }
}

/// One tensor handed to the safetensors writer.
struct RawTensor<'a> {
    dtype: safetensors::Dtype,
    shape: &'a [usize],
    data: Cow<'a, [u8]>,
}

impl View for &RawTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `tensors` (name, shape, values) as a bf16 safetensors file at `path`, streaming to
/// disk without a second copy of the data. Each tensor's value count must match its shape, and
/// names must be unique.
pub fn save_bf16(path: &Path, tensors: &[(&str, &[usize], &[bf16])]) -> Result<()> {
    let raw: Vec<(&str, RawTensor<'_>)> = tensors
        .iter()
        .map(|&(name, shape, values)| {
            (
                name,
                RawTensor {
                    dtype: safetensors::Dtype::BF16,
                    shape,
                    data: bf16_bytes(values),
                },
            )
        })
        .collect();
    let counts: Vec<usize> = tensors.iter().map(|(_, _, v)| v.len()).collect();
    save_raw(path, &raw, &counts)
}

#[cfg(target_endian = "little")]
fn bf16_bytes(values: &[bf16]) -> Cow<'_, [u8]> {
    Cow::Borrowed(bytemuck::cast_slice(values))
}

#[cfg(not(target_endian = "little"))]
fn bf16_bytes(values: &[bf16]) -> Cow<'_, [u8]> {
    Cow::Owned(
        values
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
    )
}

/// Checks names and shapes (`counts[i]` is the number of values given for tensor i), then
/// writes the file.
fn save_raw(path: &Path, tensors: &[(&str, RawTensor<'_>)], counts: &[usize]) -> Result<()> {
    let bad = |msg: String| Error::Weights {
        file: path.to_path_buf(),
        msg,
    };
    let mut seen = std::collections::HashSet::new();
    for ((name, t), &count) in tensors.iter().zip(counts) {
        if !seen.insert(*name) {
            return Err(bad(format!("tensor `{name}` given twice")));
        }
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel != Some(count) {
            return Err(bad(format!(
                "tensor `{name}`: shape {:?} needs {} values, {count} given",
                t.shape,
                numel.map_or_else(|| "too many".to_string(), |n| n.to_string())
            )));
        }
    }
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (*n, t)), None, path).map_err(|e| {
        match e {
            SafeTensorError::IoError(source) => Error::io(path, source),
            other => bad(format!("cannot write safetensors: {other}")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh, empty folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("nanovllm-weights-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Values that are exact in bf16, distinct per position.
    fn ramp(n: usize, offset: f32) -> Vec<bf16> {
        (0..n).map(|i| bf16::from_f32(i as f32 + offset)).collect()
    }

    /// Writes F32 or F16 tensors, for the conversion paths of the loader.
    fn save_as(path: &Path, dtype: safetensors::Dtype, tensors: &[(&str, &[usize], &[f32])]) {
        let raw: Vec<(&str, RawTensor<'_>)> = tensors
            .iter()
            .map(|&(name, shape, values)| {
                let data: Vec<u8> = match dtype {
                    safetensors::Dtype::F32 => {
                        values.iter().flat_map(|v| v.to_le_bytes()).collect()
                    }
                    safetensors::Dtype::F16 => values
                        .iter()
                        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                        .collect(),
                    safetensors::Dtype::I64 => values
                        .iter()
                        .flat_map(|v| (*v as i64).to_le_bytes())
                        .collect(),
                    other => panic!("test writer does not do {other}"),
                };
                (
                    name,
                    RawTensor {
                        dtype,
                        shape,
                        data: Cow::Owned(data),
                    },
                )
            })
            .collect();
        let counts: Vec<usize> = tensors.iter().map(|(_, _, v)| v.len()).collect();
        save_raw(path, &raw, &counts).unwrap();
    }

    fn weights_error(result: Result<impl fmt::Debug>) -> String {
        match result {
            Err(e @ Error::Weights { .. }) => e.to_string(),
            other => panic!("expected a weights error, got {other:?}"),
        }
    }

    #[test]
    fn bf16_round_trip() {
        let dir = TempDir::new("bf16");
        let embed = ramp(6 * 4, 0.5);
        let norm = ramp(4, -3.0);
        save_bf16(
            &dir.0.join("model.safetensors"),
            &[("embed", &[6, 4], &embed), ("norm", &[4], &norm)],
        )
        .unwrap();
        let w = Weights::open(&dir.0).unwrap();
        assert_eq!(w.names(), ["embed", "norm"]);
        assert_eq!(w.len(), 2);
        assert!(w.contains("norm") && !w.contains("lm_head"));
        let v = w.view("embed").unwrap();
        assert_eq!(
            (v.dtype, v.shape.as_slice(), v.data.len()),
            (Dtype::BF16, &[6, 4][..], 48)
        );
        assert_eq!(w.load_bf16("embed", &[6, 4]).unwrap(), embed);
        assert_eq!(w.load_bf16("norm", &[4]).unwrap(), norm);
        let msg = weights_error(w.view("lm_head"));
        assert!(msg.contains("no tensor named `lm_head`"), "{msg}");
    }

    #[test]
    fn converts_f32_and_f16() {
        let dir = TempDir::new("convert");
        // 1 + 2^-9 is not a bf16: it rounds to 1 (ties to even), 1 + 3*2^-9 rounds up to 1 + 2^-7.
        let values = [
            1.0,
            -2.5,
            1.0 + 1.0 / 512.0,
            1.0 + 3.0 / 512.0,
            65504.0,
            1e-3,
        ];
        save_as(
            &dir.0.join("a.safetensors"),
            safetensors::Dtype::F32,
            &[("w32", &[2, 3], &values)],
        );
        save_as(
            &dir.0.join("b.safetensors"),
            safetensors::Dtype::F16,
            &[("w16", &[6], &values)],
        );
        save_as(
            &dir.0.join("c.safetensors"),
            safetensors::Dtype::I64,
            &[("ids", &[2], &[1.0, 2.0])],
        );
        let w = Weights::open(&dir.0).unwrap();
        let want32: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(w.load_bf16("w32", &[2, 3]).unwrap(), want32);
        assert_eq!(want32[2], bf16::ONE);
        assert_eq!(want32[3].to_f32(), 1.0 + 1.0 / 128.0);
        let want16: Vec<bf16> = values
            .iter()
            .map(|&v| bf16::from_f32(f16::from_f32(v).to_f32()))
            .collect();
        assert_eq!(w.load_bf16("w16", &[6]).unwrap(), want16);
        assert_eq!(w.view("w16").unwrap().dtype, Dtype::F16);
        assert_eq!(w.view("ids").unwrap().dtype, Dtype::Other("I64"));
        let msg = weights_error(w.load_bf16("ids", &[2]));
        assert!(msg.contains("`ids`") && msg.contains("I64"), "{msg}");
        // Narrowing a converted tensor converts only the slice.
        assert_eq!(
            w.load_bf16_narrow("w32", &[2, 3], 1, 1, 2).unwrap(),
            [want32[1], want32[2], want32[4], want32[5]]
        );
    }

    #[test]
    fn sharded_checkpoint_through_index() {
        let dir = TempDir::new("sharded");
        let (a, b, c) = (ramp(8, 0.0), ramp(3, 10.0), ramp(2, 20.0));
        save_bf16(
            &dir.0.join("model-00001-of-00002.safetensors"),
            &[("a", &[2, 4], &a)],
        )
        .unwrap();
        save_bf16(
            &dir.0.join("model-00002-of-00002.safetensors"),
            &[("b", &[3], &b), ("c", &[2], &c)],
        )
        .unwrap();
        // A stray file outside the index must be ignored.
        save_bf16(&dir.0.join("stray.safetensors"), &[("a", &[1], &a[..1])]).unwrap();
        let index = serde_json::json!({
            "metadata": {"total_size": 26},
            "weight_map": {
                "a": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors",
                "c": "model-00002-of-00002.safetensors",
            }
        });
        std::fs::write(dir.0.join(INDEX_FILE), index.to_string()).unwrap();
        let w = Weights::open(&dir.0).unwrap();
        assert_eq!(w.names(), ["a", "b", "c"]);
        assert_eq!(w.load_bf16("a", &[2, 4]).unwrap(), a);
        assert_eq!(w.load_bf16("b", &[3]).unwrap(), b);
        assert_eq!(w.load_bf16("c", &[2]).unwrap(), c);

        // The index points at a tensor in the wrong shard.
        let wrong = serde_json::json!({"weight_map": {"a": "model-00002-of-00002.safetensors"}});
        std::fs::write(dir.0.join(INDEX_FILE), wrong.to_string()).unwrap();
        let msg = weights_error(Weights::open(&dir.0));
        assert!(
            msg.contains("tensor `a` is listed in `model-00002-of-00002"),
            "{msg}"
        );

        // A listed shard is missing.
        std::fs::write(dir.0.join(INDEX_FILE), index.to_string()).unwrap();
        std::fs::remove_file(dir.0.join("model-00002-of-00002.safetensors")).unwrap();
        let msg = weights_error(Weights::open(&dir.0));
        assert!(
            msg.contains("shard `model-00002-of-00002.safetensors`"),
            "{msg}"
        );
        assert!(msg.contains(INDEX_FILE), "{msg}");

        // A corrupt index.
        std::fs::write(dir.0.join(INDEX_FILE), "{\"weight_map\": 3}").unwrap();
        let msg = weights_error(Weights::open(&dir.0));
        assert!(msg.contains("weight_map"), "{msg}");
    }

    #[test]
    fn duplicate_tensor_across_files_is_refused() {
        let dir = TempDir::new("dup");
        save_bf16(&dir.0.join("x.safetensors"), &[("t", &[2], &ramp(2, 0.0))]).unwrap();
        save_bf16(&dir.0.join("y.safetensors"), &[("t", &[2], &ramp(2, 1.0))]).unwrap();
        let msg = weights_error(Weights::open(&dir.0));
        assert!(
            msg.contains("tensor `t` is also in") && msg.contains("x.safetensors"),
            "{msg}"
        );
    }

    #[test]
    fn narrow_along_dim_0_and_1() {
        let dir = TempDir::new("narrow");
        // 4 x 6 matrix with value 10*row + col.
        let m: Vec<bf16> = (0..4)
            .flat_map(|r| (0..6).map(move |c| bf16::from_f32((10 * r + c) as f32)))
            .collect();
        let bias = ramp(4, 0.0);
        save_bf16(
            &dir.0.join("m.safetensors"),
            &[("m", &[4, 6], &m), ("bias", &[4], &bias)],
        )
        .unwrap();
        let w = Weights::open(&dir.0).unwrap();
        let as_f32 = |v: Vec<bf16>| v.into_iter().map(f32::from).collect::<Vec<_>>();
        // Rows 1..3 (a column-parallel shard).
        assert_eq!(
            as_f32(w.load_bf16_narrow("m", &[4, 6], 0, 1, 2).unwrap()),
            [10., 11., 12., 13., 14., 15., 20., 21., 22., 23., 24., 25.]
        );
        // Columns 3..6 (a row-parallel shard).
        assert_eq!(
            as_f32(w.load_bf16_narrow("m", &[4, 6], 1, 3, 3).unwrap()),
            [3., 4., 5., 13., 14., 15., 23., 24., 25., 33., 34., 35.]
        );
        // Two TP shards along dim 1 put back together give the whole tensor.
        let left = w.load_bf16_narrow("m", &[4, 6], 1, 0, 3).unwrap();
        let right = w.load_bf16_narrow("m", &[4, 6], 1, 3, 3).unwrap();
        let joined: Vec<bf16> = left
            .chunks(3)
            .zip(right.chunks(3))
            .flat_map(|(l, r)| l.iter().chain(r).copied())
            .collect();
        assert_eq!(joined, m);
        assert_eq!(
            as_f32(w.load_bf16_narrow("bias", &[4], 0, 2, 2).unwrap()),
            [2., 3.]
        );
        assert!(w
            .load_bf16_narrow("m", &[4, 6], 1, 6, 0)
            .unwrap()
            .is_empty());

        let msg = weights_error(w.load_bf16_narrow("m", &[4, 6], 1, 4, 3));
        assert!(
            msg.contains("slice 4..4+3 is outside dim 1 of shape [4, 6]"),
            "{msg}"
        );
        let msg = weights_error(w.load_bf16_narrow("m", &[4, 6], 0, usize::MAX, 2));
        assert!(msg.contains("outside dim 0"), "{msg}");
        let msg = weights_error(w.load_bf16_narrow("m", &[4, 6], 2, 0, 1));
        assert!(msg.contains("cannot narrow dim 2 of a 2-D tensor"), "{msg}");
        let msg = weights_error(w.load_bf16_narrow("m", &[6, 4], 0, 0, 1));
        assert!(msg.contains("expected shape [6, 4], found [4, 6]"), "{msg}");
    }

    #[test]
    fn shape_mismatch_names_tensor_and_shapes() {
        let dir = TempDir::new("shape");
        save_bf16(
            &dir.0.join("model.safetensors"),
            &[("layer.w", &[2, 3], &ramp(6, 0.0))],
        )
        .unwrap();
        let w = Weights::open(&dir.0).unwrap();
        let msg = weights_error(w.load_bf16("layer.w", &[3, 2]));
        assert!(
            msg.contains("tensor `layer.w`: expected shape [3, 2], found [2, 3]"),
            "{msg}"
        );
        assert!(msg.contains("model.safetensors"), "{msg}");
        let msg = weights_error(w.load_bf16("layer.w", &[6]));
        assert!(msg.contains("found [2, 3]"), "{msg}");
    }

    #[test]
    fn save_refuses_bad_input() {
        let dir = TempDir::new("save");
        let path = dir.0.join("bad.safetensors");
        let msg = weights_error(save_bf16(&path, &[("t", &[2, 2], &ramp(3, 0.0))]));
        assert!(
            msg.contains("tensor `t`: shape [2, 2] needs 4 values, 3 given"),
            "{msg}"
        );
        let one = ramp(1, 0.0);
        let msg = weights_error(save_bf16(&path, &[("t", &[1], &one), ("t", &[1], &one)]));
        assert!(msg.contains("`t` given twice"), "{msg}");
        let err = save_bf16(
            &dir.0.join("no/such/dir/x.safetensors"),
            &[("t", &[1], &one)],
        )
        .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn empty_or_missing_folder() {
        let dir = TempDir::new("empty");
        std::fs::write(dir.0.join("config.json"), "{}").unwrap();
        let msg = weights_error(Weights::open(&dir.0));
        assert!(msg.contains("no *.safetensors file"), "{msg}");
        assert!(msg.contains(&dir.0.display().to_string()), "{msg}");
        let err = Weights::open(&dir.0.join("absent")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn truncated_file_is_an_error_naming_it() {
        let dir = TempDir::new("truncated");
        let path = dir.0.join("model.safetensors");
        save_bf16(&path, &[("t", &[16, 16], &ramp(256, 0.0))]).unwrap();
        let full = std::fs::read(&path).unwrap();
        // Cut inside the data, inside the header, inside the length prefix, and to nothing.
        for keep in [full.len() - 1, full.len() / 2, 20, 4, 0] {
            std::fs::write(&path, &full[..keep]).unwrap();
            let msg = weights_error(Weights::open(&dir.0));
            assert!(msg.contains("model.safetensors"), "kept {keep}: {msg}");
            assert!(
                msg.contains("not a valid safetensors file"),
                "kept {keep}: {msg}"
            );
        }
        // Extra bytes at the end are corruption too.
        let mut longer = full.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        weights_error(Weights::open(&dir.0));
        std::fs::write(&path, &full).unwrap();
        Weights::open(&dir.0).unwrap();
    }

    #[test]
    fn garbled_header_is_an_error_naming_it() {
        let dir = TempDir::new("garbled");
        let path = dir.0.join("model.safetensors");
        save_bf16(&path, &[("t", &[4], &ramp(4, 0.0))]).unwrap();
        let full = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&full[8..8 + header_len])
            .unwrap()
            .to_string();

        let rewrite = |header: &str, data: &[u8]| {
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(data);
            std::fs::write(&path, bytes).unwrap();
        };
        let data = &full[8 + header_len..];
        let cases = [
            // Not JSON.
            header.replace('{', "<"),
            // Offsets past the data.
            header.replace("[0,8]", "[0,800]"),
            // Shape disagreeing with the byte count.
            header.replace("[4]", "[5]"),
            // Unknown dtype.
            header.replace("BF16", "Q4"),
        ];
        for garbled in &cases {
            assert_ne!(garbled, &header, "the test must change the header");
            rewrite(garbled, data);
            let msg = weights_error(Weights::open(&dir.0));
            assert!(msg.contains("model.safetensors"), "{garbled}: {msg}");
        }
        // A length prefix claiming a huge header.
        let mut bytes = full.clone();
        bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
        weights_error(Weights::open(&dir.0));
        // Invalid UTF-8 in the header.
        let mut bytes = full.clone();
        bytes[9] = 0xff;
        std::fs::write(&path, bytes).unwrap();
        weights_error(Weights::open(&dir.0));
    }
}
