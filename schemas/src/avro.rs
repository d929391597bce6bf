//! Avro single-object encoding (spec 1.10+): `C3 01`, the schema's CRC-64-AVRO fingerprint, the datum.

use std::io::Read as _;
use std::sync::Arc;

use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
use apache_avro::{Schema, from_avro_datum, from_value, write_avro_datum_ref};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("invalid avro schema: {0}")]
    Schema(String),
    #[error("event does not fit its avro schema: {0}")]
    Encode(String),
    #[error("not a single-object encoded record of this schema (header {found:02x?})")]
    Header { found: Vec<u8> },
    #[error("avro payload is malformed: {0}")]
    Decode(String),
}

/// Encoder/decoder for one schema. Cheap to share: encoding allocates only the output buffer.
///
/// Data of the current schema is decoded by `serde_avro_fast` straight into the Rust type: through
/// apache-avro it went into a `Value` tree first (a `String` per field name, a `Vec` per record),
/// half of the meter's CPU per event. Data of an earlier schema still goes through apache-avro,
/// whose schema resolution serde_avro_fast does not do.
#[derive(Debug, Clone)]
pub struct AvroCodec {
    schema: Schema,
    /// The same schema, compiled for `serde_avro_fast` (which has no `Clone`).
    fast: Arc<serde_avro_fast::Schema>,
    header: Vec<u8>,
    /// Earlier versions of the schema, by their single-object header: a datum one of them wrote
    /// (an event still in a spool or a topic when the services were upgraded) is read through
    /// Avro's schema resolution into the current schema.
    earlier: Vec<(Vec<u8>, Schema)>,
}

impl AvroCodec {
    /// Builds the codec from an `.avsc`. Logical types are dropped first: they do not change the
    /// binary encoding, the Parsing Canonical Form (and so the fingerprint) excludes them, and
    /// apache-avro 0.21 keeps them in its canonical form, which would give a fingerprint other
    /// Avro implementations do not compute.
    pub fn from_avsc(avsc: &str) -> Result<Self, CodecError> {
        let json: serde_json::Value = serde_json::from_str(avsc).map_err(|e| CodecError::Schema(e.to_string()))?;
        let json = strip_logical_types(json);
        let schema = Schema::parse(&json).map_err(|e| CodecError::Schema(e.to_string()))?;
        let fast: serde_avro_fast::Schema = json.to_string().parse().map_err(|e| CodecError::Schema(format!("{e}")))?;
        let header = RabinFingerprintHeader::from_schema(&schema).build_header();
        Ok(Self { schema, fast: Arc::new(fast), header, earlier: Vec::new() })
    }

    /// The same codec, also reading data written with each of `earlier` (older `.avsc`s of
    /// this schema whose changes Avro's resolution rules allow: added enum symbols, added
    /// fields with defaults). It still writes only the current schema.
    pub fn reading_earlier(mut self, earlier: &[&str]) -> Result<Self, CodecError> {
        for avsc in earlier {
            let old = Self::from_avsc(avsc)?;
            self.earlier.push((old.header, old.schema));
        }
        Ok(self)
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The schema's Parsing Canonical Form, as the Avro specification defines it.
    pub fn canonical_form(&self) -> String {
        self.schema.canonical_form()
    }

    pub fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&self.header);
        write_avro_datum_ref(&self.schema, value, &mut out).map_err(|e| CodecError::Encode(e.to_string()))?;
        Ok(out)
    }

    pub fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        if let Some(body) = bytes.strip_prefix(self.header.as_slice()) {
            return self.decode_current(body);
        }
        let earlier = self.earlier.iter().find_map(|(h, s)| Some((bytes.strip_prefix(h.as_slice())?, s)));
        let Some((mut reader, writer)) = earlier else {
            let n = bytes.len().min(self.header.len());
            return Err(CodecError::Header { found: bytes[..n].to_vec() });
        };
        let value =
            from_avro_datum(writer, &mut reader, Some(&self.schema)).map_err(|e| CodecError::Decode(e.to_string()))?;
        if !reader.is_empty() {
            return Err(CodecError::Decode(format!("{} trailing bytes", reader.len())));
        }
        from_value(&value).map_err(|e| CodecError::Decode(e.to_string()))
    }

    /// A datum of the current schema, straight into `T`; every byte must belong to it.
    fn decode_current<T: DeserializeOwned>(&self, body: &[u8]) -> Result<T, CodecError> {
        let mut config = serde_avro_fast::de::DeserializerConfig::new(&self.fast);
        // Arrays and maps in these events hold a handful of entries: a length prefix of a billion
        // (garbage, or a hostile producer) is refused before anything is allocated for it.
        config.max_seq_size = MAX_SEQ_LEN;
        let mut state = serde_avro_fast::de::DeserializerState::with_config(
            serde_avro_fast::de::read::SliceRead::new(body),
            config,
        );
        let value = T::deserialize(state.deserializer()).map_err(|e| CodecError::Decode(e.to_string()))?;
        let mut rest = state.into_reader();
        let mut probe = [0u8; 64];
        let trailing = rest.read(&mut probe).unwrap_or(0);
        if trailing > 0 {
            return Err(CodecError::Decode(format!("{trailing} or more trailing bytes")));
        }
        Ok(value)
    }
}

/// The longest array or map `decode` accepts.
const MAX_SEQ_LEN: usize = 100_000;

/// Removes `logicalType` annotations, collapsing `{"type": "long"}` back to `"long"`.
pub fn strip_logical_types(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(mut map) => {
            map.remove("logicalType");
            if map.len() == 1 {
                if let Some(Value::String(t)) = map.get("type") {
                    return Value::String(t.clone());
                }
            }
            Value::Object(map.into_iter().map(|(k, v)| (k, strip_logical_types(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(strip_logical_types).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fingerprint_is_over_the_spec_canonical_form() {
        let codec = AvroCodec::from_avsc(
            r#"{"type":"record","name":"R","namespace":"n","doc":"d","fields":[
                {"name":"id","type":{"type":"string","logicalType":"uuid"}},
                {"name":"at","type":["null",{"type":"long","logicalType":"timestamp-micros"}],"default":null}]}"#,
        )
        .unwrap();
        assert_eq!(
            codec.canonical_form(),
            r#"{"name":"n.R","type":"record","fields":[{"name":"id","type":"string"},{"name":"at","type":["null","long"]}]}"#
        );
    }
}
