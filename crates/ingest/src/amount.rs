//! Exact money parsing: a JSON number or decimal string to integer micros (millionths of
//! the currency unit), with integer arithmetic only — never through `f64`. Whether an
//! amount may be negative, and which field it came from, is left to the validator.
//!
//! Decimal strings are the exact path: `"9223372036854.775807"` converts digit for digit.
//! JSON numbers are converted from their textual form; without serde_json's
//! `arbitrary_precision` feature a fractional number is held as an `f64`, so its text is the
//! shortest representation that round-trips (`12.34` stays `"12.34"`), which is exact for
//! up to 15 significant digits. Producers sending more digits must send a string.

/// Micros per unit: amounts carry at most this many decimal places.
const SCALE_DIGITS: i64 = 6;

/// Exponents beyond this magnitude behave like this magnitude (any non-zero mantissa is then
/// too large or too precise); clamping keeps the arithmetic below bounded.
const EXPONENT_CLAMP: i64 = 1_000_000;

/// Converts a JSON number or a decimal string (`"12"`, `"12.5"`, `"-1.5"`, `"1.5E-3"`) to
/// integer micros, exactly.
///
/// Rejects, with a short reason the caller prefixes with the field name: other JSON types,
/// strings that are not plain decimals (empty, whitespace, a leading `+`, `NaN`, `inf`),
/// more than 6 non-zero decimal places (never rounds), and values outside `i64` micros.
pub fn to_micros(value: &serde_json::Value) -> Result<i64, String> {
    match value {
        serde_json::Value::Number(n) => parse_decimal(&n.to_string()),
        serde_json::Value::String(s) => parse_decimal(s),
        _ => Err("must be a number or a decimal string".to_owned()),
    }
}

/// [`to_micros`] of a value as validation parses it.
pub(crate) fn json_to_micros(value: &crate::validate::json::Json<'_>) -> Result<i64, String> {
    use crate::validate::json::Json;
    match value {
        Json::Number(n) => parse_decimal(&n.to_string()),
        Json::String(s) => parse_decimal(s),
        _ => Err("must be a number or a decimal string".to_owned()),
    }
}

/// Largest magnitude in micros: `i64::MAX`, or one more for a negative amount (`i64::MIN`).
fn magnitude_limit(negative: bool) -> u64 {
    if negative {
        i64::MIN.unsigned_abs()
    } else {
        i64::MAX.unsigned_abs()
    }
}

fn not_a_decimal() -> String {
    "is not a decimal number (expected digits with an optional '-', '.' and exponent, e.g. \"12.34\")"
        .to_owned()
}

fn too_large() -> String {
    "is too large (at most 9223372036854.775807)".to_owned()
}

fn too_precise() -> String {
    "has more than 6 decimal places".to_owned()
}

/// Parses `-?digits(.digits)?([eE][+-]?digits)?` exactly into micros.
fn parse_decimal(text: &str) -> Result<i64, String> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(at) => (
            rest.get(..at).ok_or_else(not_a_decimal)?,
            parse_exponent(rest.get(at + 1..).ok_or_else(not_a_decimal)?)?,
        ),
        None => (rest, 0),
    };
    let (int_digits, frac_digits) = match mantissa.split_once('.') {
        Some((int, frac)) => (int, frac),
        None => (mantissa, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int_digits.is_empty()
        || !all_digits(int_digits)
        || (mantissa.contains('.') && frac_digits.is_empty())
        || !all_digits(frac_digits)
    {
        return Err(not_a_decimal());
    }

    // The value is DIGITS × 10^(exponent − fraction length); in micros the power grows by 6.
    let digits = int_digits.bytes().chain(frac_digits.bytes());
    let frac_len = i64::try_from(frac_digits.len()).map_err(|_| too_precise())?;
    let shift = exponent
        .checked_add(SCALE_DIGITS)
        .and_then(|s| s.checked_sub(frac_len))
        .ok_or_else(too_precise)?;
    if int_digits
        .bytes()
        .chain(frac_digits.bytes())
        .all(|b| b == b'0')
    {
        return Ok(0);
    }

    let limit = magnitude_limit(negative);
    let mut magnitude: u64 = 0;
    let total = int_digits.len().saturating_add(frac_digits.len());
    // With a negative shift the last |shift| digits are below one micro: they must be zeros.
    let kept = if shift < 0 {
        let dropped = usize::try_from(shift.unsigned_abs()).unwrap_or(usize::MAX);
        total.saturating_sub(dropped)
    } else {
        total
    };
    for (index, byte) in digits.enumerate() {
        let digit = u64::from(byte.saturating_sub(b'0'));
        if index < kept {
            magnitude = magnitude
                .checked_mul(10)
                .and_then(|m| m.checked_add(digit))
                .filter(|m| *m <= limit)
                .ok_or_else(too_large)?;
        } else if digit != 0 {
            return Err(too_precise());
        }
    }
    if shift > 0 {
        for _ in 0..shift {
            magnitude = magnitude
                .checked_mul(10)
                .filter(|m| *m <= limit)
                .ok_or_else(too_large)?;
        }
    }

    if negative {
        0i64.checked_sub_unsigned(magnitude).ok_or_else(too_large)
    } else {
        i64::try_from(magnitude).map_err(|_| too_large())
    }
}

/// Parses an exponent `[+-]?digits`, clamping its magnitude to [`EXPONENT_CLAMP`].
fn parse_exponent(text: &str) -> Result<i64, String> {
    let (negative, digits) = if let Some(d) = text.strip_prefix('-') {
        (true, d)
    } else if let Some(d) = text.strip_prefix('+') {
        (false, d)
    } else {
        (false, text)
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_a_decimal());
    }
    let mut value: i64 = 0;
    for byte in digits.bytes() {
        value = value
            .saturating_mul(10)
            .saturating_add(i64::from(byte.saturating_sub(b'0')))
            .min(EXPONENT_CLAMP);
    }
    Ok(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn micros(text: &str) -> Result<i64, String> {
        to_micros(&json!(text))
    }

    #[test]
    fn decimal_strings_convert_exactly() {
        let cases = [
            ("0", 0),
            ("12", 12_000_000),
            ("12.5", 12_500_000),
            ("12.34", 12_340_000),
            ("19.99", 19_990_000),
            ("0.3", 300_000),
            ("0.1", 100_000),
            ("0.2", 200_000),
            ("0.000001", 1),
            ("0.0000010", 1),
            ("1.500000000", 1_500_000),
            ("007.5", 7_500_000),
            ("-1.5", -1_500_000),
            ("-0", 0),
            ("-0.000001", -1),
            ("9223372036854.775807", i64::MAX),
            ("-9223372036854.775808", i64::MIN),
        ];
        for (text, expected) in cases {
            assert_eq!(micros(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn exponent_forms_convert_exactly_with_integer_arithmetic() {
        let cases = [
            ("1e2", 100_000_000),
            ("1E2", 100_000_000),
            ("1e+2", 100_000_000),
            ("1.5E-3", 1_500),
            ("1e-6", 1),
            ("123456e-6", 123_456),
            ("12.3456789e3", 12_345_678_900),
            ("0e999999999999", 0),
            ("0.0e-999999999999", 0),
            ("9.223372036854775807e12", i64::MAX),
        ];
        for (text, expected) in cases {
            assert_eq!(micros(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn json_numbers_convert_through_their_text_not_through_arithmetic_on_floats() {
        assert_eq!(to_micros(&json!(12)), Ok(12_000_000));
        assert_eq!(to_micros(&json!(12.34)), Ok(12_340_000));
        assert_eq!(to_micros(&json!(19.99)), Ok(19_990_000));
        assert_eq!(to_micros(&json!(0.3)), Ok(300_000));
        assert_eq!(to_micros(&json!(12.0)), Ok(12_000_000));
        assert_eq!(to_micros(&json!(1e20)), Err(too_large()));
        let parsed: serde_json::Value = serde_json::from_str("1.5E-3").unwrap();
        assert_eq!(to_micros(&parsed), Ok(1_500));
    }

    #[test]
    fn more_than_six_non_zero_decimal_places_is_rejected_never_rounded() {
        for text in ["0.0000001", "1.1234567", "19.9999999", "1e-7", "1.5e-6"] {
            let err = micros(text).unwrap_err();
            assert!(
                err.contains("has more than 6 decimal places"),
                "{text}: {err}"
            );
        }
        assert!(to_micros(&json!(0.1234567)).is_err());
    }

    #[test]
    fn values_beyond_i64_micros_are_too_large() {
        for text in [
            "9223372036854.775808",
            "-9223372036854.775809",
            "100000000000000",
            "1e13",
            "1e999999999999999999999",
        ] {
            let err = micros(text).unwrap_err();
            assert!(err.contains("too large"), "{text}: {err}");
        }
        assert!(
            to_micros(&json!(u64::MAX))
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn text_that_is_not_a_plain_decimal_is_rejected() {
        for text in [
            "", " 1", "1 ", "+1", "NaN", "nan", "inf", "-inf", "Infinity", "1.", ".5", "-", "1e",
            "1e+", "e5", "1.2.3", "1,5", "0x10", "1_000", "--1", "١", "1e2.5",
        ] {
            let err = micros(text).unwrap_err();
            assert!(err.contains("not a decimal number"), "{text:?}: {err}");
        }
    }

    #[test]
    fn other_json_types_are_rejected() {
        for value in [json!(null), json!(true), json!([1]), json!({"a": 1})] {
            assert_eq!(
                to_micros(&value),
                Err("must be a number or a decimal string".to_owned())
            );
        }
    }

    proptest! {
        #[test]
        fn six_digit_decimal_strings_round_trip_exactly(int in any::<u32>(), frac in 0u32..1_000_000) {
            let text = format!("{int}.{frac:06}");
            let expected = i64::from(int) * 1_000_000 + i64::from(frac);
            prop_assert_eq!(micros(&text), Ok(expected));
            prop_assert_eq!(micros(&format!("-{text}")), Ok(-expected));
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,40}") {
            let _ = micros(&text);
        }
    }
}
