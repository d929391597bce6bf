//! Avro single-object encoding (spec 1.10+): `C3 01`, the schema's CRC-64-AVRO fingerprint, the datum.

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
#[derive(Debug, Clone)]
pub struct AvroCodec {
    schema: Schema,
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
        let schema = Schema::parse(&strip_logical_types(json)).map_err(|e| CodecError::Schema(e.to_string()))?;
        let header = RabinFingerprintHeader::from_schema(&schema).build_header();
        Ok(Self { schema, header, earlier: Vec::new() })
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
        let (mut reader, writer) = match bytes.strip_prefix(self.header.as_slice()) {
            Some(body) => (body, None),
            None => {
                let earlier = self.earlier.iter().find_map(|(h, s)| Some((bytes.strip_prefix(h.as_slice())?, s)));
                let Some((body, writer)) = earlier else {
                    let n = bytes.len().min(self.header.len());
                    return Err(CodecError::Header { found: bytes[..n].to_vec() });
                };
                (body, Some(writer))
            }
        };
        let value = match writer {
            None => from_avro_datum(&self.schema, &mut reader, None),
            Some(w) => from_avro_datum(w, &mut reader, Some(&self.schema)),
        }
        .map_err(|e| CodecError::Decode(e.to_string()))?;
        if !reader.is_empty() {
            return Err(CodecError::Decode(format!("{} trailing bytes", reader.len())));
        }
        from_value(&value).map_err(|e| CodecError::Decode(e.to_string()))
    }
}

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
