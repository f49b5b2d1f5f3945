package schema

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/analyticsd/analyticsd/internal/logger"
	"github.com/analyticsd/analyticsd/retention"
)

// Migrator applies the ClickHouse and Postgres migrations. Run is idempotent and safe to call from
// several processes at once: it holds a Postgres advisory lock for its whole duration, applies only
// versions not yet recorded, and every ClickHouse statement is itself IF NOT EXISTS.
type Migrator struct {
	CH            driver.Conn
	PG            *pgxpool.Pool
	DB            string // ClickHouse database
	Cluster       string // CLICKHOUSE_CLUSTER: the cluster layout (see Layout); empty on one server
	RetentionDays int
	// ShrinkRetention lets Run shorten the tables' TTL to RETENTION_DAYS (`migrate
	// --shrink-retention`): the days in between are deleted for good, so a window that shrinks
	// because RETENTION_DAYS was left unset in one shell is refused instead.
	ShrinkRetention bool
	Log             *slog.Logger
	// FillSettle is how long a migration's fill waits between the two reads of a difference it is about
	// to write (default 1 s; see FillQuarterHours).
	FillSettle time.Duration
}

// Result says what Run found and did.
type Result struct {
	Server            Version
	Features          Features
	AppliedClickHouse []int
	AppliedPostgres   []int
	// Retention is set when Run changed the tables' TTL to RETENTION_DAYS: "90 -> 120 days".
	Retention string
}

// ServerVersion reads the ClickHouse server version from the connection handshake.
func ServerVersion(ch driver.Conn) (Version, error) {
	sv, err := ch.ServerVersion()
	if err != nil {
		return Version{}, fmt.Errorf("read clickhouse server version: %w", err)
	}
	return Version{int(sv.Version.Major), int(sv.Version.Minor), int(sv.Version.Patch)}, nil
}

// Run applies every pending migration, Postgres first (it also holds the lock), then ClickHouse.
func (m *Migrator) Run(ctx context.Context) (Result, error) {
	log := m.Log
	log = logger.Or(log)
	var res Result
	v, err := ServerVersion(m.CH)
	if err != nil {
		return res, err
	}
	if err := CheckTimeZone(ctx, m.CH); err != nil {
		return res, err
	}
	res.Server, res.Features = v, FeaturesFor(v)
	chMigrations, err := ClickHouse(Params{DB: m.DB, Cluster: m.Cluster, RetentionDays: m.RetentionDays, Features: res.Features})
	if err != nil {
		return res, err
	}
	pgMigrations, err := Postgres()
	if err != nil {
		return res, err
	}

	conn, err := m.PG.Acquire(ctx)
	if err != nil {
		return res, fmt.Errorf("migrate: connect to postgres: %w", err)
	}
	defer conn.Release()
	start := time.Now()
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock(hashtext($1))", "analyticsd.migrate."+m.DB); err != nil {
		return res, fmt.Errorf("migrate: take advisory lock: %w", err)
	}
	defer func() {
		// A fresh context: the lock must be released even when ctx was cancelled.
		uctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := conn.Exec(uctx, "SELECT pg_advisory_unlock(hashtext($1))", "analyticsd.migrate."+m.DB); err != nil {
			// Closing the connection releases the lock too.
			conn.Conn().Close(uctx)
		}
	}()
	log.Debug("migration lock held", "waited", time.Since(start))

	if res.AppliedPostgres, err = m.postgres(ctx, conn.Conn(), pgMigrations); err != nil {
		return res, err
	}
	if res.AppliedClickHouse, err = m.clickhouse(ctx, chMigrations); err != nil {
		return res, err
	}
	if res.Features.TTL {
		if res.Retention, err = m.applyRetention(ctx); err != nil {
			return res, err
		}
	}
	log.Info("migrations applied", "clickhouse_server", v.String(), "ttl", res.Features.TTL,
		"clickhouse", res.AppliedClickHouse, "postgres", res.AppliedPostgres, "retention", res.Retention)
	return res, nil
}

// Retained are the tables RETENTION_DAYS applies to, each partitioned by the UTC day of its time
// column: the raw events and increments, and usage_quarter_hour, the fine-grained aggregate that local
// days inside the raw window are read from. daily_usage is kept forever.
var Retained = []RetainedTable{{"events", "ts"}, {"usage_increments", "ts"}, {"usage_quarter_hour", "slot"}}

// RetainedTable is a table RETENTION_DAYS applies to, and the column its TTL and partitions follow.
type RetainedTable struct{ Name, TimeColumn string }

// applyRetention brings the raw tables' TTL to RETENTION_DAYS (tables with a TTL clause; a table
// created on a server without TTL keeps being swept). Raising the window first records the first
// day the old one kept as the retention floor: days before it are already gone, and the rollup must
// not take what is left of them for their raw data.
func (m *Migrator) applyRetention(ctx context.Context) (string, error) {
	ttl := make([]int, len(Retained))
	for i, t := range Retained {
		days, ok, err := retention.TableTTL(ctx, m.CH, m.DB, m.layout().LocalName(t.Name))
		if err != nil {
			return "", fmt.Errorf("migrate clickhouse: %w", err)
		}
		if !ok {
			days = m.RetentionDays
		}
		if days > m.RetentionDays && !m.ShrinkRetention {
			return "", fmt.Errorf("migrate: RETENTION_DAYS=%d would shorten the retention of %s.%s from %d days, deleting the days in between for good; "+
				"set RETENTION_DAYS=%d to keep it, or run `analyticsd migrate --shrink-retention` if that is meant", m.RetentionDays, m.DB, t.Name, days, days)
		}
		ttl[i] = days
	}
	changed := ""
	for i, t := range Retained {
		days := ttl[i]
		if days == m.RetentionDays {
			continue
		}
		if m.RetentionDays > days {
			old := retention.Window{Days: days, TTL: true}
			if err := retention.NewFloor(m.PG, m.DB).Raise(ctx, old.CompleteFrom(time.Time{}, time.Now())); err != nil {
				return changed, fmt.Errorf("migrate: %w", err)
			}
		}
		if err := m.CH.Exec(ctx, ModifyTTL(m.layout(), t, m.RetentionDays)); err != nil {
			return changed, fmt.Errorf("migrate clickhouse: apply RETENTION_DAYS=%d to %s.%s: %w", m.RetentionDays, m.DB, t.Name, err)
		}
		changed = fmt.Sprintf("%d -> %d days", days, m.RetentionDays)
	}
	return changed, nil
}

// ModifyTTL is the statement that sets a retained table's retention (on every replica of a cluster).
// It stays ON CLUSTER: servers with TTL and before 20.8 (AlterRacesOnCluster) would run it through
// the worker that a replicated ALTER can stop, but none is tested here (18.16 has no TTL, production
// runs 25.8), so Shards is not used for it.
func ModifyTTL(l Layout, t RetainedTable, days int) string {
	return fmt.Sprintf("ALTER TABLE %s%s MODIFY TTL %s + INTERVAL %d DAY", l.Local(t.Name), l.OnCluster(), t.TimeColumn, days)
}

func (m *Migrator) layout() Layout { return Layout{DB: m.DB, Cluster: m.Cluster} }

func (m *Migrator) postgres(ctx context.Context, conn *pgx.Conn, ms []Migration) ([]int, error) {
	if _, err := conn.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version    int PRIMARY KEY,
		name       text NOT NULL,
		applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return nil, fmt.Errorf("migrate postgres: create schema_migrations: %w", err)
	}
	done, err := pgApplied(ctx, conn)
	if err != nil {
		return nil, err
	}
	var applied []int
	for _, mig := range ms {
		if done[mig.Version] {
			continue
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			for _, stmt := range mig.Statements {
				if _, err := tx.Exec(ctx, stmt); err != nil {
					return err
				}
			}
			_, err := tx.Exec(ctx, "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", mig.Version, mig.Name)
			return err
		})
		if err != nil {
			return applied, fmt.Errorf("migrate postgres %04d_%s: %w", mig.Version, mig.Name, err)
		}
		applied = append(applied, mig.Version)
	}
	return applied, nil
}

func pgApplied(ctx context.Context, conn *pgx.Conn) (map[int]bool, error) {
	rows, err := conn.Query(ctx, "SELECT version FROM schema_migrations")
	if err != nil {
		return nil, fmt.Errorf("migrate postgres: read schema_migrations: %w", err)
	}
	versions, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		return nil, fmt.Errorf("migrate postgres: read schema_migrations: %w", err)
	}
	done := make(map[int]bool, len(versions))
	for _, v := range versions {
		done[int(v)] = true
	}
	return done, nil
}

// clickhouse records applied versions in the ClickHouse database itself, so a database recreated
// on its own (a new cluster, a restored Postgres) is still brought up to date.
func (m *Migrator) clickhouse(ctx context.Context, ms []Migration) ([]int, error) {
	l := m.layout()
	engine := "MergeTree"
	if l.Clustered() {
		// One copy on every server of the cluster (no {shard} in the path), so whichever server a
		// later migrate connects to knows what was applied.
		engine = fmt.Sprintf("ReplicatedMergeTree('/clickhouse/tables/%s/all/%s/schema_migrations', '{shard}-{replica}')", m.Cluster, m.DB)
	}
	boot := []string{
		"CREATE DATABASE IF NOT EXISTS " + m.DB + l.OnCluster(),
		"CREATE TABLE IF NOT EXISTS " + m.DB + ".schema_migrations" + l.OnCluster() +
			" (version UInt32, name String, applied_at DateTime) ENGINE = " + engine + " ORDER BY version",
	}
	for _, stmt := range boot {
		if err := m.CH.Exec(ctx, stmt); err != nil {
			return nil, fmt.Errorf("migrate clickhouse: %s: %w", firstLine(stmt), err)
		}
	}
	done, err := chApplied(ctx, m.CH, m.DB)
	if err != nil {
		return nil, err
	}
	var applied []int
	for _, mig := range ms {
		if done[mig.Version] {
			continue
		}
		for _, stmt := range mig.Statements {
			if err := m.CH.Exec(ctx, stmt); err != nil {
				return applied, fmt.Errorf("migrate clickhouse %04d_%s: %s: %w", mig.Version, mig.Name, firstLine(stmt), err)
			}
		}
		if fill := fills[mig.Version]; fill != nil {
			settle := m.FillSettle
			if settle <= 0 {
				settle = time.Second
			}
			start := time.Now()
			if err := fill(ctx, m.CH, l, settle); err != nil {
				return applied, fmt.Errorf("migrate clickhouse %04d_%s: %w", mig.Version, mig.Name, err)
			}
			logger.Or(m.Log).Info("migration filled from the stored rows", "version", mig.Version, "took", time.Since(start).Round(time.Millisecond))
		}
		if err := recordClickHouse(ctx, m.CH, m.DB, mig); err != nil {
			return applied, err
		}
		applied = append(applied, mig.Version)
	}
	return applied, nil
}

func chApplied(ctx context.Context, ch driver.Conn, db string) (map[int]bool, error) {
	done, err := AppliedVersions(ctx, ch, db+".schema_migrations")
	if err != nil {
		return nil, fmt.Errorf("migrate clickhouse: %w", err)
	}
	return done, nil
}

// AppliedVersions reads the ClickHouse migration versions recorded in from: a schema_migrations table
// (db.schema_migrations), or a table function reading one elsewhere (relocate's remote()).
func AppliedVersions(ctx context.Context, ch driver.Conn, from string) (map[int]bool, error) {
	rows, err := ch.Query(ctx, "SELECT DISTINCT version FROM "+from)
	if err != nil {
		return nil, fmt.Errorf("read schema_migrations: %w", err)
	}
	defer rows.Close()
	done := map[int]bool{}
	for rows.Next() {
		var v uint32
		if err := rows.Scan(&v); err != nil {
			return nil, fmt.Errorf("read schema_migrations: %w", err)
		}
		done[int(v)] = true
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read schema_migrations: %w", err)
	}
	return done, nil
}

func recordClickHouse(ctx context.Context, ch driver.Conn, db string, mig Migration) error {
	batch, err := ch.PrepareBatch(ctx, "INSERT INTO "+db+".schema_migrations (version, name, applied_at)")
	if err != nil {
		return fmt.Errorf("migrate clickhouse: record %04d: %w", mig.Version, err)
	}
	if err := batch.Append(uint32(mig.Version), mig.Name, time.Now().UTC()); err != nil {
		return errors.Join(fmt.Errorf("migrate clickhouse: record %04d: %w", mig.Version, err), batch.Abort())
	}
	if err := batch.Send(); err != nil {
		return fmt.Errorf("migrate clickhouse: record %04d: %w", mig.Version, err)
	}
	return nil
}

func firstLine(s string) string {
	for i, r := range s {
		if r == '\n' || r == '(' {
			return s[:i]
		}
	}
	return s
}
