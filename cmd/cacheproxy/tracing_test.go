package main

import (
	"bytes"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"cacheproxy/internal/redistest"
	"cacheproxy/internal/twiliofake"

	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracev1 "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"
)

// otlpReceiver is an OTLP/HTTP traces endpoint in process: it decodes
// each export and keeps its spans and raw bytes.
type otlpReceiver struct {
	mu    sync.Mutex
	spans []*tracev1.Span
	raw   [][]byte
	got   chan struct{}
}

func (o *otlpReceiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	var req collectortrace.ExportTraceServiceRequest
	if r.URL.Path != "/v1/traces" || proto.Unmarshal(b, &req) != nil {
		http.Error(w, "bad export", http.StatusBadRequest)
		return
	}
	o.mu.Lock()
	o.raw = append(o.raw, b)
	for _, rs := range req.ResourceSpans {
		for _, ss := range rs.ScopeSpans {
			o.spans = append(o.spans, ss.Spans...)
		}
	}
	o.mu.Unlock()
	select {
	case o.got <- struct{}{}:
	default:
	}
	w.Header().Set("Content-Type", "application/x-protobuf")
	out, _ := proto.Marshal(&collectortrace.ExportTraceServiceResponse{})
	_, _ = w.Write(out)
}

// waitSpans waits (bounded) until the receiver holds spans named each of names.
func (o *otlpReceiver) waitSpans(t *testing.T, names ...string) map[string]*tracev1.Span {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		o.mu.Lock()
		byName := map[string]*tracev1.Span{}
		for _, s := range o.spans {
			byName[s.Name] = s
		}
		o.mu.Unlock()
		all := true
		for _, n := range names {
			all = all && byName[n] != nil
		}
		if all {
			return byName
		}
		select {
		case <-o.got:
		case <-deadline:
			t.Fatalf("spans %v never all arrived; got %v", names, byName)
		}
	}
}

// waitCount waits until n spans named name have arrived.
func (o *otlpReceiver) waitCount(t *testing.T, name string, n int) {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		o.mu.Lock()
		got := 0
		for _, s := range o.spans {
			if s.Name == name {
				got++
			}
		}
		o.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-o.got:
		case <-deadline:
			t.Fatalf("%d %q spans arrived, want %d", got, name, n)
		}
	}
}

func attr(s *tracev1.Span, key string) string {
	for _, kv := range s.Attributes {
		if kv.Key == key {
			if v := kv.Value.GetStringValue(); v != "" {
				return v
			}
			return strings.TrimSpace(kv.Value.String())
		}
	}
	return ""
}

// With an OTLP endpoint set, each request is a server span that continues
// the client's traceparent, with child spans for the fleet claim, the
// budget wait and the upstream call, whose traceparent the upstream sees
// (the same trace, the sidecar's span as parent); attributes name the
// route, the cache outcome in RFC 9211's words and the account, never a
// credential.
func TestTracingContinuesTheClientsTrace(t *testing.T) {
	recv := &otlpReceiver{got: make(chan struct{}, 1)}
	collector := httptest.NewServer(recv)
	defer collector.Close()
	fake, up := newFake(t)
	var upstreamParent string
	var mu sync.Mutex
	fake.Before = func(w http.ResponseWriter, r *http.Request) bool {
		mu.Lock()
		upstreamParent = r.Header.Get("traceparent")
		mu.Unlock()
		return false
	}
	srv := redistest.Start(t)
	p := start(t, upstreamConfig(up.URL), "OTEL_EXPORTER_OTLP_ENDPOINT="+collector.URL, "OTEL_BSP_SCHEDULE_DELAY=50",
		"OTEL_SERVICE_NAME=cacheproxy-test", "CACHEPROXY_REDIS_URL="+srv.URL(), "CACHEPROXY_CACHE_KEY_SECRET=tracing-secret-0123456789")
	waitFor(t, p, "connected to Redis: sharing entries and invalidations")
	const traceID, clientSpan = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	req, _ := http.NewRequest("GET", "http://"+p.addr+path, nil)
	req.Header.Set("Authorization", auth())
	req.Header.Set("traceparent", "00-"+traceID+"-"+clientSpan+"-01")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	spans := recv.waitSpans(t, "cacheproxy GET", "fleet.claim", "budget.wait", "upstream GET")
	server := spans["cacheproxy GET"]
	hex := hex.EncodeToString
	if hex(server.TraceId) != traceID || hex(server.ParentSpanId) != clientSpan || server.Kind != tracev1.Span_SPAN_KIND_SERVER {
		t.Fatalf("server span: trace %s parent %s kind %v; want the client's trace and span as parent", hex(server.TraceId), hex(server.ParentSpanId), server.Kind)
	}
	for _, want := range [][2]string{{"cacheproxy.cache_status", "fwd=uri-miss; stored"}, {"cacheproxy.account", acct}, {"http.route", "conversations.v1.participant"}} {
		if got := attr(server, want[0]); got != want[1] {
			t.Errorf("server span %s = %q, want %q", want[0], got, want[1])
		}
	}
	for _, name := range []string{"fleet.claim", "budget.wait", "upstream GET"} {
		if s := spans[name]; hex(s.TraceId) != traceID {
			t.Errorf("%s is in trace %s", name, hex(s.TraceId))
		}
	}
	upSpan := spans["upstream GET"]
	mu.Lock()
	parent := upstreamParent
	mu.Unlock()
	if want := "00-" + traceID + "-" + hex(upSpan.SpanId) + "-01"; parent != want {
		t.Fatalf("the upstream saw traceparent %q, want %q (the sidecar's upstream span as parent)", parent, want)
	}
	// A participant read by identity: the spans say its route and SIDs,
	// never the identity (the access log's rule).
	const identity = "alice.traced@example.com"
	fake.AddParticipant(conv, twiliofake.Participant{Sid: twiliofake.SID("MB", 77), Identity: identity})
	req, _ = http.NewRequest("GET", "http://"+p.addr+"/v1/Conversations/"+conv+"/Participants/"+url.PathEscape(identity), nil)
	req.Header.Set("Authorization", auth())
	if resp, err = http.DefaultClient.Do(req); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("a read by identity: %d", resp.StatusCode)
	}
	recv.waitCount(t, "cacheproxy GET", 2)
	recv.waitCount(t, "upstream GET", 2)
	recv.mu.Lock()
	defer recv.mu.Unlock()
	for _, b := range recv.raw {
		if bytes.Contains(b, []byte(token)) || bytes.Contains(b, []byte(strings.TrimPrefix(auth(), "Basic "))) {
			t.Fatal("a credential reached the traces")
		}
		if bytes.Contains(b, []byte("alice.traced")) {
			t.Fatal("an identity reached the traces")
		}
	}
}
