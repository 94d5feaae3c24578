//! Money as text: amounts travel as integer micros (millionths of the currency unit) and
//! are shown as exact decimal strings — never through a float. Shared by the query API
//! (answers) and `pulsectl loadgen` (the answers it expects), so both format alike.

/// Formats `micros` as a decimal string with at least two and at most six fraction
/// digits, trailing zeros beyond the second trimmed: `12_340_000` → `"12.34"`,
/// `5_000_000` → `"5.00"`, `1` → `"0.000001"`, `-2_500_000` → `"-2.50"`.
pub fn micros_to_decimal(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let units = abs / 1_000_000;
    let mut frac = format!("{:06}", abs % 1_000_000);
    while frac.len() > 2 && frac.ends_with('0') {
        frac.pop();
    }
    format!("{sign}{units}.{frac}")
}

/// Sums micros, `None` on overflow (a sum that cannot be shown exactly is an error, not a
/// wrapped number).
pub fn checked_sum(values: impl IntoIterator<Item = i64>) -> Option<i64> {
    values
        .into_iter()
        .try_fold(0i64, |acc, v| acc.checked_add(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_format_as_exact_decimals_with_two_to_six_fraction_digits() {
        assert_eq!(micros_to_decimal(12_340_000), "12.34");
        assert_eq!(micros_to_decimal(5_000_000), "5.00");
        assert_eq!(micros_to_decimal(0), "0.00");
        assert_eq!(micros_to_decimal(1), "0.000001");
        assert_eq!(micros_to_decimal(10_000_010), "10.00001");
        assert_eq!(micros_to_decimal(-2_500_000), "-2.50");
        assert_eq!(
            micros_to_decimal(i64::MAX),
            "9223372036854.775807",
            "the largest amount is exact"
        );
        assert_eq!(micros_to_decimal(i64::MIN), "-9223372036854.775808");
    }

    #[test]
    fn sums_that_overflow_are_reported_not_wrapped() {
        assert_eq!(checked_sum([1, 2, 3]), Some(6));
        assert_eq!(checked_sum([i64::MAX, 1]), None);
    }
}
