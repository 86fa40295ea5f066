package main

import (
	"log"
	"strings"

	"github.com/rs/zerolog"
)

// newStdLog adapts zerolog for net/http's ErrorLog (TLS handshake errors,
// header parse errors), one warn line each.
func newStdLog(l zerolog.Logger, component string) *log.Logger {
	return log.New(stdLogWriter{l.With().Str("component", component).Logger()}, "", 0)
}

type stdLogWriter struct{ l zerolog.Logger }

func (w stdLogWriter) Write(p []byte) (int, error) {
	w.l.Warn().Msg(strings.TrimSpace(string(p)))
	return len(p), nil
}
