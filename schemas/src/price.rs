//! The price card: USD per million tokens as written in policy, held and applied as integer nano-USD.

use serde::{Deserialize, Deserializer};

/// Nano-USD in one USD.
pub const NANOS_PER_USD: i128 = 1_000_000_000;

/// A price in nano-USD per million tokens. Parsed from a decimal without going through `f64`
/// arithmetic: a YAML number is re-read from its shortest exact decimal text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct NanosPerMTok(pub i64);

impl NanosPerMTok {
    pub fn parse_usd(text: &str) -> Result<Self, String> {
        parse_usd_nanos(text).map(NanosPerMTok)
    }
}

/// Parses "3", "3.00", "0.075", "$1.25" into nano-USD; more than nine decimals is an error.
pub fn parse_usd_nanos(text: &str) -> Result<i64, String> {
    let t = text.trim().trim_start_matches('$');
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !(frac.is_empty() || digits(frac)) {
        return Err(format!("{text:?} is not a non-negative decimal USD amount"));
    }
    if frac.len() > 9 {
        return Err(format!("{text:?} has more than 9 decimals (finer than a nano-dollar)"));
    }
    let whole: i64 = whole.parse().map_err(|_| format!("{text:?} is too large"))?;
    let frac_nanos: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().map_err(|_| format!("{text:?} is malformed"))?
    };
    whole
        .checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(frac_nanos))
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Nano-USD as people read money, exactly: thousands grouped, every non-zero decimal, at least
/// two: `$4,000.00`, `$0.0013`, `$12,345.6789`, `-$2.50`. The one money format of alerts,
/// decisions, error bodies and consoles (nothing is rounded: a $0.0013 alert never reads $0.00).
pub fn usd(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let n = nanos.unsigned_abs();
    let frac = format!("{:09}", n % 1_000_000_000);
    let frac = frac.trim_end_matches('0');
    format!("{sign}${}.{frac:0<2}", group_thousands(n / 1_000_000_000))
}

/// Nano-USD as a plain exact decimal for tables and files: `12.345678901`, nine decimals, no
/// symbol or grouping (the reports' CSV, TSV and JSON `cost_usd`).
pub fn usd_decimal(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let n = nanos.unsigned_abs();
    format!("{sign}{}.{:09}", n / 1_000_000_000, n % 1_000_000_000)
}

/// `1234567` → `1,234,567`.
pub fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Deserializes a USD amount written as a YAML string or number into nano-USD.
pub fn de_usd_nanos<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Float(f64),
        Text(String),
    }
    let text = match Raw::deserialize(d)? {
        Raw::Int(n) => n.to_string(),
        // `{}` prints the shortest decimal that reads back as the same f64, i.e. what was written.
        Raw::Float(f) => format!("{f}"),
        Raw::Text(s) => s,
    };
    parse_usd_nanos(&text).map_err(serde::de::Error::custom)
}

fn de_price<'de, D: Deserializer<'de>>(d: D) -> Result<NanosPerMTok, D::Error> {
    de_usd_nanos(d).map(NanosPerMTok)
}

fn de_opt_price<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NanosPerMTok>, D::Error> {
    de_price(d).map(Some)
}

/// How capable, and how dear, a model is; the frontier-share report counts `frontier` spend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelTier {
    /// The flagship models (Opus): worth their price only on hard tasks.
    Frontier,
    /// The balanced middle (Sonnet); what a model without a tier is.
    #[default]
    Standard,
    /// Small, cheap models for routine work (Haiku, mini, flash).
    Economy,
}

impl ModelTier {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelTier::Frontier => "frontier",
            ModelTier::Standard => "standard",
            ModelTier::Economy => "economy",
        }
    }
}

/// One row of the price card: what a concrete model costs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub provider: String,
    pub model: String,
    /// `frontier`, `standard` (the default) or `economy`.
    #[serde(default)]
    pub tier: ModelTier,
    #[serde(deserialize_with = "de_price")]
    pub input_usd_per_mtok: NanosPerMTok,
    #[serde(deserialize_with = "de_price")]
    pub output_usd_per_mtok: NanosPerMTok,
    /// Prompt-cache reads; defaults to the input price when absent.
    #[serde(default, deserialize_with = "de_opt_price")]
    pub cached_read_usd_per_mtok: Option<NanosPerMTok>,
    /// Prompt-cache writes; defaults to the input price when absent.
    #[serde(default, deserialize_with = "de_opt_price")]
    pub cache_write_usd_per_mtok: Option<NanosPerMTok>,
}

/// Token counts of one request, as the provider reported them. `input` excludes cached reads
/// and cache writes, which are priced separately.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    pub input: i64,
    pub output: i64,
    pub cached_read: i64,
    pub cache_write: i64,
}

impl ModelPrice {
    /// Cost in nano-USD, rounded half-up once over the whole request.
    pub fn cost_nanos(&self, t: TokenCounts) -> i64 {
        let cached = self.cached_read_usd_per_mtok.unwrap_or(self.input_usd_per_mtok);
        let write = self.cache_write_usd_per_mtok.unwrap_or(self.input_usd_per_mtok);
        let per_mtok: i128 = i128::from(t.input) * i128::from(self.input_usd_per_mtok.0)
            + i128::from(t.output) * i128::from(self.output_usd_per_mtok.0)
            + i128::from(t.cached_read) * i128::from(cached.0)
            + i128::from(t.cache_write) * i128::from(write.0);
        let nanos = (per_mtok + 500_000) / 1_000_000;
        i64::try_from(nanos).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn money_is_printed_exactly_in_one_format() {
        assert_eq!(usd(4_000_000_000_000), "$4,000.00");
        assert_eq!(usd(1_289_000), "$0.001289");
        assert_eq!(usd(12_345_678_900_000), "$12,345.6789");
        assert_eq!(usd(500_123_000_000), "$500.123");
        assert_eq!(usd(1), "$0.000000001");
        assert_eq!(usd(0), "$0.00");
        assert_eq!(usd(-2_500_000_000), "-$2.50");
        assert_eq!(usd(i64::MIN), "-$9,223,372,036.854775808");
        assert_eq!(usd_decimal(12_345_678_901), "12.345678901");
        assert_eq!(usd_decimal(0), "0.000000000");
        assert_eq!(usd_decimal(-1_500_000_000), "-1.500000000");
        assert_eq!(usd_decimal(i64::MAX), "9223372036.854775807");
        assert_eq!(usd_decimal(i64::MIN), "-9223372036.854775808");
        assert_eq!(group_thousands(1_234_567), "1,234,567");
        assert_eq!(group_thousands(999), "999");
    }

    #[test]
    fn parses_decimal_usd_exactly() {
        assert_eq!(parse_usd_nanos("5.00").unwrap(), 5_000_000_000);
        assert_eq!(parse_usd_nanos("0.075").unwrap(), 75_000_000);
        assert_eq!(parse_usd_nanos("$1.25").unwrap(), 1_250_000_000);
        assert_eq!(parse_usd_nanos("4000").unwrap(), 4_000_000_000_000);
        assert!(parse_usd_nanos("-1").is_err());
        assert!(parse_usd_nanos("1e3").is_err());
        assert!(parse_usd_nanos("0.0000000001").is_err());
    }

    #[test]
    fn yaml_floats_keep_their_written_value() {
        #[derive(Deserialize)]
        struct P {
            #[serde(deserialize_with = "de_usd_nanos")]
            p: i64,
        }
        let p: P = serde_yaml_ng::from_str("p: 0.3").unwrap();
        assert_eq!(p.p, 300_000_000);
        let p: P = serde_yaml_ng::from_str("p: 3").unwrap();
        assert_eq!(p.p, 3_000_000_000);
    }

    #[test]
    fn tier_defaults_to_standard_and_rejects_unknown_names() {
        let p: ModelPrice = serde_yaml_ng::from_str(
            "{provider: anthropic, model: claude-opus-4-7, tier: frontier, input_usd_per_mtok: 5, output_usd_per_mtok: 25}",
        )
        .unwrap();
        assert_eq!(p.tier, ModelTier::Frontier);
        let p: ModelPrice = serde_yaml_ng::from_str(
            "{provider: openai, model: gpt-4o, input_usd_per_mtok: 2.5, output_usd_per_mtok: 10}",
        )
        .unwrap();
        assert_eq!(p.tier, ModelTier::Standard);
        let bad = serde_yaml_ng::from_str::<ModelPrice>(
            "{provider: a, model: b, tier: premium, input_usd_per_mtok: 1, output_usd_per_mtok: 1}",
        );
        assert!(bad.unwrap_err().to_string().contains("premium"));
    }

    #[test]
    fn cost_of_a_haiku_request() {
        let price = ModelPrice {
            provider: "anthropic".into(),
            model: "claude-haiku-4-5".into(),
            tier: ModelTier::Economy,
            input_usd_per_mtok: NanosPerMTok::parse_usd("1.00").unwrap(),
            output_usd_per_mtok: NanosPerMTok::parse_usd("5.00").unwrap(),
            cached_read_usd_per_mtok: Some(NanosPerMTok::parse_usd("0.10").unwrap()),
            cache_write_usd_per_mtok: None,
        };
        // 1,234 in at $1/M = 1,234,000 n$; 567 out at $5/M = 2,835,000 n$; 100 cached at $0.10/M = 10,000 n$.
        let t = TokenCounts { input: 1234, output: 567, cached_read: 100, cache_write: 0 };
        assert_eq!(price.cost_nanos(t), 4_079_000);
    }
}
