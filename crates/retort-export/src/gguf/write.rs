//! The GGUF v3 writer: header, typed metadata, tensor infos, aligned data.
//!
//! Everything about the layout is known before the first byte of tensor data: [`GgufHeader`] holds the
//! metadata and the tensor table (names, shapes, types), so offsets are computed up front and tensor
//! data is then streamed one tensor at a time through [`GgufWriter`], in table order. Nothing is kept
//! in memory but the tensor being written.

use std::io::{self, Write};

use crate::gguf::types::{GgmlType, Value, ValueType};

/// `GGUF` as a little-endian u32.
pub const MAGIC: u32 = 0x4655_4747;
/// The version retort writes.
pub const VERSION: u32 = 3;
/// ggml's default data alignment (`GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: usize = 32;

/// One tensor of the table: name, shape in PyTorch order (outermost first) and element type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// llama.cpp's tensor name.
    pub name: String,
    /// Shape, outermost dimension first (GGUF stores it reversed: `ne[0]` is the row length).
    pub shape: Vec<usize>,
    /// Element type.
    pub ty: GgmlType,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Length of one row (the innermost dimension).
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Bytes of data, or `None` when rows are not whole blocks of the type.
    pub fn nbytes(&self) -> Option<usize> {
        let rows = self.numel().checked_div(self.row_len()).unwrap_or(0);
        self.ty.row_bytes(self.row_len())?.checked_mul(rows)
    }
}

/// What a GGUF file will contain, before any data is written.
#[derive(Debug, Clone, Default)]
pub struct GgufHeader {
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
}

fn pad(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

impl GgufHeader {
    /// An empty header.
    pub fn new() -> GgufHeader {
        GgufHeader::default()
    }

    /// Sets a metadata key; a key set twice keeps its first position and its last value (as gguf-py).
    pub fn set(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
    }

    /// The value of a key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Removes a key.
    pub fn remove(&mut self, key: &str) {
        self.metadata.retain(|(k, _)| k != key);
    }

    /// The metadata, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// Adds a tensor to the table. Fails when the row length is not a whole number of the type's
    /// blocks or the name is taken.
    pub fn add_tensor(&mut self, info: TensorInfo) -> Result<(), String> {
        if info.name.len() >= 64 {
            return Err(format!("tensor name `{}` is longer than ggml's 63 bytes", info.name));
        }
        if info.shape.is_empty() || info.shape.len() > 4 {
            return Err(format!(
                "tensor `{}` has {} dimensions; GGUF allows 1 to 4",
                info.name,
                info.shape.len()
            ));
        }
        if info.nbytes().is_none() {
            return Err(format!(
                "tensor `{}` has rows of {} values, not a multiple of {}'s block of {}",
                info.name,
                info.row_len(),
                info.ty,
                info.ty.block_size()
            ));
        }
        if self.tensors.iter().any(|t| t.name == info.name) {
            return Err(format!("tensor `{}` is added twice", info.name));
        }
        self.tensors.push(info);
        Ok(())
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    fn alignment(&self) -> u64 {
        match self.get("general.alignment").and_then(Value::as_u64) {
            Some(a) if a.is_power_of_two() => a,
            _ => DEFAULT_ALIGNMENT as u64,
        }
    }

    /// The total file size this header describes.
    pub fn file_size(&self) -> u64 {
        let mut counter = Counter(0);
        // Writing to a counter cannot fail.
        let _ = self.write_meta(&mut counter);
        let align = self.alignment();
        let data: u64 = self.tensors.iter().map(|t| pad(t.nbytes().unwrap_or(0) as u64, align)).sum();
        pad(counter.0, align) + data
    }

    fn write_meta<W: Write>(&self, w: &mut W) -> io::Result<()> {
        w.write_all(&MAGIC.to_le_bytes())?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(self.metadata.len() as u64).to_le_bytes())?;
        for (k, v) in &self.metadata {
            write_str(w, k.as_bytes())?;
            w.write_all(&(v.value_type() as u32).to_le_bytes())?;
            write_value(w, v)?;
        }
        let align = self.alignment();
        let mut offset = 0u64;
        for t in &self.tensors {
            write_str(w, t.name.as_bytes())?;
            w.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            for d in t.shape.iter().rev() {
                w.write_all(&(*d as u64).to_le_bytes())?;
            }
            w.write_all(&t.ty.id().to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            offset += pad(t.nbytes().unwrap_or(0) as u64, align);
        }
        Ok(())
    }
}

struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn write_str<W: Write>(w: &mut W, s: &[u8]) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s)
}

fn write_value<W: Write>(w: &mut W, v: &Value) -> io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_str(w, s),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Array(t, items) => {
            if *t == ValueType::Array {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "nested GGUF arrays are not written",
                ));
            }
            w.write_all(&(*t as u32).to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for item in items {
                if item.value_type() != *t {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("GGUF array of {} holds a {}", t.name(), item.value_type().name()),
                    ));
                }
                write_value(w, item)?;
            }
            Ok(())
        }
    }
}

/// Streams a GGUF file: the header first, then each tensor's data in table order.
pub struct GgufWriter<W: Write> {
    out: W,
    header: GgufHeader,
    next: usize,
    align: u64,
}

const ZEROS: [u8; 64] = [0; 64];

impl<W: Write> GgufWriter<W> {
    /// Writes the header, tensor table and padding.
    pub fn start(mut out: W, header: GgufHeader) -> io::Result<GgufWriter<W>> {
        let mut counter = Counter(0);
        header.write_meta(&mut counter)?;
        header.write_meta(&mut out)?;
        let align = header.alignment();
        write_padding(&mut out, pad(counter.0, align) - counter.0)?;
        Ok(GgufWriter { out, header, next: 0, align })
    }

    /// The tensor whose data comes next, if any.
    pub fn next_tensor(&self) -> Option<&TensorInfo> {
        self.header.tensors.get(self.next)
    }

    /// Writes the next tensor's data (exactly its byte size) and the padding after it.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let Some(t) = self.header.tensors.get(self.next) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tensor `{name}` is not in the table"),
            ));
        };
        let size = t.nbytes().unwrap_or(0);
        if t.name != name || data.len() != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("expected `{}` ({size} bytes) next, got `{name}` ({} bytes)", t.name, data.len()),
            ));
        }
        self.out.write_all(data)?;
        write_padding(&mut self.out, pad(size as u64, self.align) - size as u64)?;
        self.next += 1;
        Ok(())
    }

    /// Checks that every tensor was written and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        if self.next != self.header.tensors.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} of {} tensors were written", self.next, self.header.tensors.len()),
            ));
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

fn write_padding<W: Write>(w: &mut W, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}
