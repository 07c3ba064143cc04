//! SentencePiece `tokenizer.model` files: the pieces, scores and types of the protobuf `ModelProto`,
//! read with a minimal protobuf decoder (only field 1, `pieces`, is needed).

use std::path::Path;

use crate::error::{ExportError, Result};

/// A piece's type, as `sentencepiece_model.proto` numbers them (and GGUF's `token_type` reuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum PieceType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The text (`▁` for spaces).
    pub piece: String,
    /// Its score (log probability for unigram models, merge priority for BPE models).
    pub score: f32,
    /// Its type.
    pub kind: PieceType,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len())?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Some(s)
    }

    /// The next field: its number, wire type, and payload (varint value or bytes).
    fn field(&mut self) -> Option<(u64, Payload<'_>)> {
        let key = self.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        let payload = match wire {
            0 => Payload::Varint(self.varint()?),
            1 => Payload::Bytes(self.bytes(8)?),
            2 => {
                let n = usize::try_from(self.varint()?).ok()?;
                Payload::Bytes(self.bytes(n)?)
            }
            5 => Payload::Bytes(self.bytes(4)?),
            _ => return None,
        };
        Some((num, payload))
    }
}

enum Payload<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// Reads the pieces of a SentencePiece model.
pub fn read(path: &Path) -> Result<Vec<Piece>> {
    let buf = std::fs::read(path).map_err(|e| ExportError::read(path, e))?;
    parse(&buf).ok_or_else(|| ExportError::Tokenizer {
        path: path.to_path_buf(),
        problem: "is not a SentencePiece model (its protobuf could not be decoded)".into(),
    })
}

fn parse(buf: &[u8]) -> Option<Vec<Piece>> {
    let mut r = Reader { buf, pos: 0 };
    let mut pieces = Vec::new();
    while r.pos < buf.len() {
        let (num, payload) = r.field()?;
        if num != 1 {
            continue;
        }
        let Payload::Bytes(msg) = payload else { return None };
        let mut p = Reader { buf: msg, pos: 0 };
        let mut piece = Piece { piece: String::new(), score: 0.0, kind: PieceType::Normal };
        while p.pos < msg.len() {
            match p.field()? {
                (1, Payload::Bytes(s)) => piece.piece = String::from_utf8(s.to_vec()).ok()?,
                (2, Payload::Bytes(f)) if f.len() == 4 => {
                    piece.score = f32::from_le_bytes([f[0], f[1], f[2], f[3]])
                }
                (3, Payload::Varint(t)) => {
                    piece.kind = match t {
                        1 => PieceType::Normal,
                        2 => PieceType::Unknown,
                        3 => PieceType::Control,
                        4 => PieceType::UserDefined,
                        5 => PieceType::Unused,
                        6 => PieceType::Byte,
                        _ => return None,
                    }
                }
                _ => {}
            }
        }
        pieces.push(piece);
    }
    if pieces.is_empty() { None } else { Some(pieces) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
        let mut m = vec![0x0a];
        varint(text.len() as u64, &mut m);
        m.extend_from_slice(text.as_bytes());
        m.push(0x15);
        m.extend_from_slice(&score.to_le_bytes());
        m.push(0x18);
        varint(kind, &mut m);
        let mut out = vec![0x0a];
        varint(m.len() as u64, &mut out);
        out.extend(m);
        out
    }

    #[test]
    fn decodes_pieces_and_skips_other_fields() {
        let mut buf = piece("<unk>", 0.0, 2);
        buf.extend(piece("▁the", -3.5, 1));
        // trainer_spec (field 2) with a varint inside: skipped.
        buf.extend([0x12, 0x02, 0x08, 0x01]);
        buf.extend(piece("<0x0A>", 0.0, 6));
        let p = parse(&buf).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[1], Piece { piece: "▁the".into(), score: -3.5, kind: PieceType::Normal });
        assert_eq!(p[2].kind, PieceType::Byte);
        assert!(parse(&buf[..buf.len() - 2]).is_none(), "truncated");
        assert!(parse(b"{\"not\": \"protobuf\"}").is_none());
    }
}
