-- One definition of each token quantity (tollgate_schemas::usage::sql): `input_tokens` already
-- holds cache reads and cache writes, so prompt tokens are `{prompt_tokens}` and a request's
-- tokens are `{total_tokens}`. Migration 0003's failure-mode views added the cache columns a
-- second time; they are replaced here (they are views: the stored rows were always right).

DROP TABLE IF EXISTS {db}.context_stuffing_by_workflow;

-- Context stuffing: prompt tokens (everything the model read) per successful request, per
-- workflow (symptom: avg_prompt_tokens > 50,000).
CREATE VIEW IF NOT EXISTS {db}.context_stuffing_by_workflow AS
SELECT toStartOfMonth(ended_at, 'UTC') AS month, workflow_tag,
    count() AS requests,
    sum({prompt_tokens}) AS prompt_tokens,
    prompt_tokens / requests AS avg_prompt_tokens,
    max({prompt_tokens}) AS max_prompt_tokens
FROM {db}.usage_events FINAL
WHERE status = 'ok'
GROUP BY month, workflow_tag;

DROP TABLE IF EXISTS {db}.loop_session_hours;

-- Agent loops: every (workflow, session, hour) with its tokens (read and written) and the p95 of
-- its workflow's session-hours in the same month (symptom: ratio_to_p95 > 3).
CREATE VIEW IF NOT EXISTS {db}.loop_session_hours AS
SELECT month, workflow_tag, session_id, hour, requests, tokens, cost_nanos, workflow_p95_tokens,
    if(workflow_p95_tokens > 0, tokens / workflow_p95_tokens, 0) AS ratio_to_p95
FROM (
    SELECT month, workflow_tag,
        groupArray(session_id) AS sessions, groupArray(hour) AS hours,
        groupArray(requests) AS requests_a, groupArray(tokens) AS tokens_a,
        groupArray(cost_nanos) AS cost_a,
        toFloat64(quantile(0.95)(tokens)) AS workflow_p95_tokens
    FROM (
        SELECT toStartOfMonth(ended_at, 'UTC') AS month, workflow_tag, session_id,
            toStartOfHour(ended_at, 'UTC') AS hour, count() AS requests,
            sum({total_tokens}) AS tokens,
            sum(cost_nanos) AS cost_nanos
        FROM {db}.usage_events FINAL
        GROUP BY month, workflow_tag, session_id, hour
    )
    GROUP BY month, workflow_tag
)
ARRAY JOIN sessions AS session_id, hours AS hour, requests_a AS requests, tokens_a AS tokens, cost_a AS cost_nanos;

DROP TABLE IF EXISTS {db}.tokenizer_drift;

-- Tokenizer drift: per model version, the provider's prompt tokens against Tollgate's reference
-- (tiktoken) count of the same text. Cache hits do not change it: a cached prompt is still
-- counted once.
CREATE VIEW IF NOT EXISTS {db}.tokenizer_drift AS
SELECT provider, model, model_version,
    min(ended_at) AS first_seen, max(ended_at) AS last_seen,
    count() AS requests,
    sum({prompt_tokens}) AS prompt_tokens,
    sum(assumeNotNull(reference_input_tokens)) AS reference_tokens,
    prompt_tokens / requests AS avg_prompt_tokens,
    reference_tokens / requests AS avg_reference_tokens,
    if(reference_tokens > 0, prompt_tokens / reference_tokens, 0) AS token_ratio
FROM {db}.usage_events FINAL
WHERE status = 'ok' AND token_source = 'provider' AND isNotNull(reference_input_tokens)
    AND assumeNotNull(reference_input_tokens) > 0
GROUP BY provider, model, model_version;
