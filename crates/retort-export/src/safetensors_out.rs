//! A streaming safetensors writer: the header is computed from names, dtypes and shapes, then each
//! tensor's bytes are produced and written in turn, so a multi-gigabyte model is written with one
//! tensor in memory. Checkpoints larger than the shard size are split the way transformers splits
//! them, with `model.safetensors.index.json`.

use std::io::Write;
use std::path::Path;

use retort_hf::Dtype;
use serde_json::{Map, Value as Json, json};

use crate::error::{ExportError, Result};
use crate::output::Sink;

/// A tensor to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The safetensors key.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

impl Entry {
    /// Bytes of data.
    pub fn nbytes(&self) -> u64 {
        let elem = match &self.dtype {
            Dtype::Other(name) => other_size(name),
            d => d.size(),
        };
        self.shape.iter().product::<usize>() as u64 * elem as u64
    }
}

/// Element sizes of the non-float dtypes a checkpoint may carry (copied verbatim).
fn other_size(name: &str) -> usize {
    match name {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "I16" | "U16" => 2,
        "I32" | "U32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => 0,
    }
}

/// Splits tensors into shards of at most `max` bytes, in order (a tensor larger than `max` gets a shard
/// of its own), as `huggingface_hub.split_torch_state_dict_into_shards` does.
pub fn plan_shards(entries: &[Entry], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut size = 0u64;
    for (i, e) in entries.iter().enumerate() {
        let n = e.nbytes();
        if n > max {
            shards.push(vec![i]);
            continue;
        }
        if size + n > max && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(i);
        size += n;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// The file names of a checkpoint of `n` shards.
pub fn shard_names(n: usize) -> Vec<String> {
    if n <= 1 {
        return vec!["model.safetensors".into()];
    }
    (1..=n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect()
}

fn header(entries: &[&Entry]) -> Vec<u8> {
    let mut h = Map::new();
    h.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for e in entries {
        let end = offset + e.nbytes();
        h.insert(
            e.name.clone(),
            json!({"dtype": e.dtype.name(), "shape": e.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut bytes = Json::Object(h).to_string().into_bytes();
    while !bytes.len().is_multiple_of(8) {
        bytes.push(b' ');
    }
    bytes
}

/// Writes a checkpoint into `dir`: one file or shards plus an index. `data` produces a tensor's bytes
/// (exactly [`Entry::nbytes`] of them). Returns the file names written.
pub fn write_checkpoint(
    sink: &dyn Sink,
    dir: &Path,
    entries: &[Entry],
    shard_max: u64,
    data: &mut dyn FnMut(&Entry) -> Result<Vec<u8>>,
) -> Result<Vec<String>> {
    let shards = plan_shards(entries, shard_max);
    let names = shard_names(shards.len());
    let mut weight_map = Map::new();
    for (shard, file) in shards.iter().zip(&names) {
        let path = dir.join(file);
        let list: Vec<&Entry> = shard.iter().map(|&i| &entries[i]).collect();
        let h = header(&list);
        let mut f = sink.create(&path).map_err(|e| ExportError::write(&path, e))?;
        f.write_all(&(h.len() as u64).to_le_bytes()).map_err(|e| ExportError::write(&path, e))?;
        f.write_all(&h).map_err(|e| ExportError::write(&path, e))?;
        for e in list {
            let bytes = data(e)?;
            if bytes.len() as u64 != e.nbytes() {
                return Err(ExportError::Lint {
                    path: path.clone(),
                    problem: format!(
                        "tensor `{}` produced {} bytes, expected {}",
                        e.name,
                        bytes.len(),
                        e.nbytes()
                    ),
                });
            }
            f.write_all(&bytes).map_err(|err| ExportError::write(&path, err))?;
            weight_map.insert(e.name.clone(), Json::String(file.clone()));
        }
        f.commit().map_err(|e| ExportError::write(&path, e))?;
    }
    let mut files = names.clone();
    if names.len() > 1 {
        let total: u64 = entries.iter().map(Entry::nbytes).sum();
        let mut sorted: Vec<(String, Json)> = weight_map.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let index = json!({"metadata": {"total_size": total}, "weight_map": Map::from_iter(sorted)});
        let path = dir.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).unwrap_or_default() + "\n";
        crate::output::write_file(sink, &path, text.as_bytes()).map_err(|e| ExportError::write(&path, e))?;
        files.push("model.safetensors.index.json".into());
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &str, n: usize) -> Entry {
        Entry { name: name.into(), dtype: Dtype::F32, shape: vec![n] }
    }

    #[test]
    fn shards_like_transformers() {
        let es = [e("a", 10), e("b", 10), e("c", 30), e("d", 5)];
        // 40, 40, 120, 20 bytes with a 80-byte limit: c is too big and gets its own shard at once (before
        // the shard being filled, as huggingface_hub does), then [a b], then [d].
        assert_eq!(plan_shards(&es, 80), vec![vec![2], vec![0, 1], vec![3]]);
        assert_eq!(plan_shards(&es, 1000), vec![vec![0, 1, 2, 3]]);
        assert_eq!(shard_names(1), ["model.safetensors"]);
        assert_eq!(shard_names(3)[2], "model-00003-of-00003.safetensors");
    }
}
