-- tenants.time_zone (issue 21): the IANA zone whose local midnight starts the tenant's days in reads
-- (today/week/month, daily buckets, date-only ranges). Any zone Go's time.LoadLocation knows; the CLI
-- validates it. Quotas and the billed daily usage stay per UTC day whatever it says.
ALTER TABLE tenants ADD COLUMN time_zone text NOT NULL DEFAULT 'UTC';
