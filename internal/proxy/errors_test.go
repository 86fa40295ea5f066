package proxy

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"regexp"
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
		s.opts.Logger, s.opts.LogOutput = zerolog.New(&warn).Level(zerolog.WarnLevel), &warn
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
		s.opts.Logger, s.opts.LogOutput = zerolog.New(lb), lb
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

// The access line's fields encoded in one value are the line zerolog
// writes field by field: the same bytes, or for a method JSON must escape,
// the same JSON.
func TestAccessFieldsAreTheLineZerologWrites(t *testing.T) {
	cred := newHarness(t).p.fp.lookup(basic(acctA, tokenA))
	stamp := []byte(`"2026-12-02T02:30:00Z"`)
	for _, tc := range []struct {
		method string
		status int
		rec    record
		exact  bool
	}{
		{"GET", 200, record{reqNum: 42}, true},
		{"GET", 200, record{reqID: "req-123", cred: cred}, true},
		{"POST", 503, record{reqNum: 7, cred: cred, viaUpstream: true, upstreamStatus: 503, upstreamDur: 1500 * time.Microsecond,
			calls: callStats{queueWait: 2 * time.Millisecond, retries: 2, tooMany: 1}}, true},
		{"HEAD", 499, record{reqNum: 1, viaUpstream: true}, true},
		{"G\"E\x01T\xff", 405, record{reqNum: 3}, false},
	} {
		var ref, got bytes.Buffer
		refLog, gotLog := zerolog.New(&ref), zerolog.New(&got)
		ev := refLog.Info().RawJSON("time", stamp)
		if tc.rec.reqID != "" {
			ev.Str("request_id", tc.rec.reqID)
		} else {
			ev.Str("request_id", "ab12-"+strconv.FormatUint(tc.rec.reqNum, 10))
		}
		ev.Str("method", tc.method).Int("status", tc.status)
		if tc.rec.viaUpstream {
			ev.Int("upstream_status", tc.rec.upstreamStatus).Int64("upstream_us", tc.rec.upstreamDur.Microseconds()).
				Int64("queue_wait_us", tc.rec.calls.queueWait.Microseconds()).Int("retries", tc.rec.calls.retries).Int("upstream_429s", tc.rec.calls.tooMany)
		}
		ev.Int64("bytes", 1234).Int64("duration_us", 567)
		if tc.rec.cred != nil {
			ev.RawJSON("account", tc.rec.cred.accountJSON())
		}
		ev.Msg("request")
		gotLog.Info().RawJSON("time", appendAccessFields(nil, stamp, tc.method, tc.status, &tc.rec, 1234, 567*time.Microsecond, "ab12-")).Msg("request")
		if tc.exact {
			if got.String() != ref.String() {
				t.Errorf("line\n%s\nwant zerolog's\n%s", got.String(), ref.String())
			}
			continue
		}
		var a, b map[string]any
		if err := json.Unmarshal(got.Bytes(), &a); err != nil {
			t.Fatalf("not JSON: %v\n%s", err, got.String())
		}
		if err := json.Unmarshal(ref.Bytes(), &b); err != nil || !reflect.DeepEqual(a, b) {
			t.Errorf("line\n%s\nwant the JSON of zerolog's\n%s", got.String(), ref.String())
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

// An info access line written to Options.LogOutput directly is the line
// Logger writes through a zerolog event, byte for byte: misses, hits,
// pass-throughs, answers without credentials, unrouted requests; and the
// lines that still go through zerolog (an error's) are unchanged.
func TestDirectAccessLinesAreTheLinesZerologWrites(t *testing.T) {
	dead := "http://" + deadUpstreamAddr(t)
	queueWait := regexp.MustCompile(`"queue_wait_us":[0-9]+`)
	// run returns the request lines written through zerolog events and,
	// with direct, those written to LogOutput (a buffer of their own, so
	// that a line's path shows).
	run := func(direct bool) (viaEvents, written []string) {
		var events syncBuffer
		h := newHarness(t, func(s *setup) {
			s.opts.Logger = zerolog.New(&events) // LogOutput: the harness's logs
			if !direct {
				s.opts.LogOutput = nil
			}
			s.cfg.Upstreams.Proxy.URL = dead // an error line
		})
		id := []string{"X-Request-Id", "req-1"}
		h.get(pathConv, id...) // a miss
		h.settle()
		h.get(pathConv, id...) // a hit
		h.get(pathV2, id...)
		for _, r := range []struct{ method, path, auth string }{
			{"HEAD", pathConv, basic(acctA, tokenA)},
			{"GET", pathConv, ""},                                       // no credential: the upstream's 401
			{"GET", "/v1/Conversations/" + conv1, basic(acctA, tokenA)}, // passed through
			{"GET", "/nowhere", basic(acctA, tokenA)},                   // unrouted
			{"GET", pathConv, basic(acctA, tokenA) + "x"},               // a wrong credential
			{"GET", pathProxy, basic(acctA, tokenA)},                    // 502: an error line
		} {
			resp := h.do(r.method, r.path, r.auth, id...)
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		requests := func(b *syncBuffer) (out []string) {
			for _, l := range strings.SplitAfter(b.String(), "\n") {
				if strings.Contains(l, `"message":"request"`) {
					// The budget's wait is timed on the real clock.
					out = append(out, queueWait.ReplaceAllString(l, `"queue_wait_us":0`))
				}
			}
			return out
		}
		return requests(&events), requests(h.logs)
	}
	viaEvents, direct := run(true)
	want, _ := run(false)
	// Lines with an error (here the unrouted request's and the 502's)
	// still go through an event; the two buffers interleave, so lines are
	// compared in sorted order.
	if len(direct) != 7 || len(viaEvents) != 2 || len(want) != 9 {
		t.Fatalf("%d lines written directly and %d through events, want 7 and the 2 with an error; %d through events alone, want 9:\n%s\n%s\n%s",
			len(direct), len(viaEvents), len(want), direct, viaEvents, want)
	}
	got := append(direct, viaEvents...)
	slices.Sort(got)
	slices.Sort(want)
	levels := map[string]bool{}
	for i := range got {
		if got[i] != want[i] {
			t.Errorf("line %d written directly\n%s\nwant zerolog's\n%s", i, got[i], want[i])
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(got[i]), &m); err != nil {
			t.Fatalf("not JSON: %v\n%s", err, got[i])
		}
		levels[m["level"].(string)] = true
	}
	if !levels["info"] || len(levels) < 2 {
		t.Errorf("levels %v: want info lines and at least one other", levels)
	}
}
