//! Durations in config files: an integer followed by a unit, `ms`, `s`, `m`,
//! `h` or `d` (`"500ms"`, `"60s"`, `"10m"`, `"30d"`), as milliseconds.

/// A text that is no duration; the message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration; write an integer and a unit: ms, s, m, h or d (e.g. \"10m\")")]
    Syntax(String),
    #[error("{0:?} is too long a duration")]
    TooLong(String),
}

/// Parses `"10m"` into 600000.
pub fn parse_duration_ms(s: &str) -> Result<i64, DurationError> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let bad = || DurationError::Syntax(s.to_string());
    if num.is_empty() {
        return Err(bad());
    }
    let n: i64 = num.parse().map_err(|_| bad())?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).ok_or_else(|| DurationError::TooLong(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::parse_duration_ms;

    #[test]
    fn units() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("60s"), Ok(60_000));
        assert_eq!(parse_duration_ms("10m"), Ok(600_000));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms("30d"), Ok(2_592_000_000));
        assert_eq!(parse_duration_ms("0s"), Ok(0));
    }

    #[test]
    fn refusals() {
        for s in ["", "m", "10", "10 m", "-5m", "1.5h", "10w", "99999999999999999999d"] {
            assert!(parse_duration_ms(s).is_err(), "{s}");
        }
    }
}
