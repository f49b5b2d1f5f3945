package query

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/gofiber/fiber/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/internal/excerpt"
	"github.com/analyticsd/analyticsd/internal/labels"
	"github.com/analyticsd/analyticsd/internal/logger"
)

// DefaultKPIMetrics are the contract's KPI set (docs/contract.md), returned by /metrics when no metric
// is asked for.
var DefaultKPIMetrics = []string{"auth.user.registered", "auth.user.login", "builder.generate.completed", "apikey.request"}

// Config shapes the read endpoints.
type Config struct {
	MaxExportRows int // ANALYTICS_MAX_EXPORT_ROWS
	LabelCap      int
}

// Service is the read API.
type Service struct {
	cfg     Config
	store   *Store
	audit   *audit.Log
	log     *slog.Logger
	metrics *metrics
	tenants *labels.Capped
	gate    exportGate // running exports (see Drain)
	zones   *zoneCache // tenants' time zones; nil: every tenant reads in UTC unless tz says otherwise
}

// NewService wires the read API; reg may be nil.
func NewService(cfg Config, store *Store, auditLog *audit.Log, reg prometheus.Registerer, log *slog.Logger) *Service {
	cfg.defaults()
	log = logger.Or(log)
	s := &Service{cfg: cfg, store: store, audit: auditLog, log: log, tenants: labels.NewCapped(cfg.LabelCap), metrics: newMetrics(reg)}
	return s
}

// SetZones gives the reads each tenant's configured time zone (*tenant.Store), the default of the tz
// parameter. Call it before serving.
func (s *Service) SetZones(z ZoneLookup) { s.zones = &zoneCache{lookup: z} }

// zone is the request's time zone: tz when given, else the tenant's, else UTC. The response names
// it (X-Analytics-Time-Zone), so a client knows which days it got.
func (s *Service) zone(c *fiber.Ctx) (Zone, error) {
	z := UTC
	if tz := c.Query("tz"); tz != "" {
		var err error
		if z, err = ParseZone(tz); err != nil {
			return UTC, err
		}
	} else if cached, ok := s.zones.get(c.UserContext(), principal(c).TenantID); ok {
		z = cached
	} else {
		z = cached
		c.Set("X-Analytics-Degraded", "the tenant's time zone could not be read; days are in "+z.Name())
	}
	c.Set("X-Analytics-Time-Zone", z.Name())
	return z, nil
}

// rangeOf reads from/to in the request's zone.
func (s *Service) rangeOf(c *fiber.Ctx) (Range, error) {
	z, err := s.zone(c)
	if err != nil {
		return Range{}, err
	}
	return ParseRangeIn(c.Query("from"), c.Query("to"), s.store.now(), z)
}

// Register mounts the read endpoints on r; read is the auth middleware they require. Each route
// takes the parameters listed with it and refuses any other.
func (s *Service) Register(r fiber.Router, read fiber.Handler) {
	filter := []string{"from", "to", "tz", "event", "source", "user_id", "limit", "cursor"}
	r.Get("/events", read, s.timed("events", s.getEvents, filter...))
	r.Get("/usage", read, s.timed("usage", s.getUsage, "from", "to", "tz", "metric", "metric[]", "fill"))
	r.Get("/metrics", read, s.timed("metrics", s.getKPIs, "tz", "metric", "metric[]"))
	r.Get("/event-names", read, s.timed("event-names", s.getEventNames, "from", "to", "tz", "limit"))
	r.Get("/active-users", read, s.timed("active-users", s.getActiveUsers, "from", "to", "tz", "event"))
	export := append(slices.Clip(filter), "bom")
	r.Get("/export.csv", read, s.timed("export", s.getExport("csv"), export...))
	r.Get("/export.ndjson", read, s.timed("export", s.getExport("ndjson"), export...))
}

// nameErr is the 400 for an event, metric or source filter no stored row can have.
func nameErr(param, v string) error {
	if !utf8.ValidString(v) {
		return paramErr("%s is not valid UTF-8", param)
	}
	return paramErr("%s=%q is empty or longer than %d bytes; no stored name is", param, excerpt.Short(v), MaxFilterBytes)
}

// timed wraps every read route: it refuses parameters the route does not take and repeated ones,
// times the handler and maps what it returns to a response (httpError), so the handlers return the
// package's errors as they are.
func (s *Service) timed(endpoint string, h fiber.Handler, params ...string) fiber.Handler {
	obs := s.metrics.duration.WithLabelValues(endpoint)
	return func(c *fiber.Ctx) error {
		start := time.Now()
		// Every read parameter but metric takes one value.
		var err error
		if uerr := api.UnknownParam(c, params); uerr != nil {
			err = uerr
		} else if rerr := api.RepeatedParam(c, "metric", "metric[]"); rerr != nil {
			err = rerr
		} else {
			err = h(c)
		}
		obs.Observe(time.Since(start).Seconds())
		return httpError(err)
	}
}

func principal(c *fiber.Ctx) api.Principal {
	p, _ := api.PrincipalOf(c)
	return p
}

// filter reads the shared event filter parameters.
func (s *Service) filter(c *fiber.Ctx) (EventFilter, error) {
	f := EventFilter{Tenant: principal(c).TenantID}
	var err error
	if f.Range, err = s.rangeOf(c); err != nil {
		return f, err
	}
	if f.Event = c.Query("event"); f.Event != "" && !ValidName(f.Event) {
		return f, nameErr("event", f.Event)
	}
	if f.Source = c.Query("source"); f.Source != "" && !ValidName(f.Source) {
		return f, nameErr("source", f.Source)
	}
	if f.UserID = c.Query("user_id"); len(f.UserID) > 255 {
		return f, paramErr("user_id is longer than 255 bytes")
	}
	return f, nil
}

func (s *Service) getEvents(c *fiber.Ctx) error {
	f, err := s.filter(c)
	if err != nil {
		return err
	}
	if f.Limit, err = ParseLimit(c.Query("limit")); err != nil {
		return err
	}
	if f.Cursor, err = ParseCursor(c.Query("cursor")); err != nil {
		return err
	}
	f.Cursor.PinFrom(&f.Range, c.Query("from"))
	page, err := s.store.Events(c.UserContext(), f)
	if err != nil {
		return err
	}
	return api.OK(c, page)
}

// metricsParam reads metric[]=a&metric[]=b and metric=a,b (both may be combined). Each metric[]
// value is one name as it is: an imported event's name may hold a comma or spaces at its ends
// ("Checkout.Order Completed, v2"), and split up it was answered as two other names, silently
// (found by review). metric= is the short form for names without a comma.
func metricsParam(c *fiber.Ctx, def []string) ([]string, error) {
	var out []string
	seen := map[string]bool{}
	args := c.Context().QueryArgs()
	for _, key := range []string{"metric[]", "metric"} {
		for _, v := range args.PeekMulti(key) {
			names := []string{string(v)}
			if key == "metric" {
				names = strings.Split(names[0], ",")
				for i := range names {
					names[i] = strings.TrimSpace(names[i])
				}
			}
			for _, m := range names {
				if m == "" || seen[m] {
					continue
				}
				if !ValidName(m) {
					return nil, nameErr("metric", m)
				}
				seen[m] = true
				out = append(out, m)
			}
		}
	}
	if len(out) > 50 {
		return nil, paramErr("at most 50 metrics per request, got %d", len(out))
	}
	if len(out) == 0 {
		return def, nil
	}
	return out, nil
}

func (s *Service) getUsage(c *fiber.Ctx) error {
	r, err := s.rangeOf(c)
	if err != nil {
		return err
	}
	// Usage is counted per day: a bound inside a day would be answered as its whole day, unlike
	// the same range on /events or /event-names.
	for _, b := range [2]struct {
		name string
		at   time.Time
	}{{"from", r.From}, {"to", r.To}} {
		if !b.at.Equal(r.Zone.DayStart(r.Zone.Date(b.at))) {
			return paramErr("%s=%s is inside a day of %s, and usage is counted per day: give from and to as dates (YYYY-MM-DD), or as instants at midnight",
				b.name, b.at.Format(time.RFC3339), r.Zone.Name())
		}
	}
	metrics, err := metricsParam(c, nil)
	if err != nil {
		return err
	}
	if len(metrics) == 0 {
		return paramErr("name at least one metric: metric[]=auth.user.login&metric[]=api_requests_daily (or metric=a,b)")
	}
	fill := false
	switch c.Query("fill") {
	case "", "none":
	case "zero":
		fill = true
	default:
		return paramErr("fill=%q: want zero or none", excerpt.Short(c.Query("fill")))
	}
	first, last := r.Days()
	res, err := s.store.UsageIn(c.UserContext(), principal(c).TenantID, metrics, r.Zone, first, last, fill)
	if err != nil {
		return err
	}
	if res.Degraded {
		c.Set("X-Analytics-Degraded", "postgres unavailable; all days from ClickHouse")
	}
	return api.OK(c, res.Series)
}

func (s *Service) getKPIs(c *fiber.Ctx) error {
	metrics, err := metricsParam(c, DefaultKPIMetrics)
	if err != nil {
		return err
	}
	z, err := s.zone(c)
	if err != nil {
		return err
	}
	kpis, err := s.store.KPIsIn(c.UserContext(), principal(c).TenantID, metrics, z)
	if err != nil {
		return err
	}
	return api.OK(c, kpis)
}

func (s *Service) getEventNames(c *fiber.Ctx) error {
	r, err := s.rangeOf(c)
	if err != nil {
		return err
	}
	limit, err := parseCount("limit", c.Query("limit"), 1000, 1000)
	if err != nil {
		return err
	}
	names, more, err := s.store.EventNames(c.UserContext(), principal(c).TenantID, r, limit)
	if err != nil {
		return err
	}
	c.Set("X-Event-Names-Truncated", strconv.FormatBool(more))
	return api.OK(c, names)
}

func (s *Service) getActiveUsers(c *fiber.Ctx) error {
	r, err := s.rangeOf(c)
	if err != nil {
		return err
	}
	event := c.Query("event", "auth.user.login")
	if !ValidName(event) {
		return nameErr("event", event)
	}
	au, err := s.store.ActiveUsers(c.UserContext(), principal(c).TenantID, r, event)
	if err != nil {
		return err
	}
	return api.OK(c, au)
}

// exportFormats are the export routes' encodings, by the name's extension.
var exportFormats = map[string]struct {
	format      Format
	contentType string
}{
	"csv":    {CSV, "text/csv; charset=utf-8"},
	"ndjson": {NDJSON, "application/x-ndjson"},
}

// getExport streams one page of the filter's events (newest first, at most limit rows, default and
// maximum ANALYTICS_MAX_EXPORT_ROWS) as CSV or NDJSON. The headers say whether the page is the whole
// result; when it is not, X-Export-Next-Cursor and Link rel="next" name the next page.
func (s *Service) getExport(ext string) fiber.Handler {
	kind := exportFormats[ext]
	return func(c *fiber.Ctx) error {
		f, err := s.filter(c)
		if err != nil {
			return err
		}
		limit, err := parseCount("limit", c.Query("limit"), s.cfg.MaxExportRows, s.cfg.MaxExportRows)
		if err != nil {
			return err
		}
		if f.Cursor, err = ParseCursor(c.Query("cursor")); err != nil {
			return err
		}
		f.Cursor.PinFrom(&f.Range, c.Query("from"))
		bom := false
		switch c.Query("bom") {
		case "", "false", "0":
		case "true", "1":
			if kind.format != CSV {
				return paramErr("bom applies to export.csv only (NDJSON is UTF-8 without a byte-order mark)")
			}
			bom = true
		default:
			return paramErr("bom=%q: want true or false", excerpt.Short(c.Query("bom")))
		}
		p := principal(c)
		if !s.gate.enter(p.TenantID) {
			return api.TooMany("too_many_exports",
				fmt.Sprintf("at most %d exports of a tenant (%d in all) run at once; retry when one has finished", exportsPerTenant, exportsTotal), 5)
		}
		streaming := false
		defer func() {
			if !streaming {
				s.gate.leave(p.TenantID)
			}
		}()
		exp, err := s.store.PlanExport(c.UserContext(), f, limit)
		if err != nil {
			return err
		}
		// Named by the local days it covers, in the request's zone, as the range was read (UTC
		// dates named the day before for a range of Tokyo days; found by review).
		first, last := f.Range.Days()
		name := fmt.Sprintf("analytics-%s-%s-%s.%s", p.Slug, first.Format("20060102"), last.Format("20060102"), ext)
		c.Set(fiber.HeaderContentType, kind.contentType)
		c.Set(fiber.HeaderContentDisposition, `attachment; filename="`+name+`"`)
		c.Set("X-Export-Row-Limit", strconv.Itoa(limit))
		c.Set("X-Export-Truncated", strconv.FormatBool(exp.Truncated))
		if exp.Truncated {
			// The next page is this request with the cursor set and the range resolved: a default
			// range ("the last 30 days") recomputed by the next request would slide past midnight
			// and drop the oldest day's rows.
			next := exp.Next.Encode()
			args := fasthttp.AcquireArgs()
			c.Context().QueryArgs().CopyTo(args)
			args.Set("cursor", next)
			args.Set("from", f.Range.From.Format(time.RFC3339))
			args.Set("to", f.Range.To.Format(time.RFC3339))
			c.Set("X-Export-Next-Cursor", next)
			c.Set(fiber.HeaderLink, "<"+c.Path()+"?"+args.String()+`>; rel="next"`)
			fasthttp.ReleaseArgs(args)
		}
		c.Set(fiber.HeaderCacheControl, "no-store")
		if c.Method() == fiber.MethodHead {
			return nil // the headers only: no page query, nothing downloaded, nothing to audit
		}
		s.metrics.exports.WithLabelValues(s.tenants.Value(p.Slug)).Inc()
		if s.audit != nil {
			meta := map[string]any{"from": f.Range.From, "to": f.Range.To, "event": f.Event, "source": f.Source,
				"limit": limit, "truncated": exp.Truncated}
			if f.UserID != "" {
				// The user by its hash: the audit log outlives the user's erasure (found by review:
				// the export's user_id filter was kept in plain text).
				meta["user_hash"] = audit.UserHash(p.TenantID, f.UserID)
			}
			if !f.Cursor.IsZero() {
				meta["cursor"] = c.Query("cursor")
			}
			entry := audit.Entry{TenantID: p.TenantID, Actor: p.Actor, Action: "export." + ext, Target: "events", Meta: meta}
			if err := s.audit.Record(c.UserContext(), entry); err != nil {
				// An export that cannot be audited is refused: every download is audited (docs/contract.md).
				return err
			}
		}
		// The page query starts inside the stream, once the connection is ours: if it never gets
		// there (the client reset the connection first), nothing was started that needs closing.
		log, rows, tenant := s.log, 0, p.TenantID
		streaming = true
		api.Stream(c, exp.Duration(), func(w io.Writer) (err error) {
			rows, err = exp.Write(w, kind.format, bom)
			return err
		}, func(err error) {
			s.gate.leave(tenant)
			if err != nil {
				// The body is left unterminated: the client sees the export cut short, never a
				// shorter file that looks complete.
				log.Warn("export ended early", "tenant", p.Slug, "format", ext, "rows", rows, "err", err)
			}
		})
		return nil
	}
}

// Drain waits until every export still streaming has ended, or ctx ends: at shutdown, after the
// HTTP server stopped taking requests (it does not wait for streams it handed over).
func (s *Service) Drain(ctx context.Context) error { return s.gate.wait(ctx) }

// httpError maps what a read route returns to a response (timed applies it to every route): a bad
// parameter is a 400 naming it; a response the handler built (too_many_exports) stays as it is; any
// other error is storage (ClickHouse, Postgres, the audit log) failing to answer, a 503 the client
// can retry.
func httpError(err error) error {
	var param *ParamError
	var resp *api.Error
	switch {
	case err == nil:
		return nil
	case errors.As(err, &param):
		return api.BadRequest("invalid_parameter", param.Msg)
	case errors.As(err, &resp):
		return resp
	}
	if shardDown(err) {
		return api.Unavailable("shard_unavailable", "part of the analytics storage (every replica of a ClickHouse shard) is unreachable; "+
			"no partial answer is given; retry shortly", 5, err)
	}
	return api.Unavailable("storage_unavailable", "analytics storage did not answer; retry shortly", 5, err)
}

// shardDown reports the cluster's answer when no replica of some shard could be reached (code 279,
// ALL_CONNECTION_TRIES_FAILED): the read is refused whole — a sum over the shards that answered would
// be a wrong number, not a smaller one.
func shardDown(err error) bool {
	var ex *clickhouse.Exception
	return errors.As(err, &ex) && ex.Code == 279
}
