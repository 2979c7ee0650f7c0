//! The few protobuf messages qtrace exchanges with container runtimes, encoded and decoded by
//! hand: three requests of one string field and responses of which only strings, nested
//! messages and string maps are read. A generated codec (prost with protoc, or derive macros)
//! would bring a build step or a proc-macro dependency for about a hundred lines; what is here
//! is fuzzable, rejects malformed input with an error and never reads past its buffer.

use anyhow::{bail, Result};

/// `field` as a length-delimited string (wire type 2).
pub fn put_string(out: &mut Vec<u8>, field: u32, s: &str) {
    put_varint(out, u64::from(field << 3 | 2));
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One field of a message: its number and, for length-delimited fields, its bytes (other
/// wire types are skipped over and yield `None`).
pub struct Fields<'a> {
    buf: &'a [u8],
}

pub fn fields(buf: &[u8]) -> Fields<'_> {
    Fields { buf }
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let Some((&b, rest)) = self.buf.split_first() else {
                bail!("protobuf: truncated varint");
            };
            self.buf = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        bail!("protobuf: varint longer than 10 bytes")
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        if n > self.buf.len() as u64 {
            bail!("protobuf: field of {n} bytes past the message's end");
        }
        let (head, rest) = self.buf.split_at(n as usize);
        self.buf = rest;
        Ok(head)
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Option<&'a [u8]>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let field = (|| {
            let key = self.varint()?;
            let number = u32::try_from(key >> 3).unwrap_or(u32::MAX);
            let bytes = match key & 7 {
                0 => {
                    self.varint()?;
                    None
                }
                1 => {
                    self.take(8)?;
                    None
                }
                2 => {
                    let n = self.varint()?;
                    Some(self.take(n)?)
                }
                5 => {
                    self.take(4)?;
                    None
                }
                t => bail!("protobuf: wire type {t} (groups or garbage)"),
            };
            Ok((number, bytes))
        })();
        if field.is_err() {
            // One error ends the iteration: the rest cannot be framed.
            self.buf = &[];
        }
        Some(field)
    }
}

/// The length-delimited field `number` (the last one, as protobuf merges repeated scalars).
pub fn bytes_of(buf: &[u8], number: u32) -> Result<Option<&[u8]>> {
    let mut found = None;
    for f in fields(buf) {
        if let (n, Some(b)) = f? {
            if n == number {
                found = Some(b);
            }
        }
    }
    Ok(found)
}

/// The string field `number`, empty when absent (proto3's default).
pub fn string_of(buf: &[u8], number: u32) -> Result<String> {
    Ok(match bytes_of(buf, number)? {
        Some(b) => String::from_utf8_lossy(b).into_owned(),
        None => String::new(),
    })
}

/// Every instance of the length-delimited field `number` (a repeated message).
pub fn repeated(buf: &[u8], number: u32) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    for f in fields(buf) {
        if let (n, Some(b)) = f? {
            if n == number {
                out.push(b);
            }
        }
    }
    Ok(out)
}

/// A `map<string, string>` field: entries are messages of key = 1, value = 2.
pub fn string_map(buf: &[u8], number: u32) -> Result<Vec<(String, String)>> {
    repeated(buf, number)?
        .into_iter()
        .map(|e| Ok((string_of(e, 1)?, string_of(e, 2)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(fields: &[(u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, b) in fields {
            put_varint(&mut out, u64::from(n << 3 | 2));
            put_varint(&mut out, b.len() as u64);
            out.extend_from_slice(b);
        }
        out
    }

    #[test]
    fn strings_maps_and_nested_messages() {
        let entry = |k: &str, v: &str| message(&[(1, k.as_bytes()), (2, v.as_bytes())]);
        let long = "x".repeat(300);
        let mut inner = message(&[
            (1, b"abc"),
            (2, &entry("io.kubernetes.pod.name", "web-1")),
            (2, &entry("team", &long)),
        ]);
        // A varint and a fixed64 field in between are skipped.
        inner.extend_from_slice(&[3 << 3, 0x96, 0x01, 4 << 3 | 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        let outer = message(&[(1, &inner)]);
        let c = bytes_of(&outer, 1).unwrap().unwrap();
        assert_eq!(string_of(c, 1).unwrap(), "abc");
        assert_eq!(string_of(c, 9).unwrap(), "");
        let labels = string_map(c, 2).unwrap();
        assert_eq!(labels[0], ("io.kubernetes.pod.name".into(), "web-1".into()));
        assert_eq!(labels[1].1, long);
        let mut req = Vec::new();
        put_string(&mut req, 1, &long);
        assert_eq!(string_of(&req, 1).unwrap(), long);
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        for bad in [
            &[0x0a, 0x05, b'a'][..], // length past the end
            &[0x0b][..],             // wire type 3 (group)
            &[0x08, 0xff, 0xff][..], // truncated varint
            &[
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ][..],
        ] {
            assert!(bytes_of(bad, 1).is_err(), "{bad:?}");
        }
        assert_eq!(bytes_of(&[], 1).unwrap(), None);
    }
}
