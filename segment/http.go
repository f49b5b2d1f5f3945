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
// credential — the write key as the Basic-auth user, or the body's writeKey — is turned into first.
func (s *Service) Register(r fiber.Router, authn fiber.Handler) {
	r.Post("/v1/batch", s.prepare(""), authn, s.store)
	for _, t := range Types {
		r.Post("/v1/"+t, s.prepare(t), authn, s.store)
	}
}

// pending is what prepare leaves to store: the messages refused before ingest saw them, and the
// original position of each event handed to ingest.
type pending struct {
	total    int
	refused  []Refusal
	position []int
}

const pendingKey = "segment.pending"

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

// prepare reads a Segment request for endpoint type typ ("" for /v1/batch): it finds the
// credential, translates every message, and replaces the request's body with the ingest events and
// its Authorization with the write key as a bearer token, for authn and ingest's handler to take.
// Nothing read from the request is kept past it except as fresh copies (json.Unmarshal copies).
func (s *Service) prepare(typ string) fiber.Handler {
	return func(c *fiber.Ctx) error {
		key, keyErr := basicKey(c.Get(fiber.HeaderAuthorization))
		body, err := ingest.Decompress(c.Request().Body(), c.Get(fiber.HeaderContentEncoding), MaxBatchBytes)
		if err == nil {
			err = contentType(c.Get(fiber.HeaderContentType))
		}
		var msgs []json.RawMessage
		var d defaults
		var bodyKey string
		if err == nil {
			msgs, d, bodyKey, err = split(body, typ)
		}
		switch {
		case keyErr != nil:
			return keyErr
		case key == "" && bodyKey == "" && c.Get(fiber.HeaderAuthorization) == "":
			return api.Unauthorized("missing write key: send it as the Basic-auth user with an empty password (Authorization: Basic base64(<API key>:)), or as writeKey in the body")
		case err != nil:
			return requestError(err)
		}
		if key == "" {
			key = bodyKey
		}
		if key != "" {
			c.Request().Header.Set(fiber.HeaderAuthorization, "Bearer "+key)
		}
		now := s.now()
		p := &pending{total: len(msgs)}
		events := make([]ingest.Event, 0, len(msgs))
		for i, raw := range msgs {
			ev, err := translate(raw, typ, d, now)
			if err != nil {
				p.refused = append(p.refused, Refusal{Index: i, MessageID: messageID(raw), Error: err.Error()})
				continue
			}
			events = append(events, ev)
			p.position = append(p.position, i)
		}
		native, err := json.Marshal(events)
		if err != nil {
			return err
		}
		c.Request().SetBody(native)
		c.Request().Header.SetContentType(fiber.MIMEApplicationJSON)
		c.Request().Header.Del(fiber.HeaderContentEncoding)
		c.Locals(pendingKey, p)
		return c.Next()
	}
}

// store hands the translated events to ingest's handler and answers in Segment's shape: 200
// {"success":true} when every message was stored or was a duplicate of one stored before; a 400
// naming each refused message otherwise (the rest are stored); ingest's own refusals of the whole
// request (413, 503 + Retry-After, ...) as they are.
func (s *Service) store(c *fiber.Ctx) error {
	p, _ := c.Locals(pendingKey).(*pending)
	if p == nil {
		return errors.New("segment: store without prepare")
	}
	var res ingest.EventsResult
	if len(p.position) > 0 {
		err := s.events(c)
		var ae *api.Error
		switch {
		case errors.As(err, &ae) && ae.Code == "invalid_events":
			res, _ = ae.Details.(ingest.EventsResult)
		case err != nil:
			return err
		default:
			var out struct {
				Data ingest.EventsResult `json:"data"`
			}
			if err := json.Unmarshal(c.Response().Body(), &out); err != nil {
				return fmt.Errorf("read ingest's answer: %w", err)
			}
			res = out.Data
		}
		c.Response().ResetBody()
	}
	if res.Disabled {
		return c.Status(http.StatusOK).JSON(fiber.Map{"success": true, "disabled": true, "message": res.Message})
	}
	for _, r := range res.Rejected {
		i := p.position[r.Index]
		p.refused = append(p.refused, Refusal{Index: i, Error: r.Error})
	}
	if len(p.refused) == 0 {
		return c.Status(http.StatusOK).JSON(fiber.Map{"success": true})
	}
	out := Result{Stored: res.Accepted, Duplicates: len(res.Duplicates), Refused: p.refused}
	slices.SortFunc(out.Refused, func(a, b Refusal) int { return cmp.Compare(a.Index, b.Index) })
	return api.BadRequest("invalid_messages", fmt.Sprintf("%d of %d messages were refused and not stored (%d stored, %d duplicates); see details.refused. Fix them and send the batch again: messages with a messageId are stored once however often they are sent",
		len(out.Refused), p.total, out.Stored, out.Duplicates)).WithDetails(out)
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
// the one message; and the body's writeKey. Every message must be within MaxMessageBytes.
func split(body []byte, typ string) ([]json.RawMessage, defaults, string, error) {
	var d defaults
	if typ != "" {
		var m struct {
			WriteKey string `json:"writeKey"`
		}
		if err := json.Unmarshal(body, &m); err != nil {
			return nil, d, "", badBody("body must be one JSON object, the " + typ + " call")
		}
		if len(body) > MaxMessageBytes {
			return nil, d, m.WriteKey, tooLarge(fmt.Sprintf("the message is %d bytes; Segment's limit is %d (32 KB) per message", len(body), MaxMessageBytes))
		}
		return []json.RawMessage{body}, d, m.WriteKey, nil
	}
	var b batch
	if err := json.Unmarshal(body, &b); err != nil {
		return nil, d, "", badBody(`body must be a JSON object {"batch":[...]}: ` + err.Error())
	}
	if len(b.Batch) == 0 {
		return nil, d, b.WriteKey, badBody(`batch is empty or missing: send {"batch":[{"type":"track",...},...]}`)
	}
	var over []string
	for i, m := range b.Batch {
		if len(m) > MaxMessageBytes {
			over = append(over, fmt.Sprintf("message %d is %d bytes", i, len(m)))
		}
	}
	if len(over) > 0 {
		return nil, d, b.WriteKey, tooLarge(strings.Join(over, ", ") + fmt.Sprintf("; Segment's limit is %d (32 KB) per message: nothing was stored", MaxMessageBytes))
	}
	d.sentAt = b.SentAt
	if b.Context != nil {
		d.ip = b.Context.IP
	}
	return b.Batch, d, b.WriteKey, nil
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
