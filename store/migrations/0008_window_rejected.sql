-- Refused requests apart in the rollups, so that what rate limits and budgets count can be read
-- from usage_windows: `requests` counts every request, refused ones included; `rejected`
-- counts those Tollgate refused (status 'rejected': they reached no provider and cost
-- nothing), which limits leave out (tollgate_schemas::measures::ATTEMPTED_ROWS and
-- ATTEMPTED_WINDOW_REQUESTS). Rows written before this migration read 0 here.
ALTER TABLE {db}.usage_windows ADD COLUMN rejected Int64 DEFAULT 0 AFTER errors;
