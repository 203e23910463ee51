//! The text metadata Cycles writes and merges: times as `MM:SS.hh` / `HH:MM:SS.hh` and sample
//! counts as decimal text, read and written with Cycles' own rules (`util/time.cpp`, `sscanf
//! "%d"`), so merged attributes are byte-for-byte what `_cycles.merge` writes.

/// Seconds in a Cycles time string: `[[[D:]H:]M:]S[.fraction]`. Malformed text counts as 0, as
/// in Cycles (a missing attribute is the empty string, so it adds nothing to a sum).
pub fn parse_duration(text: &str) -> f64 {
    const MULTIPLIERS: [f64; 4] = [1.0, 60.0, 3600.0, 86_400.0];
    if text.is_empty() {
        return 0.0;
    }
    let fraction_tokens = split_tokens(text, '.');
    let mut seconds = match fraction_tokens.as_slice() {
        [] => return 0.0,
        [_] => 0.0,
        [_, fraction] => c_atof(fraction) * 0.1f64.powf(fraction.len() as f64),
        _ => return 0.0,
    };
    let tokens = split_tokens(fraction_tokens[0], ':');
    if tokens.len() > MULTIPLIERS.len() {
        return 0.0;
    }
    for (token, multiplier) in tokens.iter().rev().zip(MULTIPLIERS) {
        seconds += f64::from(c_atoi(token)) * multiplier;
    }
    seconds
}

/// A duration as Cycles writes it: `MM:SS.hh`, or `HH:MM:SS.hh` from one hour on; the
/// hundredths are truncated, not rounded.
pub fn format_duration(seconds: f64) -> String {
    // C's (int) casts: truncation towards zero, saturated here rather than undefined.
    let whole = seconds as i32;
    let (h, m, s) = (whole / 3600, (whole / 60) % 60, whole % 60);
    let hundredths = ((seconds * 100.0) as i32) % 100;
    if h > 0 {
        format!("{h:02}:{m:02}:{s:02}.{hundredths:02}")
    } else {
        format!("{m:02}:{s:02}.{hundredths:02}")
    }
}

/// A sample count as `sscanf(text, "%d")` reads it: leading spaces, a sign, digits, and
/// anything after them ignored. `None` when no number starts the text or it overflows.
pub(crate) fn parse_samples(text: &str) -> Option<i64> {
    let trimmed = text.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let (negative, digits) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    let value: i64 = digits[..end].parse().ok()?;
    let value = if negative { -value } else { value };
    i32::try_from(value).ok().map(i64::from)
}

/// Cycles' `string_split` with one separator and empty tokens kept, except a trailing one.
fn split_tokens(text: &str, separator: char) -> Vec<&str> {
    let mut tokens: Vec<&str> = text.split(separator).collect();
    if tokens.last().is_some_and(|t| t.is_empty()) {
        tokens.pop();
    }
    tokens
}

/// C's `atoi`: leading spaces, a sign, then as many digits as there are; 0 when none.
fn c_atoi(text: &str) -> i32 {
    let trimmed = text.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let (negative, digits) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    let mut value: i64 = 0;
    for digit in digits.bytes().take_while(u8::is_ascii_digit) {
        value = (value * 10 + i64::from(digit - b'0')).min(i64::from(i32::MAX) + 1);
    }
    let value = if negative { -value } else { value };
    value.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}

/// C's `atof` for the decimal forms a time can hold: the longest prefix that reads as a number.
fn c_atof(text: &str) -> f64 {
    let trimmed = text.trim_start_matches(|c: char| c.is_ascii_whitespace());
    (1..=trimmed.len())
        .rev()
        .filter(|&end| trimmed.is_char_boundary(end))
        .find_map(|end| {
            let prefix = &trimmed[..end];
            // Rust accepts "inf" and "nan" spellings C also accepts; both are fine here.
            prefix.parse::<f64>().ok()
        })
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_cycles() {
        assert_eq!(parse_duration(""), 0.0);
        assert_eq!(parse_duration("00:00.05"), 5.0 * 0.1f64.powf(2.0));
        assert_eq!(parse_duration("01:02.50"), 0.5 + 2.0 + 60.0);
        assert_eq!(parse_duration("01:00:00.00"), 3600.0);
        assert_eq!(parse_duration("1:00:00:00"), 86_400.0);
        // Too many fields or dots: unreliable, so 0 as in Cycles.
        assert_eq!(parse_duration("1:1:1:1:1"), 0.0);
        assert_eq!(parse_duration("1.2.3"), 0.0);
        // A trailing dot is dropped, an inner empty field counts as 0.
        assert_eq!(parse_duration("00:07."), 7.0);
        assert_eq!(parse_duration("2::03"), 7203.0);
    }

    #[test]
    fn durations_format_like_cycles() {
        assert_eq!(format_duration(0.0), "00:00.00");
        assert_eq!(format_duration(0.1), "00:00.10");
        assert_eq!(format_duration(61.257), "01:01.25");
        assert_eq!(format_duration(3723.5), "01:02:03.50");
        // Truncation of seconds * 100 as a C cast does it: 0.29 * 100 = 28.999…
        assert_eq!(format_duration(0.29), "00:00.28");
        // Sums of parsed times come out as Cycles prints them.
        let sum = parse_duration("00:00.05") + parse_duration("00:00.05");
        assert_eq!(format_duration(sum), "00:00.10");
    }

    #[test]
    fn samples_read_like_sscanf() {
        assert_eq!(parse_samples("16"), Some(16));
        assert_eq!(parse_samples("  8 samples"), Some(8));
        assert_eq!(parse_samples("-3"), Some(-3));
        assert_eq!(parse_samples("many"), None);
        assert_eq!(parse_samples(""), None);
        assert_eq!(parse_samples("99999999999"), None);
    }
}
