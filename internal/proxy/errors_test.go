package proxy

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"cacheproxy/internal/config"
	"cacheproxy/internal/logbuf"

	"github.com/rs/zerolog"
)

func TestUpstreamUnreachableIs502(t *testing.T) {
	dead := "http://" + deadUpstreamAddr(t)
	h := newHarnessWithURLs(t, dead, dead)
	for _, tc := range []struct{ method, path string }{{"GET", pathConv}, {"POST", "/v1/Conversations"}, {"GET", "/v2/Conversations"}} {
		s, _, body := readResp(t, h.do(tc.method, tc.path, basic(acctA, tokenA)))
		checkTwilioError(t, s, body, http.StatusBadGateway)
	}
}

// newHarnessWithURLs is a harness whose upstream URLs are replaced.
func newHarnessWithURLs(t *testing.T, conv, prox string) *harness {
	return newHarness(t, func(s *setup) {
		s.cfg.Upstreams.Conversations.URL, s.cfg.Upstreams.Proxy.URL = conv, prox
	})
}

func TestUpstreamTimeoutIs504(t *testing.T) {
	hang := make(chan struct{})
	defer close(hang)
	h := newHarness(t, func(s *setup) {
		s.cfg.Upstreams.Conversations.Timeout = config.Duration(50 * time.Millisecond)
	})
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		select {
		case <-hang:
		case <-r.Context().Done():
		}
		return true
	}
	for _, tc := range []struct{ method, path string }{{"GET", pathConv}, {"POST", pathConv}, {"GET", "/v1/Conversations"}} {
		s, _, body := readResp(t, h.do(tc.method, tc.path, basic(acctA, tokenA)))
		checkTwilioError(t, s, body, http.StatusGatewayTimeout)
	}
}

func TestHugeBodyIs413(t *testing.T) {
	h := newHarness(t, func(s *setup) { s.cfg.Server.MaxBodyBytes = 1 << 10 })
	// Known length: refused before anything is sent upstream.
	s, _, body := readResp(t, h.doBody("POST", pathConv, basic(acctA, tokenA), strings.NewReader(strings.Repeat("a", 4<<10))))
	checkTwilioError(t, s, body, http.StatusRequestEntityTooLarge)
	if h.conv.Total() != 0 {
		t.Fatalf("oversized body reached the upstream")
	}
	// Unknown length (chunked): cut off while streaming.
	s, _, body = readResp(t, h.doBody("POST", pathConv, basic(acctA, tokenA), struct{ *strings.Reader }{strings.NewReader(strings.Repeat("a", 64<<10))}))
	checkTwilioError(t, s, body, http.StatusRequestEntityTooLarge)
}

func TestClientGoneIsLoggedNotAnswered(t *testing.T) {
	h := newHarness(t)
	gate := make(chan struct{})
	arrived := make(chan struct{}, 2)
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool { arrived <- struct{}{}; <-gate; return false }
	defer close(gate)
	for _, method := range []string{"POST", "GET"} { // pass-through and cached
		ctx, cancel := context.WithCancel(context.Background())
		req := httptestRequest(ctx, pathConv, basic(acctA, tokenA))
		req.Method = method
		w := newTrackingWriter()
		done := make(chan struct{})
		go func() { h.p.ServeHTTP(w, req); close(done) }()
		<-arrived
		cancel()
		<-done
		if w.wrote {
			t.Fatalf("%s: client that went away got %d", method, w.code)
		}
	}
	n := 0
	for _, l := range h.logs.lines(t) {
		if l["message"] == "request" && l["status"] == float64(499) {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("want 2 access-log lines with status 499, got %d:\n%s", n, h.logs.String())
	}
}

func TestAccessLogLine(t *testing.T) {
	h := newHarness(t)
	h.get(pathConv)
	h.settle()
	h.get(pathConv, "X-Request-Id", "req-123")
	lines := h.logs.lines(t)
	var got []map[string]any
	for _, l := range lines {
		if l["message"] == "request" {
			got = append(got, l)
		}
	}
	if len(got) != 2 {
		t.Fatalf("want one line per request, got %d", len(got))
	}
	for _, f := range []string{"request_id", "method", "route", "upstream", "status", "cache", "upstream_status", "upstream_us", "queue_wait_us", "retries", "bytes", "duration_us", "account"} {
		if _, ok := got[0][f]; !ok {
			t.Errorf("access log lacks %q: %v", f, got[0])
		}
	}
	if got[0]["cache"] != "miss" || got[1]["cache"] != "hit" || got[1]["request_id"] != "req-123" ||
		got[0]["route"] != "conversations.v1.participant" || got[0]["account"] != acctA || got[0]["upstream_status"] != float64(200) ||
		got[0]["bytes"].(float64) < 100 {
		t.Fatalf("access log lines wrong:\n%v\n%v", got[0], got[1])
	}
	// A hit made no upstream call: no upstream fields rather than zeros.
	for _, f := range []string{"upstream_status", "upstream_us", "queue_wait_us", "retries", "upstream_429s"} {
		if _, ok := got[1][f]; ok {
			t.Errorf("hit's access log has %q: %v", f, got[1])
		}
	}
}

// jsonKeys are the keys of one JSON object, in their order.
func jsonKeys(t *testing.T, line string) []string {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(line))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		t.Fatalf("not a JSON object: %q", line)
	}
	var keys []string
	for dec.More() {
		k, err := dec.Token()
		if err != nil {
			t.Fatalf("%q: %v", line, err)
		}
		keys = append(keys, k.(string))
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			t.Fatalf("%q: %v", line, err)
		}
	}
	return keys
}

// An access line has the fields of the line zerolog wrote field by field,
// in that order, the level first; a logger's level drops the lines below
// it and keeps those at or above it.
func TestAccessLineFieldsInOrderAndLevels(t *testing.T) {
	h := newHarness(t)
	h.get(pathConv)
	h.settle()
	h.get(pathConv)
	var got []string
	for _, l := range strings.Split(strings.TrimSpace(h.logs.String()), "\n") {
		if strings.Contains(l, `"message":"request"`) {
			got = append(got, l)
		}
	}
	if len(got) != 2 {
		t.Fatalf("want 2 access lines, got %d", len(got))
	}
	miss := []string{"level", "route", "upstream", "cache", "time", "request_id", "method", "status", "upstream_status", "upstream_us",
		"queue_wait_us", "retries", "upstream_429s", "bytes", "duration_us", "account", "message"}
	hit := slices.DeleteFunc(slices.Clone(miss), func(k string) bool {
		return strings.HasPrefix(k, "upstream_") || k == "queue_wait_us" || k == "retries"
	})
	for i, want := range [][]string{miss, hit} {
		if keys := jsonKeys(t, got[i]); !slices.Equal(keys, want) || !strings.HasPrefix(got[i], `{"level":"info",`) {
			t.Errorf("line %s\nkeys %q\nwant %q", got[i], keys, want)
		}
	}
	requests := func(b *syncBuffer) (out []map[string]any) {
		for _, l := range b.lines(t) {
			if l["message"] == "request" {
				out = append(out, l)
			}
		}
		return out
	}
	// At warn level an info line is dropped and an error line kept.
	var warn syncBuffer
	dead := newHarness(t, func(s *setup) {
		s.opts.Logger = zerolog.New(&warn).Level(zerolog.WarnLevel)
		s.cfg.Upstreams.Proxy.URL = "http://" + deadUpstreamAddr(t)
	})
	dead.get(pathConv)
	status, _, _ := readResp(t, dead.do("GET", pathProxy, basic(acctA, tokenA)))
	if lines := requests(&warn); status != http.StatusBadGateway || len(lines) != 1 || lines[0]["level"] != "error" ||
		lines[0]["status"] != float64(502) || lines[0]["error"] == nil {
		t.Fatalf("at warn level: status %d, lines %v", status, lines)
	}
	// Through a buffering level writer an info line waits for the flush,
	// an error line is written at once.
	var out syncBuffer
	lb := logbuf.New(&out, 1<<20)
	buffered := newHarness(t, func(s *setup) {
		s.opts.Logger = zerolog.New(lb)
		s.cfg.Upstreams.Proxy.URL = "http://" + deadUpstreamAddr(t)
	})
	buffered.get(pathConv)
	if lines := requests(&out); len(lines) != 0 {
		t.Fatalf("an info line was written before the flush: %v", lines)
	}
	buffered.do("GET", pathProxy, basic(acctA, tokenA)).Body.Close()
	if lines := requests(&out); len(lines) != 2 || lines[0]["level"] != "info" || lines[1]["level"] != "error" {
		t.Fatalf("after an error line: %v, want the info line and the error line written", lines)
	}
}

// The access line holds its fields in this order, with these names and
// types, after its context (route, upstream, cache): a line built field by
// field with zerolog is the line logRequest writes, byte for byte.
func TestAccessLineFields(t *testing.T) {
	h := newHarness(t)
	cred := h.p.fp.lookup(basic(acctA, tokenA))
	for _, tc := range []struct {
		method string
		status int
		rec    record
	}{
		{"GET", 200, record{reqNum: 42}},
		{"GET", 200, record{reqID: "req-123", cred: cred}},
		{"POST", 503, record{reqNum: 7, cred: cred, viaUpstream: true, upstreamStatus: 503, upstreamDur: 1500 * time.Microsecond,
			calls: callStats{queueWait: 2 * time.Millisecond, retries: 2, tooMany: 1}, errMsg: "upstream \"failed\""}},
		{"HEAD", 499, record{reqNum: 1, viaUpstream: true}},
		{"G\"E\x01T\xff", 405, record{reqNum: 3}},
	} {
		var got, ref syncBuffer
		p := h.p
		p.access = accessLoggers(zerolog.New(&got)) // this test's line only
		tc.rec.start, tc.rec.cache = h.clk.Now(), outcomeNone
		r := httptest.NewRequest("GET", "/", nil)
		r.Method = tc.method
		w := &recordWriter{status: tc.status, bytes: 1234}
		if tc.status == 499 {
			w.status = 0 // the client left before an answer
		}
		p.logRequest(r, &tc.rec, w)
		lvl := zerolog.InfoLevel
		if tc.status >= 500 {
			lvl = zerolog.ErrorLevel
		}
		ev := accessLoggers(zerolog.New(&ref))[0][outcomeNone].WithLevel(lvl).Str("time", h.clk.Now().UTC().Format(time.RFC3339))
		if tc.rec.reqID != "" {
			ev.Str("request_id", tc.rec.reqID)
		} else {
			ev.Str("request_id", h.p.ids.prefix+strconv.FormatUint(tc.rec.reqNum, 10))
		}
		ev.Str("method", tc.method).Int("status", tc.status)
		if tc.rec.viaUpstream {
			ev.Int("upstream_status", tc.rec.upstreamStatus).Int64("upstream_us", tc.rec.upstreamDur.Microseconds()).
				Int64("queue_wait_us", tc.rec.calls.queueWait.Microseconds()).Int("retries", tc.rec.calls.retries).Int("upstream_429s", tc.rec.calls.tooMany)
		}
		ev.Int64("bytes", 1234).Int64("duration_us", 0)
		if tc.rec.cred != nil {
			ev.RawJSON("account", tc.rec.cred.accountJSON())
		}
		if tc.rec.errMsg != "" {
			ev.Str("error", tc.rec.errMsg)
		}
		ev.Msg("request")
		if got.String() != ref.String() {
			t.Errorf("line\n%s\nwant\n%s", got.String(), ref.String())
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(got.String()), &m); err != nil {
			t.Errorf("not JSON: %v\n%s", err, got.String())
		}
	}
}

// TestNoCredentialInLogs drives every path a request can take, at debug
// level, and checks that no log line holds a token or Authorization value.
func TestNoCredentialInLogs(t *testing.T) {
	h := newHarness(t)
	panicky := newHarness(t, func(s *setup) { s.opts.Transport = panicTransport{NewTransport()} })
	panicky.logs = h.logs
	authA, authB, wrong := basic(acctA, tokenA), basic(acctB, tokenB), basic(acctA, "wrongSECRETwrong")
	for _, auth := range []string{authA, authB, wrong, "Bearer " + tokenA, "Basic !!!" + tokenB} {
		h.do("GET", pathConv, auth).Body.Close()
		h.do("GET", pathConv, auth).Body.Close()
		h.do("POST", pathConv, auth).Body.Close()
		h.do("GET", "/nowhere", auth).Body.Close()
		h.do("GET", "/v1/Services", auth).Body.Close()
		panicky.do("GET", pathV2, auth).Body.Close()
	}
	logs := h.logs.String() + panicky.logs.String()
	if !strings.Contains(logs, `"message":"request"`) {
		t.Fatalf("no access log written")
	}
	for _, secret := range []string{tokenA, tokenB, "wrongSECRETwrong", authA, authB, wrong,
		base64.StdEncoding.EncodeToString([]byte(acctA + ":" + tokenA)), "Authorization", "Basic "} {
		if strings.Contains(logs, secret) {
			t.Fatalf("logs contain %q", secret)
		}
	}
}

// TestUnroutedPathNotLogged: the client's 404 names its path; the access
// log does not (a path can hold a participant's identity).
func TestUnroutedPathNotLogged(t *testing.T) {
	h := newHarness(t)
	for _, path := range []string{"/nowhere/jane@example.com", "/v1/Services/jane@example.com/Participants"} {
		status, _, body := readResp(t, h.do("GET", path, basic(acctA, tokenA)))
		if status != 404 || !strings.Contains(string(body), "jane@example.com") {
			t.Fatalf("%s: %d %s", path, status, body)
		}
	}
	logs := h.logs.String()
	if strings.Count(logs, `"status":404`) != 2 || strings.Contains(logs, "jane@example.com") {
		t.Fatalf("access log names the path or lacks the lines:\n%s", logs)
	}
}

// A client's X-Request-Id is echoed and logged only when it is short and
// printable: otherwise the line gets the sidecar's own id, and nothing of
// the client's is echoed.
func TestOnlyAPlainRequestIDIsKept(t *testing.T) {
	h := newHarness(t)
	for _, id := range []string{"ok-1", "has space", `has"quote`, "back\\slash", "ctl\x01", "caf\xc3\xa9", strings.Repeat("x", 65), strings.Repeat("y", 64)} {
		req := httptest.NewRequest("GET", pathConv, nil)
		req.Header.Set("Authorization", basic(acctA, tokenA))
		req.Header["X-Request-Id"] = []string{id}
		w := &discardWriter{h: http.Header{}}
		before := len(h.logs.lines(t))
		h.p.ServeHTTP(w, req)
		lines := h.logs.lines(t)[before:]
		var logged any
		for _, l := range lines {
			if l["message"] == "request" {
				logged = l["request_id"]
			}
		}
		keep := id == "ok-1" || id == strings.Repeat("y", 64)
		if echoed := w.h.Get("X-Request-Id"); keep != (echoed == id) || keep != (logged == id) || logged == nil || (!keep && echoed != "") {
			t.Errorf("X-Request-Id %q: echoed %q, logged %v (keep: %v)", id, echoed, logged, keep)
		}
	}
}
