//! Times and durations as text: RFC 3339 timestamps and Go-style durations, parsed and
//! formatted without a calendar crate (the proleptic Gregorian arithmetic is a few lines:
//! Howard Hinnant's `days_from_civil`). Everything is UTC nanoseconds in an `i64`, so the
//! representable years are 1678 to 2261; anything outside parses as `None`.

const NS_PER_S: i64 = 1_000_000_000;
const S_PER_DAY: i64 = 86_400;

/// Days since 1970-01-01 of a date in the proleptic Gregorian calendar.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of `days_from_civil`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` (RFC 3339; `t`, `z` and a space for
/// the `T` accepted; no leap seconds). Fraction digits beyond nanoseconds are ignored.
pub(crate) fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |at: usize, len: usize| -> Option<i64> {
        b.get(at..at + len)?.iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let sep = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));
    let year = num(0, 4)?;
    let month = num(5, 2)?;
    let day = num(8, 2)?;
    let hour = num(11, 2)?;
    let minute = num(14, 2)?;
    let second = num(17, 2)?;
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let mut at = 19;
    let mut nanos = 0i64;
    if sep(at, b".") {
        at += 1;
        let start = at;
        let mut scale = NS_PER_S;
        while let Some(c) = b.get(at).filter(|c| c.is_ascii_digit()) {
            if scale > 1 {
                scale /= 10;
                nanos += i64::from(c - b'0') * scale;
            }
            at += 1;
        }
        if at == start {
            return None;
        }
    }
    let offset_s = match b.get(at) {
        Some(b'Z' | b'z') => {
            at += 1;
            0
        }
        Some(&sign @ (b'+' | b'-')) => {
            let (h, m) = (num(at + 1, 2)?, num(at + 4, 2)?);
            if !sep(at + 3, b":") || h > 23 || m > 59 {
                return None;
            }
            at += 6;
            let off = h * 3600 + m * 60;
            if sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    if at != b.len() {
        return None;
    }
    let secs = days_from_civil(year, month, day) * S_PER_DAY + hour * 3600 + minute * 60 + second
        - offset_s;
    // In i128: the earliest representable instant has a negative whole second whose
    // nanoseconds alone are below i64::MIN, brought back in range by the fraction.
    i64::try_from(i128::from(secs) * i128::from(NS_PER_S) + i128::from(nanos)).ok()
}

/// Formats as RFC 3339 in UTC with the fraction trimmed of trailing zeros (as Go's
/// `RFC3339Nano`): `2024-05-01T12:00:00.25Z`.
pub(crate) fn format_rfc3339(ns: i64) -> String {
    let secs = ns.div_euclid(NS_PER_S);
    let nanos = ns.rem_euclid(NS_PER_S);
    let (year, month, day) = civil_from_days(secs.div_euclid(S_PER_DAY));
    let sod = secs.rem_euclid(S_PER_DAY);
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    );
    push_fraction(&mut out, nanos);
    out.push('Z');
    out
}

fn push_fraction(out: &mut String, nanos: i64) {
    if nanos != 0 {
        let digits = format!("{nanos:09}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
}

/// Parses a Go-style duration: an optional sign, then one or more decimal numbers each
/// with a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`), as in `1h30m`, `1.5s`, `-250ms`;
/// or a bare `0`. `None` if malformed or beyond ±292 years.
pub(crate) fn parse_duration(s: &str) -> Option<i64> {
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let whole_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let whole_digits = &rest[..whole_len];
        rest = &rest[whole_len..];
        let mut frac_digits = "";
        if let Some(after_dot) = rest.strip_prefix('.') {
            let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
            frac_digits = &after_dot[..frac_len];
            rest = &after_dot[frac_len..];
        }
        if whole_digits.is_empty() && frac_digits.is_empty() {
            return None;
        }
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(rest.len(), |(i, _)| i);
        let unit: i128 = match &rest[..unit_len] {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        rest = &rest[unit_len..];
        // Digits past what can matter are ignored rather than overflowing: 30 digits of
        // whole part already exceed any i64 duration.
        if whole_digits.len() > 30 {
            return None;
        }
        let whole: i128 = whole_digits.parse().unwrap_or(0);
        total = total.checked_add(whole.checked_mul(unit)?)?;
        let mut scale = unit;
        for d in frac_digits.bytes().take(18) {
            scale /= 10;
            total += i128::from(d - b'0') * scale;
        }
        if total > i128::from(i64::MAX) + 1 {
            return None;
        }
    }
    let signed = if negative { -total } else { total };
    i64::try_from(signed).ok()
}

/// Formats as seconds with a trimmed fraction, the form CEL prints: `5400s`, `1.5s`,
/// `-0.25s`. [`parse_duration`] reads it back.
pub(crate) fn format_duration(ns: i64) -> String {
    let abs = ns.unsigned_abs();
    let mut out = String::new();
    if ns < 0 {
        out.push('-');
    }
    out.push_str(&(abs / 1_000_000_000).to_string());
    // The remainder is below 1e9, so it fits an i64.
    push_fraction(&mut out, (abs % 1_000_000_000) as i64);
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-02-29T12:30:15.5Z"),
            Some(1_709_209_815_500_000_000)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T14:30:15.5+02:00"),
            parse_rfc3339("2024-02-29T12:30:15.5Z")
        );
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59.999999999Z"), Some(-1));
        assert_eq!(parse_rfc3339("2023-02-29T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2024-01-01T24:00:00Z"), None);
        assert_eq!(parse_rfc3339("2024-01-01T00:00:00"), None);
        assert_eq!(parse_rfc3339("2024-01-01T00:00:00.Z"), None);
        assert_eq!(parse_rfc3339("3000-01-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2024-01-01T00:00:00Zjunk"), None);
        assert_eq!(parse_rfc3339("ä"), None);
    }

    #[test]
    fn rfc3339_round_trips() {
        for ns in [0, 1, -1, 1_709_209_815_500_000_000, i64::MAX, i64::MIN] {
            let text = format_rfc3339(ns);
            assert_eq!(parse_rfc3339(&text), Some(ns), "{text}");
        }
        assert_eq!(format_rfc3339(1_500_000_000), "1970-01-01T00:00:01.5Z");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h30m"), Some(5_400 * NS_PER_S));
        assert_eq!(parse_duration("1.5s"), Some(1_500_000_000));
        assert_eq!(parse_duration("-250ms"), Some(-250_000_000));
        assert_eq!(parse_duration(".5us"), Some(500));
        assert_eq!(parse_duration("1µs"), Some(1_000));
        assert_eq!(parse_duration("0"), Some(0));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("1"), None);
        assert_eq!(parse_duration("1d"), None);
        assert_eq!(parse_duration("."), None);
        assert_eq!(parse_duration("9999999999999999999999h"), None);
        assert_eq!(parse_duration("2562047h47m16.854775807s"), Some(i64::MAX));
        assert_eq!(parse_duration("-2562047h47m16.854775808s"), Some(i64::MIN));
        assert_eq!(parse_duration("2562047h47m16.854775808s"), None);
        for ns in [0, 1, -1, 5_400 * NS_PER_S, i64::MAX, i64::MIN, -250_000_000] {
            assert_eq!(parse_duration(&format_duration(ns)), Some(ns), "{ns}");
        }
    }
}
