package proxy

import (
	"math"
	"strconv"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

func TestAppendIntIsStrconvs(t *testing.T) {
	vals := []int64{math.MinInt64, -1000, -999, -1, 1000, 1001, 123456, math.MaxInt64}
	for v := range int64(1000) {
		vals = append(vals, v)
	}
	for _, v := range vals {
		if got, want := string(appendInt([]byte("x"), v)), "x"+strconv.FormatInt(v, 10); got != want {
			t.Errorf("appendInt(%d) = %q, want %q", v, got, want)
		}
	}
}

// A zero Logger writes nothing, with or without a LogOutput, and the
// proxy serves as before.
func TestZeroLoggerLogsNothing(t *testing.T) {
	for _, out := range []*syncBuffer{nil, {}} {
		h := newHarness(t, func(s *setup) {
			s.opts.Logger, s.opts.LogOutput = zerolog.Logger{}, nil
			if out != nil {
				s.opts.LogOutput = out
			}
		})
		for range 2 { // a miss, then a hit
			if status, _, _ := h.get(pathConv); status != 200 {
				t.Fatalf("status %d", status)
			}
		}
		if out != nil && out.String() != "" {
			t.Errorf("lines written to LogOutput under a zero Logger: %s", out.String())
		}
		if logs := h.logs.String(); strings.Contains(logs, `"message":"request"`) {
			t.Errorf("access lines under a zero Logger: %s", logs)
		}
	}
}
