// Package logger holds the one default analyticsd's constructors share for their *slog.Logger: nil
// (tests and tools that do not care) means discard. Production wiring always passes one, scoped with
// With("component", …).
package logger

import "log/slog"

// Or returns l, or a logger that discards everything when l is nil.
func Or(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}
