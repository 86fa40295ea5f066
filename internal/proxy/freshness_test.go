package proxy

import (
	"net/http"
	"net/url"
	"strings"
	"testing"

	"cacheproxy/internal/twiliofake"
)

// update writes through the proxy as account B (another credential than
// the reader's) with the API's own verb and body.
func (h *harness) update(method, path, attrs string) {
	h.t.Helper()
	var body, ctype string
	if strings.HasPrefix(path, "/v2/") {
		body, ctype = `{"name":"`+attrs+`"}`, "application/json"
	} else {
		body, ctype = url.Values{"Attributes": {attrs}}.Encode(), "application/x-www-form-urlencoded"
	}
	s, _, b := readResp(h.t, h.doBody(method, path, basic(acctB, tokenB), strings.NewReader(body), "Content-Type", ctype))
	if s >= 300 {
		h.t.Fatalf("%s %s: %d %s", method, path, s, b)
	}
}

func TestWritesInvalidateForEveryCredential(t *testing.T) {
	tests := []struct {
		name, read, writeMethod, write string
		fresh                          string // what the next read must contain
		deleted                        bool
	}{
		{"v1 participant update", pathConv, "POST", pathConv, "new-v1", false},
		{"v1 read by identity, update by sid", "/v1/Conversations/" + conv1 + "/Participants/alice@example.com", "POST", pathConv, "new-id", false},
		{"v1 read by unique name, update by sid", "/v1/Conversations/support-room/Participants/" + member1, "POST", pathConv, "new-un", false},
		{"v1 service form read, plain form update", pathSvc, "POST", "/v1/Conversations/" + conv2 + "/Participants/" + member2, "new-svc", false},
		{"v1 conversation delete", pathConv, "DELETE", "/v1/Conversations/" + conv1, "", true},
		{"v1 delete by unique name, read by sid", pathConv, "DELETE", "/v1/Conversations/support-room", "", true},
		{"v1 participant delete", pathConv, "DELETE", pathConv, "", true},
		{"v1 user conversation write", pathConv, "DELETE", "/v1/Users/US1/Conversations/" + conv1, "", false},
		{"v2 participant update", pathV2, "PUT", pathV2, "new-v2", false},
		{"proxy participant delete", pathProxy, "DELETE", pathProxy, "", true},
		{"proxy session update", pathProxy, "POST", "/v1/Services/" + ksvc + "/Sessions/" + sess1, "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			fake := h.conv
			if strings.Contains(tc.read, "/Sessions/") {
				fake = h.prox
			}
			h.get(tc.read)
			h.settle()
			if _, cs, _ := h.get(tc.read); !strings.HasPrefix(cs, "cacheproxy; hit") {
				t.Fatalf("not cached before the write: %q", cs)
			}
			before := fake.Total()
			h.update(tc.writeMethod, tc.write, tc.fresh)
			s, cs, body := h.get(tc.read)
			if strings.HasPrefix(cs, "cacheproxy; hit") || fake.Total() != before+2 {
				t.Fatalf("read after write served from cache: %q", cs)
			}
			if tc.deleted && s != 404 {
				t.Fatalf("read after delete: %d %s", s, body)
			}
			if tc.fresh != "" && !strings.Contains(body, tc.fresh) {
				t.Fatalf("read after write: %s, want %s", body, tc.fresh)
			}
		})
	}
}

func TestWriteCreatingAParticipantClearsA404(t *testing.T) {
	h := newHarness(t)
	newSid := twiliofake.SID("MB", 1001) // what the fake assigns to conv1's second participant
	path := "/v1/Conversations/" + conv1 + "/Participants/" + newSid
	if s, _, _ := h.get(path); s != 404 {
		t.Fatalf("want 404 first, got %d", s)
	}
	h.settle()
	h.update("POST", "/v1/Conversations/"+conv1+"/Participants", "created")
	if s, _, body := h.get(path); s != 200 || !strings.Contains(body, "created") {
		t.Fatalf("negative entry survived the create: %d %s", s, body)
	}
}

// TestReadAfterWriteNeverSeesOlderData is the race of docs/architecture.md
// "Freshness": read R1 starts a fetch that the upstream answers with
// pre-write data; a write completes; read R2 arrives after the write's
// response and must neither join R1's fetch nor find its result cached.
func TestReadAfterWriteNeverSeesOlderData(t *testing.T) {
	for _, read := range []string{pathConv, "/v1/Conversations/support-room/Participants/alice@example.com", pathV2, pathProxy} {
		t.Run(read, func(t *testing.T) {
			flights := &countingFlights{joined: make(chan string, 4)}
			h := newHarness(t, func(s *setup) { s.opts.flights = flights })
			fake, write, method := h.conv, pathConv, "POST"
			switch read {
			case pathV2:
				write, method = pathV2, "PUT"
			case pathProxy:
				fake, write, method = h.prox, "/v1/Services/"+ksvc+"/Sessions/"+sess1, "POST"
			}
			// R1's fetch reads the data, then is held before answering.
			gate := make(chan struct{})
			held := make(chan struct{})
			first := true
			fake.Before = func(w http.ResponseWriter, r *http.Request) bool {
				if r.Method == "GET" && first {
					first = false
					rec := &bufferedWriter{h: http.Header{}}
					fake.Before = nil
					fake.ServeHTTP(rec, r) // the pre-write answer
					close(held)
					<-gate
					rec.copyTo(w)
					return true
				}
				return false
			}
			r1 := make(chan string, 1)
			go func() { _, _, b := h.get(read); r1 <- b }()
			<-flights.joined
			<-held
			h.update(method, write, "after-write") // the write's response has been sent

			r2 := make(chan string, 1)
			go func() { _, _, b := h.get(read); r2 <- b }()
			<-flights.joined
			body2 := <-r2 // must not wait for R1's held fetch
			close(gate)
			body1 := <-r1
			h.settle()
			_, _, body3 := h.get(read)
			if fake.Calls("GET", strings.SplitN(read, "?", 2)[0]) < 2 {
				t.Fatalf("R2 joined R1's fetch")
			}
			if read == pathProxy {
				// A session update changes no participant field in the fake;
				// what matters is that R2 fetched anew (checked above) and
				// R1's pre-write result was not stored.
				if _, cs, _ := h.get(read); !strings.HasPrefix(cs, "cacheproxy; hit") {
					t.Fatalf("R2's result was not stored: %q", cs)
				}
				return
			}
			if !strings.Contains(body2, "after-write") || !strings.Contains(body3, "after-write") {
				t.Fatalf("read after write saw old data:\nR1 %s\nR2 %s\nR3 %s", body1, body2, body3)
			}
		})
	}
}

// bufferedWriter captures a response to replay it later.
type bufferedWriter struct {
	h    http.Header
	code int
	body []byte
}

func (b *bufferedWriter) Header() http.Header { return b.h }
func (b *bufferedWriter) WriteHeader(c int)   { b.code = c }
func (b *bufferedWriter) Write(p []byte) (int, error) {
	b.body = append(b.body, p...)
	return len(p), nil
}
func (b *bufferedWriter) copyTo(w http.ResponseWriter) {
	for k, v := range b.h {
		w.Header()[k] = v
	}
	w.WriteHeader(b.code)
	_, _ = w.Write(b.body)
}

// Hostile input, point 2: a write that Twilio refused changed nothing, so
// it invalidates nothing: after a POST without credentials, a DELETE of a
// conversation with a wrong token and a POST to a conversation by a name
// that widens to every conversation, each answered 401, both tenants'
// entries are still hits. A write answered 404 or 5xx may have changed
// something, and does invalidate.
func TestRefusedWritesInvalidateNothing(t *testing.T) {
	h := newHarness(t)
	tenants := map[string]string{"A": basic(acctA, tokenA), "B": basic(acctB, tokenB)}
	fill := func() {
		t.Helper()
		for name, auth := range tenants {
			readResp(t, h.do("GET", pathConv, auth))
			if _, cs, _ := readResp(t, h.do("GET", pathConv, auth)); !strings.HasPrefix(cs, "cacheproxy; hit") {
				t.Fatalf("tenant %s: %q, want a hit", name, cs)
			}
		}
	}
	fill()
	form := "Attributes=%7B%7D"
	refused := []struct{ method, path, auth string }{
		{"POST", pathConv, ""},
		{"DELETE", "/v1/Conversations/" + conv1, basic(acctA, "wrong-token")},
		{"POST", "/v1/Conversations/anything/Participants/" + member1, basic(acctA, "wrong-token")},
	}
	for _, w := range refused {
		s, _, _ := readResp(t, h.doBody(w.method, w.path, w.auth, strings.NewReader(form), "Content-Type", "application/x-www-form-urlencoded"))
		if s != http.StatusUnauthorized {
			t.Fatalf("%s %s: %d, want Twilio's 401", w.method, w.path, s)
		}
		for name, auth := range tenants {
			if _, cs, _ := readResp(t, h.do("GET", pathConv, auth)); !strings.HasPrefix(cs, "cacheproxy; hit") {
				t.Errorf("tenant %s after a refused %s %s: %q, want a hit", name, w.method, w.path, cs)
			}
		}
	}
	for _, status := range []int{http.StatusNotFound, http.StatusServiceUnavailable} {
		fill()
		h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
			if r.Method != "POST" {
				return false
			}
			twiliofake.Error(w, status, 20000+status, "refused by the test")
			return true
		}
		readResp(t, h.doBody("POST", pathConv, basic(acctA, tokenA), strings.NewReader(form), "Content-Type", "application/x-www-form-urlencoded"))
		h.conv.Before = nil
		if _, cs, _ := readResp(t, h.do("GET", pathConv, basic(acctB, tokenB))); !strings.HasPrefix(cs, "cacheproxy; fwd=uri-miss") {
			t.Errorf("after a write answered %d: %q, want a miss", status, cs)
		}
	}
}
