package proxy

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"cacheproxy/internal/twiliofake"
)

func TestParticipantReadsAreCached(t *testing.T) {
	for _, path := range []string{pathConv, pathSvc, pathProxy, pathV2} {
		t.Run(path, func(t *testing.T) {
			h := newHarness(t)
			fake := h.conv
			if path == pathProxy {
				fake = h.prox
			}
			status, cs, body1 := h.get(path)
			if status != 200 || cs != "cacheproxy; fwd=uri-miss; stored" {
				t.Fatalf("first read: %d %q %s", status, cs, body1)
			}
			h.settle()
			h.clk.Advance(7 * time.Second)
			resp := h.do(http.MethodGet, path, basic(acctA, tokenA))
			status, cs, body2 := readResp(t, resp)
			if status != 200 || cs != "cacheproxy; hit; ttl=23" || body2 != body1 {
				t.Fatalf("second read: %d %q", status, cs)
			}
			if age := resp.Header.Get("Age"); age != "7" {
				t.Fatalf("Age = %q, want 7", age)
			}
			if resp.Header.Get("Content-Type") != "application/json" || resp.Header.Get("Twilio-Request-Id") == "" {
				t.Fatalf("upstream headers not kept: %v", resp.Header)
			}
			if n := fake.Calls("GET", path); n != 1 {
				t.Fatalf("upstream calls = %d, want 1", n)
			}
			// HEAD is answered from the GET entry.
			resp = h.do(http.MethodHead, path, basic(acctA, tokenA))
			if _, cs, _ := readResp(t, resp); !strings.HasPrefix(cs, "cacheproxy; hit") || fake.Total() != 1 {
				t.Fatalf("HEAD: %q, upstream calls %d", cs, fake.Total())
			}
			// Past the TTL the entry is fetched again.
			h.clk.Advance(24 * time.Second)
			if _, cs, _ := h.get(path); cs != "cacheproxy; fwd=uri-miss; stored" || fake.Calls("GET", path) != 2 {
				t.Fatalf("after TTL: %q, calls %d", cs, fake.Calls("GET", path))
			}
		})
	}
}

func TestHeadMissThenGetHit(t *testing.T) {
	h := newHarness(t)
	status, _, body := readResp(t, h.do(http.MethodHead, pathConv, basic(acctA, tokenA)))
	if status != 200 || body != "" {
		t.Fatalf("HEAD: %d %q", status, body)
	}
	h.settle()
	if _, cs, body := h.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") || !strings.Contains(body, member1) {
		t.Fatalf("GET after HEAD: %q %s", cs, body)
	}
}

func TestNegativeCachingAndWhatIsNeverStored(t *testing.T) {
	h := newHarness(t)
	missing := "/v1/Conversations/" + conv1 + "/Participants/" + twiliofake.SID("MB", 99)
	if s, cs, _ := h.get(missing); s != 404 || cs != "cacheproxy; fwd=uri-miss; stored" {
		t.Fatalf("404: %d %q", s, cs)
	}
	h.settle()
	if s, cs, _ := h.get(missing); s != 404 || !strings.HasPrefix(cs, "cacheproxy; hit; ttl=") {
		t.Fatalf("404 again: %d %q", s, cs)
	}
	h.clk.Advance(6 * time.Second) // past negative_ttl (5s), within ttl (30s)
	if _, cs, _ := h.get(missing); !strings.HasPrefix(cs, "cacheproxy; fwd=uri-miss") || h.conv.Calls("GET", missing) != 2 {
		t.Fatalf("404 after negative TTL: %q calls %d", cs, h.conv.Calls("GET", missing))
	}

	for _, status := range []int{401, 403, 429, 500, 503} {
		t.Run(fmt.Sprint(status), func(t *testing.T) {
			path := pathV2 + fmt.Sprintf("?s=%d", status)
			h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
				if r.URL.RawQuery == fmt.Sprintf("s=%d", status) {
					if status == http.StatusTooManyRequests {
						w.Header().Set("Retry-After", "0") // retried at once, not on the harness's frozen clock
					}
					twiliofake.Error(w, status, 20000+status, "nope")
					return true
				}
				return false
			}
			defer func() { h.conv.Before = nil }()
			for i := 1; i <= 2; i++ {
				s, cs, _ := h.get(path)
				h.settle()
				if s != status || cs != "cacheproxy; fwd=uri-miss" {
					t.Fatalf("read %d: %d %q", i, s, cs)
				}
			}
			if n := h.conv.Calls("GET", pathV2); n < 2 {
				t.Fatalf("a %d was served from cache", status)
			}
		})
	}

	t.Run("no-store response", func(t *testing.T) {
		h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
			w.Header().Set("Cache-Control", "no-store")
			return false
		}
		defer func() { h.conv.Before = nil }()
		for i := 0; i < 2; i++ {
			if _, cs, _ := h.get(pathSvc + "?ns=1"); cs != "cacheproxy; fwd=uri-miss" {
				t.Fatalf("no-store response: %q", cs)
			}
			h.settle()
		}
	})
}

func TestBodiesOverTheLimitAreServedNotStored(t *testing.T) {
	h := newHarness(t, func(s *setup) { s.cfg.Cache.MaxEntryBytes = 100 })
	for i := 0; i < 2; i++ {
		s, cs, body := h.get(pathConv)
		h.settle()
		if s != 200 || cs != "cacheproxy; fwd=uri-miss" || !strings.Contains(body, member1) {
			t.Fatalf("read %d: %d %q", i, s, cs)
		}
	}
}

func TestClientCacheControl(t *testing.T) {
	h := newHarness(t)
	h.get(pathConv)
	h.settle()
	h.conv.SetAttributes(conv1, member1, `{"v":1}`) // written elsewhere

	if _, cs, body := h.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") || !strings.Contains(body, `{\"v\":0}`) {
		t.Fatalf("plain read should be the cached copy: %q", cs)
	}
	// no-store bypasses the cache: fresh data, nothing stored or refreshed.
	if _, cs, body := h.get(pathConv, "Cache-Control", "no-store"); cs != "cacheproxy; fwd=bypass" || !strings.Contains(body, `{\"v\":1}`) {
		t.Fatalf("no-store: %q %s", cs, body)
	}
	h.settle()
	if _, _, body := h.get(pathConv); !strings.Contains(body, `{\"v\":0}`) {
		t.Fatalf("no-store refreshed the entry")
	}
	// no-cache fetches fresh and refreshes the entry.
	if _, cs, body := h.get(pathConv, "Cache-Control", "no-cache"); cs != "cacheproxy; fwd=request; stored" || !strings.Contains(body, `{\"v\":1}`) {
		t.Fatalf("no-cache: %q %s", cs, body)
	}
	h.settle()
	if _, cs, body := h.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") || !strings.Contains(body, `{\"v\":1}`) {
		t.Fatalf("after no-cache: %q %s", cs, body)
	}
	if n := h.conv.Calls("GET", pathConv); n != 3 {
		t.Fatalf("upstream calls = %d, want 3", n)
	}
}

func TestQueryIsPartOfTheKey(t *testing.T) {
	h := newHarness(t)
	h.get(pathConv + "?a=1")
	h.settle()
	if _, cs, _ := h.get(pathConv + "?a=2"); !strings.HasPrefix(cs, "cacheproxy; fwd=uri-miss") {
		t.Fatalf("other query served from cache: %q", cs)
	}
}

func TestMemoryIsBoundedByMaxBytes(t *testing.T) {
	h := newHarness(t, func(s *setup) { s.cfg.Cache.MaxBytes = 1 << 20 })
	big := strings.Repeat("x", 20<<10)
	for i := 0; i < 200; i++ { // 200 x 20 KiB = 4 MiB offered to a 1 MiB cache
		sid := twiliofake.SID("MB", 5000+i)
		h.conv.AddParticipant(conv1, twiliofake.Participant{Sid: sid, Attributes: big})
		if s, _, _ := h.get("/v1/Conversations/" + conv1 + "/Participants/" + sid); s != 200 {
			t.Fatalf("read %d: %d", i, s)
		}
	}
	h.settle()
	st := h.store.Stats()
	if st.Bytes > 1<<20 || st.Bytes == 0 {
		t.Fatalf("cache holds %d bytes, want (0, %d]", st.Bytes, 1<<20)
	}
}

func TestCredentialIsolation(t *testing.T) {
	h := newHarness(t)
	_, _, bodyA := h.get(pathConv)
	h.settle()
	if jsonField(t, bodyA, "account_sid") != acctA {
		t.Fatalf("A got %s", bodyA)
	}
	// B, right token: its own fetch, its own body.
	s, cs, bodyB := readResp(t, h.do("GET", pathConv, basic(acctB, tokenB)))
	if s != 200 || !strings.HasPrefix(cs, "cacheproxy; fwd=uri-miss") || jsonField(t, bodyB, "account_sid") != acctB {
		t.Fatalf("B: %d %q %s", s, cs, bodyB)
	}
	// B with a wrong token, A's user with a wrong token, no credentials:
	// the upstream's 401, never A's body.
	for name, auth := range map[string]string{
		"B wrong token":  basic(acctB, "wrong"),
		"A wrong token":  basic(acctA, "wrong"),
		"no credentials": "",
		"garbage":        "Bearer " + tokenA[:8],
	} {
		s, _, body := readResp(t, h.do("GET", pathConv, auth))
		if s != 401 || strings.Contains(body, member1) {
			t.Fatalf("%s: %d %s", name, s, body)
		}
	}
}

// TestCredentialIsolationRace: A and B race on the same cold path while the
// upstream holds both; each gets its own answer.
func TestCredentialIsolationRace(t *testing.T) {
	flights := &countingFlights{joined: make(chan string, 16)}
	h := newHarness(t, func(s *setup) {}, func(s *setup) { s.opts.flights = flights })
	gate := make(chan struct{})
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool { <-gate; return false }
	type res struct {
		auth, body string
		status     int
	}
	results := make(chan res, 4)
	for _, auth := range []string{basic(acctA, tokenA), basic(acctB, tokenB), basic(acctB, "wrong"), basic(acctA, tokenA)} {
		go func() {
			s, _, body := readResp(t, h.do("GET", pathConv, auth))
			results <- res{auth, body, s}
		}()
	}
	keys := map[string]bool{}
	for i := 0; i < 4; i++ {
		keys[<-flights.joined] = true
	}
	if len(keys) != 3 {
		t.Fatalf("flights = %d, want 3 (A, B, B-wrong; A twice shares one)", len(keys))
	}
	close(gate)
	for i := 0; i < 4; i++ {
		r := <-results
		switch r.auth {
		case basic(acctA, tokenA):
			if r.status != 200 || jsonField(t, r.body, "account_sid") != acctA {
				t.Fatalf("A got %d %s", r.status, r.body)
			}
		case basic(acctB, tokenB):
			if r.status != 200 || jsonField(t, r.body, "account_sid") != acctB {
				t.Fatalf("B got %d %s", r.status, r.body)
			}
		default:
			if r.status != 401 {
				t.Fatalf("wrong token got %d %s", r.status, r.body)
			}
		}
	}
}

func TestCoalescing(t *testing.T) {
	const n = 50
	flights := &countingFlights{joined: make(chan string, n)}
	h := newHarness(t, func(s *setup) { s.opts.flights = flights })
	gate := make(chan struct{})
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool { <-gate; return false }

	// The first client leaves while the fetch is under way; the rest wait.
	firstCtx, leave := context.WithCancel(context.Background())
	firstDone := make(chan error, 1)
	go func() {
		req, _ := http.NewRequestWithContext(firstCtx, "GET", h.srv.URL+pathConv, nil)
		req.Header.Set("Authorization", basic(acctA, tokenA))
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		firstDone <- err
	}()
	<-flights.joined

	var wg sync.WaitGroup
	statuses := make(chan string, n)
	for i := 1; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, cs, body := h.get(pathConv)
			statuses <- fmt.Sprintf("%d %s %v", s, cs, strings.Contains(body, member1))
		}()
	}
	for i := 1; i < n; i++ {
		<-flights.joined
	}
	leave()
	if err := <-firstDone; err == nil {
		t.Fatalf("first client was answered although it left")
	}
	close(gate)
	wg.Wait()
	close(statuses)
	for s := range statuses {
		if s != "200 cacheproxy; fwd=uri-miss; collapsed true" {
			t.Fatalf("waiter got %q", s)
		}
	}
	if c := h.conv.Calls("GET", pathConv); c != 1 {
		t.Fatalf("upstream calls = %d, want 1", c)
	}
	h.settle()
	if _, cs, _ := h.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") {
		t.Fatalf("the detached fetch did not store its result: %q", cs)
	}
}

// TestWaiterLeavesAtOnce: a waiter whose own context ends returns while the
// shared fetch is still held upstream.
func TestWaiterLeavesAtOnce(t *testing.T) {
	h := newHarness(t)
	gate := make(chan struct{})
	arrived := make(chan struct{}, 1)
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool { arrived <- struct{}{}; <-gate; return false }
	defer close(gate)
	go h.get(pathConv) // the leader, held upstream
	<-arrived

	ctx, cancel := context.WithCancel(context.Background())
	req := httptestRequest(ctx, pathConv, basic(acctA, tokenA))
	w := newTrackingWriter()
	done := make(chan struct{})
	go func() { h.p.ServeHTTP(w, req); close(done) }()
	cancel()
	<-done // returns although the upstream is still held
	if w.wrote {
		t.Fatalf("a client that left was answered with %d", w.code)
	}
	if !strings.Contains(h.logs.String(), `"status":499`) {
		t.Fatalf("client gone not logged: %s", h.logs.String())
	}
}

type panicTransport struct{ http.RoundTripper }

func (p panicTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if strings.Contains(r.URL.Path, "/Participants/") && r.Method == "GET" {
		panic("boom")
	}
	return p.RoundTripper.RoundTrip(r)
}

func TestPanicInFetchIsA502(t *testing.T) {
	h := newHarness(t, func(s *setup) { s.opts.Transport = panicTransport{NewTransport()} })
	for i := 0; i < 3; i++ {
		s, _, body := h.get(pathConv)
		checkTwilioError(t, s, body, 502)
	}
	// The process lives on: pass-through still works.
	if s, _, _ := h.get("/v1/Conversations"); s != 200 {
		t.Fatalf("after panics: %d", s)
	}
}

func TestFingerprintMemoMatchesHMAC(t *testing.T) {
	f := newFingerprinter([]byte("k"))
	g := newFingerprinter([]byte("k")) // same secret, other memo seeds
	other := newFingerprinter([]byte("other"))
	for i := 0; i < 3*fpMemoSize; i++ { // more headers than slots: evictions
		auth := basic(acctA, fmt.Sprint("token", i))
		a := string(f.lookup(auth).hex[:])
		b := string(f.lookup(auth).hex[:]) // memoised
		c := string(g.lookup(auth).hex[:])
		if a != b || a != c || len(a) != 32 {
			t.Fatalf("fingerprint of %d differs: %s %s %s", i, a, b, c)
		}
		if a == string(other.lookup(auth).hex[:]) {
			t.Fatal("fingerprint does not depend on the secret")
		}
		if strings.Contains(a, "token") {
			t.Fatal("fingerprint holds the token")
		}
	}
	if f.lookup(basic(acctA, "x")).hex == f.lookup(basic(acctA, "y")).hex {
		t.Fatal("different credentials share a fingerprint")
	}
	// The memo also holds the account SID, and only for SID users.
	for _, tc := range []struct{ auth, want string }{
		{basic(acctA, tokenA), acctA}, {basic(acctB, tokenB), acctB},
		{basic("someone", tokenA), ""}, {"Bearer " + tokenA, ""},
	} {
		for range 2 {
			if got := string(f.lookup(tc.auth).Account()); got != tc.want {
				t.Fatalf("account of %q = %q, want %q", tc.auth[:10], got, tc.want)
			}
		}
	}
}

func TestHitHeadersTable(t *testing.T) {
	h := newHitHeaders(2 * time.Hour) // longer than the table: the rest is formatted
	for _, i := range []int{0, 1, 59, maxHitHeaders - 1, maxHitHeaders, 7200, -1} {
		hit, age := h.hit(i), h.age(i)
		if len(hit) != 1 || hit[0] != "cacheproxy; hit; ttl="+strconv.Itoa(i) || len(age) != 1 || age[0] != strconv.Itoa(i) {
			t.Fatalf("%d: %q %q", i, hit, age)
		}
		if cap(hit) != 1 || cap(age) != 1 {
			t.Fatalf("%d: shared values not clipped: cap %d, %d", i, cap(hit), cap(age))
		}
	}
	if n := len(newHitHeaders(30 * time.Second).hits); n != 31 {
		t.Fatalf("table for 30 s has %d values", n)
	}
}
