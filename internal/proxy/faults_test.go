package proxy

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"cacheproxy/internal/clock"
	"cacheproxy/internal/fleet"
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
// negative, from L2 and from L1 after it.
func TestFleetClockSkew(t *testing.T) {
	for _, skew := range []time.Duration{time.Hour, -time.Hour} {
		t.Run(skew.String(), func(t *testing.T) {
			r := replicasEach(t, redistest.Start(t), []harnessOpt{clockAhead(skew)}, nil)
			a, b := r[0], r[1]
			ttl := int(a.cfg.Cache.TTL.D() / time.Second)
			if s, cs, _ := a.get(pathConv); s != 200 || !strings.HasSuffix(cs, "stored") {
				t.Fatalf("A: %d %q", s, cs)
			}
			for i, want := range []string{"; detail=l2", ""} {
				resp := b.do("GET", pathConv, basic(acctA, tokenA))
				age := resp.Header.Get("Age")
				s, cs, _ := readResp(t, resp)
				if s != 200 || hitTTL(cs) < 0 || !strings.HasSuffix(cs, want) || (want == "" && strings.Contains(cs, "detail=l2")) {
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
	waitUntil(t, "A holds the claim", func() bool { return a.p.Summary().ClaimsWon == 1 })
	a.fleet.Close() // A is gone: its claim is no longer renewed
	start := time.Now()
	s, cs, body := b.get(pathConv)
	t.Logf("B answered after %v", time.Since(start))
	if s != 200 || cs != "cacheproxy; fwd=uri-miss; stored" || !strings.Contains(body, member1) {
		t.Fatalf("B: %d %q %s", s, cs, body)
	}
	if w, won := b.p.Summary().ClaimsWaited, b.p.Summary().ClaimsWon; w != 1 || won != 1 {
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

// redisTimeout sets the replica's redis.timeout.
func redisTimeout(d time.Duration) harnessOpt { return func(s *setup) { s.redisTimeout = d } }

// invalidationWait sets the replica's redis.invalidation_wait.
func invalidationWait(d time.Duration) harnessOpt {
	return func(s *setup) { s.invalidationWait = d }
}

// through makes a replica reach Redis through link instead.
func through(link *redistest.Link) harnessOpt {
	return withFleet(link.URL())
}

// attrs is the attributes a read of the participant returns.
func attrs(t *testing.T, h *harness) string {
	t.Helper()
	s, _, body := h.get(pathConv)
	if s != 200 {
		t.Fatalf("read: %d %s", s, body)
	}
	_, rest, _ := strings.Cut(body, `"attributes":"`)
	v, _, _ := strings.Cut(rest, `","`)
	return v
}

// Findings 1 and 2: a write through A whose fleet invalidation does not
// reach Redis (Redis slow on A's link; Redis killed, then restarted from
// its AOF) is kept and retried until Redis takes it. Meanwhile A trusts
// no shared entry it covers; afterwards neither A nor B serves the data
// from before the write.
func TestFleetInvalidationThatMissedRedisIsRetried(t *testing.T) {
	cases := map[string]struct {
		args  []string
		fault func(t *testing.T, srv *redistest.Server, link *redistest.Link) (recover func())
	}{
		"slow": {fault: func(t *testing.T, _ *redistest.Server, link *redistest.Link) func() {
			link.Latency(t, 200) // past A's redis.timeout of 50 ms
			return link.Clear
		}},
		"killed, restarted from its AOF": {args: []string{"--appendonly", "yes", "--appendfsync", "always"},
			fault: func(t *testing.T, srv *redistest.Server, _ *redistest.Link) func() {
				srv.Stop()
				return func() { srv.Restart(t) }
			}},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			srv := redistest.Start(t, tc.args...)
			link := redistest.NewLink(t, srv.Addr)
			r := replicasEach(t, srv, []harnessOpt{redisTimeout(50 * time.Millisecond), through(link)}, nil)
			a, b := r[0], r[1]
			before := attrs(t, a)
			if _, cs, _ := b.get(pathConv); !strings.HasSuffix(cs, "detail=l2") {
				t.Fatalf("B before: %q", cs)
			}
			// The fault comes while the write is upstream: its intent was
			// recorded (a write whose intent cannot be is refused).
			var recover func()
			a.conv.Before = func(w http.ResponseWriter, req *http.Request) bool {
				if req.Method == http.MethodPost && recover == nil {
					recover = tc.fault(t, srv, link)
				}
				return false
			}
			a.update("POST", pathConv, `{"v":1}`)
			a.conv.Before = nil
			if a.inv.Stats().Queued == 0 {
				t.Fatal("the write's invalidation reached Redis: the fault did not bite")
			}
			if got := attrs(t, a); got == before {
				t.Fatalf("A during the fault: %s, the data from before its write", got)
			}
			recover()
			waitUntil(t, "A's invalidation is in Redis and told", func() bool { return a.inv.Unsent() == 0 })
			waitUntil(t, "both trust the stream", func() bool { return a.inv.Trusted() && b.inv.Trusted() })
			for name, h := range map[string]*harness{"A": a, "B": b} {
				if got := attrs(t, h); got == before || !strings.Contains(got, `\"v\":1`) {
					t.Fatalf("%s after Redis recovered: %s, want the write's data", name, got)
				}
			}
		})
	}
}

// Finding 5: garbage in the fleet's epoch (not a number, or so large that
// INCR overflows) is an error, not silence: counted, unhealthy, and a
// write's invalidation still reaches the other replicas, which read the
// write's data. Once the key is repaired, the replica is healthy again.
func TestFleetGarbageInRedisIsAnError(t *testing.T) {
	for _, garbage := range []string{"garbage", "9223372036854775807"} {
		t.Run(garbage, func(t *testing.T) {
			srv := redistest.Start(t)
			r := replicas(t, 2, srv)
			a, b := r[0], r[1]
			before := attrs(t, a)
			attrs(t, b) // in B's L1
			srv.CLI(t, "SET", "cacheproxy:epoch", garbage)
			a.update("POST", pathConv, `{"v":1}`)
			if a.fleet.CorruptReads() == 0 || a.fleet.Healthy() {
				t.Fatalf("garbage not noticed: %d reads, healthy %v", a.fleet.CorruptReads(), a.fleet.Healthy())
			}
			if got := attrs(t, b); got == before {
				t.Fatalf("B after A's write with garbage in Redis: %s, the data from before", got)
			}
			srv.CLI(t, "DEL", "cacheproxy:epoch")
			waitUntil(t, "A is healthy again", a.fleet.Healthy)
		})
	}
}

// Finding 5, acknowledgements: a stray subscriber on the fleet's channel
// (a redis-cli left open) is not waited for; only replicas that announced
// themselves with the fleet's secret are.
func TestFleetStraySubscriberCostsNothing(t *testing.T) {
	srv := redistest.Start(t)
	r := replicas(t, 2, srv)
	host, port, _ := net.SplitHostPort(srv.Addr)
	stray := exec.Command("redis-cli", "-h", host, "-p", port, "SSUBSCRIBE", "cacheproxy:{inv}")
	if err := stray.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stray.Process.Kill(); _ = stray.Wait() })
	waitUntil(t, "the stray subscriber listens", func() bool {
		return strings.Contains(srv.CLI(t, "PUBSUB", "SHARDNUMSUB", "cacheproxy:{inv}"), "3")
	})
	for range 5 {
		r[0].update("POST", pathConv, `{"v":1}`)
	}
	if n, acked := r[0].inv.Stats().Unacked, r[0].inv.Stats().Acked; n != 0 || acked < 10 {
		t.Fatalf("unacknowledged %d, acknowledged %d: want 0 and both replicas' 10", n, acked)
	}
}

// Finding 3: a replica with another cache.key_secret cannot open the
// fleet's invalidations: it drops its whole L1 on each (so it never
// serves data from before another replica's write), and writers do not
// wait for it.
func TestFleetReplicaWithAnotherSecret(t *testing.T) {
	srv := redistest.Start(t)
	other := func(s *setup) { s.opts.KeySecret = []byte("another-secret") }
	r := replicasEach(t, srv, nil, []harnessOpt{other})
	a, b := r[0], r[1]
	before := attrs(t, b)
	if _, cs, _ := b.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") {
		t.Fatalf("B's own copy: %q", cs)
	}
	a.update("POST", pathConv, `{"v":1}`)
	waitUntil(t, "B heard an invalidation it cannot open", func() bool { return b.inv.Stats().Unopened > 0 })
	if got := attrs(t, b); got == before {
		t.Fatalf("B after A's write: %s, the data from before", got)
	}
	if n := a.inv.Stats().Unacked; n != 0 {
		t.Fatalf("A waited for B: %d unacknowledged", n)
	}
}

// Finding 8: a replica that is not yet trusted (subscribed, but not yet
// counted by every writer) keeps nothing in and serves nothing from L1;
// once trusted it does.
//
// A replica now trusts within a few round trips of subscribing (docs/fleet.md),
// so its Redis link goes down (it loses its trust) and comes back.
func TestFleetReplicaTrustsL1OnlyOnceCounted(t *testing.T) {
	srv := redistest.Start(t)
	link := redistest.NewLink(t, srv.Addr)
	h := newHarness(t, through(link))
	waitTrusted(t, h.inv) // trusted first, so that losing it is the fault's doing
	link.Down()
	waitUntil(t, "the replica lost its trust", func() bool { return !h.inv.Trusted() })
	for range 2 {
		if _, cs, _ := h.get(pathConv); cs != "cacheproxy; fwd=uri-miss" {
			t.Fatalf("before it is trusted: %q, want a miss that stores nothing", cs)
		}
	}
	if h.inv.Trusted() {
		t.Fatal("trusted without Redis")
	}
	link.Up(t)
	// Trusted again (waitTrusted waits for the first trust only, which
	// came before the link went down).
	waitUntil(t, "the replica is trusted again", h.inv.Trusted)
	h.get(pathConv)
	if _, cs, _ := h.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") {
		t.Fatalf("once trusted: %q, want a hit", cs)
	}
}

// Point 7: a reader whose invalidation stream is delayed past
// redis.invalidation_wait (Toxiproxy adds 300 ms to B's Redis link; the
// wait is 100 ms) serves nothing from its L1 meanwhile: a read through B
// right after a write through A, whose wait for B's acknowledgement ran
// out, returns the write's data. Once the stream is current again, B
// serves from L1 again.
func TestFleetReaderWithAStreamDelayedPastTheWait(t *testing.T) {
	srv := redistest.Start(t)
	link := redistest.NewLink(t, srv.Addr)
	wait := invalidationWait(100 * time.Millisecond)
	r := replicasEach(t, srv, []harnessOpt{wait}, []harnessOpt{wait, through(link)})
	a, b := r[0], r[1]
	before := attrs(t, a)
	for _, path := range []string{pathConv, pathProxy} {
		b.get(path)
		if _, cs, _ := b.get(path); !strings.HasPrefix(cs, "cacheproxy; hit") || strings.Contains(cs, "detail=l2") {
			t.Fatalf("B's own copy of %s: %q", path, cs)
		}
	}
	link.Latency(t, 300)
	a.update("POST", pathConv, `{"v":1}`)
	if a.inv.Stats().Unacked == 0 {
		t.Fatal("B acknowledged within the wait: the fault did not bite")
	}
	if got := attrs(t, b); got == before {
		t.Fatalf("B right after A's write: %s, the data from before it", got)
	}
	if b.inv.Stats().Lapses == 0 {
		t.Fatal("B's stream fell behind uncounted")
	}
	link.Clear()
	waitUntil(t, "B applied A's invalidation", func() bool { return b.inv.Stats().Received > 0 })
	waitUntil(t, "B serves from its L1 again", func() bool {
		_, cs, _ := b.get(pathConv)
		return strings.HasPrefix(cs, "cacheproxy; hit")
	})
	if got := attrs(t, b); !strings.Contains(got, `\"v\":1`) {
		t.Fatalf("B afterwards: %s, want the write's data", got)
	}
	// What the write did not touch was kept through the lapse: B heard
	// every invalidation before it was current again.
	if _, cs, _ := b.get(pathProxy); !strings.HasPrefix(cs, "cacheproxy; hit") || strings.Contains(cs, "detail=l2") {
		t.Fatalf("B's copy of another participant after the lapse: %q, want an L1 hit", cs)
	}
}

// A reader whose subscription Redis dropped without the reader knowing
// (its link went dark: nothing arrives, not even the close) is still
// waited for: Redis no longer counts it among the receivers, but the
// writer waits for every replica that announced itself, up to
// redis.invalidation_wait, by when the reader's own heartbeats are too
// old for it to trust its L1. Before, the writer waited only for the
// receivers Redis counted and answered at once, and the reader served the
// data from before the write from its L1.
func TestFleetReaderWhoseSubscriptionRedisDroppedUnseen(t *testing.T) {
	srv := redistest.Start(t)
	srv.CLI(t, "ACL", "SETUSER", "b", "on", ">b-password", "~*", "&*", "+@all")
	link := redistest.NewLink(t, srv.Addr)
	wait := invalidationWait(2 * time.Second)
	r := replicasEach(t, srv, []harnessOpt{wait}, []harnessOpt{wait, withFleet("redis://b:b-password@" + link.Addr)})
	a, b := r[0], r[1]
	b.get(pathConv)
	if _, cs, _ := b.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") {
		t.Fatalf("B's own copy: %q", cs)
	}
	link.Silence(t)
	srv.CLI(t, "CLIENT", "KILL", "USER", "b")
	waitUntil(t, "Redis dropped B's subscription", func() bool {
		return strings.Fields(srv.CLI(t, "PUBSUB", "SHARDNUMSUB", "cacheproxy:{inv}"))[1] == "1"
	})
	if !b.inv.Subscribed() {
		t.Fatal("B noticed its subscription ended: the fault did not bite")
	}
	a.update("POST", pathConv, `{"v":1}`)
	if s, cs, body := b.get(pathConv); s != 200 || !strings.Contains(body, `\"v\":1`) {
		t.Fatalf("B right after A's write: %d %q %s, want the write's data", s, cs, body)
	}
	if a.inv.Stats().Unacked == 0 {
		t.Fatal("A did not wait for B")
	}
	link.Clear()
}

// A write whose invalidation Redis took (the epoch and the marks) but
// whose message it did not (the SPUBLISH refused or unanswered; here an
// ACL forbids it) is kept and published again until Redis takes it: a
// reader with a healthy stream then serves the write's data. Before, the
// write counted as told, the message was never sent again, and the reader
// served the data from before the write from its L1 until cache.ttl.
func TestFleetInvalidationWhosePublishFailedIsSentAgain(t *testing.T) {
	srv := redistest.Start(t)
	srv.CLI(t, "ACL", "SETUSER", "a", "on", ">a-password", "~*", "&*", "+@all")
	r := replicasEach(t, srv, []harnessOpt{withFleet("redis://a:a-password@" + srv.Addr)}, nil)
	a, b := r[0], r[1]
	before := attrs(t, b)
	if _, cs, _ := b.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") {
		t.Fatalf("B's own copy: %q", cs)
	}
	// Forbidden once the write is upstream: its intent went out, its
	// completion cannot.
	a.conv.Before = func(w http.ResponseWriter, req *http.Request) bool {
		if req.Method == http.MethodPost {
			srv.CLI(t, "ACL", "SETUSER", "a", "-spublish")
		}
		return false
	}
	a.update("POST", pathConv, `{"v":1}`)
	a.conv.Before = nil
	if a.inv.Unsent() == 0 {
		t.Fatal("A's write counts as told: nothing is kept to send again")
	}
	srv.CLI(t, "ACL", "SETUSER", "a", "+spublish")
	waitUntil(t, "A's invalidation is published", func() bool { return a.inv.Unsent() == 0 })
	if got := attrs(t, b); got == before || !strings.Contains(got, `\"v\":1`) {
		t.Fatalf("B after A's invalidation was published: %s, want the write's data", got)
	}
}

// A replica that loses its trust while its stream is current (its
// announcements fail: here an ACL forbids it scripts, so writers stop
// counting it) serves nothing from its L1 from then on. Before, a hit that
// had found its entry valid at the current epoch asked no more, so the
// replica went on serving its L1 untrusted.
func TestFleetReplicaThatLosesTrustServesNothingFromL1(t *testing.T) {
	srv := redistest.Start(t)
	srv.CLI(t, "ACL", "SETUSER", "b", "on", ">b-password", "~*", "&*", "+@all")
	b := replicasEach(t, srv, []harnessOpt{withFleet("redis://b:b-password@" + srv.Addr)})[0]
	b.get(pathConv)
	if _, cs, _ := b.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") {
		t.Fatalf("B's own copy: %q", cs)
	}
	srv.CLI(t, "ACL", "SETUSER", "b", "-eval", "-evalsha")
	waitUntil(t, "B is no longer trusted", func() bool { return !b.inv.Trusted() })
	if s, cs, _ := b.get(pathConv); s != 200 || strings.HasPrefix(cs, "cacheproxy; hit") {
		t.Fatalf("B untrusted: %d %q, want a miss", s, cs)
	}
}

// Point 2, an older snapshot: Redis is killed and restarted from an RDB
// snapshot taken before a write, so its epoch is lower than the one the
// replicas saw, the pre-write shared entry is back and the write's marks
// are gone. No replica serves that entry: the first to read the lower
// epoch raises the epoch and the floor past what it saw.
func TestFleetRedisRestoredFromAnOlderSnapshot(t *testing.T) {
	srv := redistest.Start(t)
	r := replicas(t, 2, srv)
	a, b := r[0], r[1]
	before := attrs(t, a) // shared
	srv.CLI(t, "SAVE")
	a.update("POST", pathConv, `{"v":1}`)
	if got := attrs(t, b); got == before {
		t.Fatalf("B after A's write: %s", got)
	}
	srv.Stop()
	srv.Restart(t) // from the snapshot
	waitUntil(t, "both trust the stream again", func() bool { return a.inv.Trusted() && b.inv.Trusted() })
	for name, h := range map[string]*harness{"B": b, "A": a} {
		if got := attrs(t, h); got == before {
			t.Fatalf("%s after Redis came back from the older snapshot: %s, the data from before the write", name, got)
		}
	}
	if a.fleet.Rewinds()+b.fleet.Rewinds() == 0 {
		t.Fatal("Redis went backwards unnoticed")
	}
}

// An announcement Redis answers too late (a slow moment on the replica's
// link, past redis.timeout) does not cost the replica its trust, and so
// its L1: writers count an announcement for three seconds.
func TestFleetSlowAnnouncementKeepsTrust(t *testing.T) {
	srv := redistest.Start(t)
	link := redistest.NewLink(t, srv.Addr)
	h := replicasEach(t, srv, []harnessOpt{redisTimeout(50 * time.Millisecond), through(link)})[0]
	errs := h.fleet.Errors()
	link.Latency(t, 300)
	for end := time.Now().Add(1200 * time.Millisecond); time.Now().Before(end); time.Sleep(time.Millisecond) { // the fault lasts past two announcements
		if !h.inv.Trusted() {
			t.Fatalf("untrusted %d Redis errors after the link slowed", h.fleet.Errors()-errs)
		}
	}
	link.Clear()
	if h.fleet.Errors() == errs {
		t.Fatal("no call timed out: the fault did not bite")
	}
}

// What a webhook delivery is answered with depends on this (hostile input,
// point 6): an invalidation is confirmed only once it is in Redis and every
// replica counted acknowledged it. Redis slow on A's link: queued; B's
// stream slow past the wait: not acknowledged; both fine: confirmed.
func TestFleetInvalidationsAreConfirmedOrNot(t *testing.T) {
	srv := redistest.Start(t)
	la, lb := redistest.NewLink(t, srv.Addr), redistest.NewLink(t, srv.Addr)
	wait := invalidationWait(100 * time.Millisecond)
	r := replicasEach(t, srv, []harnessOpt{wait, redisTimeout(50 * time.Millisecond), through(la)}, []harnessOpt{wait, through(lb)})
	a := r[0]
	ctx := context.Background()
	tags := []string{"conversations|conversation:" + conv1}
	if _, err := a.inv.InvalidateConfirmed(ctx, tags); err != nil {
		t.Fatalf("all well: %v", err)
	}
	la.Latency(t, 200)
	if _, err := a.inv.InvalidateConfirmed(ctx, tags); !errors.Is(err, fleet.ErrQueued) {
		t.Fatalf("Redis slow on A's link: %v, want ErrQueued", err)
	}
	la.Clear()
	waitUntil(t, "A's invalidation is in Redis", func() bool { return a.inv.Unsent() == 0 })
	lb.Latency(t, 300)
	if _, err := a.inv.InvalidateConfirmed(ctx, tags); err == nil || errors.Is(err, fleet.ErrQueued) {
		t.Fatalf("B's stream slow past the wait: %v, want an unacknowledged invalidation", err)
	}
	lb.Clear()
}
