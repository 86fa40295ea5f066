package proxy

import (
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"cacheproxy/internal/clock"
	"cacheproxy/internal/redistest"
)

// clockAhead sets a replica's clock d ahead of the others'.
func clockAhead(d time.Duration) harnessOpt {
	return func(s *setup) { s.opts.Clock.(*clock.Fake).Advance(d) }
}

// hitTTL is the ttl of a hit's Cache-Status, or -1.
func hitTTL(cs string) int {
	_, rest, ok := strings.Cut(cs, "; hit; ttl=")
	if !ok {
		return -1
	}
	n, _ := strconv.Atoi(strings.SplitN(rest, ";", 2)[0])
	return n
}

// Finding 4 of the faults issue: replicas' clocks an hour apart, either
// way. A shared entry carries lifetimes, not the writer's wall clock: on
// any replica a hit's ttl stays within cache.ttl and Age is never
// negative, from the shared tier and from L1 after it.
func TestFleetClockSkew(t *testing.T) {
	for _, skew := range []time.Duration{time.Hour, -time.Hour} {
		t.Run(skew.String(), func(t *testing.T) {
			r := replicasEach(t, redistest.Start(t), []harnessOpt{clockAhead(skew)}, nil)
			a, b := r[0], r[1]
			ttl := int(a.cfg.Cache.TTL.D() / time.Second)
			if s, cs, _ := a.get(pathConv); s != 200 || !strings.HasSuffix(cs, "stored") {
				t.Fatalf("A: %d %q", s, cs)
			}
			for i, want := range []string{"; detail=shared", ""} {
				resp := b.do("GET", pathConv, basic(acctA, tokenA))
				age := resp.Header.Get("Age")
				s, cs, _ := readResp(t, resp)
				if s != 200 || hitTTL(cs) < 0 || !strings.HasSuffix(cs, want) || (want == "" && strings.Contains(cs, "shared")) {
					t.Fatalf("B, read %d: %d %q, want a hit ending %q", i, s, cs, want)
				}
				if n := hitTTL(cs); n > ttl {
					t.Fatalf("B, read %d: ttl %d beyond cache.ttl %d", i, n, ttl)
				}
				if n, err := strconv.Atoi(age); err != nil || n < 0 || n > ttl {
					t.Fatalf("B, read %d: Age %q", i, age)
				}
			}
			if n := a.conv.Calls("GET", pathConv); n != 1 {
				t.Fatalf("upstream calls %d, want 1 (B shares A's entry)", n)
			}
		})
	}
}

// Finding 6: the replica holding a cold key's claim dies mid-fetch (its
// Redis connection ends; its upstream call hangs). The replica waiting on
// the claim takes it over once it lapses (fleet.ClaimTTL, as its holder no
// longer renews it) and makes its own call with its own full upstream
// timeout: 200, not 504.
func TestFleetClaimTakeoverWhenTheHolderDies(t *testing.T) {
	r := replicas(t, 2, redistest.Start(t))
	a, b := r[0], r[1]
	hang := make(chan struct{})
	defer close(hang)
	var calls atomic.Int64
	a.conv.Before = func(w http.ResponseWriter, req *http.Request) bool {
		if calls.Add(1) == 1 {
			<-hang // the dying replica's call never comes back in time
		}
		return false
	}
	go a.do("GET", pathConv, basic(acctA, tokenA)) // its answer never matters
	waitUntil(t, "A holds the claim", func() bool { return a.p.Summary().LeasesWon == 1 })
	a.fleet.Close() // A is gone: its claim is no longer renewed
	start := time.Now()
	s, cs, body := b.get(pathConv)
	t.Logf("B answered after %v", time.Since(start))
	if s != 200 || cs != "cacheproxy; fwd=uri-miss; stored" || !strings.Contains(body, member1) {
		t.Fatalf("B: %d %q %s", s, cs, body)
	}
	if w, won := b.p.Summary().LeasesWaited, b.p.Summary().LeasesWon; w != 1 || won != 1 {
		t.Fatalf("B waited %d, won %d: want it to wait, then take over", w, won)
	}
	if n := calls.Load(); n != 2 {
		t.Fatalf("upstream calls %d, want 2 (the dead one's and B's)", n)
	}
}

// waitUntil polls cond (state another goroutine or process changes) for
// up to 30 s.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(2 * time.Millisecond) // another goroutine's or process's progress
	}
}
