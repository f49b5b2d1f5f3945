package schema

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
)

// A server that refuses connections runs nothing any more; one that accepts and never answers (hung,
// or behind a black hole) may still be running an earlier insert, so only the first is Gone: the
// spool's shipper skips it, and waits for the other.
func TestOnlyARefusingServerIsGone(t *testing.T) {
	s := NewShards("c", &clickhouse.Options{DialTimeout: 300 * time.Millisecond})
	ctx := context.Background()

	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refusing := closed.Addr().String()
	closed.Close()
	if _, err := s.dial(ctx, refusing); err == nil {
		t.Fatal("dial of a closed port succeeded")
	} else if u := (Unreachable{refusing, err}); !u.Gone() {
		t.Errorf("a closed port (%v) is not Gone", err)
	}

	hung, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hung.Close()
	go func() {
		var held []net.Conn
		for {
			c, err := hung.Accept()
			if err != nil {
				for _, c := range held {
					c.Close()
				}
				return
			}
			held = append(held, c) // accepted, never answered
		}
	}()
	if _, err := s.dial(ctx, hung.Addr().String()); err == nil {
		t.Fatal("dial of a server that never answers succeeded")
	} else if u := (Unreachable{hung.Addr().String(), err}); u.Gone() {
		t.Errorf("a server that accepts and never answers (%v) is Gone", err)
	}
}
