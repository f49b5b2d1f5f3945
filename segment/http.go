package segment

import (
	"bytes"
	"cmp"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/internal/clock"
)

// Ingest is what segment needs of package ingest: the Register that mounts its POST /events
// (*ingest.Service). Segment's messages are handed to that very handler, translated, so they are
// validated, spooled, deduplicated and counted exactly as native events are.
type Ingest interface {
	Register(r fiber.Router, levels fiber.Handler, mw ...fiber.Handler)
}

// Service serves the Segment endpoints.
type Service struct {
	events fiber.Handler // ingest's POST /events
	now    func() time.Time
}

// New returns the Segment endpoints over in's event handler.
func New(in Ingest) *Service {
	return &Service{events: eventsHandler(in), now: clock.Now}
}

// eventsHandler returns the handler in mounts at POST /events, found by mounting in on an app of
// its own: ingest exports the routes it serves, not their handlers.
func eventsHandler(in Ingest) fiber.Handler {
	app := fiber.New()
	in.Register(app, nil)
	for _, r := range app.GetRoutes() {
		if r.Method == fiber.MethodPost && r.Path == "/events" && len(r.Handlers) > 0 {
			return r.Handlers[len(r.Handlers)-1]
		}
	}
	// A wiring mistake, which every test that mounts segment finds: each request is a logged 500.
	return func(*fiber.Ctx) error { return errors.New("segment: ingest registered no POST /events") }
}

// Register mounts POST /v1/batch and POST /v1/<type> for each of Types on r, and the short paths
// the browser and mobile libraries post to: /v1/b for a batch — analytics.js batching, and
// analytics-swift, analytics-kotlin and the Flutter library, all of which append /b to their
// apiHost — and /v1/<first letter of the type> (/v1/t, /v1/i, /v1/p, /v1/s, /v1/g, /v1/a) for one
// call of analytics.js (@segment/analytics-next) — where they got 404. authn authenticates
// (and rate-limits) the request from "Authorization: Bearer <API key>", which the Segment
// credential — the write key as the Basic-auth user, or the body's writeKey — is turned into first;
// the body is translated only once the credential is good.
func (s *Service) Register(r fiber.Router, authn fiber.Handler) {
	batch := s.handle("")
	r.Post("/v1/batch", s.credential, authn, batch)
	r.Post("/v1/b", s.credential, authn, batch)
	for _, t := range Types {
		call := s.handle(t)
		r.Post("/v1/"+t, s.credential, authn, call)
		r.Post("/v1/"+t[:1], s.credential, authn, call)
	}
}

// Refusal is one message that was not stored, by its position in the request (0 for a single call).
type Refusal struct {
	Index     int    `json:"index"`
	MessageID string `json:"messageId,omitempty"`
	Error     string `json:"error"`
}

// Result is error.details of a 400 when some messages were refused: the others were stored (or
// were duplicates of messages stored before), so a corrected batch can be sent again whole.
type Result struct {
	Stored     int       `json:"stored"`
	Duplicates int       `json:"duplicates"`
	Refused    []Refusal `json:"refused"` // the first maxRefusals, by index
	// RefusedCount is how many messages were refused in all.
	RefusedCount int `json:"refused_count"`
}

// maxRefusals bounds Result.Refused.
const maxRefusals = 100

// credential turns Segment's credential into the bearer token authn reads: the write key from
// "Authorization: Basic base64(<key>:)", or — only when the request has no Authorization at all —
// the body's writeKey. Any other Authorization (a Bearer API key or JWT) is left to authn.
func (s *Service) credential(c *fiber.Ctx) error {
	h := c.Get(fiber.HeaderAuthorization)
	key, err := basicKey(h)
	if err != nil {
		return err
	}
	if h == "" {
		if key, err = bodyKey(c.Request().Body(), c.Get(fiber.HeaderContentEncoding)); err != nil {
			return requestError(err)
		}
		if key == "" {
			return api.Unauthorized("missing write key: send it as the Basic-auth user with an empty password (Authorization: Basic base64(<API key>:)), or as writeKey in the body")
		}
	}
	if key != "" {
		c.Request().Header.Set(fiber.HeaderAuthorization, "Bearer "+key)
	}
	return c.Next()
}

// bodyKey is the writeKey of a request body, "" when it has none or is not JSON. A body that
// cannot be decompressed — over MaxBatchBytes once gunzipped, an encoding other than gzip, broken
// gzip — is that error, answered 413, 415 or 400 as handle answers it: taken for a body without a
// key, it was a 401 "missing write key" to a client that had sent one.
func bodyKey(raw []byte, encoding string) (string, error) {
	body, err := ingest.Decompress(raw, encoding, MaxBatchBytes)
	if err != nil {
		return "", err
	}
	var m struct {
		WriteKey string `json:"writeKey"`
	}
	_ = json.Unmarshal(body, &m)
	return m.WriteKey, nil
}

// handle serves an authenticated Segment request for endpoint type typ ("" for /v1/batch): it
// translates every message and hands the events to ingest's handler in place of the request's body.
// Nothing read from the request is kept past it except as fresh copies (json.Unmarshal copies).
func (s *Service) handle(typ string) fiber.Handler {
	return func(c *fiber.Ctx) error {
		body, err := ingest.Decompress(c.Request().Body(), c.Get(fiber.HeaderContentEncoding), MaxBatchBytes)
		if err == nil {
			err = contentType(c.Get(fiber.HeaderContentType))
		}
		if err == nil {
			err = ingest.CheckUTF8(body)
		}
		var msgs []json.RawMessage
		var d defaults
		if err == nil {
			msgs, d, err = split(body, typ)
		}
		if err != nil {
			return requestError(err)
		}
		now := s.now()
		total := len(msgs)
		var refused []Refusal
		var position []int // each event's message
		events := make([]ingest.Event, 0, len(msgs))
		first := map[string]int{} // messageId → the first message carrying it
		for i, raw := range msgs {
			ev, err := translate(raw, typ, d, now)
			if err == nil && ev.ID != "" {
				// The same message twice is a duplicate (stored once); two different messages under one
				// messageId would lose the second one silently.
				if j, ok := first[ev.ID]; !ok {
					first[ev.ID] = i
				} else if !bytes.Equal(raw, msgs[j]) {
					err = fmt.Errorf("messageId is message %d's too, with a different body: a messageId names one message; give each its own", j)
				}
			}
			if err != nil {
				refused = append(refused, Refusal{Index: i, MessageID: messageID(raw), Error: err.Error()})
				continue
			}
			events = append(events, ev)
			position = append(position, i)
		}
		var res ingest.EventsResult
		if len(events) > 0 {
			if res, err = s.storeAll(c, events); err != nil {
				return err
			}
		}
		if res.Disabled {
			return c.Status(http.StatusOK).JSON(fiber.Map{"success": true, "disabled": true, "message": res.Message})
		}
		for _, r := range res.Rejected {
			refused = append(refused, Refusal{Index: position[r.Index], MessageID: messageID(msgs[position[r.Index]]), Error: inSegmentTerms(r.Error)})
		}
		if len(refused) == 0 {
			return c.Status(http.StatusOK).JSON(fiber.Map{"success": true})
		}
		slices.SortFunc(refused, func(a, b Refusal) int { return cmp.Compare(a.Index, b.Index) })
		out := Result{Stored: res.Accepted, Duplicates: len(res.Duplicates), Refused: refused, RefusedCount: len(refused)}
		if len(refused) > maxRefusals {
			// 500 KB of "{}" is 170,000 refusals: an 18 MB answer before. The first ones show what
			// is wrong.
			out.Refused = refused[:maxRefusals]
		}
		return api.BadRequest("invalid_messages", fmt.Sprintf("%d of %d messages were refused and not stored (%d stored, %d duplicates); see details.refused. Fix them and send the batch again: messages with a messageId are stored once however often they are sent",
			len(refused), total, out.Stored, out.Duplicates)).WithDetails(out)
	}
}

// storeAll stores events through ingest's handler and returns its report, indexes counting events.
// That is one request to the handler whenever it takes them all, as it nearly always does: its
// limits (INGEST_MAX_EVENTS, INGEST_MAX_BODY_BYTES) default to 10,000 events and 10 MiB, and a
// Segment batch of at most 500 KB holds up to ~16,000 messages. One it refuses as too large
// (which it does before storing any of them) is halved, and each half stored in turn, halved again
// while too large — only when every event has an id, though. The parts are separate requests: a
// later one can fail (503, spool full) after an earlier one was stored, and the client then sends
// the whole batch again; events with ids (from messageIds) are then recognised as duplicates, but an
// event without one gets a new id and would be stored twice. Such a batch is refused whole.
func (s *Service) storeAll(c *fiber.Ctx, events []ingest.Event) (ingest.EventsResult, error) {
	var all ingest.EventsResult
	for done, n := 0, len(events); done < len(events); {
		end := min(done+n, len(events))
		res, err := s.store(c, events[done:end])
		var ae *api.Error
		if errors.As(err, &ae) && ae.Status == http.StatusRequestEntityTooLarge {
			if end-done == 1 {
				// One event alone is over ingest's body limit (INGEST_MAX_BODY_BYTES set below
				// Segment's own limits): refused as itself, so the others are still stored.
				all.Rejected = append(all.Rejected, ingest.ItemError{Index: done, Error: ae.Message})
				done = end
				continue
			}
			if without := withoutID(events); without > 0 {
				return all, api.TooLarge(fmt.Sprintf("the batch is more than analyticsd takes in one request (%s), and %d of its messages have no messageId: split across requests, they would be stored twice if the batch were sent again after a part of it failed. Send smaller batches, or give every message a messageId (Segment's libraries do); nothing was stored",
					ae.Message, without))
			}
			n = (end - done + 1) / 2
			continue
		}
		if err != nil {
			return all, err
		}
		if res.Disabled {
			return res, nil
		}
		all.Accepted += res.Accepted
		for _, r := range res.Rejected {
			r.Index += done
			all.Rejected = append(all.Rejected, r)
		}
		for _, d := range res.Duplicates {
			d.Index += done
			all.Duplicates = append(all.Duplicates, d)
		}
		done = end
	}
	return all, nil
}

// withoutID counts the events that have no id.
func withoutID(events []ingest.Event) int {
	n := 0
	for i := range events {
		if events[i].ID == "" {
			n++
		}
	}
	return n
}

// store hands events to ingest's handler as the request's body and returns its report. A request
// ingest refuses as a whole (413, 503 + Retry-After, ...) comes back as ingest's error, to be
// answered as it is; one whose every event was refused comes back as a report too.
func (s *Service) store(c *fiber.Ctx, events []ingest.Event) (ingest.EventsResult, error) {
	var res ingest.EventsResult
	native, err := marshal(events)
	if err != nil {
		return res, err
	}
	c.Request().SetBody(native)
	c.Request().Header.SetContentType(fiber.MIMEApplicationJSON)
	c.Request().Header.Del(fiber.HeaderContentEncoding)
	err = s.events(c)
	var ae *api.Error
	switch {
	case errors.As(err, &ae) && ae.Code == "invalid_events":
		res, _ = ae.Details.(ingest.EventsResult)
	case err != nil:
		return res, err
	default:
		var out struct {
			Data ingest.EventsResult `json:"data"`
		}
		if err := json.Unmarshal(c.Response().Body(), &out); err != nil {
			return res, fmt.Errorf("read ingest's answer: %w", err)
		}
		res = out.Data
	}
	c.Response().ResetBody()
	return res, nil
}

// basicKey reads the write key from "Authorization: Basic base64(<key>:)", as Segment's libraries
// send it. Another scheme (a Bearer API key or JWT) is left for authn: key is "" and err nil.
func basicKey(h string) (key string, err error) {
	scheme, cred, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok || !strings.EqualFold(scheme, "Basic") {
		return "", nil
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(cred))
	if err != nil {
		return "", api.Unauthorized("Authorization: Basic must be base64 of <API key>: (the write key as the user, an empty password)")
	}
	user, _, _ := strings.Cut(string(raw), ":")
	if user == "" {
		return "", api.Unauthorized("the Basic-auth user is empty: the write key (an analyticsd API key with events:write) is the user, and the password is empty")
	}
	return user, nil
}

// contentType accepts what Segment's API takes: JSON, under the types ingest reads as JSON —
// application/json (the server libraries), text/plain (analytics.js, which so avoids a CORS
// preflight), text/json, application/x-www-form-urlencoded (curl -d), or none.
func contentType(ct string) error {
	f, err := ingest.FormatOf(ct)
	if err != nil {
		return err
	}
	if f != ingest.FormatJSON {
		return &ingest.RequestError{Kind: ingest.ErrUnsupported, Message: "Segment's API takes Content-Type application/json"}
	}
	return nil
}

// split reads a request body: for /v1/batch the batch's messages and what they inherit, otherwise
// the one message. Every message must be within MaxMessageBytes.
func split(body []byte, typ string) ([]json.RawMessage, defaults, error) {
	var d defaults
	if typ != "" {
		var m map[string]json.RawMessage
		if err := json.Unmarshal(body, &m); err != nil {
			return nil, d, badBody("body must be one JSON object, the " + typ + " call")
		}
		if len(body) > MaxMessageBytes {
			return nil, d, tooLarge(fmt.Sprintf("the message is %d bytes; Segment's limit is %d (32 KB) per message", len(body), MaxMessageBytes))
		}
		// A copy: body may be the request's own buffer, which the translated body replaces.
		return []json.RawMessage{slices.Clone(body)}, d, nil
	}
	var b batch
	if err := strictKeys(body, batchFields); err != nil {
		return nil, d, badBody(err.Error())
	}
	if err := json.Unmarshal(body, &b); err != nil {
		return nil, d, badBody(`body must be a JSON object {"batch":[...]}: ` + err.Error())
	}
	if len(b.Batch) == 0 {
		return nil, d, badBody(`batch is empty or missing: send {"batch":[{"type":"track",...},...]}`)
	}
	var over []string
	for i, m := range b.Batch {
		if len(m) > MaxMessageBytes {
			over = append(over, fmt.Sprintf("message %d is %d bytes", i, len(m)))
		}
	}
	if len(over) > 0 {
		return nil, d, tooLarge(strings.Join(over, ", ") + fmt.Sprintf("; Segment's limit is %d (32 KB) per message: nothing was stored", MaxMessageBytes))
	}
	d.sentAt = b.SentAt
	if b.Context != nil {
		d.ip = b.Context.IP
	}
	return b.Batch, d, nil
}

func badBody(msg string) error { return &ingest.RequestError{Kind: ingest.ErrBadBody, Message: msg} }
func tooLarge(msg string) error {
	return &ingest.RequestError{Kind: ingest.ErrTooLarge, Message: msg}
}

// requestError maps a refused body to its response: 413 over a limit, 415 for a type or encoding
// Segment's API does not take, 400 otherwise.
func requestError(err error) error {
	var re *ingest.RequestError
	switch {
	case errors.As(err, &re) && errors.Is(re.Kind, ingest.ErrTooLarge):
		if strings.Contains(re.Message, "Segment") {
			return api.TooLarge(re.Message)
		}
		return api.TooLarge(fmt.Sprintf("the request is over Segment's limit of %d bytes (500 KB) per batch: send smaller batches", MaxBatchBytes))
	case errors.As(err, &re) && errors.Is(re.Kind, ingest.ErrUnsupported):
		return api.Unsupported(re.Message)
	case errors.As(err, &re):
		return api.BadRequest("invalid_body", re.Message)
	}
	return err
}

// messageID reads a message's messageId for a refusal report, when it has one.
func messageID(raw json.RawMessage) string {
	var m struct {
		MessageID string `json:"messageId"`
	}
	_ = json.Unmarshal(raw, &m)
	if len(m.MessageID) > MaxIDBytes {
		return ""
	}
	return m.MessageID
}

// nativeTerms are the analyticsd event fields ingest's refusals begin with, and the Segment
// message fields they were made from (see the package doc).
var nativeTerms = []struct{ native, segment string }{
	{"ts ", "timestamp (as corrected by sentAt) "},
	{"ip ", "context.ip "},
	{"props ", "properties (or traits, with $segment) "},
	{"user_id ", "userId (or anonymousId) "},
}

// inSegmentTerms names, in a refusal of ingest's, the message field the client sent rather than
// the event field it became: a Segment user never sent "ts" or "props".
func inSegmentTerms(msg string) string {
	for _, t := range nativeTerms {
		if rest, ok := strings.CutPrefix(msg, t.native); ok {
			return t.segment + rest
		}
	}
	return msg
}
