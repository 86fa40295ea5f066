package proxy

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cacheproxy/internal/clock"
	"cacheproxy/internal/config"
	"cacheproxy/internal/ratelimit/ratelimittest"
	"cacheproxy/internal/twiliofake"
)

// twilioLimit makes the Conversations fake answer 429 (20429) when an
// account has more than c requests in flight, as Twilio does, and seeds
// n more participants of conv1 (MB…1000 on).
func twilioLimit(h *harness, c, n int) []string {
	h.conv.MaxInFlight = c
	h.conv.Latency = 5 * time.Millisecond
	paths := make([]string, n)
	for i := range n {
		sid := twiliofake.SID("MB", 1000+i)
		h.conv.AddParticipant(conv1, twiliofake.Participant{Sid: sid, Identity: fmt.Sprint("user", i)})
		paths[i] = "/v1/Conversations/" + conv1 + "/Participants/" + sid
	}
	return paths
}

// burst reads every path at once as account A and counts the statuses.
func burst(h *harness, paths []string) map[int]int {
	var mu sync.Mutex
	statuses := map[int]int{}
	var wg sync.WaitGroup
	for _, path := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, _, _ := readResp(h.t, h.do("GET", path, basic(acctA, tokenA)))
			mu.Lock()
			statuses[s]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	return statuses
}

// realRetries runs the proxy (its retry backoff) on the real clock: a
// burst's retries then need no test to move time.
func realRetries(s *setup) { s.opts.Clock = clock.Real{} }

// Point 1 of the budget issue: with max_concurrent at Twilio's limit, 300
// concurrent cold reads are all answered, Twilio sees no 429 and never more
// than 10 in flight. (The simulation in internal/ratelimit checks that the
// upstream stays busy; bench/limits measures it.)
func TestBudgetKeepsUnderTwiliosConcurrencyLimit(t *testing.T) {
	h := newHarness(t, realRetries, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 10, config.Duration(time.Minute)
	})
	paths := twilioLimit(h, 10, 300)
	statuses := burst(h, paths)
	if statuses[200] != 300 || h.conv.TooMany() != 0 || h.conv.Peak(acctA) > 10 {
		t.Fatalf("statuses %v, upstream 429s %d, peak in flight %d: want 300 x 200, 0, <= 10",
			statuses, h.conv.TooMany(), h.conv.Peak(acctA))
	}
	if n := h.conv.Total(); n != 300 {
		t.Fatalf("upstream calls %d, want 300", n)
	}
}

// Point 2: max_concurrent (25) above Twilio's limit (10): the cap is cut by
// Twilio's 429s, the rejected calls are retried, and no client sees a 429.
// (The share of 429s is checked in internal/ratelimit's simulation, where
// time is deterministic, and measured by bench/limits.)
func TestBudgetLearnsTwiliosLimitFromItsAnswers(t *testing.T) {
	h := newHarness(t, realRetries, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 25, config.Duration(time.Minute)
		s.cfg.RateLimit.MaxRetries = 10
	})
	paths := twilioLimit(h, 10, 300)
	// Twilio's calls take far longer than the sidecar's own work around
	// them (README: 0.1 ms a hit); at 5 ms, a loaded machine's scheduling
	// held turns past Twilio's end, and the cap settled on calls Twilio
	// no longer had (12 turns, 10 at Twilio: 2 runs in 15).
	h.conv.Latency = 50 * time.Millisecond
	statuses := burst(h, paths)
	if statuses[200] != 300 {
		t.Fatalf("statuses %v, want 300 x 200", statuses)
	}
	rejected := h.conv.TooMany()
	if rejected == 0 {
		t.Fatal("Twilio never answered 429: the test did not exceed its limit")
	}
	if st := h.lim.State(acctA); st.Cap > 10 {
		t.Fatalf("cap after the burst: %+v, want <= 10", st)
	}
	var cuts []string
	for _, l := range h.logs.lines(t) {
		if l["decision"] == "cap_cut" && l["account"] == acctA && l["level"] == "info" {
			cuts = append(cuts, fmt.Sprintf("%v->%v", l["from"], l["to"]))
		}
	}
	if len(cuts) == 0 {
		t.Fatal("no cap_cut in the log")
	}
	t.Logf("upstream 429s %d of %d calls (%.1f%%), cuts %v", rejected, h.conv.Total(),
		100*float64(rejected)/float64(h.conv.Total()), cuts)
}

// Point 5: while a wrong token floods account A (its calls held upstream,
// and no memory of refusals to help), A's right token gets a turn as soon
// as one wrong call ends: turns go round-robin across credentials.
func TestAWrongTokenCannotStarveTheRightOne(t *testing.T) {
	h := newHarness(t, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 12, config.Duration(time.Minute) // slow start: 3
		s.cfg.RateLimit.UnauthorizedTTL = 0
	})
	wrong := basic(acctA, "wrongtokenxxxxxxxxxxxxxxxxxxxxxx")
	release := make(chan struct{})
	arrived := make(chan string, 300)
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Authorization") == wrong {
			arrived <- "wrong"
			<-release
			return false // the fake answers 401 (20003)
		}
		arrived <- "right"
		return false
	}
	const flood = 200
	answers := make(chan int, flood)
	for range flood {
		go func() {
			s, _, _ := readResp(t, h.do("GET", "/v1/Conversations", wrong)) // pass-through: never coalesced
			answers <- s
		}()
	}
	for range 3 { // the cap's three turns, all wrong
		if a := <-arrived; a != "wrong" {
			t.Fatalf("arrived: %s", a)
		}
	}
	waitFor(t, h, func() bool { return h.lim.State(acctA).Queued == flood-3 })
	right := h.goDo("GET", pathConv, basic(acctA, tokenA))
	waitFor(t, h, func() bool { return h.lim.State(acctA).Queued == flood-3+1 })
	// Each wrong call that ends frees a turn (and in slow start may grow
	// the cap, freeing one more). After each, every call granted so far is
	// let reach the upstream before the next ends, so the arrivals are the
	// grants, whatever order the calls' goroutines run in. Round-robin
	// grants the right one a turn among those the first two ended calls
	// free (a new credential joins just before the one served next);
	// without it, it would wait for the 197 queued before it.
	arrivals, gotRight := 3, false
	for ended := 1; !gotRight; ended++ {
		if ended > 2 {
			close(release) // let the held calls end before the test fails
			t.Fatal("the right token was not granted a turn among those two ended wrong calls freed (want round-robin turns)")
		}
		queued := h.lim.State(acctA).Queued
		release <- struct{}{}
		// The turns it frees are granted at once, together, when its turn ends.
		waitFor(t, h, func() bool { st := h.lim.State(acctA); return st.Queued < queued && st.Taking == 0 })
		for granted := flood - 3 + 1 - h.lim.State(acctA).Queued; arrivals < 3+granted; arrivals++ {
			if <-arrived == "right" {
				gotRight = true
			}
		}
	}
	if s, _, _ := readResp(t, <-right); s != 200 {
		t.Fatalf("right token: %d", s)
	}
	close(release)
	for range flood {
		if s := <-answers; s != 401 {
			t.Fatalf("wrong token: %d", s)
		}
	}
}

// Point 5, with the memory of refusals: a flood of 600 wrong-token
// requests (200 at once) costs one round of upstream calls; the rest are
// answered locally, even those that were already waiting for a turn.
func TestAWrongTokenFloodCostsOneRound(t *testing.T) {
	h := newHarness(t, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 12, config.Duration(time.Minute) // slow start: 3
	})
	wrong := basic(acctA, "wrongtokenxxxxxxxxxxxxxxxxxxxxxx")
	release := make(chan struct{})
	var mu sync.Mutex
	wrongCalls := 0
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Authorization") == wrong {
			mu.Lock()
			wrongCalls++
			mu.Unlock()
			<-release
		}
		return false
	}
	answers := make(chan int, 600)
	send := func(n int) {
		for range n {
			go func() {
				s, _, _ := readResp(t, h.do("GET", "/v1/Conversations", wrong))
				answers <- s
			}()
		}
	}
	send(200)
	waitFor(t, h, func() bool { st := h.lim.State(acctA); return st.InFlight == 3 && st.Queued == 197 })
	right := h.goDo("GET", pathConv, basic(acctA, tokenA))
	close(release) // the three wrong calls get Twilio's 401
	if s, _, _ := readResp(t, <-right); s != 200 {
		t.Fatalf("right token: %d", s)
	}
	send(400)
	for range 600 {
		if s := <-answers; s != 401 {
			t.Fatalf("wrong token: %d", s)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if wrongCalls != 3 {
		t.Fatalf("wrong-token calls upstream = %d, want 3 (one round of the cap)", wrongCalls)
	}
}

// The same for cached reads: 200 wrong-token reads of 200 participants
// (200 flights, not one) cost one round of upstream calls. The refusal is
// remembered while the call still holds its turn; before, it was
// remembered once the fill had given the turn back, and every waiter that
// took it in between was sent upstream too.
func TestACachedReadsRefusalIsRememberedBeforeItsTurnGoesBack(t *testing.T) {
	h := newHarness(t, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 12, config.Duration(time.Minute) // slow start: 3
	})
	wrong := basic(acctA, "wrongtokenxxxxxxxxxxxxxxxxxxxxxx")
	release := make(chan struct{})
	var wrongCalls atomic.Int64
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Authorization") == wrong {
			wrongCalls.Add(1)
			<-release
		}
		return false
	}
	const flood = 200
	answers := make(chan int, flood)
	for i := range flood {
		path := "/v1/Conversations/" + conv1 + "/Participants/" + twiliofake.SID("MB", 100+i)
		go func() {
			s, _, _ := readResp(t, h.do("GET", path, wrong))
			answers <- s
		}()
	}
	waitFor(t, h, func() bool { st := h.lim.State(acctA); return st.InFlight == 3 && st.Queued == flood-3 })
	close(release)
	for range flood {
		if s := <-answers; s != 401 {
			t.Fatalf("wrong token: %d", s)
		}
	}
	if n := wrongCalls.Load(); n != 3 {
		t.Fatalf("wrong-token calls upstream = %d, want 3 (one round of the cap)", n)
	}
}

// Point 4: two API keys and the account's own credentials share one
// budget once the keys' account is learned from their answers.
func TestAPIKeysShareTheirAccountsBudget(t *testing.T) {
	key1, key2 := twiliofake.SID("SK", 1), twiliofake.SID("SK", 2)
	const secret1, secret2 = "secret1xxxxxxxxxxxxxxxxxxxxxxxxx", "secret2xxxxxxxxxxxxxxxxxxxxxxxxx"
	h := newHarness(t, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 1, config.Duration(time.Minute)
	})
	h.conv.Accounts[key1], h.conv.Accounts[key2] = secret1, secret2
	h.conv.KeyOwner = map[string]string{key1: acctA, key2: acctA}
	// Before it is known, a key has its own budget.
	if st := h.lim.State(key1); st.Account != key1 {
		t.Fatalf("unknown key's budget: %+v", st)
	}
	if s, _, _ := readResp(t, h.do("GET", pathConv, basic(key1, secret1))); s != 200 { // v1: account_sid
		t.Fatalf("key 1: %d", s)
	}
	if s, _, _ := readResp(t, h.do("GET", pathV2, basic(key2, secret2))); s != 200 { // v2: accountId
		t.Fatalf("key 2: %d", s)
	}
	if st := h.lim.State(key1); st.Account != acctA || st.Keys != 2 {
		t.Fatalf("after their first answers: %+v, want account A's budget with two keys", st)
	}
	learned := 0
	for _, l := range h.logs.lines(t) {
		if l["decision"] == "key_learned" && l["account"] == acctA {
			learned++
		}
	}
	if learned != 2 {
		t.Fatalf("%d key_learned lines, want 2", learned)
	}
	// One budget: with A's one turn held upstream, both keys wait for it.
	release := make(chan struct{})
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool { <-release; return false }
	held := h.goDo("GET", "/v1/Conversations", basic(acctA, tokenA))
	waitFor(t, h, func() bool { return h.lim.State(acctA).InFlight == 1 })
	viaKey1 := h.goDo("GET", "/v1/Conversations", basic(key1, secret1))
	viaKey2 := h.goDo("GET", "/v1/Conversations", basic(key2, secret2))
	waitFor(t, h, func() bool { return h.lim.State(acctA).Queued == 2 })
	close(release)
	for _, ch := range []<-chan *http.Response{held, viaKey1, viaKey2} {
		if s, _, _ := readResp(t, <-ch); s != 200 {
			t.Fatalf("status %d", s)
		}
	}
}

// Requests without credentials never share a budget with an account.
func TestRequestsWithoutCredentialsHaveTheirOwnBudget(t *testing.T) {
	h := newHarness(t, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 1, config.Duration(time.Minute)
	})
	release := make(chan struct{})
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Authorization") == "" {
			<-release
		}
		return false
	}
	anon := h.goDo("GET", "/v1/Conversations", "")
	waitFor(t, h, func() bool { return h.lim.State("").InFlight == 1 })
	if s, _, _ := h.get(pathConv); s != 200 {
		t.Fatalf("account A behind an anonymous call: %d", s)
	}
	close(release)
	if s, _, _ := readResp(t, <-anon); s != 401 {
		t.Fatalf("anonymous: %d", s)
	}
}

// The summary line lists the busiest accounts' budgets.
func TestSummaryListsBudgets(t *testing.T) {
	h := newHarness(t, func(s *setup) { s.cfg.RateLimit.MaxConcurrent = 8 })
	h.get(pathConv)
	h.p.LogSummary(Summary{})
	for _, l := range h.logs.lines(t) {
		if l["message"] != "summary" {
			continue
		}
		b, _ := l["budgets"].([]any)
		if l["budgets_total"] != float64(1) || len(b) != 1 {
			t.Fatalf("summary budgets: %v", l)
		}
		got := b[0].(map[string]any)
		if got["account"] != acctA || got["cap"] != float64(2) || got["in_flight"] != float64(0) || got["queued"] != float64(0) {
			t.Fatalf("summary budget: %v", got)
		}
		if strings.Contains(fmt.Sprint(l), tokenA) {
			t.Fatal("summary holds a token")
		}
		return
	}
	t.Fatal("no summary line")
}

// waitFor waits until cond, which reads the harness's budget, holds.
func waitFor(t *testing.T, h *harness, cond func() bool) {
	t.Helper()
	ratelimittest.WaitUntil(t, h.lim, cond)
}

// Hostile input, point 3: distinct wrong tokens cannot take an account's
// budget from its real user. Once Twilio accepted the real user's
// credential, 300 requests with 300 made-up tokens of the same account
// share one turn: one of them is in flight (held at the upstream), the
// rest wait, and the real user's 20 cold reads are all answered meanwhile.
// Before: the made-up tokens took the cap's turns in proportion to their
// number (299 of 300 queues).
func TestDistinctWrongTokensShareOneTurn(t *testing.T) {
	h := newHarness(t, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 10, config.Duration(time.Minute)
	})
	if s, _, _ := h.get(pathConv); s != 200 {
		t.Fatalf("the real user: %d", s)
	}
	right := basic(acctA, tokenA)
	release := make(chan struct{})
	var wrongNow, wrongPeak atomic.Int64
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Authorization") != right {
			n := wrongNow.Add(1)
			for p := wrongPeak.Load(); n > p && !wrongPeak.CompareAndSwap(p, n); p = wrongPeak.Load() {
			}
			<-release
			wrongNow.Add(-1)
		}
		return false // the fake answers: 401 for a made-up token
	}
	const flood = 300
	done := make(chan struct{}, flood)
	for i := range flood {
		go func() {
			readResp(t, h.do("GET", "/v1/Conversations", basic(acctA, fmt.Sprintf("made-up-token-%04d", i)))) // pass-through
			done <- struct{}{}
		}()
	}
	defer func() {
		close(release)
		for range flood {
			<-done
		}
	}()
	waitFor(t, h, func() bool { st := h.lim.State(acctA); return st.InFlight+st.Queued == flood })
	waitFor(t, h, func() bool { return wrongPeak.Load() > 0 })
	if p := wrongPeak.Load(); p != 1 {
		t.Fatalf("%d made-up tokens' calls at the upstream at once, want 1", p)
	}
	answers := make([]<-chan *http.Response, 20)
	for i := range answers {
		answers[i] = h.goDo("GET", pathConv+"?PageSize="+strconv.Itoa(i+1), right) // cold: a key never read
	}
	for i, ch := range answers {
		resp := <-ch
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("the real user's cold read %d during the flood: %d", i, resp.StatusCode)
		}
	}
	if p := wrongPeak.Load(); p != 1 {
		t.Fatalf("%d made-up tokens' calls at the upstream at once by the end, want 1", p)
	}
}

// Issue 35, point 2: the retry after an upstream 429 spends what is left
// of the request's own max_wait, not a fresh one. Twilio answers every
// call 429 with Retry-After: 1 and max_wait is 1.5 s: the first retry
// fits, the second would end past max_wait, so the client gets Twilio's
// 429 after two calls (each retry's turn had a max_wait of its own: four
// calls, the answer after three seconds).
func TestARetrySpendsWhatIsLeftOfMaxWait(t *testing.T) {
	h := newHarness(t, realRetries, func(s *setup) {
		s.cfg.RateLimit.MaxWait, s.cfg.RateLimit.MaxRetries = config.Duration(1500*time.Millisecond), 3
	})
	var calls atomic.Int64
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		calls.Add(1)
		w.Header().Set("Retry-After", "1")
		twiliofake.Error(w, http.StatusTooManyRequests, 20429, "Too many requests")
		return true
	}
	status, _, _ := readResp(t, h.do("GET", pathConv, basic(acctA, tokenA)))
	if status != http.StatusTooManyRequests || calls.Load() != 2 {
		t.Fatalf("%d after %d upstream calls, want Twilio's 429 after 2", status, calls.Load())
	}
}
