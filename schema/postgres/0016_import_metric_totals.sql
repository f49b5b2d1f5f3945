-- import_days (0007) per metric. A day left 'inserting' is settled on resume by reading its daily_usage
-- again; one signed total could not tell a day whose rows add up to 0 (a negative usage row offsetting
-- its events) from one whose insert landed, so each day now also keeps, per metric, its daily_usage
-- before the insert (before_metrics) and what the import adds (delta_metrics): JSON objects
-- {"metric": count}, zero counts left out.
-- A day 'inserting' as events records them too (its before_total and delta_total stay NULL, which is
-- what marks it as events): should it leave the retention window before a run resumes it, retention may
-- have dropped its events, so the id check cannot settle it, and daily_usage does.
-- NULL in rows recorded before this migration; the importer then judges by the totals where they tell.
ALTER TABLE import_days ADD COLUMN before_metrics jsonb, ADD COLUMN delta_metrics jsonb;
