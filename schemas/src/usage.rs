//! The usage event: one record per LLM request, as `schemas/avro/usage_event.avsc` defines it.

use apache_avro::AvroSchema;
use serde::{Deserialize, Serialize};

use crate::avro::{AvroCodec, CodecError};

/// The `.avsc` this type must match; `tests::rust_type_matches_avsc` fails when they drift.
pub const USAGE_EVENT_AVSC: &str = include_str!("../avro/usage_event.avsc");
/// Earlier versions of the usage event, still read (v1 lacked the `Interrupted` status, v2 the
/// `trace_id`).
pub const USAGE_EVENT_EARLIER_AVSC: [&str; 2] =
    [include_str!("../avro/history/usage_event.v1.avsc"), include_str!("../avro/history/usage_event.v2.avsc")];

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "tollgate.v1")]
pub struct Envelope {
    pub project: Option<String>,
    pub team: Option<String>,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub workflow_tag: Option<String>,
    pub environment: Option<String>,
    pub cost_center: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "tollgate.v1")]
pub enum ApiFormat {
    OpenAi,
    Anthropic,
}

impl ApiFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiFormat::OpenAi => "openai",
            ApiFormat::Anthropic => "anthropic",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "tollgate.v1")]
pub enum Status {
    /// The provider answered 2xx and the response reached the client.
    Ok,
    /// The provider answered an error, sent garbage or closed the connection.
    ProviderError,
    /// The client went away before the response was complete.
    ClientAbort,
    /// The provider did not answer in time.
    Timeout,
    /// Tollgate refused the request before it reached a provider.
    Rejected,
    /// The ingress stopped (crashed, was killed) while the attempt was with the provider; a
    /// restarted ingress recorded it from its intake journal, input estimated, output unknown.
    Interrupted,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::ProviderError => "provider_error",
            Status::ClientAbort => "client_abort",
            Status::Timeout => "timeout",
            Status::Rejected => "rejected",
            Status::Interrupted => "interrupted",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "tollgate.v1")]
pub enum TokenSource {
    /// Counts come from the provider's `usage` report.
    Provider,
    /// Counts were estimated with tiktoken (the provider never reported usage).
    Estimated,
}

impl TokenSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Provider => "provider",
            TokenSource::Estimated => "estimated",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "tollgate.v1")]
pub struct AppliedDecision {
    pub rule_id: String,
    pub scope: String,
    pub action: String,
    pub version: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "tollgate.v1")]
pub struct UsageEvent {
    pub event_id: String,
    pub started_at_us: i64,
    pub first_token_at_us: Option<i64>,
    pub ended_at_us: i64,
    pub envelope: Envelope,
    pub api_key_id: Option<String>,
    pub api_format: ApiFormat,
    pub virtual_model: String,
    pub provider: String,
    pub model: String,
    pub model_version: Option<String>,
    pub attempt: i32,
    pub fallback_path: Vec<String>,
    pub status: Status,
    pub http_status: i32,
    pub error: Option<String>,
    pub streamed: bool,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub reasoning_tokens: i64,
    pub reference_input_tokens: Option<i64>,
    pub input_chars: i64,
    pub token_source: TokenSource,
    pub cost_nanos: i64,
    pub price_card_version: String,
    pub decision: Option<AppliedDecision>,
    /// The request's W3C trace id (32 lowercase hex digits), when it has one.
    pub trace_id: Option<String>,
}

/// The one definition of each token quantity, as SQL over a row of `usage_events` (or of any
/// table with the same token columns): every SQL view, report and rebuild query says it with
/// these, and `UsageEvent`'s methods say the same in Rust.
///
/// `input_tokens` is everything the model read: uncached input, cache reads and cache writes.
/// `cached_input_tokens` and `cache_write_tokens` are parts of it, kept apart for pricing only.
pub mod sql {
    /// What the model read: the prompt, cache reads and writes included.
    pub const PROMPT_TOKENS: &str = "input_tokens";
    /// What the model read and wrote.
    pub const TOTAL_TOKENS: &str = "(input_tokens + output_tokens)";
    /// The input priced at the uncached rate.
    pub const UNCACHED_INPUT_TOKENS: &str = "(input_tokens - cached_input_tokens - cache_write_tokens)";
}

impl UsageEvent {
    /// What the model read: the prompt, cache reads and writes included (`sql::PROMPT_TOKENS`).
    pub fn prompt_tokens(&self) -> i64 {
        self.input_tokens
    }

    /// What the model read and wrote (`sql::TOTAL_TOKENS`): what token limits and guards count.
    pub fn total_tokens(&self) -> i64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// The input priced at the uncached rate (`sql::UNCACHED_INPUT_TOKENS`).
    pub fn uncached_input_tokens(&self) -> i64 {
        self.input_tokens.saturating_sub(self.cached_input_tokens).saturating_sub(self.cache_write_tokens)
    }

    /// Why this event, read from the usage topic, cannot be right (`None` when it can): a negative
    /// amount, or cache parts larger than the input they are part of. Consumers set such an event
    /// aside (dead-letter topic) instead of counting it: a negative amount would subtract spend.
    pub fn implausible(&self) -> Option<String> {
        let amounts = [
            ("input_tokens", self.input_tokens),
            ("output_tokens", self.output_tokens),
            ("cached_input_tokens", self.cached_input_tokens),
            ("cache_write_tokens", self.cache_write_tokens),
            ("reasoning_tokens", self.reasoning_tokens),
            ("reference_input_tokens", self.reference_input_tokens.unwrap_or(0)),
            ("input_chars", self.input_chars),
            ("cost_nanos", self.cost_nanos),
        ];
        if let Some((field, v)) = amounts.iter().find(|(_, v)| *v < 0) {
            return Some(format!("{field} is negative ({v})"));
        }
        if self.cached_input_tokens.saturating_add(self.cache_write_tokens) > self.input_tokens {
            return Some(format!(
                "cache reads ({}) and writes ({}) exceed the input they are part of ({})",
                self.cached_input_tokens, self.cache_write_tokens, self.input_tokens
            ));
        }
        None
    }

    /// The codec for this event, built from the `.avsc` (not from the Rust type), so the bytes
    /// on the wire always carry the fingerprint of the published schema.
    pub fn codec() -> Result<AvroCodec, CodecError> {
        AvroCodec::from_avsc(USAGE_EVENT_AVSC)?.reading_earlier(&USAGE_EVENT_EARLIER_AVSC)
    }
}

#[cfg(any(test, feature = "fixtures"))]
impl UsageEvent {
    /// A successful, unpriced-looking request for tests: everything zero or empty but the ids
    /// and the end time. Override what a test cares about with struct update syntax.
    pub fn example(event_id: String, session_id: Option<String>, ended_at_us: i64) -> Self {
        UsageEvent {
            event_id,
            started_at_us: ended_at_us,
            first_token_at_us: None,
            ended_at_us,
            envelope: Envelope { session_id, ..Envelope::default() },
            api_key_id: None,
            api_format: ApiFormat::OpenAi,
            virtual_model: "vm".into(),
            provider: "p".into(),
            model: "m".into(),
            model_version: None,
            attempt: 1,
            fallback_path: vec![],
            status: Status::Ok,
            http_status: 200,
            error: None,
            streamed: false,
            input_tokens: 0,
            output_tokens: 0,
            cached_input_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            reference_input_tokens: None,
            input_chars: 0,
            token_source: TokenSource::Provider,
            cost_nanos: 0,
            price_card_version: "v".into(),
            decision: None,
            trace_id: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rust_type_matches_avsc() {
        let from_file = UsageEvent::codec().unwrap();
        let from_type = UsageEvent::get_schema();
        assert_eq!(
            from_file.canonical_form(),
            from_type.canonical_form(),
            "schemas/avro/usage_event.avsc and the UsageEvent struct have drifted apart"
        );
    }

    fn opt_string() -> impl Strategy<Value = Option<String>> {
        proptest::option::of("[a-zA-Z0-9_\\-#/ é]{0,24}")
    }

    prop_compose! {
        fn envelope()(project in opt_string(), team in opt_string(), user_id in opt_string(),
                      session_id in opt_string(), workflow_tag in opt_string(),
                      environment in opt_string(), cost_center in opt_string()) -> Envelope {
            Envelope { project, team, user_id, session_id, workflow_tag, environment, cost_center }
        }
    }

    prop_compose! {
        fn decision()(rule_id in "[a-z\\-]{1,20}", scope in "[a-z_:0-9]{0,20}",
                      action in "[a-z_]{1,20}", version in any::<i64>()) -> AppliedDecision {
            AppliedDecision { rule_id, scope, action, version }
        }
    }

    prop_compose! {
        fn event()(
            times in (any::<i64>(), proptest::option::of(any::<i64>()), any::<i64>()),
            envelope in envelope(),
            api_key_id in opt_string(),
            api_format in prop_oneof![Just(ApiFormat::OpenAi), Just(ApiFormat::Anthropic)],
            names in ("[a-z\\-]{1,16}", "[a-z]{1,12}", "[a-z0-9\\-.]{1,24}", opt_string()),
            attempt in 1i32..5,
            fallback_path in proptest::collection::vec("[a-z/\\-]{1,16}", 0..3),
            status in prop_oneof![Just(Status::Ok), Just(Status::ProviderError),
                Just(Status::ClientAbort), Just(Status::Timeout), Just(Status::Rejected),
                Just(Status::Interrupted)],
            http_status in 100i32..600,
            error in opt_string(),
            streamed in any::<bool>(),
            tokens in proptest::array::uniform5(0i64..i64::MAX),
            reference_input_tokens in proptest::option::of(0i64..1_000_000),
            input_chars in 0i64..10_000_000,
            token_source in prop_oneof![Just(TokenSource::Provider), Just(TokenSource::Estimated)],
            cost_nanos in any::<i64>(),
            price_card_version in "[a-z0-9\\-]{1,16}",
            decision in proptest::option::of(decision()),
            trace_id in proptest::option::of("[0-9a-f]{32}"),
        ) -> UsageEvent {
            UsageEvent {
                event_id: uuid_like(times.0),
                started_at_us: times.0, first_token_at_us: times.1, ended_at_us: times.2,
                envelope, api_key_id, api_format,
                virtual_model: names.0, provider: names.1, model: names.2, model_version: names.3,
                attempt, fallback_path, status, http_status, error, streamed,
                input_tokens: tokens[0], output_tokens: tokens[1], cached_input_tokens: tokens[2],
                cache_write_tokens: tokens[3], reasoning_tokens: tokens[4],
                reference_input_tokens, input_chars, token_source, cost_nanos,
                price_card_version, decision, trace_id,
            }
        }
    }

    fn uuid_like(seed: i64) -> String {
        format!("0190c4a2-{:04x}-7000-8000-000000000000", seed as u16)
    }

    proptest! {
        #[test]
        fn round_trips_through_single_object_encoding(ev in event()) {
            let codec = UsageEvent::codec().unwrap();
            let bytes = codec.encode(&ev).unwrap();
            prop_assert_eq!(&bytes[..2], &[0xC3, 0x01]);
            let back: UsageEvent = codec.decode(&bytes).unwrap();
            prop_assert_eq!(back, ev);
        }

        /// The fast path (serde_avro_fast, straight into the struct) reads what apache-avro's
        /// generic decoder reads, and refuses what it refuses: every truncation, one more byte.
        #[test]
        fn the_fast_decoder_agrees_with_apache_avro(ev in event(), cut in 0usize..400) {
            let codec = UsageEvent::codec().unwrap();
            let bytes = codec.encode(&ev).unwrap();
            let body = &bytes[10..];
            let generic = |b: &[u8]| {
                let mut r = b;
                let v = apache_avro::from_avro_datum(codec.schema(), &mut r, None).ok()?;
                r.is_empty().then(|| apache_avro::from_value::<UsageEvent>(&v).ok()).flatten()
            };
            prop_assert_eq!(generic(body), Some(ev.clone()));
            let cut = cut.min(body.len().saturating_sub(1));
            let truncated = [&bytes[..10], &body[..cut]].concat();
            prop_assert!(codec.decode::<UsageEvent>(&truncated).is_err(), "cut at {}", cut);
            let longer = [bytes.as_slice(), &[0]].concat();
            prop_assert!(codec.decode::<UsageEvent>(&longer).is_err());
        }
    }

    #[test]
    fn a_huge_array_length_is_refused_before_allocating() {
        let codec = UsageEvent::codec().unwrap();
        let ev = UsageEvent { fallback_path: vec!["a".into()], ..UsageEvent::example("e".into(), None, 1) };
        let bytes = codec.encode(&ev).unwrap();
        // fallback_path's block count 1 (zigzag 0x02) followed by the one-byte string "a".
        let at = bytes.windows(3).position(|w| w == [0x02, 0x02, b'a']).unwrap();
        let mut forged = bytes[..at].to_vec();
        forged.extend_from_slice(&[0xFE, 0xFF, 0xFF, 0xFF, 0x0F]); // 2^31 - 1 entries
        forged.extend_from_slice(&bytes[at + 1..]);
        let err = codec.decode::<UsageEvent>(&forged).unwrap_err();
        assert!(matches!(err, crate::avro::CodecError::Decode(_)), "{err}");
    }

    #[test]
    fn reads_events_an_earlier_schema_wrote() {
        use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
        use apache_avro::types::Value;
        let ev = UsageEvent { status: Status::Timeout, ..UsageEvent::example("e1".into(), Some("s".into()), 7) };
        let current = UsageEvent::codec().unwrap();
        for earlier in USAGE_EVENT_EARLIER_AVSC {
            // What a writer of the earlier schema sent: the event without the fields it lacked.
            let old = AvroCodec::from_avsc(earlier).unwrap();
            let Value::Record(mut fields) = apache_avro::to_value(&ev).unwrap() else { panic!("a record") };
            fields.retain(|(name, _)| old.schema().canonical_form().contains(&format!("\"name\":\"{name}\"")));
            let mut bytes = RabinFingerprintHeader::from_schema(old.schema()).build_header();
            bytes.extend(apache_avro::to_avro_datum(old.schema(), Value::Record(fields)).unwrap());
            assert_ne!(bytes[..10], current.encode(&ev).unwrap()[..10], "a new fingerprint");
            assert_eq!(current.decode::<UsageEvent>(&bytes).unwrap(), ev);
        }
    }

    #[test]
    fn rejects_foreign_fingerprint_and_truncation() {
        let codec = UsageEvent::codec().unwrap();
        assert!(codec.decode::<UsageEvent>(b"{\"not\":\"avro\"}").is_err());
        assert!(codec.decode::<UsageEvent>(&[0xC3, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 2]).is_err());
    }

    #[test]
    fn amounts_that_cannot_be_right_are_named() {
        let ok = UsageEvent::example("e".into(), None, 1);
        assert_eq!(ok.implausible(), None);
        let negative = UsageEvent { cost_nanos: -5, ..ok.clone() };
        assert_eq!(negative.implausible().as_deref(), Some("cost_nanos is negative (-5)"));
        let tokens = UsageEvent { output_tokens: -1, ..ok.clone() };
        assert!(tokens.implausible().unwrap().starts_with("output_tokens"));
        let cache = UsageEvent { input_tokens: 10, cached_input_tokens: 8, cache_write_tokens: 3, ..ok };
        assert!(cache.implausible().unwrap().contains("exceed the input"));
    }
}
