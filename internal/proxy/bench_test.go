package proxy

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync/atomic"
	"testing"

	"cacheproxy/internal/clock"
	"cacheproxy/internal/redistest"
	"cacheproxy/internal/tracing"

	"github.com/rs/zerolog"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// discardWriter is a reusable ResponseWriter for in-process benchmarks.
type discardWriter struct {
	h    http.Header
	code int
}

func (w *discardWriter) Header() http.Header         { return w.h }
func (w *discardWriter) WriteHeader(c int)           { w.code = c }
func (w *discardWriter) Write(b []byte) (int, error) { return len(b), nil }

// hitRequest is a read of pathConv as account A, with a writer to reuse.
func hitRequest() (*http.Request, *discardWriter) {
	req := httptest.NewRequest("GET", pathConv, nil)
	req.Header.Set("Authorization", basic(acctA, tokenA))
	return req, &discardWriter{h: http.Header{}}
}

// benchSetup runs the proxy as in production: the real clock, and the
// access log's JSON built and thrown away.
func benchSetup(s *setup) {
	s.opts.Logger = zerolog.New(io.Discard)
	s.opts.Clock = clock.Real{}
}

// BenchmarkHit measures the cache-hit path in process: routing, key
// (credential HMAC), lookup, response headers, and the access-log line
// (written to io.Discard, JSON still built).
func BenchmarkHit(b *testing.B) { benchHit(b, newHarness(b, benchSetup)) }

// BenchmarkHitWithFleet is BenchmarkHit with the fleet tier on (a real
// redis-server): an L1 hit makes no Redis call, so it should cost the same.
func BenchmarkHitWithFleet(b *testing.B) {
	h := newHarness(b, benchSetup, withFleet(redistest.Start(b).URL()))
	waitTrusted(b, h.inv)
	benchHit(b, h)
}

func benchHit(b *testing.B, h *harness) {
	h.get(pathConv)
	h.settle()
	req, w := hitRequest()
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
	h := newHarness(b, benchSetup)
	h.get(pathConv)
	h.settle()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		req, w := hitRequest()
		for pb.Next() {
			clear(w.h)
			h.p.ServeHTTP(w, req)
		}
	})
}

// BenchmarkHitUnderWrites is BenchmarkHitParallel with about one write in
// a hundred requests, from every P: each write invalidates another
// conversation's scopes (as a write through the sidecar does), so the
// epoch keeps moving while the hit entry stays valid. Compare writes=1%
// with writes=0% of the same run.
func BenchmarkHitUnderWrites(b *testing.B) {
	for _, every := range []int{0, 100} {
		name := "writes=0%"
		if every > 0 {
			name = "writes=1%"
		}
		b.Run(name, func(b *testing.B) {
			h := newHarness(b, benchSetup)
			h.get(pathConv)
			h.settle()
			var writes atomic.Int64
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				req, w := hitRequest()
				for i := 1; pb.Next(); i++ {
					if every > 0 && i%every == 0 {
						n := writes.Add(1)
						h.p.inv.Invalidate(context.Background(), []string{"conversations|conv:CH" + strconv.FormatInt(n%1000, 10)})
						continue
					}
					clear(w.h)
					h.p.ServeHTTP(w, req)
				}
			})
			b.StopTimer()
			if _, cs, _ := h.get(pathConv); cs[:16] != "cacheproxy; hit;" {
				b.Fatalf("the hit entry was invalidated: %q", cs)
			}
		})
	}
}

// BenchmarkColdMiss measures a cold participant read in process (each
// iteration a key never read: another query string), alone and with the
// fleet tier over a Toxiproxy link that adds 20 ms to everything Redis
// sends back: the difference is what Redis costs a cold miss (point 8 of
// the faults issue: at most 55 ms).
func BenchmarkColdMiss(b *testing.B) {
	b.Run("alone", func(b *testing.B) { benchCold(b, newHarness(b, benchSetup)) })
	b.Run("fleet_over_20ms", func(b *testing.B) {
		srv := redistest.Start(b)
		link := redistest.NewLink(b, srv.Addr)
		h := newHarness(b, benchSetup, withFleet(srv.URL()), through(link))
		waitTrusted(b, h.inv)
		link.Latency(b, 20)
		benchCold(b, h)
	})
}

func benchCold(b *testing.B, h *harness) {
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		req := httptest.NewRequest("GET", pathConv+"?PageSize="+strconv.Itoa(i), nil)
		req.Header.Set("Authorization", basic(acctA, tokenA))
		w := &discardWriter{h: http.Header{}}
		h.p.ServeHTTP(w, req)
		if cs := w.h.Get("Cache-Status"); w.code != 200 || cs != "cacheproxy; fwd=uri-miss; stored" {
			b.Fatalf("not a cold miss: %d %q", w.code, cs)
		}
	}
}

// BenchmarkHitTraced is BenchmarkHit with tracing on, every request
// sampled, its spans handed to an exporter that drops them: what tracing
// costs a hit (docs/tracing.md).
func BenchmarkHitTraced(b *testing.B) {
	tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()), sdktrace.WithSpanProcessor(sdktrace.NewSimpleSpanProcessor(dropSpans{})))
	b.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	tr := &tracing.Tracing{Provider: tp, Propagator: propagation.TraceContext{}}
	benchHit(b, newHarness(b, benchSetup, func(s *setup) { s.opts.Tracing = tr }))
}

// dropSpans is an exporter that drops what it is given.
type dropSpans struct{}

func (dropSpans) ExportSpans(context.Context, []sdktrace.ReadOnlySpan) error { return nil }
func (dropSpans) Shutdown(context.Context) error                             { return nil }
