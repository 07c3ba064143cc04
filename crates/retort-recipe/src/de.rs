//! A serde `Deserializer` over the spanned [`Node`] tree whose errors keep their structure: the key
//! path, the span, what was found and what was expected, and for unknown keys and values the list of
//! valid names (for "did you mean"). toml's own deserializer flattens all of that into one string.
//!
//! Enums are externally tagged in Rust, but a table may select its variant with a tag key instead
//! (`kind = "dedup"` for filters, `from = "file"` for inputs; see [`tag_key`]): the remaining keys
//! then deserialize through this deserializer too, so errors inside them keep exact positions. serde's
//! `#[serde(tag = ...)]` would buffer the table and lose them.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

use crate::secrets;
use crate::tree::{Entry, KeyPath, Node, Seg, Span, Val};

/// Separates a message from its hint inside `de::Error::custom` strings made by [`field_error`].
const HINT_SEP: char = '\u{1f}';

/// Builds a `custom` error message that carries a hint through serde's string-only channel.
pub(crate) fn field_error(message: impl fmt::Display, hint: impl fmt::Display) -> String {
    format!("{message}{HINT_SEP}{hint}")
}

/// The tag key a table uses to choose a variant of the named Rust enum.
fn tag_key(enum_name: &str) -> Option<&'static str> {
    match enum_name {
        "Filter" => Some("kind"),
        "Inputs" => Some("from"),
        _ => None,
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    InvalidType { found: String, expected: String },
    InvalidValue { found: String, expected: String },
    UnknownField { field: String, expected: &'static [&'static str] },
    UnknownVariant { variant: String, expected: &'static [&'static str] },
    MissingField { field: String },
    Custom { message: String, hint: Option<String> },
}

#[derive(Debug, Clone)]
pub(crate) struct DeError {
    pub kind: Kind,
    /// Path from the document root to where the error is (filled in as the error bubbles up).
    pub path: KeyPath,
    pub span: Option<Span>,
    /// Set when the error is about a key itself (unknown key): `path` then ends in that key.
    pub at_key: bool,
    /// Set when the error is about a variant tag (`kind = "..."`): the whole table must go, since
    /// without its tag it cannot be read at all.
    pub at_tag: bool,
}

impl DeError {
    fn new(kind: Kind) -> Self {
        DeError { kind, path: KeyPath::default(), span: None, at_key: false, at_tag: false }
    }

    fn under(mut self, seg: Seg, span: &Span) -> Self {
        self.path.0.insert(0, seg);
        if self.span.is_none() {
            self.span = Some(span.clone());
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} at `{}`", self.kind, self.path)
    }
}

impl std::error::Error for DeError {}

fn describe_unexpected(u: de::Unexpected<'_>) -> String {
    match u {
        de::Unexpected::Str(s) if secrets::looks_like_secret(s).is_some() => {
            "a string that looks like a secret (not shown)".to_string()
        }
        de::Unexpected::Str(s) => format!("string {s:?}"),
        de::Unexpected::Signed(n) => format!("integer {n}"),
        de::Unexpected::Unsigned(n) => format!("integer {n}"),
        de::Unexpected::Float(x) => format!("float {x}"),
        de::Unexpected::Bool(b) => format!("boolean {b}"),
        de::Unexpected::Map => "a table".to_string(),
        de::Unexpected::Seq => "an array".to_string(),
        de::Unexpected::Unit => "nothing".to_string(),
        other => other.to_string(),
    }
}

/// Turns serde's Rust-flavoured expectations (`u32`, `f64`, `a sequence`) into TOML words.
fn describe_expected(e: &dyn de::Expected) -> String {
    let raw = e.to_string();
    match raw.as_str() {
        "f64" | "f32" => "a number".into(),
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number >= 0".into(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".into(),
        "a boolean" => "`true` or `false`".into(),
        "a sequence" => "an array".into(),
        "a map" => "a table".into(),
        s if s.starts_with("struct ") => "a table".into(),
        s if s.starts_with("a string") => "a string".into(),
        s if s.starts_with("enum ") => "a string".into(),
        _ => raw,
    }
}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        let msg = msg.to_string();
        let (message, hint) = match msg.split_once(HINT_SEP) {
            Some((m, h)) => (m.to_string(), Some(h.to_string())),
            None => (msg, None),
        };
        DeError::new(Kind::Custom { message, hint })
    }
    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        DeError::new(Kind::InvalidType {
            found: describe_unexpected(unexp),
            expected: describe_expected(exp),
        })
    }
    fn invalid_value(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        DeError::new(Kind::InvalidValue {
            found: describe_unexpected(unexp),
            expected: describe_expected(exp),
        })
    }
    fn invalid_length(len: usize, exp: &dyn de::Expected) -> Self {
        DeError::new(Kind::InvalidValue { found: format!("{len} items"), expected: describe_expected(exp) })
    }
    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError::new(Kind::UnknownVariant { variant: variant.to_string(), expected })
    }
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError::new(Kind::UnknownField { field: field.to_string(), expected })
    }
    fn missing_field(field: &'static str) -> Self {
        DeError::new(Kind::MissingField { field: field.to_string() })
    }
}

/// Deserializes one node.
pub(crate) struct NodeDe<'a>(pub &'a Node);

impl<'de> de::Deserializer<'de> for NodeDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let node = self.0;
        let result = match &node.val {
            Val::Str(s) | Val::Datetime(s) => visitor.visit_str(s),
            Val::Int(n) => visitor.visit_i64(*n),
            Val::BigInt(s) => Err(DeError::new(Kind::InvalidValue {
                found: format!("integer {s}"),
                expected: "an integer that fits in 64 bits".into(),
            })),
            Val::Float(x) => visitor.visit_f64(*x),
            Val::Bool(b) => visitor.visit_bool(*b),
            Val::Array(items) => visitor.visit_seq(SeqAcc { items, idx: 0 }),
            Val::Table(entries) => visitor.visit_map(MapAcc::new(entries)),
        };
        result.map_err(|mut e| {
            if e.span.is_none() {
                e.span = Some(node.span.clone());
            }
            e
        })
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let node = self.0;
        let with_span = |mut e: DeError| {
            if e.span.is_none() {
                e.span = Some(node.span.clone());
            }
            e
        };
        match &node.val {
            Val::Str(s) => visitor.visit_enum(EnumAcc { variant: s, variant_span: &node.span, rest: None }),
            Val::Table(entries) => {
                let live: Vec<&Entry> = entries.iter().filter(|e| !e.node.dead).collect();
                if let Some(tag) = tag_key(name) {
                    let Some(tag_entry) = live.iter().find(|e| e.key == tag) else {
                        return Err(with_span(DeError::new(Kind::MissingField { field: tag.to_string() })));
                    };
                    let Val::Str(variant) = &tag_entry.node.val else {
                        let found = tag_entry.node.val.type_name();
                        let mut e = DeError::new(Kind::InvalidType {
                            found: found.to_string(),
                            expected: format!("one of {}", quote_list(variants)),
                        })
                        .under(Seg::Key(tag.to_string()), &tag_entry.node.span);
                        e.at_tag = true;
                        return Err(e);
                    };
                    let rest: Vec<&Entry> = live.iter().copied().filter(|e| e.key != tag).collect();
                    visitor
                        .visit_enum(EnumAcc { variant, variant_span: &tag_entry.node.span, rest: Some(rest) })
                        .map_err(|e| match (&e.kind, e.path.is_root()) {
                            // An unknown variant is about the tag's value: point the path at it.
                            (Kind::UnknownVariant { .. }, true) => {
                                let mut e = e.under(Seg::Key(tag.to_string()), &tag_entry.node.span);
                                e.at_tag = true;
                                e
                            }
                            _ => e,
                        })
                        .map_err(with_span)
                } else if let [only] = live.as_slice() {
                    visitor
                        .visit_enum(ExternalEnumAcc { entry: only })
                        .map_err(|e| e.under(Seg::Key(only.key.clone()), &only.node.span))
                } else {
                    Err(with_span(DeError::new(Kind::InvalidType {
                        found: "a table".into(),
                        expected: format!("one of {}", quote_list(variants)),
                    })))
                }
            }
            other => Err(with_span(DeError::new(Kind::InvalidType {
                found: other.type_name().to_string(),
                expected: format!("one of {}", quote_list(variants)),
            }))),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier
    }
}

pub(crate) fn quote_list(items: &[&str]) -> String {
    items.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
}

struct SeqAcc<'a> {
    items: &'a [Node],
    idx: usize,
}

impl<'de> de::SeqAccess<'de> for SeqAcc<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, DeError> {
        while let Some(node) = self.items.get(self.idx) {
            let i = self.idx;
            self.idx += 1;
            if node.dead {
                continue;
            }
            return seed.deserialize(NodeDe(node)).map(Some).map_err(|e| e.under(Seg::Index(i), &node.span));
        }
        Ok(None)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items[self.idx.min(self.items.len())..].iter().filter(|n| !n.dead).count())
    }
}

struct MapAcc<'a> {
    entries: Vec<&'a Entry>,
    idx: usize,
}

impl<'a> MapAcc<'a> {
    fn new(entries: &'a [Entry]) -> Self {
        MapAcc { entries: entries.iter().filter(|e| !e.node.dead).collect(), idx: 0 }
    }
}

impl<'de> de::MapAccess<'de> for MapAcc<'_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        let Some(entry) = self.entries.get(self.idx) else { return Ok(None) };
        let key: de::value::StrDeserializer<'_, DeError> = entry.key.as_str().into_deserializer();
        seed.deserialize(key).map(Some).map_err(|mut e| {
            e.at_key = true;
            e.span = Some(entry.key_span.clone());
            e.under(Seg::Key(entry.key.clone()), &entry.key_span)
        })
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let entry = self.entries[self.idx];
        self.idx += 1;
        seed.deserialize(NodeDe(&entry.node))
            .map_err(|e| e.under(Seg::Key(entry.key.clone()), &entry.node.span))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len() - self.idx)
    }
}

/// A variant chosen by a string value (`schedule = "cosine"`) or by a tag key (`kind = "dedup"`).
struct EnumAcc<'a> {
    variant: &'a str,
    variant_span: &'a Span,
    /// The table's other entries, when the variant was chosen by a tag key.
    rest: Option<Vec<&'a Entry>>,
}

impl<'de, 'a> de::EnumAccess<'de> for EnumAcc<'a> {
    type Error = DeError;
    type Variant = VariantAcc<'a>;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self::Variant), DeError> {
        let de: de::value::StrDeserializer<'_, DeError> = self.variant.into_deserializer();
        let span = self.variant_span.clone();
        let v = seed.deserialize(de).map_err(|mut e| {
            e.span = Some(span.clone());
            e
        })?;
        Ok((v, VariantAcc { span, rest: self.rest }))
    }
}

struct VariantAcc<'a> {
    span: Span,
    rest: Option<Vec<&'a Entry>>,
}

impl<'de> de::VariantAccess<'de> for VariantAcc<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        match self.rest.as_deref() {
            Some([first, ..]) => Err(DeError {
                kind: Kind::UnknownField { field: first.key.clone(), expected: &[] },
                path: KeyPath(vec![Seg::Key(first.key.clone())]),
                span: Some(first.key_span.clone()),
                at_key: true,
                at_tag: false,
            }),
            _ => Ok(()),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        match self.rest {
            Some(entries) => seed.deserialize(EntriesDe { entries }),
            None => {
                Err(DeError::new(Kind::InvalidType { found: "a string".into(), expected: "a table".into() })
                    .under_span(&self.span))
            }
        }
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, DeError> {
        Err(DeError::new(Kind::InvalidType { found: "a string".into(), expected: "an array".into() })
            .under_span(&self.span))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.rest {
            Some(entries) => visitor.visit_map(MapAcc { entries, idx: 0 }),
            None => {
                Err(DeError::new(Kind::InvalidType { found: "a string".into(), expected: "a table".into() })
                    .under_span(&self.span))
            }
        }
    }
}

impl DeError {
    fn under_span(mut self, span: &Span) -> Self {
        if self.span.is_none() {
            self.span = Some(span.clone());
        }
        self
    }
}

/// The remaining entries of a tag-selected table, as a map.
struct EntriesDe<'a> {
    entries: Vec<&'a Entry>,
}

impl<'de> de::Deserializer<'de> for EntriesDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_map(MapAcc { entries: self.entries, idx: 0 })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

/// `{ dedup = { threshold = 0.9 } }`: the standard externally tagged form.
struct ExternalEnumAcc<'a> {
    entry: &'a Entry,
}

impl<'de, 'a> de::EnumAccess<'de> for ExternalEnumAcc<'a> {
    type Error = DeError;
    type Variant = NodeVariant<'a>;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self::Variant), DeError> {
        let de: de::value::StrDeserializer<'_, DeError> = self.entry.key.as_str().into_deserializer();
        let key_span = self.entry.key_span.clone();
        let v = seed.deserialize(de).map_err(|mut e| {
            e.span = Some(key_span);
            e
        })?;
        Ok((v, NodeVariant(&self.entry.node)))
    }
}

struct NodeVariant<'a>(&'a Node);

impl<'de> de::VariantAccess<'de> for NodeVariant<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        Err(DeError::new(Kind::InvalidType { found: "a table".into(), expected: "a string".into() }))
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(NodeDe(self.0))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_any(NodeDe(self.0), visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_any(NodeDe(self.0), visitor)
    }
}
