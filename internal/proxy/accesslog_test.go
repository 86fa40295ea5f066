package proxy

import (
	"strings"
	"testing"

	"cacheproxy/internal/route"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
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

// Each upstream's latency series is there from the start, at 0: a
// dashboard shows 0, not "no data", before the first upstream call.
func TestUpstreamSeriesExistFromTheStart(t *testing.T) {
	reg := prometheus.NewRegistry()
	newHarness(t, func(s *setup) { s.opts.Registerer = reg })
	if n := testutil.CollectAndCount(reg, "cacheproxy_upstream_latency_seconds"); n != int(route.NumUpstreams) {
		t.Fatalf("%d latency series before any call, want one per upstream (%d)", n, route.NumUpstreams)
	}
}
