package proxy

import (
	"io"
	"math"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"cacheproxy/internal/config"
	"cacheproxy/internal/twiliofake"

	"github.com/prometheus/client_golang/prometheus"
)

// One budget, writes first: during a backlog of 300 cold reads held at the
// upstream, a POST of a participant gets the next turn that frees, ahead
// of every read that waited before it. Before: it queued behind them all
// (the 304th call to reach the upstream).
func TestAWriteGoesBeforeABacklogOfReads(t *testing.T) {
	h := newHarness(t, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 12, config.Duration(time.Minute) // slow start: 3
	})
	paths := twilioLimit(h, 100, 300)
	arrived := make(chan string, 400)
	release := make(chan struct{}, 400)
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		arrived <- r.Method
		<-release
		return false
	}
	done := make(chan int, len(paths))
	for _, p := range paths {
		go func() {
			s, _, _ := readResp(t, h.do("GET", p, basic(acctA, tokenA)))
			done <- s
		}()
	}
	waitFor(t, h, func() bool { st := h.lim.State(acctA); return st.InFlight == 3 && st.Queued == 297 })
	write := make(chan *http.Response, 1)
	go func() {
		write <- h.doBody("POST", pathConv, basic(acctA, tokenA), strings.NewReader("Attributes=%7B%7D"), "Content-Type", "application/x-www-form-urlencoded")
	}()
	waitFor(t, h, func() bool { return h.lim.State(acctA).Queued == 298 })
	for range 3 {
		<-arrived
	}
	release <- struct{}{} // one read ends: its turn is the write's
	// Slow start grows the cap to 4 as that read is served, so two turns
	// go at once: the write's, and (the write holding the share reads
	// leave to writes) a read's, which may reach Twilio first.
	fourth, fifth := <-arrived, <-arrived
	close(release)
	if s, _, _ := readResp(t, <-write); s != 200 {
		t.Fatalf("write: %d", s)
	}
	for range paths {
		if s := <-done; s != 200 {
			t.Fatalf("read: %d", s)
		}
	}
	if fourth != "POST" && fifth != "POST" {
		t.Fatalf("the turns after the first read ended went to a %s and a %s, want the write's among them", fourth, fifth)
	}
}

// Twilio's header steers the cap: with the account's other clients
// holding 6 of its 10, 300 cold reads (max_concurrent 25) learn the limit
// from the first 429s' headers and keep to the 4 left; when the others
// leave, the next 300 use all 10 at once, with no 429.
func TestTwiliosConcurrencyHeaderSteersTheBudget(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := newHarness(t, realRetries, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 25, config.Duration(time.Minute)
		s.cfg.RateLimit.MaxRetries = 10
		s.opts.Registerer = reg
	})
	paths := twilioLimit(h, 10, 600)
	h.conv.Latency = 50 * time.Millisecond // calls Twilio answers are far slower than its 429s
	h.conv.ConcurrencyHeader = true
	h.conv.SetOthers(acctA, 6)
	if st := burst(h, paths[:300]); st[200] != 300 {
		t.Fatalf("statuses %v", st)
	}
	first, calls := h.conv.TooMany(), h.conv.Total()
	st := h.lim.State(acctA)
	// The others' share is read from answers that cross ours in flight: on
	// a loaded machine it may be over by a call or two of ours that
	// reached Twilio in between (the cap is then lower than it could be),
	// never under (which would cost 429s).
	if st.Limit != 10 || st.Others < 6 || st.Others > 8 || st.Cap != 10-st.Others {
		t.Fatalf("after the first 300: %+v, want limit 10, others 6 (up to 8), cap 10 - others", st)
	}
	// The share of 429s depends on timing, so it is measured by
	// bench/limits (README: 1.0%), not asserted here. This test holds the
	// count to what learning costs: at most slow start's first round (7).
	if first == 0 || first > 7 {
		t.Fatalf("%d upstream 429s of %d calls, want some (to learn the limit) and at most 7", first, calls)
	}
	if l, o := gauge(t, reg, "cacheproxy_budget_account_limit", acctA), gauge(t, reg, "cacheproxy_budget_others_in_flight", acctA); l != 10 || o != float64(st.Others) {
		t.Fatalf("metrics: limit %v, others %v; want 10 and %d", l, o, st.Others)
	}
	h.conv.SetOthers(acctA, 0)
	if st := burst(h, paths[300:]); st[200] != 300 {
		t.Fatalf("statuses %v", st)
	}
	if n := h.conv.TooMany(); n != first {
		t.Fatalf("%d more upstream 429s once the others left, want 0", n-first)
	}
	if p := h.conv.Peak(acctA); p != 10 {
		t.Fatalf("peak in flight %d once the others left, want the limit, 10", p)
	}
	t.Logf("upstream 429s %d of %d calls in the first 300 reads", first, calls)
}

// A 429 for another limit (a per-endpoint rate: code 20001 here, not
// 20429) is retried after its Retry-After and does not cut the account's
// cap.
func TestOtherRateLimitsDoNotCutTheCap(t *testing.T) {
	h := newHarness(t, realRetries, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 8, config.Duration(time.Minute)
	})
	var mu sync.Mutex
	refused := 0
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		mu.Lock()
		defer mu.Unlock()
		if refused < 2 {
			refused++
			w.Header().Set("Retry-After", "0")
			twiliofake.Error(w, http.StatusTooManyRequests, 20001, "Too many requests for this endpoint")
			return true
		}
		return false
	}
	before := h.lim.State(acctA).Cap
	if s, _, _ := h.get(pathConv); s != 200 {
		t.Fatalf("read: %d", s)
	}
	if after := h.lim.State(acctA).Cap; after < before {
		t.Fatalf("cap %d -> %d after 429s of another limit, want it kept", before, after)
	}
}

// gauge is the value of the gauge name for account in reg (NaN if none).
func gauge(t *testing.T, reg *prometheus.Registry, name, account string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "account" && l.GetValue() == account {
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	return math.NaN()
}

// Hostile input, round three, point 1: an upstream whose every answer
// reports 2^63-1 calls in flight (Twilio-Concurrent-Requests) does not
// hold the account to one call at a time: 200 cold reads, 20 at a time,
// all get 200 with max_wait 1 s and the cap where it would be without the
// header; the reports are counted on /metrics and logged once.
func TestAnImpossibleConcurrencyHeaderIsIgnored(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := newHarness(t, realRetries, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 25, config.Duration(time.Second)
		s.opts.Registerer = reg
	})
	paths := twilioLimit(h, 0, 200)
	h.conv.Latency = 20 * time.Millisecond
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("Twilio-Concurrent-Requests", "9223372036854775807")
		return false
	}
	statuses := map[int]int{}
	for i := 0; i < len(paths); i += 20 {
		for s, n := range burst(h, paths[i:i+20]) {
			statuses[s] += n
		}
	}
	if statuses[200] != 200 {
		t.Fatalf("statuses %v, want 200 answers of 200", statuses)
	}
	if st := h.lim.State(acctA); st.Others != 0 || st.Limit != 0 || st.Cap < 20 {
		t.Fatalf("budget %+v: want no others, no limit, and the cap grown by slow start past 20", st)
	}
	if g := gauge(t, reg, "cacheproxy_budget_others_in_flight", acctA); g != 0 {
		t.Fatalf("cacheproxy_budget_others_in_flight %v, want 0", g)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	ignored := -1.0
	for _, f := range families {
		if f.GetName() == "cacheproxy_budget_reports_ignored_total" {
			ignored = f.GetMetric()[0].GetCounter().GetValue()
		}
	}
	if ignored != 200 {
		t.Fatalf("cacheproxy_budget_reports_ignored_total %v, want 200", ignored)
	}
	if n := strings.Count(h.logs.String(), `"decision":"report_ignored"`); n != 1 {
		t.Fatalf("%d log lines about the ignored reports, want 1 (a minute apart)", n)
	}
}

// Hostile input, round three, point 2: a flood of writes does not starve
// the reads of its account. 30 writers POST one participant in a loop
// (more than the cap of 10 can serve), and 60 cold reads of others run
// 10 at a time with max_wait 1 s: every read gets its answer (with writes
// taking every turn, each read waited out max_wait into a 429).
func TestReadsGetTheirShareBesideAWriteFlood(t *testing.T) {
	h := newHarness(t, realRetries, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 10, config.Duration(time.Second)
	})
	paths := twilioLimit(h, 10, 61)
	h.conv.Latency = 20 * time.Millisecond
	stop := make(chan struct{})
	var writers sync.WaitGroup
	for range 30 {
		writers.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				req, _ := http.NewRequest("POST", h.srv.URL+paths[0], strings.NewReader("Attributes=%7B%7D"))
				req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
				req.Header.Set("Authorization", basic(acctA, tokenA))
				if resp, err := http.DefaultClient.Do(req); err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}
		})
	}
	defer func() { close(stop); writers.Wait() }()
	for changed := h.lim.Changed(); h.lim.State(acctA).Queued < 10; changed = h.lim.Changed() {
		<-changed // the writes hold the cap and queue behind it
	}
	statuses := map[int]int{}
	for i := 1; i < len(paths); i += 10 {
		for s, n := range burst(h, paths[i:i+10]) {
			statuses[s] += n
		}
	}
	if statuses[200] != 60 {
		t.Fatalf("reads beside the flood: statuses %v, want 60 answers", statuses)
	}
}
