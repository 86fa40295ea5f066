package proxy

import (
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

// A zero Logger writes nothing, and the proxy serves as before.
func TestZeroLoggerLogsNothing(t *testing.T) {
	h := newHarness(t, func(s *setup) { s.opts.Logger = zerolog.Logger{} })
	for range 2 { // a miss, then a hit
		if status, _, _ := h.get(pathConv); status != 200 {
			t.Fatalf("status %d", status)
		}
	}
	if logs := h.logs.String(); strings.Contains(logs, `"message":"request"`) {
		t.Errorf("access lines under a zero Logger: %s", logs)
	}
}
