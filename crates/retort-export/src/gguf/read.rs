//! The GGUF reader: metadata, tensor table and zero-copy tensor data from a memory-mapped file.
//!
//! Every count and length in the file is checked against the bytes that remain before it is used, so a
//! truncated or hostile file is an error that names the offset, never a huge allocation or a panic.

use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{ExportError, Result};
use crate::gguf::types::{GgmlType, Value, ValueType};
use crate::gguf::write::{DEFAULT_ALIGNMENT, MAGIC};
use crate::quant;

/// A tensor of a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensor {
    /// Its name.
    pub name: String,
    /// Shape, outermost dimension first (PyTorch order; the file stores it reversed).
    pub shape: Vec<usize>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of its data from the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub nbytes: usize,
}

impl GgufTensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An opened GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// The tensor table in file order.
    pub tensors: Vec<GgufTensor>,
    data_start: usize,
    alignment: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: &str) -> ExportError {
        ExportError::gguf(self.path, format!("{what} at byte {}", self.pos))
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.buf.len() => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(self.err(&format!("the file ends inside {what} ({n} bytes needed)"))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// A count that must fit in what is left, given each item needs at least `min` bytes.
    fn count(&mut self, what: &str, min: usize) -> Result<usize> {
        let n = self.u64(what)?;
        match usize::try_from(n) {
            Ok(n) if n.checked_mul(min.max(1)).is_some_and(|b| b <= self.remaining()) => Ok(n),
            _ => Err(self.err(&format!("{what} is {n}, more than the file can hold"))),
        }
    }

    fn string(&mut self, what: &str) -> Result<Vec<u8>> {
        let n = self.count(what, 1)?;
        Ok(self.take(n, what)?.to_vec())
    }

    fn value(&mut self, t: ValueType, depth: usize) -> Result<Value> {
        Ok(match t {
            ValueType::U8 => Value::U8(self.array::<1>("a u8")?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array("an i8")?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array("a u16")?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array("an i16")?)),
            ValueType::U32 => Value::U32(self.u32("a u32")?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array("an i32")?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array("an f32")?)),
            ValueType::Bool => match self.array::<1>("a bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(&format!("a bool is {b}, not 0 or 1"))),
            },
            ValueType::String => Value::String(self.string("a string")?),
            ValueType::U64 => Value::U64(self.u64("a u64")?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array("an i64")?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array("an f64")?)),
            ValueType::Array => {
                if depth > 1 {
                    return Err(self.err("arrays are nested too deeply"));
                }
                let id = self.u32("an array's element type")?;
                let et = ValueType::from_id(id)
                    .ok_or_else(|| self.err(&format!("unknown array element type {id}")))?;
                let min = match et {
                    ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
                    ValueType::U16 | ValueType::I16 => 2,
                    ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
                    _ => 8,
                };
                let n = self.count("an array's length", min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(et, depth + 1)?);
                }
                Value::Array(et, items)
            }
        })
    }
}

#[allow(unsafe_code)]
fn map(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| ExportError::read(path, e))?;
    // SAFETY: read-only private map; retort never writes a file it has mapped. Another process
    // truncating the file while it is mapped could fault reads, a risk every GGUF/safetensors loader
    // (llama.cpp included) accepts.
    unsafe { Mmap::map(&file) }.map_err(|e| ExportError::read(path, e))
}

impl GgufFile {
    /// Opens and validates a GGUF file (header, metadata, tensor table, data bounds).
    pub fn open(path: &Path) -> Result<GgufFile> {
        let map = map(path)?;
        let parsed = parse(&map, path)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version: parsed.0,
            metadata: parsed.1,
            tensors: parsed.2,
            data_start: parsed.3,
            alignment: parsed.4,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The data alignment.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// An integer value.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's raw bytes.
    pub fn data(&self, t: &GgufTensor) -> &[u8] {
        let start = self.data_start + t.offset as usize;
        &self.map[start..start + t.nbytes]
    }

    /// A tensor's values as f32 (dequantized). Fails for types retort cannot dequantize.
    pub fn to_f32(&self, t: &GgufTensor) -> Result<Vec<f32>> {
        quant::dequantize(t.ty, self.data(t), t.numel())
            .map_err(|reason| ExportError::gguf(&self.path, format!("tensor `{}`: {reason}", t.name)))
    }
}

type Parsed = (u32, Vec<(String, Value)>, Vec<GgufTensor>, usize, usize);

fn parse(buf: &[u8], path: &Path) -> Result<Parsed> {
    let mut c = Cursor { buf, pos: 0, path };
    let magic = c.u32("the magic number")?;
    if magic != MAGIC {
        return Err(ExportError::gguf(path, "it does not start with `GGUF`"));
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(ExportError::gguf(path, format!("version {version} is not supported (2 and 3 are)")));
    }
    // A tensor info takes at least 8 (name) + 4 + 8 + 4 + 8 bytes; a key/value at least 8 + 4 + 1.
    let n_tensors = c.count("the tensor count", 32)?;
    let n_kv = c.count("the metadata count", 13)?;
    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key_bytes = c.string("a metadata key")?;
        let key = String::from_utf8(key_bytes).map_err(|_| c.err("a metadata key is not UTF-8"))?;
        let id = c.u32("a value type")?;
        let t = ValueType::from_id(id)
            .ok_or_else(|| c.err(&format!("key `{key}` has unknown value type {id}")))?;
        let v = c.value(t, 0)?;
        if metadata.iter().any(|(k, _)| *k == key) {
            return Err(c.err(&format!("key `{key}` appears twice")));
        }
        metadata.push((key, v));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => return Err(ExportError::gguf(path, "`general.alignment` must be a power of two")),
        },
    };
    let mut tensors = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name_bytes = c.string("a tensor name")?;
        let name = String::from_utf8(name_bytes).map_err(|_| c.err("a tensor name is not UTF-8"))?;
        let n_dims = c.u32("a tensor's dimension count")? as usize;
        if n_dims == 0 || n_dims > 4 {
            return Err(c.err(&format!("tensor `{name}` has {n_dims} dimensions (1 to 4 allowed)")));
        }
        let mut ne = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = c.u64("a tensor dimension")?;
            ne.push(usize::try_from(d).map_err(|_| c.err(&format!("tensor `{name}` is too large")))?);
        }
        let id = c.u32("a tensor type")?;
        let ty = GgmlType::from_id(id)
            .ok_or_else(|| c.err(&format!("tensor `{name}` has unknown ggml type {id}")))?;
        let offset = c.u64("a tensor offset")?;
        let shape: Vec<usize> = ne.iter().rev().copied().collect();
        let numel = ne.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let nbytes = numel.and_then(|n| {
            let row = ne[0];
            ty.row_bytes(row).and_then(|rb| rb.checked_mul(n.checked_div(row).unwrap_or(0)))
        });
        let Some(nbytes) = nbytes else {
            return Err(c.err(&format!(
                "tensor `{name}` has shape {shape:?}, which is not a whole number of {ty} blocks"
            )));
        };
        if offset % alignment as u64 != 0 {
            return Err(c.err(&format!("tensor `{name}` data offset {offset} is not aligned to {alignment}")));
        }
        if tensors.iter().any(|t: &GgufTensor| t.name == name) {
            return Err(c.err(&format!("tensor `{name}` appears twice")));
        }
        tensors.push(GgufTensor { name, shape, ty, offset, nbytes });
    }
    let data_start = c.pos.div_ceil(alignment) * alignment;
    for t in &tensors {
        let end = (data_start as u64).checked_add(t.offset).and_then(|s| s.checked_add(t.nbytes as u64));
        if end.is_none_or(|e| e > buf.len() as u64) {
            return Err(ExportError::gguf(
                path,
                format!(
                    "tensor `{}` ({} bytes at data offset {}) runs past the end of the file ({} bytes): truncated?",
                    t.name,
                    t.nbytes,
                    t.offset,
                    buf.len()
                ),
            ));
        }
    }
    Ok((version, metadata, tensors, data_start, alignment))
}
