-- One definition of each failure-mode measure (tollgate_schemas::measures), shared with the
-- reports and the enforcer's guards. The loop view computed its p95 with quantile(0.95), which
-- samples and interpolates, over every session-hour; the guards' baseline took an exact
-- quantile over the session-hours with tokens. All three views now take their rows and their
-- aggregate from the same definitions (they are views: the stored rows do not change).

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
WHERE {stuffing_rows}
GROUP BY month, workflow_tag;

DROP TABLE IF EXISTS {db}.loop_session_hours;

-- Agent loops: every (workflow, session, hour) with tokens, and the exact p95 of its workflow's
-- session-hours in the same month (symptom: ratio_to_p95 > 3).
CREATE VIEW IF NOT EXISTS {db}.loop_session_hours AS
SELECT month, workflow_tag, session_id, hour, requests, tokens, cost_nanos, workflow_p95_tokens,
    if(workflow_p95_tokens > 0, tokens / workflow_p95_tokens, 0) AS ratio_to_p95
FROM (
    SELECT month, workflow_tag,
        groupArray(session_id) AS sessions, groupArray(hour) AS hours,
        groupArray(requests) AS requests_a, groupArray(tokens) AS tokens_a,
        groupArray(cost_nanos) AS cost_a,
        toFloat64({session_hour_p95}) AS workflow_p95_tokens
    FROM (
        SELECT toStartOfMonth(ended_at, 'UTC') AS month, workflow_tag, session_id,
            toStartOfHour(ended_at, 'UTC') AS hour, count() AS requests,
            sum({total_tokens}) AS tokens,
            sum(cost_nanos) AS cost_nanos
        FROM {db}.usage_events FINAL
        WHERE {loop_rows}
        GROUP BY month, workflow_tag, session_id, hour
        HAVING {session_hour_has_tokens}
    )
    GROUP BY month, workflow_tag
)
ARRAY JOIN sessions AS session_id, hours AS hour, requests_a AS requests, tokens_a AS tokens, cost_a AS cost_nanos;

DROP TABLE IF EXISTS {db}.tokenizer_drift;

-- Tokenizer drift: per model version, the provider's prompt tokens against Tollgate's reference
-- (tiktoken) count of the same text, over successful requests the provider counted.
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
WHERE {drift_rows}
GROUP BY provider, model, model_version;
