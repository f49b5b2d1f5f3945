package main

import (
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/jsontext"
)

// Encoders for the three wire forms of one event: the REST body analyticsd ingests, the JSONEachRow
// row clickhouse-client inserts (the ceiling), and (in pg.go) the Postgres COPY row.

const (
	rfc3339Z = "2006-01-02T15:04:05Z"
	chTime   = "2006-01-02 15:04:05"
)

// appendRESTEvent appends e as the guide's event object (props as a JSON object).
func appendRESTEvent(b []byte, e *Event) []byte {
	b = append(b, `{"id":"`...)
	b = jsontext.AppendUUID(b, e.ID)
	b = append(b, `","event":`...)
	b = jsontext.AppendString(b, e.Name())
	b = append(b, `,"user_id":`...)
	b = jsontext.AppendString(b, e.UserID)
	b = append(b, `,"source":`...)
	b = jsontext.AppendString(b, e.Source())
	b = append(b, `,"ts":"`...)
	b = time.Unix(e.Ts, 0).UTC().AppendFormat(b, rfc3339Z)
	b = append(b, `","props":`...)
	b = append(b, e.Props...)
	b = append(b, `,"ip":`...)
	b = jsontext.AppendString(b, e.IP)
	b = append(b, `,"request_id":`...)
	b = jsontext.AppendString(b, e.RequestID)
	return append(b, '}')
}

// appendRawRow appends e as one JSONEachRow line of analyticsd's events table (props as a string).
func appendRawRow(b []byte, e *Event, tenant uuid.UUID, receivedAt int64) []byte {
	b = append(b, `{"tenant_id":"`...)
	b = jsontext.AppendUUID(b, tenant)
	b = append(b, `","ts":"`...)
	b = time.Unix(e.Ts, 0).UTC().AppendFormat(b, chTime)
	b = append(b, `","id":"`...)
	b = jsontext.AppendUUID(b, e.ID)
	b = append(b, `","received_at":"`...)
	b = time.Unix(receivedAt, 0).UTC().AppendFormat(b, chTime)
	b = append(b, `","event":`...)
	b = jsontext.AppendString(b, e.Name())
	b = append(b, `,"source":`...)
	b = jsontext.AppendString(b, e.Source())
	b = append(b, `,"user_id":`...)
	b = jsontext.AppendString(b, e.UserID)
	b = append(b, `,"props":`...)
	b = jsontext.AppendString(b, e.Props)
	b = append(b, `,"ip":`...)
	b = jsontext.AppendString(b, e.IP)
	b = append(b, `,"request_id":`...)
	b = jsontext.AppendString(b, e.RequestID)
	return append(b, "}\n"...)
}
