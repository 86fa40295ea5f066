package ratelimit

import (
	"context"
	"runtime"
	"sync"
	"testing"
	"time"

	"cacheproxy/internal/clock"
)

// simResult is what a simulated burst did.
type simResult struct {
	calls, rejected, maxInFlight int
	took                         time.Duration
	events                       []Event
}

// simulate sends clients calls at once through a Limiter with cfg (on a
// fake clock) to a simulated upstream that answers each call in latency and
// rejects at once (a 429) any call beyond limit in flight for the account;
// each rejected call is tried again at once, as Twilio says it is safe to.
// Time moves only when every client is either in flight upstream or queued
// in the Limiter, so the run is deterministic.
func simulate(t *testing.T, cfg Config, clients, limit int, latency time.Duration) simResult {
	t.Helper()
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	start := clk.Now()
	var res simResult
	var evMu sync.Mutex
	cfg.OnEvent = func(e Event) { evMu.Lock(); res.events = append(res.events, e); evMu.Unlock() }
	cfg.MaxWait = time.Hour
	l := New(cfg, clk)

	type call struct {
		turn  Turn
		reply chan bool // true: served, the client is done; false: rejected
	}
	started := make(chan call)
	var wg sync.WaitGroup
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				ls, err := l.Acquire(context.Background(), "AC1", "one credential")
				if err != nil {
					t.Error(err)
					return
				}
				c := call{ls, make(chan bool)}
				started <- c
				if <-c.reply {
					return
				}
			}
		}()
	}

	type running struct {
		c   call
		end time.Time
	}
	var upstream []running // in flight upstream, in order of their end
	known, finished := 0, 0
	deadline := time.Now().Add(30 * time.Second) // a broken limiter must fail, not hang
	settle := func() {
		for {
			st := l.State("AC1")
			select {
			case c := <-started:
				known++
				res.calls++
				if len(upstream) >= limit {
					res.rejected++
					known--
					c.turn.Done(Throttled)
					c.reply <- false
					continue
				}
				upstream = append(upstream, running{c, clk.Now().Add(latency)})
				res.maxInFlight = max(res.maxInFlight, len(upstream))
				continue
			default:
			}
			if known == st.InFlight && st.Queued+st.InFlight == clients-finished {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("simulation stuck: %+v, known %d, finished %d", st, known, finished)
			}
			runtime.Gosched()
		}
	}
	for {
		settle()
		if finished == clients {
			break
		}
		if len(upstream) == 0 {
			t.Fatalf("nothing in flight and %d clients waiting: %+v", clients-finished, l.State("AC1"))
		}
		clk.Advance(upstream[0].end.Sub(clk.Now()))
		for len(upstream) > 0 && !upstream[0].end.After(clk.Now()) {
			r := upstream[0]
			upstream = upstream[1:]
			known--
			finished++
			r.c.turn.Done(Served)
			r.c.reply <- true
		}
	}
	wg.Wait()
	res.took = clk.Now().Sub(start)
	return res
}

// Point 1 of the budget issue: the configured cap matches Twilio's limit
// (C = 10, 100 ms): 300 cold reads make no 429 and keep the upstream busy.
func TestConcurrencyCapKeepsUnderTheUpstreamLimit(t *testing.T) {
	r := simulate(t, Config{MaxConcurrent: 10}, 300, 10, 100*time.Millisecond)
	if r.rejected != 0 || r.maxInFlight > 10 || r.calls != 300 {
		t.Fatalf("calls %d, 429s %d, max in flight %d: want 300, 0, <= 10", r.calls, r.rejected, r.maxInFlight)
	}
	// 30 rounds of 10 take 3 s; slow start (3, 6, 10) may add a little.
	if r.took > 3600*time.Millisecond {
		t.Fatalf("took %s of simulated time, want <= 1.2 x 3s (the upstream idled)", r.took)
	}
	t.Logf("300 calls in %s of simulated time, max %d in flight", r.took, r.maxInFlight)
}

// Point 2: the configured cap (25) is above Twilio's (10): the cap learns
// it from the 429s, which stay under 5% of upstream calls.
func TestCapLearnsTheUpstreamLimit(t *testing.T) {
	r := simulate(t, Config{MaxConcurrent: 25}, 300, 10, 100*time.Millisecond)
	share := float64(r.rejected) / float64(r.calls)
	if r.calls-r.rejected != 300 || share >= 0.05 {
		t.Fatalf("served %d, 429s %d of %d calls (%.1f%%): want 300 served, under 5%%", r.calls-r.rejected, r.rejected, r.calls, 100*share)
	}
	var cuts []Event
	for _, e := range r.events {
		if e.Kind == CapCut {
			cuts = append(cuts, e)
		}
	}
	if len(cuts) == 0 || cuts[len(cuts)-1].To > 10 {
		t.Fatalf("cap never cut to the upstream's 10: %+v", cuts)
	}
	t.Logf("429s %d of %d calls (%.1f%%), %s of simulated time, cuts %+v", r.rejected, r.calls, 100*share, r.took, cuts)
}

// Without slow start's help (the account's cap already at 25 when the
// burst comes), the 429 evidence still lands the cap on the upstream's
// limit rather than cutting it to the floor.
func TestCapCutFollowsTheEvidence(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	l := New(Config{MaxConcurrent: 25, MaxWait: time.Second}, clk)
	steady(l, "AC1")
	var turns []Turn
	for range 25 {
		ls, err := l.Acquire(context.Background(), "AC1", "c")
		if err != nil {
			t.Fatal(err)
		}
		turns = append(turns, ls)
	}
	// The upstream takes 10 and rejects 15 at once.
	for _, ls := range turns[10:] {
		ls.Done(Throttled)
	}
	if st := l.State("AC1"); st.Cap != 10 {
		t.Fatalf("cap after 15 rejections with 10 served in flight: %d, want 10", st.Cap)
	}
	for _, ls := range turns[:10] {
		ls.Done(Served)
	}
}

func TestCapRecoversLinearly(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	var events []Event
	l := New(Config{MaxConcurrent: 20, MaxWait: time.Second, Recover: 10 * time.Second,
		OnEvent: func(e Event) { events = append(events, e) }}, clk)
	var turns []Turn
	for range 5 { // slow start: a quarter of 20
		ls, err := l.Acquire(context.Background(), "AC1", "c")
		if err != nil {
			t.Fatal(err)
		}
		turns = append(turns, ls)
	}
	turns[0].Done(Throttled) // 5 in flight: the upstream allows 4 at most
	if st := l.State("AC1"); st.Cap != 4 || st.SlowStart {
		t.Fatalf("after a 429 with 5 in flight: %+v, want cap 4", st)
	}
	if len(events) != 1 || events[0].Kind != CapCut || events[0].From != 5 || events[0].To != 4 || events[0].InFlight != 5 {
		t.Fatalf("events %+v, want one cut 5 -> 4 with 5 in flight", events)
	}
	for _, ls := range turns[1:] {
		ls.Done(Served)
	}
	clk.Advance(5 * time.Second)
	if st := l.State("AC1"); st.Cap != 12 {
		t.Fatalf("half way back: cap %d, want 12", st.Cap)
	}
	clk.Advance(5 * time.Second)
	if st := l.State("AC1"); st.Cap != 20 {
		t.Fatalf("recovered: cap %d, want 20", st.Cap)
	}
}

func TestSlowStartGrowsWhileInUse(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	l := New(Config{MaxConcurrent: 8, MaxWait: time.Second}, clk)
	ls, _ := l.Acquire(context.Background(), "AC1", "c")
	ls.Done(Served) // one call with a cap of 2: not in use, no growth
	if st := l.State("AC1"); st.Cap != 2 || !st.SlowStart {
		t.Fatalf("after an idle call: %+v, want cap 2 in slow start", st)
	}
	for want := 3; want <= 8; want++ {
		var turns []Turn
		for range l.State("AC1").Cap {
			ls, err := l.Acquire(context.Background(), "AC1", "c")
			if err != nil {
				t.Fatal(err)
			}
			turns = append(turns, ls)
		}
		turns[0].Done(Served) // served with the cap full: one more
		if st := l.State("AC1"); st.Cap != want {
			t.Fatalf("cap %d, want %d", st.Cap, want)
		}
		for _, ls := range turns[1:] {
			ls.Done(Failed) // says nothing: no growth
		}
		if st := l.State("AC1"); st.Cap != want {
			t.Fatalf("cap %d after failures, want %d", st.Cap, want)
		}
	}
	if st := l.State("AC1"); st.SlowStart {
		t.Fatalf("slow start did not end at MaxConcurrent: %+v", st)
	}
}

// steady puts user's account where slow start ends: the cap at
// MaxConcurrent.
func steady(l *Limiter, user string) {
	ls, _ := l.Acquire(context.Background(), user, "c") // creates the account
	ls.Done(Unused)
	l.mu.Lock()
	a := l.accountLocked(user)
	a.slowStart, a.cap, a.cutAt = false, float64(l.cfg.MaxConcurrent), time.Time{}
	l.mu.Unlock()
}
