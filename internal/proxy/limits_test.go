package proxy

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cacheproxy/internal/config"
	"cacheproxy/internal/twiliofake"

	"go.uber.org/goleak"
)

// tightBudget: 1 call per second, a 1 ms wait bound, on the budget's fake
// clock. The first call takes the second's only slot at once; any other
// call in that second is refused once its 1 ms has passed (waitedOut).
func tightBudget(s *setup) {
	s.budgetOnFakeClock = true
	s.cfg.RateLimit.RequestsPerSecond, s.cfg.RateLimit.MaxWait = 1, config.Duration(time.Millisecond)
	s.cfg.RateLimit.MaxConcurrent = 100
}

func check429(t *testing.T, resp *http.Response) {
	t.Helper()
	s, _, body := readResp(t, resp)
	checkTwilioError(t, s, body, http.StatusTooManyRequests)
	if !strings.Contains(body, `"code":20429`) || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("rejection lacks code 20429 or Retry-After: %v %s", resp.Header, body)
	}
}

func TestHitsAndCoalescedGroupsCostNoExtraSlots(t *testing.T) {
	const n = 30
	flights := &countingFlights{joined: make(chan string, n)}
	h := newHarness(t, tightBudget, func(s *setup) { s.opts.flights = flights })
	gate := make(chan struct{})
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool { <-gate; return false }
	var wg sync.WaitGroup
	var ok atomic.Int64
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if s, _, _ := h.get(pathConv); s == 200 {
				ok.Add(1)
			}
		}()
	}
	for i := 0; i < n; i++ {
		<-flights.joined
	}
	close(gate)
	wg.Wait()
	if ok.Load() != n {
		t.Fatalf("%d of %d coalesced reads succeeded on a one-slot budget", ok.Load(), n)
	}
	h.settle()
	for i := 0; i < 100; i++ { // hits never touch the limiter
		if _, cs, _ := h.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") {
			t.Fatalf("hit %d: %q", i, cs)
		}
	}
	// The budget is spent: the next cold read is refused.
	check429(t, h.waitedOut("GET", pathV2, basic(acctA, tokenA)))
	// Another account has its own budget.
	if s, _, _ := readResp(t, h.do("GET", pathV2, basic(acctB, tokenB))); s != 200 {
		t.Fatalf("account B: %d", s)
	}
	if sum := h.p.Summary(); sum.Rejections != 1 || sum.UpstreamCalls != 2 {
		t.Fatalf("summary: %+v", sum)
	}
}

func TestWritesCountAgainstTheSameBudget(t *testing.T) {
	h := newHarness(t, tightBudget)
	h.update("POST", pathConv, "x") // as account B: takes B's slot
	check429(t, h.waitedOut("GET", pathConv, basic(acctB, tokenB)))
	check429(t, h.waitedOut("DELETE", pathConv, basic(acctB, tokenB)))
	if h.conv.Total() != 1 {
		t.Fatalf("upstream calls = %d, want 1", h.conv.Total())
	}
}

// tooMany makes the fake answer the first n requests with Twilio's 429.
func tooMany(f *twiliofake.Fake, n int, retryAfter string) *atomic.Int64 {
	var seen atomic.Int64
	f.Before = func(w http.ResponseWriter, r *http.Request) bool {
		if seen.Add(1) <= int64(n) {
			if retryAfter != "" {
				w.Header().Set("Retry-After", retryAfter)
			}
			twiliofake.Error(w, http.StatusTooManyRequests, 20429, "Too Many Requests")
			return true
		}
		return false
	}
	return &seen
}

func TestUpstream429IsRetried(t *testing.T) {
	h := newHarness(t, func(s *setup) { s.cfg.RateLimit.RequestsPerSecond = 40 })
	seen := tooMany(h.conv, 2, "")
	answer := h.goDo("GET", pathConv, basic(acctA, tokenA))
	// Full jitter: attempt k waits at most backoff_base * 2^k.
	for k, limit := range []time.Duration{200 * time.Millisecond, 400 * time.Millisecond} {
		d := h.clk.WaitAsked(k + 1)[k]
		if d < 0 || d > limit {
			t.Fatalf("retry %d waited %s, want within [0, %s]", k, d, limit)
		}
		h.clk.Advance(d)
	}
	s, _, body := readResp(t, <-answer)
	if s != 200 || !strings.Contains(body, member1) || seen.Load() != 3 {
		t.Fatalf("read through two 429s: %d after %d calls", s, seen.Load())
	}
	if st := h.lim.State(acctA); st.Cap != 1 || st.SlowStart {
		t.Fatalf("account's cap after 429s with one call in flight: %+v, want 1", st)
	}
	var line map[string]any
	for _, l := range h.logs.lines(t) {
		if l["message"] == "request" {
			line = l
		}
	}
	if line["retries"] != float64(2) || line["upstream_429s"] != float64(2) || line["status"] != float64(200) {
		t.Fatalf("access log: %v", line)
	}
}

func TestRetryAfterIsHonoured(t *testing.T) {
	// A Retry-After of 3 s fits in a max_wait of 5 s (a retry spends what
	// is left of the request's own max_wait: TestARetrySpendsWhatIsLeftOfMaxWait).
	h := newHarness(t, func(s *setup) { s.cfg.RateLimit.MaxWait = config.Duration(5 * time.Second) })
	tooMany(h.conv, 1, "3")
	answer := h.goDo("GET", pathConv, basic(acctA, tokenA))
	if d := h.clk.WaitAsked(1)[0]; d != 3*time.Second {
		t.Fatalf("waited %s, want the upstream's Retry-After of 3s", d)
	}
	h.clk.Advance(3 * time.Second)
	if s, _, _ := readResp(t, <-answer); s != 200 {
		t.Fatalf("status %d", s)
	}
	// A Retry-After beyond the request's remaining budget: no retry, the
	// client gets the 429 (not stored).
	tooMany(h.conv, 1, "3600")
	s, cs, _ := h.get(pathV2)
	if s != 429 || cs != "cacheproxy; fwd=uri-miss" {
		t.Fatalf("429 beyond budget: %d %q", s, cs)
	}
}

func TestRetriesGiveUpAfterMaxRetries(t *testing.T) {
	h := newHarness(t, func(s *setup) { s.cfg.RateLimit.MaxRetries = 2 })
	seen := tooMany(h.conv, 100, "0")
	if s, _, _ := h.get(pathConv); s != 429 || seen.Load() != 3 {
		t.Fatalf("status %d after %d calls, want 429 after 3", s, seen.Load())
	}
}

func TestWritesAreRetriedOnlyWhenReplayable(t *testing.T) {
	h := newHarness(t, func(s *setup) { s.cfg.RateLimit.ReplayBytes = 1 << 10 })
	seen := tooMany(h.conv, 1, "0")
	small := "Attributes=" + strings.Repeat("s", 100)
	s, _, body := readResp(t, h.doBody("POST", "/v1/Conversations/"+conv1+"/Messages", basic(acctA, tokenA), strings.NewReader(small), "Content-Type", "application/x-www-form-urlencoded"))
	if s != 200 || seen.Load() != 2 || !strings.Contains(body, fmt.Sprintf(`"body_bytes":%d`, len(small))) {
		t.Fatalf("small write: %d after %d calls: %s", s, seen.Load(), body)
	}
	seen = tooMany(h.conv, 1, "0")
	big := strings.Repeat("b", 4<<10)
	s, _, _ = readResp(t, h.doBody("POST", "/v1/Conversations/"+conv1+"/Messages", basic(acctA, tokenA), strings.NewReader(big)))
	if s != 429 || seen.Load() != 1 {
		t.Fatalf("large write: %d after %d calls, want the 429 and no retry", s, seen.Load())
	}
}

func TestStaleIfError(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fail  func(h *harness)
		cache string
	}{
		{"upstream 500", func(h *harness) {
			h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
				twiliofake.Error(w, 500, 20500, "Internal Server Error")
				return true
			}
		}, "cacheproxy; fwd=stale; fwd-status=500"},
		{"upstream 429", func(h *harness) { tooMany(h.conv, 100, "0") }, "cacheproxy; fwd=stale; fwd-status=429"},
		{"upstream gone", func(h *harness) { h.convSrv.CloseClientConnections(); h.convSrv.Close() }, "cacheproxy; fwd=stale"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(s *setup) {
				s.cfg.Cache.StaleIfError = config.Duration(time.Minute)
				s.cfg.RateLimit.MaxRetries = 1
			})
			_, _, fresh := h.get(pathConv)
			h.settle()
			tc.fail(h)
			h.clk.Advance(45 * time.Second) // expired (ttl 30s), inside stale_if_error
			s, cs, body := h.get(pathConv)
			if s != 200 || cs != tc.cache || body != fresh {
				t.Fatalf("stale answer: %d %q", s, cs)
			}
			h.clk.Advance(time.Minute) // past the stale window: the error shows
			if s, _, _ := h.get(pathConv); s == 200 {
				t.Fatalf("served stale past stale_if_error")
			}
		})
	}
}

func TestStaleWhileRevalidate(t *testing.T) {
	h := newHarness(t, func(s *setup) {
		s.cfg.Cache.StaleWhileRevalidate = config.Duration(time.Minute)
	})
	h.get(pathConv)
	h.settle()
	h.conv.SetAttributes(conv1, member1, "refreshed")
	gate := make(chan struct{})
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool { <-gate; return false }
	h.clk.Advance(40 * time.Second)
	for i := 0; i < 10; i++ { // answered at once, while the refresh is held
		s, cs, body := h.get(pathConv)
		if s != 200 || !strings.HasSuffix(cs, "detail=stale-while-revalidate") || strings.Contains(body, "refreshed") {
			t.Fatalf("stale-while-revalidate answer %d: %d %q", i, s, cs)
		}
	}
	close(gate)
	if err := h.p.Wait(t.Context()); err != nil {
		t.Fatal(err)
	}
	h.settle()
	if n := h.conv.Calls("GET", pathConv); n != 2 {
		t.Fatalf("upstream calls = %d, want 2 (one background refresh)", n)
	}
	if _, cs, body := h.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") || !strings.Contains(body, "refreshed") {
		t.Fatalf("after refresh: %q %s", cs, body)
	}
}

func TestSummaryLine(t *testing.T) {
	h := newHarness(t)
	h.get(pathConv)
	h.settle()
	h.get(pathConv)
	h.get(pathConv)
	tooMany(h.conv, 1, "0")
	h.get(pathV2)
	prev := h.p.LogSummary(Summary{})
	var sum map[string]any
	for _, l := range h.logs.lines(t) {
		if l["message"] == "summary" {
			sum = l
		}
	}
	want := map[string]float64{"hits": 2, "misses": 2, "upstream_calls": 3, "upstream_429s": 1, "retries": 1, "rejections": 0, "entries": 2, "hit_ratio": 0.5}
	for k, v := range want {
		if sum[k] != v {
			t.Errorf("summary %s = %v, want %v (%v)", k, sum[k], v, sum)
		}
	}
	if _, ok := sum["queue_wait_us"]; !ok || sum["bytes"].(float64) <= 0 {
		t.Errorf("summary lacks queue wait or bytes: %v", sum)
	}
	if prev.Hits != 2 {
		t.Fatalf("returned totals: %+v", prev)
	}
	// The cache's removals are the interval's too, each kind apart.
	for _, k := range []string{"evictions", "expiries", "cache_rejections"} {
		if v, ok := sum[k]; !ok || v != 0.0 {
			t.Errorf("summary %s = %v, want 0 in this interval (%v)", k, v, sum)
		}
	}
	// The next interval counts from prev: nothing happened since.
	h.p.LogSummary(prev)
	for _, l := range h.logs.lines(t) {
		if l["message"] == "summary" {
			sum = l
		}
	}
	if sum["hits"] != 0.0 || sum["misses"] != 0.0 || sum["entries"] != 2.0 {
		t.Fatalf("the next interval: %v, want no hits or misses, and the 2 entries still held", sum)
	}
}

// TestQueuedClientsThatLeaveLeakNothing: pass-through requests queued for a
// turn whose clients go away return at once, never reach the upstream, and
// once the account's rate window has opened no goroutine
// remains. (A cached read's shared fetch is detached from its clients: it
// keeps its place until its turn or max_wait, then fills the cache.)
func TestQueuedClientsThatLeaveLeakNothing(t *testing.T) {
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { // registered first: runs after the servers close
		goleak.VerifyNone(t, before,
			goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
			goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
			goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"))
	})
	h := newHarness(t, func(s *setup) {
		s.cfg.RateLimit.RequestsPerSecond, s.cfg.RateLimit.MaxWait = 1, config.Duration(10*time.Second)
	})
	if s, _, _ := h.get(pathConv); s != 200 { // takes this second's slot
		t.Fatalf("first read: %d", s)
	}
	for i := 0; i < 3; i++ {
		ctx, cancel := context.WithCancel(context.Background())
		w := newTrackingWriter()
		done := make(chan struct{})
		req := httptestRequest(ctx, "/v1/Conversations", basic(acctA, tokenA))
		go func() { h.p.ServeHTTP(w, req); close(done) }()
		cancel()
		<-done
		if w.wrote {
			t.Fatalf("a client that left was answered %d", w.code)
		}
	}
	// The window's timer sleeps until the window opens (1 s at most here),
	// finds the queue empty and exits.
	if err := h.wait(t.Context()); err != nil {
		t.Fatal(err)
	}
	if h.conv.Total() != 1 {
		t.Fatalf("requests whose clients left reached the upstream: %d calls", h.conv.Total())
	}
}

func TestStaleWhenTheBudgetIsSpent(t *testing.T) {
	h := newHarness(t, tightBudget, func(s *setup) {
		s.cfg.Cache.StaleIfError = config.Duration(time.Minute)
	})
	_, _, fresh := h.get(pathConv) // spends this second's only slot
	h.settle()
	h.clk.Advance(45 * time.Second) // the entry expires; the limiter's second has not
	s, cs, body := readResp(t, h.waitedOut("GET", pathConv, basic(acctA, tokenA)))
	if s != 200 || cs != "cacheproxy; fwd=stale" || body != fresh {
		t.Fatalf("with the budget spent: %d %q", s, cs)
	}
	if h.p.Summary().Rejections != 1 || h.conv.Total() != 1 {
		t.Fatalf("summary %+v, upstream calls %d", h.p.Summary(), h.conv.Total())
	}
}
