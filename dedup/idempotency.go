package dedup

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/internal/logger"
)

// IdempotencyHeader is the request header that makes a write happen once.
const IdempotencyHeader = "Idempotency-Key"

// PendingTTL bounds how long a request with an Idempotency-Key may run before a retry with the same
// key runs it again. The writes behind it are idempotent by themselves (ids derived from the key),
// so a second run after this changes nothing either; it only loses the stored response. A retry of a
// request whose instance died (kill -9, OOM) does not wait for it: see KeepAlive.
const PendingTTL = time.Minute

// An instance running KeepAlive refreshes its liveness mark every holderBeat; the mark expires
// holderTTL after the last refresh, so a retry finds a dead instance's request free within ~10 s.
const (
	holderBeat = 2 * time.Second
	holderTTL  = 8 * time.Second
)

func (s *Store) holderKey(holder string) string { return s.prefix + "idem-holder:" + holder }

// KeepAlive marks this process alive in Redis until ctx ends, and from its first successful mark on
// names it as the holder of the requests it runs. A retry that finds a request pending under a holder
// whose mark has expired — the process died mid-request — runs it at once instead of answering 409
// until PendingTTL ends. Serve stops it only once the HTTP server has drained, and the mark is then
// deleted: no request of this process is left running. A mark lost while its process lives (Redis
// restarted from an older snapshot, evicted, or this process cut off from it for holderTTL) lets a
// retry run beside the first run: both write the same derived ids, so nothing is stored twice, but the
// replayed response is the second run's.
func (s *Store) KeepAlive(ctx context.Context) {
	tok := make([]byte, 8)
	_, _ = rand.Read(tok)
	holder := hex.EncodeToString(tok)
	key := s.holderKey(holder)
	t := time.NewTicker(holderBeat)
	defer t.Stop()
	for {
		if err := s.rdb.Set(ctx, key, "1", holderTTL).Err(); err == nil && s.holder.Load() == nil {
			s.holder.Store(holder)
		}
		select {
		case <-ctx.Done():
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
			defer cancel()
			_ = s.rdb.Del(dctx, key).Err()
			return
		case <-t.C:
		}
	}
}

// holderGone reports whether holder's liveness mark has expired (false when Redis cannot say).
func (s *Store) holderGone(ctx context.Context, holder string) bool {
	n, err := s.rdb.Exists(ctx, s.holderKey(holder)).Result()
	return err == nil && n == 0
}

// record is what Redis keeps for a key: the request's fingerprint and, once done, its response.
type record struct {
	State       string `json:"s"` // "pending" or "done"
	Fingerprint string `json:"fp"`
	Token       string `json:"t,omitempty"` // tells this request's pending record from a later one
	Holder      string `json:"h,omitempty"` // the process running it (KeepAlive), while pending
	Status      int    `json:"st,omitempty"`
	ContentType string `json:"ct,omitempty"`
	Body        string `json:"b,omitempty"`
}

// beginScript starts a request under its key: the record (KEYS[1]) as it stands, or "!" when only
// the key's fingerprint mark (KEYS[2]) is left and names another request (ARGV[3]), or "" when this
// request now holds the key (its pending record ARGV[1], and the mark, ARGV[4] seconds).
var beginScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v then return v end
local f = redis.call('GET', KEYS[2])
if f and f ~= ARGV[3] then return '!' end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
return ''
`)

// markLife is how long a key's fingerprint mark outlives its start: as long as the rows whose ids
// were derived from the key can still be claimed (one to two windows after their claim, which
// follows the start), and a minute for clocks that differ between instances. A kept response lasts
// one window; after it the mark alone answers another request under the key with 422: run, its
// rows would be found to be duplicates of the first request's and dropped, though acknowledged.
func (s *Store) markLife() int { return int(2*s.windowSeconds()) + 60 }

// takeoverScript replaces a dead holder's pending record (ARGV[1], as read) with this request's
// (ARGV[2]); it returns 0 when the record changed since it was read (another retry took it first).
var takeoverScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
`)

// finishScript replaces this request's pending record (ARGV[1]) with the response (ARGV[2]), or
// deletes it when ARGV[2] is empty; a record it does not own is left alone.
var finishScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return 1
`)

// Idempotency returns middleware, mounted after authentication, that makes a request sent with an
// Idempotency-Key header take effect once per tenant and key within the window: a retry with the same
// key and the same request (method, path, query, content headers and body) gets the first response
// back, marked Idempotent-Replayed: true, and changes nothing; the same key with a different request
// is refused with 422; a retry while the first is still running gets 409 and Retry-After (unless the
// instance running it died: KeepAlive). Responses
// worth replaying are kept — 2xx, and 4xx other than 408, 409, 425 and 429 — while a 5xx or a 429
// frees the key, so that the retry runs. With Redis unavailable the request runs unchecked (marked
// X-Analytics-Degraded); the ids derived from the key still keep its rows from being stored twice.
func (s *Store) Idempotency(log *slog.Logger) fiber.Handler {
	log = logger.Or(log)
	return func(c *fiber.Ctx) error {
		raw := c.Get(IdempotencyHeader)
		if raw == "" {
			return c.Next()
		}
		if !validKey(raw) {
			return api.BadRequest("invalid_idempotency_key", "Idempotency-Key must be 1 to 255 printable ASCII characters; a UUID per logical request is a good choice")
		}
		p, ok := api.PrincipalOf(c)
		if !ok {
			return c.Next()
		}
		api.SetIdempotencyKey(c, raw)
		rkey := s.prefix + "idem:{" + p.TenantID.String() + "}:" + hashHex(c.Route().Path, "\x00", raw)
		fkey := rkey + ":fp"
		fp := fingerprint(c)
		tok := make([]byte, 8)
		_, _ = rand.Read(tok)
		holder, _ := s.holder.Load().(string)
		pending, _ := json.Marshal(record{State: "pending", Fingerprint: fp, Token: hex.EncodeToString(tok), Holder: holder})
		ctx := c.UserContext()
		prev, err := beginScript.Run(ctx, s.rdb, []string{rkey, fkey}, string(pending), int(PendingTTL.Seconds()), fp, s.markLife()).Text()
		if err != nil {
			log.Warn("idempotency key not checked: redis unavailable", "err", err)
			c.Set("X-Analytics-Degraded", "Idempotency-Key not checked (redis unavailable); derived ids still keep events from being stored twice")
			return c.Next()
		}
		if prev != "" && prev != "!" && s.takeOver(ctx, rkey, prev, fp, string(pending)) {
			prev = ""
		}
		if prev != "" {
			var r record
			if prev == "!" { // the response expired; the key's mark names another request
				r.Fingerprint = prev
			} else if json.Unmarshal([]byte(prev), &r) != nil {
				return c.Next()
			}
			// Answered without the handler: the request's rate-limit Meter (consume) is taken here.
			if m := api.MeterOf(c); m != nil {
				if err := m.TakeNow(c); err != nil {
					return err
				}
			}
			switch {
			case r.Fingerprint != fp:
				return api.Unprocessable("idempotency_key_reused",
					"this Idempotency-Key was used with a different request (method, path, query or body) in the last "+(2*s.window).String()+"; send a new key for a new request")
			case r.State != "done":
				return api.Conflict("idempotency_key_in_use", "a request with this Idempotency-Key is still being processed; retry shortly", 1)
			}
			c.Set("Idempotent-Replayed", "true")
			if r.ContentType != "" {
				c.Set(fiber.HeaderContentType, r.ContentType)
			}
			return c.Status(r.Status).SendString(r.Body)
		}

		herr := s.runFreeingOnPanic(c, rkey, string(pending))
		if herr != nil {
			// Render the error now, so that the response can be kept like any other; it is still
			// returned below, so that the middleware before this one sees it (ratelimit's Defer
			// meters failed requests).
			if rerr := c.App().Config().ErrorHandler(c, herr); rerr != nil {
				return rerr
			}
		}
		status := c.Response().StatusCode()
		done := ""
		if replayable(status) {
			b, _ := json.Marshal(record{State: "done", Fingerprint: fp, Status: status,
				ContentType: string(c.Response().Header.ContentType()), Body: string(c.Response().Body())})
			done = string(b)
		}
		if err := finishScript.Run(ctx, s.rdb, []string{rkey}, string(pending), done, s.windowSeconds()).Err(); err != nil {
			log.Warn("idempotent response not kept: redis unavailable", "err", err)
		}
		return herr
	}
}

// runFreeingOnPanic runs the rest of the chain; if it panics, the key's pending record is deleted
// before the panic goes on (to api.NewApp's recover, which answers 500): a 5xx frees the key, so
// that the retry runs — not 409 for PendingTTL from a holder that is still alive.
func (s *Store) runFreeingOnPanic(c *fiber.Ctx, rkey, pending string) error {
	defer func() {
		if r := recover(); r != nil {
			ctx, cancel := context.WithTimeout(context.WithoutCancel(c.UserContext()), time.Second)
			_ = finishScript.Run(ctx, s.rdb, []string{rkey}, pending, "", s.windowSeconds()).Err()
			cancel()
			panic(r)
		}
	}()
	return c.Next()
}

// takeOver makes this request the holder of a pending record prev (the same request) whose holder
// died, and reports whether it did.
func (s *Store) takeOver(ctx context.Context, rkey, prev, fp, pending string) bool {
	var r record
	if json.Unmarshal([]byte(prev), &r) != nil || r.State != "pending" || r.Fingerprint != fp || r.Holder == "" {
		return false
	}
	if self, _ := s.holder.Load().(string); r.Holder == self || !s.holderGone(ctx, r.Holder) {
		return false
	}
	n, err := takeoverScript.Run(ctx, s.rdb, []string{rkey}, prev, pending, int(PendingTTL.Seconds())).Int()
	return err == nil && n == 1
}

func replayable(status int) bool {
	switch status {
	case http.StatusRequestTimeout, http.StatusConflict, http.StatusTooEarly, http.StatusTooManyRequests:
		return false
	}
	return status >= 200 && status < 500
}

func validKey(k string) bool {
	if len(k) > 255 {
		return false
	}
	for i := 0; i < len(k); i++ {
		if k[i] < 0x20 || k[i] > 0x7e {
			return false
		}
	}
	return true
}

// fingerprint identifies a request for its key: what a retry must send again byte for byte.
func fingerprint(c *fiber.Ctx) string {
	h := sha256.New()
	for _, part := range [][]byte{[]byte(c.Method()), []byte(c.Path()), c.Request().URI().QueryString(),
		c.Request().Header.ContentType(), c.Request().Header.Peek(fiber.HeaderContentEncoding), c.Request().Body()} {
		h.Write([]byte(strconv.Itoa(len(part)) + ":"))
		h.Write(part)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func hashHex(parts ...string) string {
	h := sha256.New()
	for _, p := range parts {
		h.Write([]byte(p))
	}
	return hex.EncodeToString(h.Sum(nil))
}
