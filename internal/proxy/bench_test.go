package proxy

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/rs/zerolog"
)

// discardWriter is a reusable ResponseWriter for in-process benchmarks.
type discardWriter struct {
	h    http.Header
	code int
}

func (w *discardWriter) Header() http.Header         { return w.h }
func (w *discardWriter) WriteHeader(c int)           { w.code = c }
func (w *discardWriter) Write(b []byte) (int, error) { return len(b), nil }

// BenchmarkHit measures the cache-hit path in process: routing, key
// (credential HMAC), lookup, response headers, and the access-log line
// (written to io.Discard, JSON still built).
func BenchmarkHit(b *testing.B) {
	h := newHarness(b, func(s *setup) { s.opts.Logger = zerolog.New(io.Discard) })
	h.get(pathConv)
	h.settle()
	req := httptest.NewRequest("GET", pathConv, nil)
	req.Header.Set("Authorization", basic(acctA, tokenA))
	w := &discardWriter{h: http.Header{}}
	h.p.ServeHTTP(w, req)
	if w.code != 200 || w.h.Get("Cache-Status")[:16] != "cacheproxy; hit;" {
		b.Fatalf("not a hit: %d %v", w.code, w.h)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		clear(w.h)
		h.p.ServeHTTP(w, req)
	}
}

// BenchmarkHitParallel is BenchmarkHit from every P at once: what shared
// counters, locks and cache lines cost when the cores contend.
func BenchmarkHitParallel(b *testing.B) {
	h := newHarness(b, func(s *setup) { s.opts.Logger = zerolog.New(io.Discard) })
	h.get(pathConv)
	h.settle()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		req := httptest.NewRequest("GET", pathConv, nil)
		req.Header.Set("Authorization", basic(acctA, tokenA))
		w := &discardWriter{h: http.Header{}}
		for pb.Next() {
			clear(w.h)
			h.p.ServeHTTP(w, req)
		}
	})
}
