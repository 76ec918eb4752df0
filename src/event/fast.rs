//! A fast path for well-formed events: a strict scanner for the subset of JSON
//! that real producers emit (no escapes, integers, flat `assign`/`attrs`).
//!
//! Contract: when [`parse_fast`] returns `Some`, the serde path
//! ([`super::parse_event_serde`]) would have produced the same `RawEvent`.
//! On anything outside the subset — an escape, a float, a nested value under an
//! unknown key, a limit exceeded, any syntax doubt — it returns `None` and the
//! serde path decides, including the rejection reason. A property test checks
//! the contract on generated inputs.
//!
//! [`parse_fast_ascii`] reads raw bytes not yet checked to be UTF-8 and takes
//! only lines that are all ASCII (every byte it accepts outside a string is
//! ASCII syntax, and inside a string it refuses bytes >= 0x80), so such a
//! line, valid UTF-8, needs no separate validation pass; any other line is
//! validated first and read by [`parse_fast`].

use std::borrow::Cow;

use super::{Attrs, RawEvent, MAX_ATTR_BYTES, MAX_ENTRIES, UNKNOWN_EXPERIMENT_ID};

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    /// `0x80` in every byte: a string byte >= 0x80 is refused (the line was
    /// not validated); 0: the line is valid UTF-8, any string byte goes.
    refuse: u64,
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

    /// The bytes of a string with no escapes and no control characters (nor
    /// bytes >= 0x80 if refused). Eight bytes at a time while the line has
    /// them ([`first_special`]), then byte by byte.
    #[inline]
    fn raw_string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        while let Some(w) = word(self.b, self.i) {
            let at = first_special(w, self.refuse);
            if at < 8 {
                self.i += at;
                return self.string_end(start);
            }
            self.i += 8;
        }
        let refuse = self.refuse as u8;
        loop {
            match *self.b.get(self.i)? {
                b'"' | b'\\' => break,
                c if c < 0x20 || c & refuse != 0 => return None,
                _ => self.i += 1,
            }
        }
        self.string_end(start)
    }

    /// At the byte that ends a string begun at `start`: its closing quote
    /// (the string), or an escape or a refused byte (`None`: serde decides).
    #[inline]
    fn string_end(&mut self, start: usize) -> Option<&'a [u8]> {
        if self.b[self.i] != b'"' {
            return None;
        }
        let out = &self.b[start..self.i];
        self.i += 1;
        Some(out)
    }

    /// A string value. Cut at quotes (ASCII) from a line that is valid UTF-8
    /// or all ASCII, it always is UTF-8, so it is not checked again.
    #[inline]
    fn string(&mut self) -> Option<&'a str> {
        self.raw_string().map(utf8)
    }

    /// The compact `"digits"` form of an `assign` key (1 to 7 digits, no
    /// space), read as one word: its id, or `None` with nothing consumed
    /// (then [`Scan::experiment_key`] reads it, whatever its form).
    #[inline]
    fn compact_key(&mut self) -> Option<u64> {
        let w = word(self.b, self.i + 1)?;
        if self.b[self.i] != b'"' {
            return None;
        }
        let (n, id) = leading_digits(w);
        ((1..8).contains(&n) && (w >> (8 * n)) as u8 == b'"').then(|| {
            self.i += n + 2;
            id
        })
    }

    /// The compact form of a whole `assign` member and what follows it,
    /// `"digits":digits,` or `…}` (a key of 1 to 6 digits, a value as
    /// [`Scan::compact_integer`] reads it), in two words: its experiment id,
    /// its variation id and whether the object ends, with all of it
    /// consumed; or `None` with nothing consumed (then the general steps
    /// read the member, whatever its form).
    #[inline]
    fn compact_pair(&mut self) -> Option<(u64, i64, bool)> {
        if self.b.get(self.i) != Some(&b'"') {
            return None;
        }
        let w = word(self.b, self.i + 1)?;
        let (n, id) = leading_digits(w);
        // The key's closing quote and the colon, bytes n and n + 1 of `w`.
        if !(1..7).contains(&n) || (w >> (8 * n)) as u16 != u16::from_le_bytes([b'"', b':']) {
            return None;
        }
        let at = self.i + n + 3;
        let v = word(self.b, at)?;
        let (m, var) = leading_digits(v);
        if !(1..8).contains(&m) || (m > 1 && v as u8 == b'0') {
            return None;
        }
        let ends = match (v >> (8 * m)) as u8 {
            b',' => false,
            b'}' => true,
            _ => return None,
        };
        self.i = at + m + 1;
        Some((id, var as i64, ends))
    }

    /// The compact form of a non-negative integer (1 to 7 digits, no leading
    /// zero, not followed by a fraction or an exponent), read as one word:
    /// its value, or `None` with nothing consumed (then [`Scan::opt_integer`]
    /// reads it, or refuses it, as for any integer).
    #[inline]
    fn compact_integer(&mut self) -> Option<i64> {
        let w = word(self.b, self.i)?;
        let (n, v) = leading_digits(w);
        if !(1..8).contains(&n) {
            return None;
        }
        let next = (w >> (8 * n)) as u8;
        let ok = (n == 1 || w as u8 != b'0') && !matches!(next, b'.' | b'e' | b'E');
        ok.then(|| {
            self.i += n;
            v as i64
        })
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
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let key = self.raw_string()?;
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
            // Real producers write `"1013":10132,` with no spaces: that form
            // is read two words at a time, any other by the general steps
            // (`ends`: `None` until they read what follows the member).
            let (exp, var, ends) = match self.compact_pair() {
                Some((exp, var, ends)) => (exp, Some(var), Some(ends)),
                None => {
                    let exp = match self.compact_key() {
                        Some(id) => id,
                        None => self.experiment_key()?,
                    };
                    self.eat(b':')?;
                    let var = match self.compact_integer() {
                        Some(v) => Some(v),
                        None => self.opt_integer()?,
                    };
                    (exp, var, None)
                }
            };
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
            let ends = match ends {
                Some(ends) => ends,
                None => self.object_ends()?,
            };
            if ends {
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
            let key = utf8(key);
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
            b'"' => self.raw_string().map(drop),
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            _ => self.integer().map(drop),
        }
    }
}

/// `b`, a string's bytes from [`Scan::raw_string`], as `str`.
///
/// Every line a `Scan` reads is valid UTF-8 ([`parse_fast`]: it is a `str`)
/// or refuses every byte >= 0x80 inside strings ([`parse_fast_ascii`]), and
/// a string is cut at its quotes, ASCII bytes that never lie inside a UTF-8
/// sequence: the bytes are valid UTF-8 either way. (A per-string
/// `from_utf8` was ~1% of all the engine's CPU on the assigned shapes.)
#[inline]
fn utf8(b: &[u8]) -> &str {
    debug_assert!(std::str::from_utf8(b).is_ok());
    // SAFETY: valid UTF-8, as said above (and checked in debug builds).
    unsafe { std::str::from_utf8_unchecked(b) }
}

const ONES: u64 = 0x0101_0101_0101_0101;

/// Eight bytes of `b` from `i` as a little-endian word (byte `i` lowest), if
/// the line has them.
#[inline]
fn word(b: &[u8], i: usize) -> Option<u64> {
    let w: [u8; 8] = b.get(i..i.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(w))
}

/// Where in `w` the first `"`, `\\` or control character (< 0x20) is, or
/// the first byte >= 0x80 if `refuse` is `0x80` in every byte: 0..8, or 8 if
/// none. (Each test may also flag bytes above a true hit, through a borrow,
/// never below one, so the lowest flag is exact.)
#[inline]
fn first_special(w: u64, refuse: u64) -> usize {
    let high = 0x80 * ONES;
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x & high;
    let control = w.wrapping_sub(0x20 * ONES) & !w & high;
    let flags = zero_in(w ^ (b'"' as u64 * ONES)) | zero_in(w ^ (b'\\' as u64 * ONES)) | control | (w & refuse);
    (flags.trailing_zeros() / 8) as usize
}

/// The run of ASCII digits `w` starts with: how many (0..=8) and, when 1 to
/// 7, their value (byte 0 the most significant digit); 8 digits give no value.
#[inline]
fn leading_digits(w: u64) -> (usize, u64) {
    let d = w.wrapping_sub(0x30 * ONES);
    // A byte of `d` is a digit's value if it is below 10: bit 7 of
    // `(x & 0x7f) + 0x76` is set for 10..=0x7f, bit 7 of `x` above. A byte
    // below '0' borrows from the ones above it, which are past the run.
    let not_digit = ((d & (0x7f * ONES)).wrapping_add(0x76 * ONES) | d) & (0x80 * ONES);
    let n = (not_digit.trailing_zeros() / 8) as usize;
    if n == 0 || n == 8 {
        return (n, 0);
    }
    // The run's bytes to the top of the word, zeros (leading zero digits)
    // below: then pairs, quads and the two halves are summed in place.
    let v = d << (8 * (8 - n));
    let v = (v & (0x0f * 0x0001_0001_0001_0001)) * 10 + ((v >> 8) & (0x0f * 0x0001_0001_0001_0001));
    let v = (v & (0xff * 0x0000_0001_0000_0001)) * 100 + ((v >> 16) & (0xff * 0x0000_0001_0000_0001));
    let v = (v & 0xffff) * 10_000 + (v >> 32);
    (n, v)
}

/// Parses a well-formed event in the fast subset, or `None` (use the serde path).
pub(super) fn parse_fast<'a>(text: &'a str, assign: &mut Vec<(u64, i64)>) -> Option<RawEvent<'a>> {
    scan(Scan { b: text.as_bytes(), i: 0, refuse: 0 }, assign)
}

/// [`parse_fast`] of a line not checked to be UTF-8: `Some` only for a line
/// that is all ASCII (so valid UTF-8), as `parse_fast` would read it.
pub(super) fn parse_fast_ascii<'a>(line: &'a [u8], assign: &mut Vec<(u64, i64)>) -> Option<RawEvent<'a>> {
    scan(Scan { b: line, i: 0, refuse: 0x80 * ONES }, assign)
}

#[inline]
fn scan<'a>(mut sc: Scan<'a>, assign: &mut Vec<(u64, i64)>) -> Option<RawEvent<'a>> {
    let mut ev = RawEvent::default();
    sc.object(|sc, key| {
        match key {
            b"ts" => ev.ts = sc.opt_integer()?,
            b"tenant" => ev.tenant = sc.opt_string()?,
            b"session" => ev.session = sc.opt_string()?,
            b"mp" => ev.mp = sc.opt_string()?,
            b"device" => ev.device = sc.opt_string()?,
            b"login" => ev.login = sc.opt_string()?,
            b"assign" => sc.assign(assign)?,
            b"attrs" => ev.attrs = sc.attrs()?,
            // An integer or null; a float, a string etc. goes to serde (bad_value).
            b"value" => ev.value = sc.opt_integer()?,
            _ => sc.skip_scalar()?,
        }
        Some(())
    })?;
    sc.ws();
    (sc.i == sc.b.len()).then_some(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-at-a-time steps against byte-by-byte ones, on words of every
    /// mix of digits, quotes, escapes, control and non-ASCII bytes.
    #[test]
    fn word_steps_agree_with_byte_steps() {
        let alphabet =
            [b'0', b'1', b'5', b'9', b'/', b':', b'"', b'\\', b'\t', 0, 0x1f, b' ', b'a', 0x7f, 0x80, 0xc3, 0xff];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..200_000 {
            let mut bytes = [0u8; 8];
            for b in &mut bytes {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                // Long digit runs often: most bytes digits in half the rounds.
                let pick = (state >> 33) as usize;
                *b = if round % 2 == 0 && !pick.is_multiple_of(4) {
                    b'0' + (pick % 10) as u8
                } else {
                    alphabet[pick % alphabet.len()]
                };
            }
            let w = u64::from_le_bytes(bytes);
            let special = bytes.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20).unwrap_or(8);
            assert_eq!(first_special(w, 0), special, "{bytes:?}");
            let refused =
                bytes.iter().position(|&c| c == b'"' || c == b'\\' || !(0x20..0x80).contains(&c)).unwrap_or(8);
            assert_eq!(first_special(w, 0x80 * ONES), refused, "{bytes:?}");
            let n = bytes.iter().position(|c| !c.is_ascii_digit()).unwrap_or(8);
            let value =
                if (1..8).contains(&n) { std::str::from_utf8(&bytes[..n]).unwrap().parse().unwrap() } else { 0 };
            assert_eq!(leading_digits(w), (n, value), "{bytes:?}");
        }
        for v in [0u64, 1, 9, 10, 99, 1234, 10132, 999_999, 1_000_000, 9_999_999] {
            let mut bytes = *b"\"\"\"\"\"\"\"\"";
            let s = v.to_string();
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            assert_eq!(leading_digits(u64::from_le_bytes(bytes)), (s.len(), v));
        }
    }

    /// Assignments in the compact form and next to every other form: the
    /// same map as the general steps (serde) read.
    #[test]
    fn compact_assignments_read_as_any_other_form() {
        let mut out = Vec::new();
        for assign in [
            r#"{"1013":10132,"1020":10202,"7":0,"0042":5}"#,
            r#"{"1013":10132 ,"1020" : 10202}"#,
            r#"{"12345678":1,"1":12345678,"2":-5,"3":null}"#,
            r#"{"1":10132}"#,
            r#"{"1":10}"#,
            r#"{"1":1}"#,
            r#"{"123456":1234567,"1234567":1,"1":0,"2":12345678,"3":7}"#,
            r#"{"5":1 ,"6":2, "7":3,"8" :4,"9": 5,"10":6 }"#,
            r#"{"5":1,"5":2,"6":3,"5":null}"#,
        ] {
            // Last (the map's end is near the line's) and first in the line.
            for line in [
                format!(r#"{{"ts":1525356185123,"tenant":"a","session":"s","mp":"m","assign":{assign}}}"#),
                format!(r#"{{"assign":{assign},"ts":1525356185123,"tenant":"a","session":"s","mp":"m"}}"#),
            ] {
                let ev = parse_fast(&line, &mut out).expect(&line);
                let mut want = Vec::new();
                assert_eq!(Ok(ev), super::super::parse_event_serde(&line, &mut want), "{line}");
                assert_eq!(out, want, "{line}");
            }
        }
        for bad in [
            r#"{"1":01,"2":3}"#,
            r#"{"1":1.5,"2":3}"#,
            r#"{"1":2e1,"2":3}"#,
            r#"{"1":2]"#,
            r#"{"1":01}"#,
            r#"{"1":10.5}"#,
            r#"{"1":1e3}"#,
            r#"{"1":"2"}"#,
            r#"{"x1":2}"#,
            r#"{"":2}"#,
        ] {
            let line = format!(r#"{{"ts":1525356185123,"tenant":"a","session":"s","mp":"m","assign":{bad},"x":1}}"#);
            assert!(parse_fast(&line, &mut out).is_none(), "{line}");
        }
    }
}
