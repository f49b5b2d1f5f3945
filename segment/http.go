package segment

import (
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

// Register mounts POST /v1/batch and POST /v1/<type> for each of Types on r. authn authenticates
// (and rate-limits) the request from "Authorization: Bearer <API key>", which the Segment
// credential — the write key as the Basic-auth user, or the body's writeKey — is turned into first;
// the body is translated only once the credential is good.
func (s *Service) Register(r fiber.Router, authn fiber.Handler) {
	r.Post("/v1/batch", s.credential, authn, s.handle(""))
	for _, t := range Types {
		r.Post("/v1/"+t, s.credential, authn, s.handle(t))
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
	Refused    []Refusal `json:"refused"`
}

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
		key = bodyKey(c.Request().Body(), c.Get(fiber.HeaderContentEncoding))
		if key == "" {
			return api.Unauthorized("missing write key: send it as the Basic-auth user with an empty password (Authorization: Basic base64(<API key>:)), or as writeKey in the body")
		}
	}
	if key != "" {
		c.Request().Header.Set(fiber.HeaderAuthorization, "Bearer "+key)
	}
	return c.Next()
}

// bodyKey is the writeKey of a request body, "" when it has none or cannot be read.
func bodyKey(raw []byte, encoding string) string {
	body, err := ingest.Decompress(raw, encoding, MaxBatchBytes)
	if err != nil {
		return ""
	}
	var m struct {
		WriteKey string `json:"writeKey"`
	}
	_ = json.Unmarshal(body, &m)
	return m.WriteKey
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
		for i, raw := range msgs {
			ev, err := translate(raw, typ, d, now)
			if err != nil {
				refused = append(refused, Refusal{Index: i, MessageID: messageID(raw), Error: err.Error()})
				continue
			}
			events = append(events, ev)
			position = append(position, i)
		}
		var res ingest.EventsResult
		if len(events) > 0 {
			if res, err = s.store(c, events); err != nil {
				return err
			}
		}
		if res.Disabled {
			return c.Status(http.StatusOK).JSON(fiber.Map{"success": true, "disabled": true, "message": res.Message})
		}
		for _, r := range res.Rejected {
			refused = append(refused, Refusal{Index: position[r.Index], MessageID: messageID(msgs[position[r.Index]]), Error: r.Error})
		}
		if len(refused) == 0 {
			return c.Status(http.StatusOK).JSON(fiber.Map{"success": true})
		}
		slices.SortFunc(refused, func(a, b Refusal) int { return cmp.Compare(a.Index, b.Index) })
		out := Result{Stored: res.Accepted, Duplicates: len(res.Duplicates), Refused: refused}
		return api.BadRequest("invalid_messages", fmt.Sprintf("%d of %d messages were refused and not stored (%d stored, %d duplicates); see details.refused. Fix them and send the batch again: messages with a messageId are stored once however often they are sent",
			len(refused), total, out.Stored, out.Duplicates)).WithDetails(out)
	}
}

// store hands events to ingest's handler as the request's body and returns its report. A request
// ingest refuses as a whole (413, 503 + Retry-After, ...) comes back as ingest's error, to be
// answered as it is; one whose every event was refused comes back as a report too.
func (s *Service) store(c *fiber.Ctx, events []ingest.Event) (ingest.EventsResult, error) {
	var res ingest.EventsResult
	native, err := json.Marshal(events)
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

// contentType accepts what Segment's API takes: JSON (its libraries send application/json).
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
	if len(m.MessageID) > 255 {
		return ""
	}
	return m.MessageID
}
