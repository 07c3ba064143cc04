//! safetensors checkpoints: one file or shards with `model.safetensors.index.json`, memory-mapped, read
//! through zero-copy views. Headers are validated before any tensor is touched: a header claiming
//! gigabytes or a truncated file is an error, never an allocation.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

/// Element types of tensors.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// Anything else (integers, fp8, ...), kept by name: only an error if a model needs it as weights.
    Other(String),
}

impl Dtype {
    /// Bytes per element (0 for [`Dtype::Other`]).
    pub fn size(&self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::Other(_) => 0,
        }
    }

    /// The safetensors spelling.
    pub fn name(&self) -> &str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::Other(s) => s,
        }
    }

    fn from_st(d: safetensors::Dtype) -> Dtype {
        match d {
            safetensors::Dtype::F32 => Dtype::F32,
            safetensors::Dtype::F16 => Dtype::F16,
            safetensors::Dtype::BF16 => Dtype::BF16,
            other => Dtype::Other(format!("{other:?}")),
        }
    }
}

/// A problem with a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// No safetensors weights in the directory.
    #[error("`{}` has no model.safetensors or model.safetensors.index.json", dir.display())]
    Missing {
        /// The directory.
        dir: PathBuf,
    },
    /// A file could not be opened or mapped.
    #[error("cannot read `{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file.
    #[error("`{}` is not a valid safetensors file: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The shard index is inconsistent.
    #[error("`{}`: {reason}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor needed as weights has a dtype retort does not load.
    #[error("tensor `{tensor}` in `{}` is {dtype}; retort loads F32, F16 and BF16 weights", path.display())]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: String,
    },
}

/// Where a tensor lives.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    file: usize,
    start: usize,
    end: usize,
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// An opened checkpoint.
pub struct Checkpoint {
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("files", &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A tensor's bytes, borrowed from the mapped file.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// Its key.
    pub name: &'a str,
    /// Element type.
    pub dtype: &'a Dtype,
    /// Shape.
    pub shape: &'a [usize],
    /// Little-endian bytes.
    pub data: &'a [u8],
    /// The file it is in.
    pub path: &'a Path,
}

impl TensorView<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as f32 (exact for F16 and BF16). Errors on non-float dtypes.
    pub fn to_f32(&self) -> Result<Vec<f32>, WeightsError> {
        let mut out = vec![0f32; self.numel()];
        self.read_f32_into(&mut out)?;
        Ok(out)
    }

    /// Converts into a caller's buffer of exactly `numel` values.
    pub fn read_f32_into(&self, out: &mut [f32]) -> Result<(), WeightsError> {
        debug_assert_eq!(out.len(), self.numel());
        match self.dtype {
            Dtype::F32 => {
                for (o, b) in out.iter_mut().zip(self.data.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::F16 => {
                for (o, b) in out.iter_mut().zip(self.data.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            Dtype::BF16 => {
                for (o, b) in out.iter_mut().zip(self.data.chunks_exact(2)) {
                    *o = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            Dtype::Other(d) => {
                return Err(WeightsError::UnsupportedDtype {
                    path: self.path.to_path_buf(),
                    tensor: self.name.to_string(),
                    dtype: d.clone(),
                });
            }
        }
        Ok(())
    }
}

#[allow(unsafe_code)]
fn map(path: &Path) -> Result<Mmap, WeightsError> {
    let file =
        std::fs::File::open(path).map_err(|source| WeightsError::Io { path: path.to_path_buf(), source })?;
    // SAFETY: the map is read-only and private to this process. If another process truncates or rewrites
    // the file while it is mapped, reads may fault or see new bytes; every safetensors loader (PyTorch,
    // candle) accepts that risk, and retort never writes into a checkpoint it has open.
    unsafe { Mmap::map(&file) }.map_err(|source| WeightsError::Io { path: path.to_path_buf(), source })
}

impl Checkpoint {
    /// Opens the weights of a model directory: `model.safetensors.index.json` (sharded) or
    /// `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Checkpoint, WeightsError> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return Checkpoint::open_index(&index);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Checkpoint::open_files(&[single]);
        }
        Err(WeightsError::Missing { dir: dir.to_path_buf() })
    }

    /// Opens a sharded checkpoint from its index file.
    pub fn open_index(index: &Path) -> Result<Checkpoint, WeightsError> {
        let bad = |reason: String| WeightsError::Index { path: index.to_path_buf(), reason };
        let text = std::fs::read_to_string(index)
            .map_err(|source| WeightsError::Io { path: index.to_path_buf(), source })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not valid JSON at line {}: {e}", e.line())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("has no `weight_map` object".into()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<String> = Vec::new();
        let mut expected: BTreeMap<&str, &str> = BTreeMap::new();
        for (tensor, file) in map {
            let file =
                file.as_str().ok_or_else(|| bad(format!("`weight_map.{tensor}` is not a file name")))?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(bad(format!("`weight_map.{tensor}` points outside the directory: `{file}`")));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
            expected.insert(tensor, file);
        }
        files.sort();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.is_file() {
                return Err(bad(format!("lists shard `{}`, which does not exist", p.display())));
            }
        }
        let ckpt = Checkpoint::open_files(&paths)?;
        for (tensor, file) in expected {
            match ckpt.tensors.get(tensor) {
                Some(info) if ckpt.shards[info.file].path.file_name().is_some_and(|n| n == file) => {}
                Some(info) => {
                    return Err(bad(format!(
                        "maps `{tensor}` to `{file}` but it is in `{}`",
                        ckpt.shards[info.file].path.display()
                    )));
                }
                None => return Err(bad(format!("maps `{tensor}` to `{file}`, which does not contain it"))),
            }
        }
        Ok(ckpt)
    }

    /// Opens one or more safetensors files as one checkpoint (a tensor may appear in only one).
    pub fn open_files(paths: &[PathBuf]) -> Result<Checkpoint, WeightsError> {
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        let mut metadata = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let m = map(path)?;
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&m).map_err(|e| WeightsError::Invalid {
                    path: path.clone(),
                    reason: match e {
                        safetensors::SafeTensorError::HeaderTooLarge => {
                            "its header claims to be larger than 100 MB".into()
                        }
                        safetensors::SafeTensorError::InvalidHeaderLength => {
                            "its header length runs past the end of the file (truncated or not safetensors)"
                                .into()
                        }
                        safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                            "its tensors do not fill the file exactly (truncated or corrupt)".into()
                        }
                        safetensors::SafeTensorError::HeaderTooSmall => {
                            "it is shorter than a safetensors header".into()
                        }
                        other => format!("{other}"),
                    },
                })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let t = TensorInfo {
                    dtype: Dtype::from_st(info.dtype),
                    shape: info.shape.clone(),
                    file: i,
                    start: base + info.data_offsets.0,
                    end: base + info.data_offsets.1,
                };
                if let Some(prev) = tensors.insert(name.clone(), t) {
                    return Err(WeightsError::Invalid {
                        path: path.clone(),
                        reason: format!(
                            "tensor `{name}` is also in `{}`",
                            shards.get(prev.file).map_or_else(
                                || path.display().to_string(),
                                |s: &Shard| s.path.display().to_string()
                            )
                        ),
                    });
                }
            }
            if let Some(md) = meta.metadata() {
                for (k, v) in md {
                    metadata.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            shards.push(Shard { path: path.clone(), map: m });
        }
        Ok(Checkpoint { shards, tensors, metadata })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// dtype and shape of a tensor.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// A zero-copy view of a tensor.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let (key, info) = self.tensors.get_key_value(name)?;
        let shard = &self.shards[info.file];
        Some(TensorView {
            name: key,
            dtype: &info.dtype,
            shape: &info.shape,
            data: &shard.map[info.start..info.end],
            path: &shard.path,
        })
    }

    /// The `__metadata__` of the files (e.g. `{"format": "pt"}`).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The files, in order.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// The most common float dtype of the tensors (what the model was saved in).
    pub fn dominant_dtype(&self) -> Option<Dtype> {
        let mut counts: HashMap<&Dtype, usize> = HashMap::new();
        for t in self.tensors.values() {
            *counts.entry(&t.dtype).or_default() += t.shape.iter().product::<usize>();
        }
        counts.into_iter().filter(|(d, _)| d.size() > 0).max_by_key(|(_, n)| *n).map(|(d, _)| d.clone())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a safetensors file with the given f32 tensors (test helper; the real writer is in
    /// retort-export).
    pub(crate) fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, shape, values) in tensors {
            let start = data.len();
            for v in values {
                data.extend_from_slice(&v.to_le_bytes());
            }
            header.insert(
                (*name).to_string(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let mut h = serde_json::to_vec(&header).unwrap();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&h);
        bytes.extend_from_slice(&data);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn single_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        write_f32(
            &dir.path().join("model.safetensors"),
            &[("a", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]), ("b", vec![1], vec![-0.5])],
        );
        let c = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(c.names().collect::<Vec<_>>(), ["a", "b"]);
        let a = c.get("a").unwrap();
        assert_eq!(a.shape, [2, 2]);
        assert_eq!(a.to_f32().unwrap(), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(c.get("b").unwrap().to_f32().unwrap(), [-0.5]);
        assert_eq!(c.dominant_dtype(), Some(Dtype::F32));
    }

    #[test]
    fn sharded_with_index() {
        let dir = tempfile::tempdir().unwrap();
        write_f32(&dir.path().join("model-00001-of-00002.safetensors"), &[("a", vec![1], vec![1.0])]);
        write_f32(&dir.path().join("model-00002-of-00002.safetensors"), &[("b", vec![1], vec![2.0])]);
        let index = serde_json::json!({"metadata": {"total_size": 8}, "weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}});
        std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
        let c = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(c.get("b").unwrap().to_f32().unwrap(), [2.0]);
        assert_eq!(c.files().len(), 2);
        // An index that lies about where a tensor is.
        let index = serde_json::json!({"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}});
        std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("does not contain it"), "{e}");
    }

    #[test]
    fn truncated_and_lying_headers_are_refused_without_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        write_f32(&p, &[("a", vec![4], vec![1.0; 4])]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        // A header length claiming 16 GB.
        let mut lying = (16u64 << 30).to_le_bytes().to_vec();
        lying.extend_from_slice(b"{}");
        std::fs::write(&p, lying).unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("larger than 100 MB"), "{e}");
        std::fs::write(&p, b"abc").unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("shorter than a safetensors header"), "{e}");
        let e = Checkpoint::open(&dir.path().join("nowhere")).unwrap_err().to_string();
        assert!(e.contains("has no model.safetensors"), "{e}");
    }
}
