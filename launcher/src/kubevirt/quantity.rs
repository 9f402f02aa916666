//! Kubernetes resource quantities (`128Mi`, `1Gi`, `1G`, `500m`, `1.5Gi`, `1e9`) as the VMI
//! carries them, for memory sizes and CPU counts.

use serde::{Deserialize, Deserializer};

/// A quantity that is not a Kubernetes quantity, or does not fit.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Empty text.
    #[error("Empty quantity")]
    Empty,
    /// Not `<number><suffix>`.
    #[error("'{0}' is not a quantity like 128Mi, 1Gi or 1G")]
    Syntax(String),
    /// Larger than 2^64 - 1 in the unit asked for.
    #[error("'{0}' is too large")]
    Overflow(String),
    /// Negative.
    #[error("'{0}' is negative")]
    Negative(String),
}

/// A quantity as written in the VMI (`"1Gi"`); JSON numbers are accepted too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quantity(pub String);

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(serde_json::Number),
        }
        Ok(match Raw::deserialize(de)? {
            Raw::Text(text) => Quantity(text),
            Raw::Number(n) => Quantity(n.to_string()),
        })
    }
}

impl Quantity {
    /// The value in whole units (bytes for memory), rounded up as Kubernetes does.
    pub fn value(&self) -> Result<u64, QuantityError> {
        scaled(&self.0, 0)
    }

    /// The value in thousandths (millicores for CPU), rounded up.
    pub fn milli_value(&self) -> Result<u64, QuantityError> {
        scaled(&self.0, 3)
    }
}

impl std::fmt::Display for Quantity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `text` times 10^`extra_decimal_exponent`, rounded up to an integer.
fn scaled(text: &str, extra_decimal_exponent: i32) -> Result<u64, QuantityError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(QuantityError::Empty);
    }
    let syntax = || QuantityError::Syntax(text.to_owned());
    let overflow = || QuantityError::Overflow(text.to_owned());
    let (sign, unsigned) = match text.as_bytes()[0] {
        b'-' => (-1, &text[1..]),
        b'+' => (1, &text[1..]),
        _ => (1, text),
    };
    let number_end = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(syntax());
    }
    // The mantissa as an integer, and the power of ten it is scaled by.
    let digits = format!("{whole}{fraction}");
    let mut mantissa: u128 = digits.parse().map_err(|_| overflow())?;
    let mut decimal_exp: i32 = -i32::try_from(fraction.len()).map_err(|_| overflow())?;
    let mut binary_exp: u32 = 0;
    match suffix {
        "" => {}
        "Ki" => binary_exp = 10,
        "Mi" => binary_exp = 20,
        "Gi" => binary_exp = 30,
        "Ti" => binary_exp = 40,
        "Pi" => binary_exp = 50,
        "Ei" => binary_exp = 60,
        "n" => decimal_exp -= 9,
        "u" => decimal_exp -= 6,
        "m" => decimal_exp -= 3,
        "k" => decimal_exp += 3,
        "M" => decimal_exp += 6,
        "G" => decimal_exp += 9,
        "T" => decimal_exp += 12,
        "P" => decimal_exp += 15,
        "E" => decimal_exp += 18,
        exp if exp.starts_with(['e', 'E']) => {
            decimal_exp += exp[1..].parse::<i32>().map_err(|_| syntax())?;
        }
        _ => return Err(syntax()),
    }
    if sign < 0 && mantissa != 0 {
        return Err(QuantityError::Negative(text.to_owned()));
    }
    decimal_exp += extra_decimal_exponent;
    if mantissa.leading_zeros() < binary_exp {
        return Err(overflow());
    }
    mantissa <<= binary_exp;
    let value = if decimal_exp >= 0 {
        let factor = 10u128
            .checked_pow(decimal_exp.unsigned_abs())
            .ok_or_else(overflow)?;
        mantissa.checked_mul(factor).ok_or_else(overflow)?
    } else {
        match 10u128.checked_pow(decimal_exp.unsigned_abs()) {
            Some(divisor) => mantissa.div_ceil(divisor),
            // A divisor beyond u128: the value is below one unit.
            None => u128::from(mantissa != 0),
        }
    };
    u64::try_from(value).map_err(|_| overflow())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(text: &str) -> Result<u64, QuantityError> {
        Quantity(text.into()).value()
    }

    #[test]
    fn binary_suffixes_are_powers_of_two() {
        assert_eq!(bytes("128Mi"), Ok(128 << 20));
        assert_eq!(bytes("1Gi"), Ok(1 << 30));
        assert_eq!(bytes("2Ki"), Ok(2048));
        assert_eq!(bytes("1.5Gi"), Ok(3 << 29));
    }

    #[test]
    fn decimal_suffixes_are_powers_of_ten() {
        assert_eq!(bytes("1G"), Ok(1_000_000_000));
        assert_eq!(bytes("64M"), Ok(64_000_000));
        assert_eq!(bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(bytes("1048576"), Ok(1 << 20));
    }

    #[test]
    fn fractions_round_up() {
        assert_eq!(bytes("1500m"), Ok(2));
        assert_eq!(Quantity("500m".into()).milli_value(), Ok(500));
        assert_eq!(Quantity("2".into()).milli_value(), Ok(2000));
        assert_eq!(Quantity("0.1".into()).value(), Ok(1));
    }

    #[test]
    fn bad_text_is_a_syntax_error() {
        assert_eq!(bytes(""), Err(QuantityError::Empty));
        assert!(matches!(bytes("1Gb"), Err(QuantityError::Syntax(_))));
        assert!(matches!(bytes("Gi"), Err(QuantityError::Syntax(_))));
        assert!(matches!(bytes("-1Gi"), Err(QuantityError::Negative(_))));
        assert!(matches!(bytes("99999Ei"), Err(QuantityError::Overflow(_))));
    }

    #[test]
    fn json_numbers_are_accepted() {
        let q: Quantity = serde_json::from_str("1073741824").unwrap();
        assert_eq!(q.value(), Ok(1 << 30));
        let q: Quantity = serde_json::from_str("\"1Gi\"").unwrap();
        assert_eq!(q.value(), Ok(1 << 30));
    }
}
