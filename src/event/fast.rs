//! A fast path for well-formed events: a strict scanner for the subset of JSON
//! that real producers emit (no escapes, integers, flat `assign`/`attrs`).
//!
//! Contract: when [`parse_fast`] returns `Some`, the serde path
//! ([`super::parse_event_serde`]) would have produced the same `RawEvent`.
//! On anything outside the subset — an escape, a float, a nested value under an
//! unknown key, a limit exceeded, any syntax doubt — it returns `None` and the
//! serde path decides, including the rejection reason. A property test checks
//! the contract on generated inputs.

use std::borrow::Cow;

use super::{Attrs, RawEvent, MAX_ATTR_BYTES, MAX_ENTRIES, UNKNOWN_EXPERIMENT_ID};

struct Scan<'a> {
    /// The line, already checked to be UTF-8 (so string slices cut at
    /// quotes, which are ASCII, are `str` without a second pass).
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    #[inline]
    fn ws(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            if matches!(c, b' ' | b'\t' | b'\r' | b'\n') {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    #[inline]
    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.b.get(self.i) == Some(&c)).then(|| self.i += 1)
    }

    #[inline]
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    /// After an object's member: `,` (another follows: `false`) or `}` (the
    /// object ends: `true`); anything else is not the fast subset.
    #[inline]
    fn object_ends(&mut self) -> Option<bool> {
        let ends = match self.peek()? {
            b',' => false,
            b'}' => true,
            _ => return None,
        };
        self.i += 1;
        Some(ends)
    }

    /// A string with no escapes and no control characters.
    #[inline]
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            let c = *self.b.get(self.i)?;
            match c {
                b'"' => break,
                b'\\' => return None,
                c if c < 0x20 => return None,
                _ => self.i += 1,
            }
        }
        let out = &self.s[start..self.i];
        self.i += 1;
        Some(out)
    }

    /// An `assign` key read straight into its experiment id, in one pass:
    /// `"` ASCII digits `"` (leading zeros allowed; more than fits in `u64`
    /// is [`UNKNOWN_EXPERIMENT_ID`]). Anything else (empty, a non-digit, an
    /// escape) is `None`: the serde path decides (`bad_assign_key`).
    #[inline]
    fn experiment_key(&mut self) -> Option<u64> {
        self.eat(b'"')?;
        let start = self.i;
        let mut id: u64 = 0;
        let mut overflow = false;
        while let Some(&c) = self.b.get(self.i) {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            match id.checked_mul(10).and_then(|v| v.checked_add(d as u64)) {
                Some(v) => id = v,
                None => overflow = true,
            }
            self.i += 1;
        }
        if self.i == start || self.b.get(self.i) != Some(&b'"') {
            return None;
        }
        self.i += 1;
        Some(if overflow { UNKNOWN_EXPERIMENT_ID } else { id })
    }

    /// An integer of at most 18 digits, JSON grammar (no leading zeros, no "-0").
    #[inline]
    fn integer(&mut self) -> Option<i64> {
        self.ws();
        let neg = self.b.get(self.i) == Some(&b'-');
        if neg {
            self.i += 1;
        }
        let start = self.i;
        let mut v: i64 = 0;
        while let Some(&c) = self.b.get(self.i) {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            if self.i - start == 18 {
                return None;
            }
            v = v * 10 + d as i64;
            self.i += 1;
        }
        let n = self.i - start;
        if n == 0 || (n > 1 && self.b[start] == b'0') || (neg && v == 0) {
            return None;
        }
        if matches!(self.b.get(self.i), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(if neg { -v } else { v })
    }

    /// `null` or an integer: `Some(None)` / `Some(Some(v))`.
    #[inline]
    fn opt_integer(&mut self) -> Option<Option<i64>> {
        if self.peek()? == b'n' {
            return self.literal(b"null").map(|()| None);
        }
        self.integer().map(Some)
    }

    #[inline]
    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.ws();
        self.b[self.i..].starts_with(word).then(|| self.i += word.len())
    }

    /// `null` → `Some(true)`; anything else: no input consumed.
    #[inline]
    fn null(&mut self) -> bool {
        self.peek() == Some(b'n') && self.literal(b"null").is_some()
    }

    fn opt_string(&mut self) -> Option<Option<Cow<'a, str>>> {
        if self.null() {
            return Some(None);
        }
        self.string().map(|s| Some(Cow::Borrowed(s)))
    }

    /// Members of an object, calling `member` with each key; `{}` allowed.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            member(self, key)?;
            if self.object_ends()? {
                return Some(());
            }
        }
    }

    /// An `assign` value into `out` (emptied first: a later key replaces an
    /// earlier one, and null empties it). Each key becomes its experiment id
    /// as it is scanned, each value an integer, in one pass over the bytes.
    fn assign(&mut self, out: &mut Vec<(u64, i64)>) -> Option<()> {
        out.clear();
        if self.null() {
            return Some(());
        }
        self.eat(b'{')?;
        if self.eat(b'}').is_some() {
            return Some(());
        }
        // Bit (id mod 64) set for every id pushed: duplicates are rare, so
        // most keys skip the scan for an earlier entry.
        let mut seen = 0u64;
        loop {
            let exp = self.experiment_key()?;
            self.eat(b':')?;
            let var = self.opt_integer()?;
            let bit = 1u64 << (exp % 64);
            if seen & bit != 0 && exp != UNKNOWN_EXPERIMENT_ID {
                if let Some(p) = out.iter().position(|(e, _)| *e == exp) {
                    out.remove(p);
                }
            }
            seen |= bit;
            if let Some(v) = var {
                if out.len() == MAX_ENTRIES {
                    return None;
                }
                out.push((exp, v));
            }
            if self.object_ends()? {
                return Some(());
            }
        }
    }

    fn attrs(&mut self) -> Option<Option<Attrs<'a>>> {
        if self.null() {
            return Some(None);
        }
        let mut out = Attrs::new();
        self.object(|sc, key| {
            let value = sc.opt_string()?;
            if key.len() > MAX_ATTR_BYTES || value.as_ref().is_some_and(|v| v.len() > MAX_ATTR_BYTES) {
                return None;
            }
            out.retain(|(k, _)| *k != key);
            if let Some(v) = value {
                if out.len() == MAX_ENTRIES {
                    return None;
                }
                out.push((Cow::Borrowed(key), v));
            }
            Some(())
        })?;
        Some(Some(out))
    }

    /// A scalar under an unknown key: string, integer, true, false or null.
    fn skip_scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            _ => self.integer().map(drop),
        }
    }
}

/// Parses a well-formed event in the fast subset, or `None` (use the serde path).
pub(super) fn parse_fast<'a>(text: &'a str, assign: &mut Vec<(u64, i64)>) -> Option<RawEvent<'a>> {
    let mut sc = Scan { s: text, b: text.as_bytes(), i: 0 };
    let mut ev = RawEvent::default();
    sc.object(|sc, key| {
        match key {
            "ts" => ev.ts = sc.opt_integer()?,
            "tenant" => ev.tenant = sc.opt_string()?,
            "session" => ev.session = sc.opt_string()?,
            "mp" => ev.mp = sc.opt_string()?,
            "device" => ev.device = sc.opt_string()?,
            "login" => ev.login = sc.opt_string()?,
            "assign" => sc.assign(assign)?,
            "attrs" => ev.attrs = sc.attrs()?,
            // An integer or null; a float, a string etc. goes to serde (bad_value).
            "value" => ev.value = sc.opt_integer()?,
            _ => sc.skip_scalar()?,
        }
        Some(())
    })?;
    sc.ws();
    (sc.i == sc.b.len()).then_some(ev)
}
