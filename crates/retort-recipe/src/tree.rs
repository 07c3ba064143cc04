//! A spanned, owned copy of the TOML document that the deserializer walks and the validator points into.
//!
//! Nodes are never deleted: a node that produced an error is marked dead, the deserializer skips it and
//! the next attempt can find the next error. Array indices and spans stay those of the file.

use std::fmt;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// A byte range in the recipe text.
pub type Span = Range<usize>;

/// One value with the byte range it came from.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub val: Val,
    pub span: Span,
    pub dead: bool,
}

#[derive(Debug, Clone)]
pub(crate) enum Val {
    Str(String),
    Int(i64),
    /// An integer literal that does not fit in 64 bits (kept as written).
    BigInt(String),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Vec<Entry>),
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: String,
    pub key_span: Span,
    pub node: Node,
}

impl Val {
    /// The TOML type name, as users know it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Val::Str(_) => "string",
            Val::Int(_) | Val::BigInt(_) => "integer",
            Val::Float(_) => "float",
            Val::Bool(_) => "boolean",
            Val::Datetime(_) => "date-time",
            Val::Array(_) => "array",
            Val::Table(_) => "table",
        }
    }
}

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    /// A key in a table.
    Key(String),
    /// An index in an array (0-based).
    Index(usize),
}

/// A dotted key path such as `distill.filters[1].max_chars`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    /// Parses `a.b[2].c`. Keys are bare TOML keys; used for paths written in code.
    pub fn parse(s: &str) -> KeyPath {
        let mut segs = Vec::new();
        for part in s.split('.').filter(|p| !p.is_empty()) {
            let (name, rest) = part.split_once('[').unwrap_or((part, ""));
            if !name.is_empty() {
                segs.push(Seg::Key(name.to_string()));
            }
            for idx in rest.split('[') {
                if let Ok(i) = idx.trim_end_matches(']').parse() {
                    segs.push(Seg::Index(i));
                }
            }
        }
        KeyPath(segs)
    }

    /// This path extended by one key.
    pub fn key(&self, k: &str) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_string()));
        p
    }

    /// This path extended by one index.
    pub fn index(&self, i: usize) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    /// True for the document root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The last key name, if the path ends in a key.
    pub fn last_key(&self) -> Option<&str> {
        match self.0.last() {
            Some(Seg::Key(k)) => Some(k),
            _ => None,
        }
    }

    /// The path without its last step.
    pub fn parent(&self) -> KeyPath {
        let mut p = self.clone();
        p.0.pop();
        p
    }
}

fn is_bare_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    if is_bare_key(k) {
                        f.write_str(k)?;
                    } else {
                        write!(f, "{k:?}")?;
                    }
                }
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

impl Node {
    /// Builds the owned tree from toml's spanned parse result.
    pub fn from_toml(root: Spanned<DeTable<'_>>) -> Node {
        let span = root.span();
        Node { val: Val::Table(convert_table(root.into_inner())), span, dead: false }
    }

    /// The entries, if this is a table.
    pub fn entries(&self) -> Option<&[Entry]> {
        match &self.val {
            Val::Table(e) => Some(e),
            _ => None,
        }
    }

    /// The node at a path, dead or alive.
    pub fn get(&self, path: &KeyPath) -> Option<&Node> {
        let mut node = self;
        for seg in &path.0 {
            node = match (seg, &node.val) {
                (Seg::Key(k), Val::Table(entries)) => &entries.iter().find(|e| &e.key == k)?.node,
                (Seg::Index(i), Val::Array(items)) => items.get(*i)?,
                _ => return None,
            };
        }
        Some(node)
    }

    /// True when a live value exists at the path (the user wrote it).
    pub fn has(&self, path: &KeyPath) -> bool {
        self.get(path).is_some_and(|n| !n.dead)
    }

    /// The span of the key that ends the path (for unknown-key messages), else the value's span.
    pub fn key_span(&self, path: &KeyPath) -> Option<Span> {
        if let (Some(Seg::Key(k)), Some(parent)) = (path.0.last(), self.get(&path.parent()))
            && let Some(entries) = parent.entries()
            && let Some(e) = entries.iter().find(|e| &e.key == k)
        {
            return Some(e.key_span.clone());
        }
        self.get(path).map(|n| n.span.clone())
    }

    /// The span of the value at the path, or of the nearest enclosing table the file has; `None` when
    /// only the document itself encloses it (a default of a section the file does not have).
    pub fn nearest_span(&self, path: &KeyPath) -> Option<Span> {
        let mut p = path.clone();
        while !p.is_root() {
            if let Some(n) = self.get(&p) {
                return Some(n.span.clone());
            }
            p = p.parent();
        }
        None
    }

    /// The index in the file of the `i`-th live element of the array at `path` (elements that failed
    /// to deserialize are skipped in the typed value, so its indices can lag the file's).
    pub fn file_index(&self, path: &KeyPath, i: usize) -> usize {
        match self.get(path).map(|n| &n.val) {
            Some(Val::Array(items)) => {
                items.iter().enumerate().filter(|(_, n)| !n.dead).nth(i).map_or(i, |(idx, _)| idx)
            }
            _ => i,
        }
    }

    /// Marks the value at a path dead. Returns false if there was nothing live to remove.
    pub fn kill(&mut self, path: &KeyPath) -> bool {
        let mut node = self;
        for seg in &path.0 {
            node = match (seg, &mut node.val) {
                (Seg::Key(k), Val::Table(entries)) => match entries.iter_mut().find(|e| &e.key == k) {
                    Some(e) => &mut e.node,
                    None => return false,
                },
                (Seg::Index(i), Val::Array(items)) => match items.get_mut(*i) {
                    Some(n) => n,
                    None => return false,
                },
                _ => return false,
            };
        }
        if node.dead || path.is_root() {
            return false;
        }
        node.dead = true;
        true
    }

    /// Visits every live node with its path, depth first.
    pub fn walk(&self, path: &KeyPath, f: &mut dyn FnMut(&KeyPath, Option<&Span>, &Node)) {
        match &self.val {
            Val::Table(entries) => {
                for e in entries.iter().filter(|e| !e.node.dead) {
                    let p = path.key(&e.key);
                    f(&p, Some(&e.key_span), &e.node);
                    e.node.walk(&p, f);
                }
            }
            Val::Array(items) => {
                for (i, n) in items.iter().enumerate().filter(|(_, n)| !n.dead) {
                    let p = path.index(i);
                    f(&p, None, n);
                    n.walk(&p, f);
                }
            }
            _ => {}
        }
    }
}

fn convert_table(table: DeTable<'_>) -> Vec<Entry> {
    table
        .into_iter()
        .map(|(k, v)| {
            let key_span = k.span();
            Entry { key: k.into_inner().into_owned(), key_span, node: convert(v) }
        })
        .collect()
}

fn convert(v: Spanned<DeValue<'_>>) -> Node {
    let span = v.span();
    let val = match v.into_inner() {
        DeValue::String(s) => Val::Str(s.into_owned()),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Val::Int(n),
            Err(_) => Val::BigInt(i.to_string()),
        },
        DeValue::Float(f) => Val::Float(parse_float(f.as_str())),
        DeValue::Boolean(b) => Val::Bool(b),
        DeValue::Datetime(d) => Val::Datetime(d.to_string()),
        DeValue::Array(items) => Val::Array(items.into_iter().map(convert).collect()),
        DeValue::Table(t) => Val::Table(convert_table(t)),
    };
    Node { val, span, dead: false }
}

fn parse_float(s: &str) -> f64 {
    // toml_parser has already validated the literal; it keeps underscores out of `as_str`.
    match s.trim_start_matches('+') {
        "inf" => f64::INFINITY,
        "-inf" => f64::NEG_INFINITY,
        "nan" | "-nan" => f64::NAN,
        other => other.parse().unwrap_or(f64::NAN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(src: &str) -> Node {
        let (doc, errors) = DeTable::parse_recoverable(src);
        assert!(errors.is_empty(), "{errors:?}");
        Node::from_toml(doc)
    }

    #[test]
    fn paths_round_trip_and_locate() {
        let src = "[train]\nlr = 1e-4\n[[distill.filters]]\nkind = \"dedup\"\n[[distill.filters]]\nkind = \"length\"\nmax_chars = 1_000\n";
        let t = tree(src);
        let p = KeyPath::parse("distill.filters[1].max_chars");
        assert_eq!(p.to_string(), "distill.filters[1].max_chars");
        let n = t.get(&p).unwrap();
        assert!(matches!(n.val, Val::Int(1000)));
        assert_eq!(&src[n.span.clone()], "1_000");
        assert_eq!(&src[t.key_span(&p).unwrap()], "max_chars");
        assert!(matches!(t.get(&KeyPath::parse("train.lr")).unwrap().val, Val::Float(f) if f == 1e-4));
    }

    #[test]
    fn kill_hides_but_keeps_indices() {
        let mut t = tree("a = [1, 2, 3]\n");
        assert!(t.kill(&KeyPath::parse("a[1]")));
        assert!(!t.kill(&KeyPath::parse("a[1]")));
        assert!(!t.has(&KeyPath::parse("a[1]")));
        assert!(t.has(&KeyPath::parse("a[2]")));
        let mut seen = vec![];
        t.walk(&KeyPath::default(), &mut |p, _, _| seen.push(p.to_string()));
        assert_eq!(seen, ["a", "a[0]", "a[2]"]);
    }

    #[test]
    fn quoted_keys_display_quoted() {
        let p = KeyPath(vec![Seg::Key("teacher".into()), Seg::Key("a b".into())]);
        assert_eq!(p.to_string(), "teacher.\"a b\"");
    }
}
