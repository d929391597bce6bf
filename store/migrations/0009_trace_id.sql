-- The request's W3C trace id (32 lowercase hex digits; '' when it had none), so a row leads to
-- its trace in the tracing backend and an outcome may name the traces that produced it.
ALTER TABLE {db}.usage_events ADD COLUMN trace_id String DEFAULT '' AFTER decision_version;
