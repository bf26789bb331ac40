//! Sizes in bytes, written by people as `256M`, `1G`, `512MiB` or `1048576`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A size in bytes. Parses binary suffixes (`K`, `M`, `G`, `T`, with or without `iB`);
/// serializes as a plain number so that scripts never have to parse suffixes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Bytes(pub u64);

/// Accepts a number of bytes or a size with a unit (`"256M"`), as config files write it.
impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Number(u64),
            Text(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Number(bytes) => Ok(Bytes(bytes)),
            Written::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BytesError {
    /// The text is empty.
    #[error("empty size")]
    Empty,
    /// The number part is not a whole number.
    #[error("size {0:?}: expected a whole number with an optional unit K, M, G or T")]
    NotANumber(String),
    /// The unit is not one of the binary units.
    #[error("size {text:?}: unknown unit {unit:?} (use K, M, G or T)")]
    UnknownUnit { text: String, unit: String },
    /// The value does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

impl Bytes {
    pub const KIB: u64 = 1 << 10;
    pub const MIB: u64 = 1 << 20;
    pub const GIB: u64 = 1 << 30;

    pub const fn mib(n: u64) -> Self {
        Bytes(n * Self::MIB)
    }

    pub const fn as_mib(self) -> u64 {
        self.0 / Self::MIB
    }
}

impl FromStr for Bytes {
    type Err = BytesError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(BytesError::Empty);
        }
        let split = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| BytesError::NotANumber(text.to_string()))?;
        let multiplier = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => Self::KIB,
            "m" | "mb" | "mib" => Self::MIB,
            "g" | "gb" | "gib" => Self::GIB,
            "t" | "tb" | "tib" => Self::GIB << 10,
            _ => {
                return Err(BytesError::UnknownUnit {
                    text: text.to_string(),
                    unit: unit.to_string(),
                })
            }
        };
        number
            .checked_mul(multiplier)
            .map(Bytes)
            .ok_or_else(|| BytesError::Overflow(text.to_string()))
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (Bytes::GIB << 10, "TiB"),
            (Bytes::GIB, "GiB"),
            (Bytes::MIB, "MiB"),
            (Bytes::KIB, "KiB"),
        ];
        for (size, unit) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{} {unit}", self.0 / size);
            }
        }
        write!(f, "{} B", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_units_people_write() {
        assert_eq!("256M".parse::<Bytes>(), Ok(Bytes::mib(256)));
        assert_eq!("256MiB".parse::<Bytes>(), Ok(Bytes::mib(256)));
        assert_eq!("1g".parse::<Bytes>(), Ok(Bytes(Bytes::GIB)));
        assert_eq!("4096".parse::<Bytes>(), Ok(Bytes(4096)));
    }

    #[test]
    fn rejects_nonsense_with_a_reason() {
        assert_eq!("".parse::<Bytes>(), Err(BytesError::Empty));
        assert!(matches!(
            "12X".parse::<Bytes>(),
            Err(BytesError::UnknownUnit { .. })
        ));
        assert!(matches!(
            "M".parse::<Bytes>(),
            Err(BytesError::NotANumber(_))
        ));
        assert!(matches!(
            "99999999999T".parse::<Bytes>(),
            Err(BytesError::Overflow(_))
        ));
    }

    #[test]
    fn deserializes_from_numbers_and_sizes() {
        assert_eq!(serde_json::from_str::<Bytes>("1024").unwrap(), Bytes(1024));
        assert_eq!(
            serde_json::from_str::<Bytes>("\"2G\"").unwrap(),
            Bytes(2 * Bytes::GIB)
        );
        assert!(serde_json::from_str::<Bytes>("\"2Q\"").is_err());
    }

    proptest! {
        #[test]
        fn display_round_trips(n in 0u64..(1 << 50)) {
            let shown = Bytes(n).to_string().replace(' ', "");
            prop_assert_eq!(shown.parse::<Bytes>(), Ok(Bytes(n)));
        }
    }
}
