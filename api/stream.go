package api

import (
	"errors"
	"fmt"
	"io"
	"net"
	"runtime/debug"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/gofiber/fiber/v2"
)

// StreamIdleTimeout is how long a streamed response waits for the client to take the next chunk
// before it gives up on it.
const StreamIdleTimeout = time.Minute

// Stream answers c with a body that write produces after the handler returns, sent with HTTP/1.1
// chunked encoding straight on the connection; done is told how it ended, exactly once. The status
// and headers are whatever c has when Stream is called. Nothing of c may be used inside write: fiber
// reuses it once the handler returns. The whole body must be taken within max (0: no bound), and
// each chunk within StreamIdleTimeout; a client slower than that gets it cut short.
//
// Why not fasthttp's SetBodyStreamWriter: it pipes the body through a 4 KiB buffer and flushes every
// 4 KiB as its own chunk and write(2) — 4× slower than this (240 MB: 0.85–1.0 s against 0.21 s,
// measured on this machine) and most of an export's time. And it ends the body cleanly whatever
// happened, so an export that failed half-way looked complete. Here a failure leaves the chunked
// body unterminated: every HTTP client reports the response as cut short.
//
// fasthttp hands the connection over only if it could write what it owed before (a client that
// pipelined requests and reset the connection never gets there): when the connection has not come
// within streamStartTimeout, done gets ErrStreamNotStarted and write never runs.
//
// The connection is closed after the body (the response says Connection: close). An HTTP/1.0
// client gets the body unframed, delimited by the close. A HEAD request gets the headers only, and
// write is not run.
func Stream(c *fiber.Ctx, max time.Duration, write func(w io.Writer) error, done func(err error)) {
	if c.Method() == fiber.MethodHead {
		done(nil)
		return
	}
	framed := c.Request().Header.IsHTTP11()
	if framed {
		c.Response().Header.SetContentLength(-1) // Transfer-Encoding: chunked
	} else {
		c.Response().Header.SetContentLength(-2) // no length, no chunking: the close ends the body
	}
	c.Response().SetConnectionClose()
	head := append([]byte(nil), c.Response().Header.Header()...)
	var state atomic.Int32 // 0 waiting, 1 started, 2 given up
	timer := time.AfterFunc(streamStartTimeout, func() {
		if state.CompareAndSwap(0, 2) {
			done(ErrStreamNotStarted)
		}
	})
	c.Context().HijackSetNoResponse(true)
	c.Context().Hijack(func(conn net.Conn) {
		timer.Stop()
		if !state.CompareAndSwap(0, 1) {
			return
		}
		cw := &chunkWriter{conn: conn, pending: head, framed: framed}
		if max > 0 {
			cw.end = time.Now().Add(max)
		}
		// fasthttp runs this in a goroutine of its own, past NewApp's recover: a panic here would end
		// the process. It ends this response instead, unterminated, so the client sees it cut short.
		defer func() {
			if r := recover(); r != nil {
				done(fmt.Errorf("the stream's writer panicked: %v\n%s", r, debug.Stack()))
			}
		}()
		err := write(cw)
		if err == nil {
			err = cw.finish()
		}
		done(err)
	})
}

// ErrStreamNotStarted: the connection never came to a streamed response (see Stream).
var ErrStreamNotStarted = errors.New("the client's connection was gone before the response could stream")

const streamStartTimeout = 10 * time.Second

// chunkWriter writes each Write as one HTTP/1.1 chunk, with one writev(2) for the chunk's size line,
// data and CRLF, after the response head on the first write.
type chunkWriter struct {
	conn    net.Conn
	pending []byte    // the response head, until the first write
	framed  bool      // chunked (HTTP/1.1), or the raw body (HTTP/1.0)
	end     time.Time // the whole body's deadline, zero for none
	size    []byte
}

// deadline is the next write's: StreamIdleTimeout from now, or the body's end if sooner.
func (w *chunkWriter) deadline() time.Time {
	d := time.Now().Add(StreamIdleTimeout)
	if !w.end.IsZero() && w.end.Before(d) {
		return w.end
	}
	return d
}

var crlf = []byte("\r\n")

func (w *chunkWriter) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	bufs := net.Buffers{w.pending, p}
	if w.framed {
		w.size = append(strconv.AppendInt(w.size[:0], int64(len(p)), 16), '\r', '\n')
		bufs = net.Buffers{w.pending, w.size, p, crlf}
	}
	w.pending = nil
	if err := w.conn.SetWriteDeadline(w.deadline()); err != nil {
		return 0, err
	}
	if _, err := bufs.WriteTo(w.conn); err != nil {
		return 0, err
	}
	return len(p), nil
}

// finish writes the last chunk, which tells the client the body is complete.
func (w *chunkWriter) finish() error {
	if err := w.conn.SetWriteDeadline(w.deadline()); err != nil {
		return err
	}
	bufs := net.Buffers{w.pending}
	if w.framed {
		bufs = append(bufs, []byte("0\r\n\r\n"))
	}
	_, err := bufs.WriteTo(w.conn)
	return err
}
