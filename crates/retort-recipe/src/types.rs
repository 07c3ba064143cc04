//! Value types written as strings in a recipe: durations, byte sizes, devices, model references and
//! export formats. Each parses with a message that says what is accepted.

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::de::field_error;

/// Why a string value did not parse: a message naming what is accepted, and a hint.
#[derive(Debug, Clone)]
pub struct ParseFail {
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: String,
}

impl fmt::Display for ParseFail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

fn fail(message: impl Into<String>, hint: impl Into<String>) -> ParseFail {
    ParseFail { message: message.into(), hint: hint.into() }
}

/// Implements serde and schemars for a type that is written as a string and has `FromStr`/`Display`.
macro_rules! string_value {
    ($ty:ty, $name:literal, $desc:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($desc)
                    }
                    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<$ty, E> {
                        s.parse::<$ty>().map_err(|e| E::custom(field_error(e.message, e.hint)))
                    }
                }
                d.deserialize_str(V)
            }
        }

        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ "type": "string", "description": $desc })
            }
        }
    };
}

/// A length of time written like `90s`, `10m`, `4h`, `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl FromStr for Duration {
    type Err = ParseFail;
    fn from_str(s: &str) -> Result<Self, ParseFail> {
        humantime::parse_duration(s.trim()).map(Duration).map_err(|_| {
            fail(
                format!("`{s}` is not a duration"),
                "write a number with a unit, e.g. \"90s\", \"10m\", \"4h\" or \"1h 30m\"",
            )
        })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

string_value!(Duration, "Duration", "a duration such as \"90s\", \"10m\" or \"4h\"");

/// A size in bytes written like `500MB`, `5GB` or `2GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = ParseFail;
    fn from_str(s: &str) -> Result<Self, ParseFail> {
        let bad = || {
            fail(
                format!("`{s}` is not a size"),
                "write a number with a unit, e.g. \"500MB\", \"5GB\" or \"2GiB\"",
            )
        };
        let t = s.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: f64 = num.parse().map_err(|_| bad())?;
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "b" | "" => 1.0,
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "tb" => 1e12,
            "kib" => 1024.0,
            "mib" => 1024.0 * 1024.0,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            _ => return Err(bad()),
        };
        let bytes = num * mult;
        if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
            return Err(bad());
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")];
        for (size, unit) in units {
            let n = self.0 as f64 / size;
            if n >= 1.0 && (n * 1000.0).fract() == 0.0 {
                return write!(f, "{n}{unit}");
            }
        }
        write!(f, "{}B", self.0)
    }
}

string_value!(ByteSize, "ByteSize", "a size such as \"500MB\", \"5GB\" or \"2GiB\"");

/// Where training and generation run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CUDA if built in and present, else wgpu if a GPU adapter is found, else the CPU.
    Auto,
    /// The CPU (f32).
    Cpu,
    /// NVIDIA GPU number N (needs a build with `--features cuda`).
    Cuda(u32),
    /// GPU number N through wgpu: Vulkan, Metal or DX12 (needs `--features wgpu`).
    Wgpu(u32),
}

impl FromStr for Device {
    type Err = ParseFail;
    fn from_str(s: &str) -> Result<Self, ParseFail> {
        let t = s.trim().to_ascii_lowercase();
        let (kind, idx) = match t.split_once(':') {
            Some((k, i)) => (k, Some(i)),
            None => (t.as_str(), None),
        };
        let index = |i: Option<&str>| -> Result<u32, ParseFail> {
            match i {
                None => Ok(0),
                Some(i) => i.parse().map_err(|_| {
                    fail(format!("`{s}` has a bad device number"), "write e.g. \"cuda:0\" or \"wgpu:1\"")
                }),
            }
        };
        match (kind, idx) {
            ("auto", None) => Ok(Device::Auto),
            ("cpu", None) => Ok(Device::Cpu),
            ("cuda", i) => Ok(Device::Cuda(index(i)?)),
            ("wgpu" | "vulkan" | "metal", i) => Ok(Device::Wgpu(index(i)?)),
            _ => Err(fail(
                format!("`{s}` is not a device"),
                "use \"auto\", \"cpu\", \"cuda:N\" or \"wgpu:N\" (N is the GPU number, from 0)",
            )),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Wgpu(i) => write!(f, "wgpu:{i}"),
        }
    }
}

string_value!(Device, "Device", "\"auto\", \"cpu\", \"cuda:N\" or \"wgpu:N\"");

/// Built-in tiny models that retort creates itself (random weights, deterministic from the seed), for
/// trying the pipeline offline. They show that the pipeline works, not model quality.
pub const BUILTIN_MODELS: &[&str] = &["tiny-llama"];

/// The base model: a Hugging Face hub repository, a local directory, or a built-in tiny model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// `org/name` on the Hugging Face hub.
    Hub {
        /// The repository id.
        repo: String,
    },
    /// A directory in Hugging Face format (absolute once the recipe is loaded).
    Local(PathBuf),
    /// `builtin:NAME`, one of [`BUILTIN_MODELS`].
    Builtin(String),
}

impl Default for ModelRef {
    fn default() -> Self {
        ModelRef::Hub { repo: String::new() }
    }
}

fn is_hub_id(s: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 96
            && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !part.starts_with(['-', '.'])
            && !part.contains("--")
            && !part.contains("..")
    };
    matches!(s.split_once('/'), Some((org, name)) if ok(org) && ok(name))
}

impl FromStr for ModelRef {
    type Err = ParseFail;
    fn from_str(s: &str) -> Result<Self, ParseFail> {
        if let Some(name) = s.strip_prefix("builtin:") {
            return if BUILTIN_MODELS.contains(&name) {
                Ok(ModelRef::Builtin(name.to_string()))
            } else {
                Err(fail(
                    format!("`{name}` is not a built-in model"),
                    format!("built-in models: {}", crate::de::quote_list(BUILTIN_MODELS)),
                ))
            };
        }
        if s.trim().is_empty() {
            return Err(fail(
                "the model is empty",
                "write a hub id like \"Qwen/Qwen2.5-1.5B-Instruct\" or a directory",
            ));
        }
        let looks_like_path =
            s.starts_with(['/', '.', '~']) || s.contains('\\') || s.matches('/').count() != 1;
        if !looks_like_path && is_hub_id(s) {
            Ok(ModelRef::Hub { repo: s.to_string() })
        } else {
            Ok(ModelRef::Local(PathBuf::from(s)))
        }
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelRef::Hub { repo } => f.write_str(repo),
            ModelRef::Local(p) => write!(f, "{}", p.display()),
            ModelRef::Builtin(n) => write!(f, "builtin:{n}"),
        }
    }
}

string_value!(
    ModelRef,
    "ModelRef",
    "a hub id (\"Qwen/Qwen2.5-1.5B-Instruct\"), a local directory, or \"builtin:tiny-llama\""
);

/// GGUF tensor types and llama.cpp file-type mixes retort writes.
pub const GGUF_TYPES: &[&str] =
    &["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_1", "q5_0", "q4_k_m", "q4_1", "q4_0"];

/// One export output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ExportFormat {
    /// The adapter merged into the base, as a Hugging Face directory (safetensors).
    Merged,
    /// The PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    Adapter,
    /// A GGUF file of the merged model with this tensor type or mix (lowercase llama.cpp name).
    Gguf(String),
    /// A GGUF LoRA adapter for llama.cpp's `--lora`.
    GgufAdapter,
    /// An Ollama `Modelfile` next to a GGUF export.
    Ollama,
}

const EXPORT_HINT: &str = "formats: \"merged\", \"adapter\", \"gguf:TYPE\", \"gguf-adapter\", \"ollama\"";

impl FromStr for ExportFormat {
    type Err = ParseFail;
    fn from_str(s: &str) -> Result<Self, ParseFail> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "merged" => return Ok(ExportFormat::Merged),
            "adapter" | "peft" => return Ok(ExportFormat::Adapter),
            "gguf-adapter" => return Ok(ExportFormat::GgufAdapter),
            "ollama" => return Ok(ExportFormat::Ollama),
            "gguf" => {
                return Err(fail(
                    "`gguf` needs a type",
                    format!("write \"gguf:q4_k_m\" (types: {})", GGUF_TYPES.join(", ")),
                ));
            }
            _ => {}
        }
        if let Some(ty) = t.strip_prefix("gguf:") {
            if GGUF_TYPES.contains(&ty) {
                return Ok(ExportFormat::Gguf(ty.to_string()));
            }
            let near = crate::suggest::did_you_mean(ty, GGUF_TYPES.iter().copied());
            let mut hint = format!("GGUF types: {}", GGUF_TYPES.join(", "));
            if let Some(n) = near {
                hint = format!("did you mean \"gguf:{n}\"? {hint}");
            }
            return Err(fail(format!("`{ty}` is not a GGUF type retort writes"), hint));
        }
        let names = ["merged", "adapter", "gguf-adapter", "ollama", "gguf:q4_k_m"];
        let hint = match crate::suggest::did_you_mean(&t, names.iter().copied()) {
            Some(n) => format!("did you mean \"{n}\"? {EXPORT_HINT}"),
            None => EXPORT_HINT.to_string(),
        };
        Err(fail(format!("`{s}` is not an export format"), hint))
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportFormat::Merged => f.write_str("merged"),
            ExportFormat::Adapter => f.write_str("adapter"),
            ExportFormat::Gguf(t) => write!(f, "gguf:{t}"),
            ExportFormat::GgufAdapter => f.write_str("gguf-adapter"),
            ExportFormat::Ollama => f.write_str("ollama"),
        }
    }
}

string_value!(
    ExportFormat,
    "ExportFormat",
    "\"merged\", \"adapter\", \"gguf:TYPE\" (f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_1, q5_0, q4_k_m, q4_1, q4_0), \"gguf-adapter\" or \"ollama\""
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("90s".parse::<Duration>().unwrap().0.as_secs(), 90);
        assert_eq!("1h 30m".parse::<Duration>().unwrap().0.as_secs(), 5400);
        assert!("soon".parse::<Duration>().is_err());
        assert_eq!(Duration(std::time::Duration::from_secs(600)).to_string(), "10m");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("5GB".parse::<ByteSize>().unwrap().0, 5_000_000_000);
        assert_eq!("2GiB".parse::<ByteSize>().unwrap().0, 2 << 30);
        assert_eq!("1.5 MB".parse::<ByteSize>().unwrap().0, 1_500_000);
        assert!("lots".parse::<ByteSize>().is_err());
        assert!("0GB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(5_000_000_000).to_string(), "5GB");
        assert_eq!(ByteSize(1234).to_string(), "1.234KB");
        // Display must round-trip.
        for s in ["5GB", "1.5MB", "123B", "2GiB"] {
            let b: ByteSize = s.parse().unwrap();
            assert_eq!(b.to_string().parse::<ByteSize>().unwrap(), b);
        }
    }

    #[test]
    fn devices() {
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("CUDA:1".parse::<Device>().unwrap(), Device::Cuda(1));
        assert_eq!("wgpu:2".parse::<Device>().unwrap(), Device::Wgpu(2));
        assert!("gpu".parse::<Device>().is_err());
        assert!("cuda:x".parse::<Device>().is_err());
        assert!("cpu:1".parse::<Device>().is_err());
    }

    #[test]
    fn model_refs() {
        assert_eq!(
            "Qwen/Qwen2.5-1.5B-Instruct".parse::<ModelRef>().unwrap(),
            ModelRef::Hub { repo: "Qwen/Qwen2.5-1.5B-Instruct".into() }
        );
        assert_eq!("./models/x".parse::<ModelRef>().unwrap(), ModelRef::Local("./models/x".into()));
        assert_eq!("a/b/c".parse::<ModelRef>().unwrap(), ModelRef::Local("a/b/c".into()));
        assert_eq!("builtin:tiny-llama".parse::<ModelRef>().unwrap(), ModelRef::Builtin("tiny-llama".into()));
        assert!("builtin:huge".parse::<ModelRef>().is_err());
    }

    #[test]
    fn export_formats() {
        assert_eq!("gguf:Q4_K_M".parse::<ExportFormat>().unwrap(), ExportFormat::Gguf("q4_k_m".into()));
        let e = "gguf:q4_km".parse::<ExportFormat>().unwrap_err();
        assert!(e.hint.contains("did you mean \"gguf:q4_k_m\""), "{}", e.hint);
        assert!("gguf".parse::<ExportFormat>().is_err());
        let e = "mergd".parse::<ExportFormat>().unwrap_err();
        assert!(e.hint.contains("\"merged\""), "{}", e.hint);
    }
}
