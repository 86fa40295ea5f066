package proxy

import (
	"strconv"
	"strings"
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
