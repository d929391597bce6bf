-- Chargeback and the four failure modes of the reference ("Failure modes → control"), as views
-- over the raw usage_events read with FINAL (one row per event_id, before merges run too).
-- Every view but tokenizer_drift (all time) has the calendar month (UTC, of ended_at) as its
-- first column, so `WHERE month = '2026-04-01'` gives what `tollgate-meter report ... --month
-- 2026-04` prints; the report runs the same SQL over any [from, to) window. Money is Int64
-- nano-USD; tokens Int64.
-- No JOIN anywhere: its syntax differs between ClickHouse 18.16 and current releases.

-- The price card's model tiers (frontier, standard, economy). The meter inserts the whole card
-- as one block with a new sync_id (Unix milliseconds) at start and when `report --policy-dir`
-- runs; only the newest sync counts, so a model removed from the card stops counting.
CREATE TABLE IF NOT EXISTS {db}.model_tiers (
    sync_id UInt64,
    provider String,
    model String,
    tier String,
    price_card_version String,
    synced_at DateTime DEFAULT now()
) ENGINE = MergeTree()
ORDER BY (sync_id, provider, model);

-- The (provider, model) pairs the newest price card marks `tier: frontier`.
CREATE VIEW IF NOT EXISTS {db}.frontier_models AS
SELECT provider, model
FROM {db}.model_tiers
WHERE tier = 'frontier' AND sync_id = (SELECT max(sync_id) FROM {db}.model_tiers);

-- Chargeback: one view per dimension; errors are events whose status is not 'ok'.
CREATE VIEW IF NOT EXISTS {db}.chargeback_by_project AS
SELECT toStartOfMonth(ended_at, 'UTC') AS month, project,
    count() AS requests, countIf(status != 'ok') AS errors,
    sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
    sum(cached_input_tokens) AS cached_input_tokens, sum(cost_nanos) AS cost_nanos
FROM {db}.usage_events FINAL
GROUP BY month, project;

CREATE VIEW IF NOT EXISTS {db}.chargeback_by_team AS
SELECT toStartOfMonth(ended_at, 'UTC') AS month, team,
    count() AS requests, countIf(status != 'ok') AS errors,
    sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
    sum(cached_input_tokens) AS cached_input_tokens, sum(cost_nanos) AS cost_nanos
FROM {db}.usage_events FINAL
GROUP BY month, team;

CREATE VIEW IF NOT EXISTS {db}.chargeback_by_cost_center AS
SELECT toStartOfMonth(ended_at, 'UTC') AS month, cost_center,
    count() AS requests, countIf(status != 'ok') AS errors,
    sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
    sum(cached_input_tokens) AS cached_input_tokens, sum(cost_nanos) AS cost_nanos
FROM {db}.usage_events FINAL
GROUP BY month, cost_center;

CREATE VIEW IF NOT EXISTS {db}.chargeback_by_user AS
SELECT toStartOfMonth(ended_at, 'UTC') AS month, user_id,
    count() AS requests, countIf(status != 'ok') AS errors,
    sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
    sum(cached_input_tokens) AS cached_input_tokens, sum(cost_nanos) AS cost_nanos
FROM {db}.usage_events FINAL
GROUP BY month, user_id;

CREATE VIEW IF NOT EXISTS {db}.chargeback_by_workflow AS
SELECT toStartOfMonth(ended_at, 'UTC') AS month, workflow_tag,
    count() AS requests, countIf(status != 'ok') AS errors,
    sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
    sum(cached_input_tokens) AS cached_input_tokens, sum(cost_nanos) AS cost_nanos
FROM {db}.usage_events FINAL
GROUP BY month, workflow_tag;

CREATE VIEW IF NOT EXISTS {db}.chargeback_by_model AS
SELECT toStartOfMonth(ended_at, 'UTC') AS month, provider, model,
    count() AS requests, countIf(status != 'ok') AS errors,
    sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
    sum(cached_input_tokens) AS cached_input_tokens, sum(cost_nanos) AS cost_nanos
FROM {db}.usage_events FINAL
GROUP BY month, provider, model;

-- Premium-model overuse: the share of each workflow's cost spent on frontier models
-- (symptom: frontier_share > 0.5).
CREATE VIEW IF NOT EXISTS {db}.frontier_share_by_workflow AS
SELECT month, workflow_tag, requests, frontier_requests, all_cost AS cost_nanos,
    frontier_cost AS frontier_cost_nanos,
    if(all_cost > 0, frontier_cost / all_cost, 0) AS frontier_share
FROM (
    SELECT toStartOfMonth(ended_at, 'UTC') AS month, workflow_tag,
        count() AS requests,
        countIf((provider, model) IN (SELECT provider, model FROM {db}.frontier_models)) AS frontier_requests,
        sum(cost_nanos) AS all_cost,
        sumIf(cost_nanos, (provider, model) IN (SELECT provider, model FROM {db}.frontier_models)) AS frontier_cost
    FROM {db}.usage_events FINAL
    GROUP BY month, workflow_tag
);

-- Context stuffing: prompt tokens (input + cache reads + cache writes) per successful request,
-- per workflow (symptom: avg_prompt_tokens > 50,000).
CREATE VIEW IF NOT EXISTS {db}.context_stuffing_by_workflow AS
SELECT toStartOfMonth(ended_at, 'UTC') AS month, workflow_tag,
    count() AS requests,
    sum(input_tokens + cached_input_tokens + cache_write_tokens) AS prompt_tokens,
    prompt_tokens / requests AS avg_prompt_tokens,
    max(input_tokens + cached_input_tokens + cache_write_tokens) AS max_prompt_tokens
FROM {db}.usage_events FINAL
WHERE status = 'ok'
GROUP BY month, workflow_tag;

-- Agent loops: every (workflow, session, hour) with its tokens (input + output + cache reads +
-- cache writes) and the p95 of its workflow's session-hours in the same month
-- (symptom: ratio_to_p95 > 3).
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
            sum(input_tokens + output_tokens + cached_input_tokens + cache_write_tokens) AS tokens,
            sum(cost_nanos) AS cost_nanos
        FROM {db}.usage_events FINAL
        GROUP BY month, workflow_tag, session_id, hour
    )
    GROUP BY month, workflow_tag
)
ARRAY JOIN sessions AS session_id, hours AS hour, requests_a AS requests, tokens_a AS tokens, cost_a AS cost_nanos;

-- Tokenizer drift: per model version, the provider's prompt tokens against Tollgate's reference
-- (tiktoken) count of the same text; a new version whose token_ratio jumps tokenizes the same
-- text into more tokens. Only provider-reported counts of successful requests (estimated ones
-- are tiktoken on both sides).
CREATE VIEW IF NOT EXISTS {db}.tokenizer_drift AS
SELECT provider, model, model_version,
    min(ended_at) AS first_seen, max(ended_at) AS last_seen,
    count() AS requests,
    sum(input_tokens + cached_input_tokens + cache_write_tokens) AS prompt_tokens,
    sum(assumeNotNull(reference_input_tokens)) AS reference_tokens,
    prompt_tokens / requests AS avg_prompt_tokens,
    reference_tokens / requests AS avg_reference_tokens,
    if(reference_tokens > 0, prompt_tokens / reference_tokens, 0) AS token_ratio
FROM {db}.usage_events FINAL
WHERE status = 'ok' AND token_source = 'provider' AND isNotNull(reference_input_tokens)
    AND assumeNotNull(reference_input_tokens) > 0
GROUP BY provider, model, model_version;

-- Untagged spend: events without a project, team or cost centre (stored as ''), with the fields
-- missing and the API key and workflow they came from, so someone can be asked to tag them.
CREATE VIEW IF NOT EXISTS {db}.untagged_spend AS
SELECT toStartOfMonth(ended_at, 'UTC') AS month,
    arrayStringConcat(arrayFilter(x -> x != '',
        [if(project = '', 'project', ''), if(team = '', 'team', ''), if(cost_center = '', 'cost_center', '')]), ',') AS missing,
    api_key_id, workflow_tag,
    count() AS requests, sum(cost_nanos) AS cost_nanos
FROM {db}.usage_events FINAL
WHERE project = '' OR team = '' OR cost_center = ''
GROUP BY month, missing, api_key_id, workflow_tag;
