-- retention_floor: per ClickHouse database, the first day whose raw events and increments are known
-- complete. Retention drops whole days; when RETENTION_DAYS is raised, the days dropped under the old
-- window stay incomplete, and the rollup must not "repair" daily_usage from what is left of them.
-- The floor only moves forward (package retention).
CREATE TABLE IF NOT EXISTS retention_floor (
    db            text PRIMARY KEY,
    complete_from date NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
