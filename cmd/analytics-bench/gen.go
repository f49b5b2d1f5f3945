package main

import (
	"math"
	"net/netip"
	"strconv"

	"github.com/google/uuid"
)

// Event is one generated event. Everything about event i follows from (seed, i) alone, so any range
// of the stream can be regenerated, in any order or in parallel, and comes out byte-identical: the
// REST load, the ClickHouse ceiling and the Postgres baseline all see the very same events.
type Event struct {
	ID        uuid.UUID
	Tenant    int   // index into the run's tenants, 0 = the busiest
	Ts        int64 // unix seconds, within the 30 days before the generator's base time
	Kind      int   // index into catalog
	UserID    string
	Props     string // compact JSON object, ~100–300 bytes
	IP        string
	RequestID string
}

// Name is the event's name, e.g. "auth.user.login".
func (e *Event) Name() string { return catalog[e.Kind].name }

// Source is the event's source, e.g. "app".
func (e *Event) Source() string { return catalog[e.Kind].source }

// kind is an entry of the guide's event catalog with the share of traffic it gets. The shares are
// what a SaaS product with a public API looks like: API calls dominate, then logins, webhooks and
// emails; registrations and payments are rare.
type kind struct {
	name   string
	source string
	weight float64
	props  func(r *rng, b []byte) []byte
}

var catalog = []kind{
	{"apikey.request", "api", 40, propsAPIRequest},
	{"auth.user.login", "app", 14, propsLogin},
	{"webhook.delivered", "webhook", 10, propsWebhook},
	{"email.sent", "job", 8, propsEmail},
	{"files.uploaded", "files", 5, propsFile},
	{"builder.generate.started", "builder", 4, propsBuildStarted},
	{"builder.generate.completed", "builder", 3.5, propsBuildCompleted},
	{"auth.user.registered", "app", 2, propsRegistered},
	{"apikey.rate_limited", "api", 2, propsRateLimited},
	{"webhook.failed", "webhook", 1.5, propsWebhookFailed},
	{"payments.checkout.created", "payments", 1, propsCheckout},
	{"payments.subscription.active", "payments", 0.6, propsSubscription},
	{"email.failed", "job", 0.5, propsEmailFailed},
	{"payments.subscription.canceled", "payments", 0.2, propsSubscriptionCanceled},
}

// Window is how far back generated timestamps reach.
const Window = 30 * 24 * 3600

// Generator produces the workload: Tenants tenants with a Zipf-like share of traffic (s = 1.1: the
// busiest gets about a quarter of all events, the smallest a third of a percent), the catalog's
// events at their shares, per-tenant user pools, timestamps uniform over the Window before Base.
type Generator struct {
	Seed    uint64
	Base    int64 // unix seconds; timestamps fall in (Base-Window, Base]
	Tenants int

	tenantCDF []float64
	kindCDF   []float64
	users     []int // pool size per tenant
}

// NewGenerator returns a generator for n tenants.
func NewGenerator(seed uint64, base int64, tenants int) *Generator {
	g := &Generator{Seed: seed, Base: base, Tenants: tenants}
	w := make([]float64, tenants)
	for k := range w {
		w[k] = 1 / math.Pow(float64(k+1), 1.1)
	}
	g.tenantCDF = cdf(w)
	kw := make([]float64, len(catalog))
	for i, k := range catalog {
		kw[i] = k.weight
	}
	g.kindCDF = cdf(kw)
	g.users = make([]int, tenants)
	for k := range g.users {
		g.users[k] = 200 + int(g.TenantShare(k)*200_000)
	}
	return g
}

func cdf(w []float64) []float64 {
	total := 0.0
	for _, x := range w {
		total += x
	}
	out := make([]float64, len(w))
	acc := 0.0
	for i, x := range w {
		acc += x / total
		out[i] = acc
	}
	out[len(out)-1] = 1
	return out
}

// TenantShare is tenant k's expected share of events.
func (g *Generator) TenantShare(k int) float64 {
	if k == 0 {
		return g.tenantCDF[0]
	}
	return g.tenantCDF[k] - g.tenantCDF[k-1]
}

func pick(cdf []float64, u float64) int {
	lo, hi := 0, len(cdf)-1
	for lo < hi {
		m := (lo + hi) / 2
		if u < cdf[m] {
			hi = m
		} else {
			lo = m + 1
		}
	}
	return lo
}

// Fill sets e to event i of stream (Seed, stream). Stream 0 is the main data set; other streams give
// extra events (latency probes, warm-up) that never collide with it.
func (g *Generator) Fill(e *Event, stream, i uint64) {
	r := newRng(g.Seed, stream, i)
	var id [16]byte
	putU64(id[0:8], r.next())
	putU64(id[8:16], r.next())
	id[6] = id[6]&0x0f | 0x40 // version 4
	id[8] = id[8]&0x3f | 0x80 // RFC 4122 variant
	e.ID = uuid.UUID(id)
	e.Tenant = pick(g.tenantCDF, r.float())
	e.Kind = pick(g.kindCDF, r.float())
	e.Ts = g.Base - int64(r.intn(Window))
	user := r.intn(g.users[e.Tenant])
	e.UserID = "usr_" + strconv.Itoa(e.Tenant+1) + "_" + strconv.Itoa(user)
	e.IP = userIP(g.Seed, e.Tenant, user)
	switch catalog[e.Kind].source {
	case "webhook", "job":
		e.RequestID = "" // background work has no request
	default:
		e.RequestID = "req_" + hexString(&r, 16)
	}
	b := make([]byte, 0, 320)
	e.Props = string(catalog[e.Kind].props(&r, b))
}

// userIP is the user's address: stable per user, IPv6 for about one user in twelve.
func userIP(seed uint64, tenant, user int) string {
	r := newRng(seed, 1<<40|uint64(tenant), uint64(user))
	if r.intn(12) == 0 {
		var a [16]byte
		a[0], a[1] = 0x2a, 0x02
		putU64(a[2:10], r.next())
		putU64(a[8:16], r.next())
		return netip.AddrFrom16(a).String()
	}
	v := r.next()
	return netip.AddrFrom4([4]byte{byte(11 + v%212), byte(v >> 8), byte(v >> 16), byte(1 + (v>>24)%254)}).String()
}

func putU64(b []byte, v uint64) {
	for i := 0; i < 8; i++ {
		b[i] = byte(v >> (8 * i))
	}
}

// rng is splitmix64: tiny, allocation-free and fully specified here, so a seed gives the same events
// on every Go version and machine.
type rng struct{ s uint64 }

func newRng(seed, stream, i uint64) rng {
	r := rng{seed ^ 0x9e3779b97f4a7c15*(stream+1)}
	r.s ^= mix(i + 0x632be59bd9b4e019)
	r.next()
	return r
}

func mix(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

func (r *rng) next() uint64 {
	r.s += 0x9e3779b97f4a7c15
	return mix(r.s)
}

// float is uniform in [0, 1).
func (r *rng) float() float64 { return float64(r.next()>>11) / (1 << 53) }

// intn is uniform in [0, n).
func (r *rng) intn(n int) int { return int(r.next() % uint64(n)) }

func (r *rng) of(list []string) string { return list[r.intn(len(list))] }

const hexDigits = "0123456789abcdef"

func appendHex(b []byte, r *rng, n int) []byte {
	for n > 0 {
		v := r.next()
		for j := 0; j < 16 && n > 0; j++ {
			b = append(b, hexDigits[v&15])
			v >>= 4
			n--
		}
	}
	return b
}

func hexString(r *rng, n int) string { return string(appendHex(make([]byte, 0, n), r, n)) }
