package proxy

import (
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"cacheproxy/internal/clock"
	"cacheproxy/internal/tier/memtier"
)

// The tiers' orderings on the in-memory L2 (internal/tier/memtier),
// driven by fake clocks: no Redis, no real time waited. The same behaviours
// are tested against a real redis-server in fleet_test.go and
// faults_test.go.

// onHub starts one replica per element of each, sharing hub.
func onHub(t *testing.T, hub *memtier.Hub, each ...[]harnessOpt) []*harness {
	return sharing(t, func(s *setup) { s.hub = hub }, each...)
}

func newHub() *memtier.Hub { return memtier.New(clock.NewFake(time.Unix(1_000_000, 0)), time.Second) }

// A claim holder that dies mid-fetch holds the waiting replica up until
// its claim lapses on the hub's clock, no longer: B takes over once the
// hub's clock has moved ClaimTTL past A's death, and makes its own call.
func TestTierClaimTakeoverOnTheFakeClock(t *testing.T) {
	hub := newHub()
	r := onHub(t, hub, nil, nil)
	a, b := r[0], r[1]
	hang := make(chan struct{})
	defer close(hang)
	var calls atomic.Int64
	a.conv.Before = func(w http.ResponseWriter, req *http.Request) bool {
		if calls.Add(1) == 1 {
			<-hang // the dying replica's call never comes back
		}
		return false
	}
	go a.do("GET", pathConv, basic(acctA, tokenA))
	waitUntil(t, "A holds the claim and its call is upstream", func() bool { return a.p.Summary().ClaimsWon == 1 && calls.Load() == 1 })
	a.member.Kill()
	answered := make(chan string, 1)
	go func() {
		s, cs, _ := b.get(pathConv)
		answered <- strconv.Itoa(s) + " " + cs
	}()
	waitUntil(t, "B waits on A's claim", func() bool { return b.p.Summary().ClaimsWaited == 1 })
	if n := calls.Load(); n != 1 {
		t.Fatalf("%d upstream calls while A's claim holds, want 1", n)
	}
	hub.Advance(time.Second)
	if got := <-answered; got != "200 cacheproxy; fwd=uri-miss; stored" {
		t.Fatalf("B: %q", got)
	}
	if n, won := calls.Load(), b.p.Summary().ClaimsWon; n != 2 || won != 1 {
		t.Fatalf("%d upstream calls, B won %d claims: want 2 and 1", n, won)
	}
}

// A L2 that fails every call is a miss, never a client error:
// reads are answered from the upstream and kept in L1, and the errors are
// counted.
func TestTierDownIsAMiss(t *testing.T) {
	hub := newHub()
	a := onHub(t, hub, nil)[0]
	hub.Fail(true)
	if s, cs, _ := a.get(pathConv); s != 200 || cs != "cacheproxy; fwd=uri-miss; stored" {
		t.Fatalf("with the tier down: %d %q", s, cs)
	}
	if _, cs, _ := a.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") {
		t.Fatalf("again: %q, want an L1 hit", cs)
	}
	if n := a.p.Summary().L2Errors; n == 0 {
		t.Fatal("the tier's errors were not counted")
	}
}

// Replicas' clocks an hour apart: a shared hit's ttl stays within
// cache.ttl and its Age is never negative, either way round.
func TestTierSkew(t *testing.T) {
	for _, ahead := range []time.Duration{time.Hour, -time.Hour} {
		hub := newHub()
		r := onHub(t, hub, nil, []harnessOpt{clockAhead(ahead)})
		a, b := r[0], r[1]
		a.get(pathConv)
		hub.Advance(5 * time.Second)
		a.clk.Advance(5 * time.Second)
		b.clk.Advance(5 * time.Second)
		resp := b.do("GET", pathConv, basic(acctA, tokenA))
		resp.Body.Close()
		cs, age := resp.Header.Get("Cache-Status"), resp.Header.Get("Age")
		if !strings.HasSuffix(cs, "detail=l2") || hitTTL(cs) != 25 || age != "5" {
			t.Errorf("B %s ahead: %q, Age %q; want a shared hit with ttl=25, Age 5", ahead, cs, age)
		}
	}
}

// A replica whose stream is held (its heartbeats would come back late)
// serves nothing from its L1: a read right after another replica's write
// returns the write's data; once its stream is delivered it serves from
// L1 again.
func TestTierHeldStreamHidesL1(t *testing.T) {
	hub := newHub()
	r := onHub(t, hub, nil, nil)
	a, b := r[0], r[1]
	before := attrs(t, b)
	if _, cs, _ := b.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") {
		t.Fatalf("B's own copy: %q", cs)
	}
	b.member.Hold()
	a.update("POST", pathConv, `{"v":1}`)
	if got := attrs(t, b); got == before {
		t.Fatalf("B with its stream held, after A's write: %s, the data from before", got)
	}
	b.member.Deliver()
	b.get(pathConv)
	if _, cs, body := b.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") || !strings.Contains(body, `\"v\":1`) {
		t.Fatalf("B once delivered: %q %s", cs, body)
	}
}
