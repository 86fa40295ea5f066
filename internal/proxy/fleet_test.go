package proxy

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"cacheproxy/internal/config"
	"cacheproxy/internal/fleet"
	"cacheproxy/internal/redistest"
	"cacheproxy/internal/twiliofake"
)

// withFleet gives a replica L2 on the redis-server at url,
// with the harness's key secret (the same on every replica). The tier is
// opened once every option is applied (a later one may change the secret).
func withFleet(url string) harnessOpt {
	return func(s *setup) { s.fleetURL = url }
}

// openFleet opens the replica's L2 as its options say.
func openFleet(t testing.TB, s *setup) *fleet.Fleet {
	timeout := time.Second
	if s.redisTimeout > 0 {
		timeout = s.redisTimeout
	}
	f, err := fleet.Open(fleet.Config{URL: s.fleetURL, Prefix: "cacheproxy:", Timeout: timeout,
		Secret: s.opts.KeySecret, Previous: s.previous, Retention: time.Hour, ClaimTTL: fleet.ClaimTTL, Clock: s.opts.Clock,
		WriteHold: s.writeHold, IntentWait: s.cfg.RateLimit.MaxWait.D()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := f.Connected(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	return f
}

// replicas starts n proxies that share one fake Twilio (the first's) and
// the redis-server srv.
func replicas(t *testing.T, n int, srv interface{ URL() string }, opts ...harnessOpt) []*harness {
	each := make([][]harnessOpt, n)
	for i := range each {
		each[i] = opts
	}
	return replicasEach(t, srv, each...)
}

// replicasEach starts one replica per element of each, with those options,
// sharing one fake Twilio (the first's) and the redis-server srv.
func replicasEach(t *testing.T, srv interface{ URL() string }, each ...[]harnessOpt) []*harness {
	out := sharing(t, withFleet(srv.URL()), each...)
	for _, h := range out {
		waitTrusted(t, h.inv)
	}
	return out
}

// sharing starts one replica per element of each with L2
// tier gives it, then those options (one may point it elsewhere), in
// front of one fake Twilio (the first's).
func sharing(t *testing.T, tier harnessOpt, each ...[]harnessOpt) []*harness {
	first := newHarness(t, append([]harnessOpt{tier}, each[0]...)...)
	out := []*harness{first}
	for _, opts := range each[1:] {
		h := newHarness(t, append(append([]harnessOpt{tier}, opts...), func(s *setup) {
			s.cfg.Upstreams.Conversations.URL, s.cfg.Upstreams.Proxy.URL = first.convSrv.URL, first.proxSrv.URL
		})...)
		h.conv, h.prox = first.conv, first.prox // the one upstream, for assertions
		out = append(out, h)
	}
	return out
}

// Point 1 of the fleet issue: a read through A, then the same read through
// B, makes one upstream call; B answers from L2, and then
// from its own L1.
func TestFleetSharesEntries(t *testing.T) {
	srv := redistest.Start(t)
	r := replicas(t, 3, srv)
	a, b, c := r[0], r[1], r[2]
	for _, path := range []string{pathConv, pathV2} {
		s, cs, body := a.get(path)
		if s != 200 || cs != "cacheproxy; fwd=uri-miss; stored" {
			t.Fatalf("A: %d %q", s, cs)
		}
		for _, h := range []*harness{b, c} {
			s, cs2, body2 := h.get(path)
			if s != 200 || !strings.HasPrefix(cs2, "cacheproxy; hit; ttl=") || !strings.HasSuffix(cs2, "; detail=l2") || body2 != body {
				t.Fatalf("second replica: %d %q", s, cs2)
			}
			if _, cs3, _ := h.get(path); !strings.HasPrefix(cs3, "cacheproxy; hit; ttl=") || strings.Contains(cs3, "detail=l2") {
				t.Fatalf("second replica, again: %q, want an L1 hit", cs3)
			}
		}
		if n := a.conv.Calls("GET", path); n != 1 {
			t.Fatalf("upstream calls for %s = %d, want 1", path, n)
		}
	}
	// An L1 hit sends Redis nothing about its request: no entry, claim,
	// account (slots) or key-book key. (The replicas' upkeep, such as
	// announcements and heartbeats, runs beside it on its own clock.)
	mon := srv.Monitor(t)
	for range 20 {
		if _, cs, _ := b.get(pathConv); strings.Contains(cs, "detail=l2") || !strings.HasPrefix(cs, "cacheproxy; hit") {
			t.Fatalf("L1 hit: %q", cs)
		}
	}
	mon.Stop()
	if sent := mon.Naming(requestKeys...); len(sent) != 0 {
		t.Fatalf("Redis ran %d commands of request keys during 20 L1 hits, want 0: %q", len(sent), sent)
	}
	// The filter sees what a miss sends.
	mon = srv.Monitor(t)
	if _, cs, _ := b.get(pathProxy); !strings.Contains(cs, "miss") {
		t.Fatalf("a new query: %q, want a miss", cs)
	}
	b.settle()
	mon.Stop()
	if len(mon.Naming(requestKeys...)) == 0 {
		t.Fatal("the command filter sees nothing of a miss")
	}
	// Another credential never opens A's entry: its own miss.
	if s, cs, _ := readResp(t, b.do("GET", pathConv, basic(acctB, tokenB))); s != 200 || !strings.HasPrefix(cs, "cacheproxy; fwd=uri-miss") {
		t.Fatalf("account B through B: %d %q", s, cs)
	}
	if b.p.Summary().L2Hits != 2 {
		t.Fatalf("summary: %+v", b.p.Summary())
	}
}

// A write through A invalidates the shared entry: B, which holds no copy
// of its own, fetches the new data instead of the shared old one.
func TestFleetWriteInvalidatesL2Entries(t *testing.T) {
	r := replicas(t, 2, redistest.Start(t))
	a, b := r[0], r[1]
	_, _, before := a.get(pathConv) // shared
	a.update("POST", pathConv, `{"v":1}`)
	// B fetches a read its pending covers and keeps nothing of it: the
	// write's completion may reach B a moment after A answered. (Here the
	// read waits for it, so that B's fetch is shared.)
	waitNoPending(t, b.inv)
	s, cs, after := b.get(pathConv)
	if s != 200 || !strings.HasSuffix(cs, "; stored") || after == before || !strings.Contains(after, `{\"v\":1}`) {
		t.Fatalf("B after A's write: %d %q %s", s, cs, after)
	}
	// What B fetched is shared again, for A's next read after its own L1
	// copy went with the write.
	if _, cs, body := a.get(pathConv); !strings.HasSuffix(cs, "detail=l2") || body != after {
		t.Fatalf("A after B's fetch: %q", cs)
	}
}

// Point 2: a dump of Redis (every key and value, and the RDB file) holds no
// participant data, identity, phone number, path, SID or token in clear.
func TestFleetStoresNothingReadable(t *testing.T) {
	srv := redistest.Start(t)
	r := replicas(t, 2, srv)
	for _, path := range []string{pathConv, pathProxy, pathV2} {
		if s, _, _ := r[0].get(path); s != 200 {
			t.Fatalf("%s: %d", path, s)
		}
	}
	r[0].update("POST", pathConv, "written")
	dump := srv.Dump(t)
	srv.CLI(t, "SAVE")
	rdb, err := os.ReadFile(filepath.Join(srv.Dir, "dump.rdb"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(dump, "cacheproxy:e:") || !strings.Contains(dump, "cacheproxy:m:") {
		t.Fatalf("the dump holds no entries or marks:\n%s", dump)
	}
	for _, secret := range []string{member1, conv1, kp1, sess1, ksvc, v2part, v2conv, acctA, tokenA, "alice@example.com",
		"+15005550001", "15005550001", "Alice", "Dana", "Participants", "Conversations", "account_sid", "written", "test-secret"} {
		if strings.Contains(dump, secret) || strings.Contains(string(rdb), secret) {
			t.Errorf("Redis holds %q in clear", secret)
		}
	}
}

// Point 6 (part): with Redis gone, every replica answers from L1 and the
// upstream, and says so in its error count; when Redis is back, sharing
// resumes without a restart.
func TestFleetSurvivesRedisOutage(t *testing.T) {
	srv := redistest.Start(t)
	r := replicas(t, 2, srv)
	a, b := r[0], r[1]
	a.get(pathConv)
	if _, cs, _ := b.get(pathConv); !strings.HasSuffix(cs, "detail=l2") { // now in B's L1 too
		t.Fatalf("B before the outage: %q", cs)
	}
	srv.Stop()
	// B no longer hears the fleet's invalidations: it drops what it holds
	// (and keeps dropping it each second until the stream is back).
	deadline := time.Now().Add(30 * time.Second)
	for b.inv.Subscribed() {
		if time.Now().After(deadline) {
			t.Fatal("B did not notice that Redis is gone")
		}
		time.Sleep(5 * time.Millisecond) // waiting for another process's end to reach B
	}
	for i, h := range []*harness{a, b} {
		for _, path := range []string{pathV2, pathProxy} {
			if s, _, _ := h.get(path); s != 200 {
				t.Fatalf("replica %d, %s with Redis down: %d", i, path, s)
			}
		}
	}
	// A write through A cannot be announced to the fleet: it is refused,
	// nothing sent upstream (docs/fleet.md, "Read-your-writes across replicas").
	refused(t, a, a, pathConv, "during the outage")
	if s, _, body := b.get(pathConv); s != 200 || strings.Contains(body, "during the outage") {
		t.Fatalf("B's read after A's refused write during the outage: %d %s", s, body)
	}
	if a.p.Summary().L2Errors == 0 || b.p.Summary().L2Errors == 0 {
		t.Fatalf("errors not counted: A %+v, B %+v", a.p.Summary(), b.p.Summary())
	}
	if a.budget.Stats().Fallbacks == 0 {
		t.Fatal("A's upstream calls during the outage did not fall back to its share of the budget")
	}
	srv.Restart(t)
	// Each replica trusts the stream again once it is subscribed and
	// counted by the others (fleet.Invalidator.Trusted).
	waitUntil(t, "both replicas trust the stream again", func() bool { return a.inv.Trusted() && b.inv.Trusted() })
	a.update("POST", pathConv, "after the outage")
	if s, _, body := b.get(pathConv); s != 200 || !strings.Contains(body, "after the outage") {
		t.Fatalf("B's read after A's write once Redis is back: %d %s", s, body)
	}
	// The first call on a dropped connection may fail while rueidis
	// reconnects; a few distinct reads (bounded) show sharing resumed.
	for i := range 20 {
		path := fmt.Sprintf("%s?attempt=%d", pathConv, i)
		a.get(path)
		if _, cs, _ := b.get(path); strings.HasSuffix(cs, "detail=l2") {
			return
		}
	}
	t.Fatal("sharing did not resume after Redis came back")
}

// requestKeys are the parts of the key names a request's commands use
// (entries, claims, an account's slots, the key book), under the
// default key prefix.
var requestKeys = []string{"cacheproxy:e:", "cacheproxy:l:", "cacheproxy:{a:", "cacheproxy:k:"}

// waitTrusted waits (bounded) until inv's replica is trusted: it hears the
// stream and every writer counts it.
func waitTrusted(t testing.TB, inv *fleet.Invalidator) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := inv.WaitTrusted(ctx); err != nil {
		t.Fatal("the replica was never trusted: ", err)
	}
}

// waitNoPending waits (bounded) until inv has heard the completion of
// every write whose intent it heard.
func waitNoPending(t testing.TB, inv *fleet.Invalidator) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); inv.Pending() > 0; {
		if time.Now().After(deadline) {
			t.Fatal("a write's completion never reached the replica")
		}
		time.Sleep(time.Millisecond) // the completion's delivery, in another goroutine
	}
}

// waitSubscribed waits (bounded) until inv hears the fleet's invalidations:
// a replica that starts is told of writes once its subscription is up.
func waitSubscribed(t testing.TB, inv *fleet.Invalidator) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !inv.Subscribed(); {
		if time.Now().After(deadline) {
			t.Fatal("the replica never subscribed to the fleet's invalidations")
		}
		time.Sleep(time.Millisecond) // the subscription's progress, in another goroutine
	}
}

// Point 4: 500 rounds of "update through A, then at once read through B
// and through C": no stale answer, though B and C hold the participant in
// their own L1 from the round before.
func TestFleetReadYourWritesAcrossReplicas(t *testing.T) {
	r := replicas(t, 3, redistest.Start(t))
	a, b, c := r[0], r[1], r[2]
	for round := range 500 {
		attrs := fmt.Sprintf(`{"round":%d}`, round)
		a.update("POST", pathConv, attrs)
		for name, h := range map[string]*harness{"B": b, "C": c} {
			if s, cs, body := h.get(pathConv); s != 200 || !strings.Contains(body, fmt.Sprintf(`{\"round\":%d}`, round)) {
				t.Fatalf("round %d, %s: %d %q %s", round, name, s, cs, body)
			}
		}
	}
	if n := a.inv.Stats().Sent; n != 500 {
		t.Fatalf("invalidations sent %d, want 500", n)
	}
	if b.inv.Stats().Received != 500 || c.inv.Stats().Received != 500 || a.inv.Stats().Acked != 1500 || a.inv.Stats().Unacked != 0 {
		t.Fatalf("received %d and %d, acknowledged %d, unacknowledged %d", b.inv.Stats().Received, c.inv.Stats().Received,
			a.inv.Stats().Acked, a.inv.Stats().Unacked)
	}
}

// A purge through one replica's admin endpoint reaches the whole fleet:
// the others' own copies and the shared entries.
func TestFleetPurgeReachesEveryReplica(t *testing.T) {
	r := replicas(t, 2, redistest.Start(t))
	a, b := r[0], r[1]
	a.warm(pathConv)
	b.warm(pathConv) // from L2, then in B's L1
	if !b.cachedFor(pathConv, basic(acctA, tokenA)) {
		t.Fatal("B holds no copy")
	}
	if s, _ := purge(t, a.p.PurgeHandler("", true), "path="+pathConv, ""); s != 200 {
		t.Fatalf("purge: %d", s)
	}
	// B's copy and the shared entry went: B fetches anew, and A then
	// gets what B fetched.
	before := a.conv.Calls("GET", pathConv)
	if _, cs, _ := b.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; fwd=uri-miss") {
		t.Fatalf("B after the purge: %q, want a miss", cs)
	}
	if _, cs, _ := a.get(pathConv); !strings.HasSuffix(cs, "detail=l2") {
		t.Fatalf("A after the purge and B's fetch: %q, want B's fetch from L2", cs)
	}
	if n := a.conv.Calls("GET", pathConv) - before; n != 1 {
		t.Fatalf("upstream calls after the purge: %d, want 1", n)
	}
}

// Point 7: the same guarantees on a 3-master Redis Cluster: shared
// entries, read-your-writes across replicas, nothing readable.
func TestFleetOnARedisCluster(t *testing.T) {
	cl := redistest.StartCluster(t, 3)
	r := replicas(t, 3, cl)
	a, b, c := r[0], r[1], r[2]
	for _, path := range []string{pathConv, pathProxy, pathV2} {
		a.get(path)
		if _, cs, _ := b.get(path); !strings.HasSuffix(cs, "detail=l2") {
			t.Fatalf("B, %s: %q", path, cs)
		}
	}
	for round := range 50 {
		a.update("POST", pathConv, fmt.Sprintf(`{"round":%d}`, round))
		for name, h := range map[string]*harness{"B": b, "C": c} {
			if s, cs, body := h.get(pathConv); s != 200 || !strings.Contains(body, fmt.Sprintf(`{\"round\":%d}`, round)) {
				t.Fatalf("round %d, %s: %d %q", round, name, s, cs)
			}
		}
	}
	dump := cl.Dump(t)
	if !strings.Contains(dump, "cacheproxy:e:") {
		t.Fatalf("no shared entries in the cluster:\n%s", dump)
	}
	for _, secret := range []string{member1, conv1, kp1, acctA, tokenA, "alice@example.com", "+15005550001"} {
		if strings.Contains(dump, secret) {
			t.Errorf("the cluster holds %q in clear", secret)
		}
	}
	if a.p.Summary().L2Errors+b.p.Summary().L2Errors != 0 {
		t.Fatalf("errors against the cluster: %+v %+v", a.p.Summary(), b.p.Summary())
	}
}

// Point 5: three replicas each get 100 concurrent cold reads of the same
// participant: one upstream call in all. The upstream holds its one call
// until the two other replicas wait on the key's fleet-wide claim.
func TestFleetMakesOneUpstreamCallPerColdKey(t *testing.T) {
	r := replicas(t, 3, redistest.Start(t))
	release := make(chan struct{})
	r[0].conv.Before = func(w http.ResponseWriter, req *http.Request) bool { <-release; return false }
	answers := make(chan string, 300)
	for _, h := range r {
		for range 100 {
			go func() {
				s, cs, _ := readResp(t, h.do("GET", pathConv, basic(acctA, tokenA)))
				answers <- fmt.Sprint(s, " ", cs)
			}()
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		waiting := 0
		for _, h := range r {
			waiting += int(h.p.Summary().ClaimsWaited)
		}
		if waiting == 2 {
			break
		}
		if time.Now().After(deadline) {
			close(release)
			t.Fatalf("%d replicas wait on the key's claim, want 2", waiting)
		}
		time.Sleep(time.Millisecond) // waiting for other replicas' calls to Redis
	}
	close(release)
	fleetCollapsed := 0
	for range 300 {
		a := <-answers
		if !strings.HasPrefix(a, "200 ") {
			t.Fatalf("answer %q", a)
		}
		if strings.HasSuffix(a, "cacheproxy; fwd=uri-miss; collapsed; detail=peer") {
			fleetCollapsed++
		}
	}
	if fleetCollapsed < 2 { // the two waiting replicas' flights (a late read is an L1 hit)
		t.Fatalf("%d answers collapsed into another replica's fetch, want at least 2", fleetCollapsed)
	}
	if n := r[0].conv.Calls("GET", pathConv); n != 1 {
		t.Fatalf("upstream calls %d, want 1", n)
	}
	won := 0
	for _, h := range r {
		won += int(h.p.Summary().ClaimsWon)
	}
	if won != 1 {
		t.Fatalf("claims won %d, want 1", won)
	}
}

// Point 3: max_concurrent is a total for the fleet. Three replicas, a fake
// Twilio that answers 429 above 10 requests in flight per account, 100
// concurrent cold reads of distinct participants sent to each replica at
// once: all answered, no 429 from Twilio, never more than 10 in flight.
func TestFleetBudgetIsAccountWide(t *testing.T) {
	r := replicas(t, 3, redistest.Start(t), realRetries, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 10, config.Duration(time.Minute)
	})
	paths := twilioLimit(r[0], 10, 300)
	answers := make(chan int, 300)
	for i, h := range r {
		for _, path := range paths[i*100 : (i+1)*100] {
			go func() {
				s, _, _ := readResp(t, h.do("GET", path, basic(acctA, tokenA)))
				answers <- s
			}()
		}
	}
	for range 300 {
		if s := <-answers; s != 200 {
			t.Fatalf("status %d", s)
		}
	}
	if n, peak := r[0].conv.TooMany(), r[0].conv.Peak(acctA); n != 0 || peak > 10 {
		t.Fatalf("Twilio answered %d 429s, peak in flight %d: want 0, <= 10", n, peak)
	}
	waited := int64(0)
	for _, h := range r {
		waited += h.budget.Stats().Waited
	}
	if waited == 0 {
		t.Fatal("no call waited for a fleet slot: the test did not exceed the fleet's cap")
	}
}

// Point 6 under load: Redis is killed while two replicas serve reads and
// writes, then started again: every request is answered, none with an
// error, and sharing resumes.
func TestFleetSurvivesRedisKilledUnderLoad(t *testing.T) {
	srv := redistest.Start(t)
	r := replicas(t, 2, srv)
	paths := []string{pathConv, pathProxy, pathV2, pathSvc}
	const workers, each = 4, 150
	answered := make(chan int, workers*each)
	for w := range workers {
		go func() {
			for i := range each {
				h := r[(w+i)%2]
				path := paths[(w*each+i)%len(paths)]
				if i%10 == 9 && path != pathProxy { // now and then a write
					s, _, body := readResp(t, h.doBody("POST", path, basic(acctA, tokenA), strings.NewReader("Attributes=x"), "Content-Type", "application/x-www-form-urlencoded"))
					if s == 503 && !strings.Contains(body, "nothing was sent upstream") {
						s = 0 // a 503 of another kind
					}
					answered <- s
					continue
				}
				s, _, _ := readResp(t, h.do("GET", path, basic(acctA, tokenA)))
				if s == 503 {
					s = 0 // reads are never refused
				}
				answered <- s
			}
		}()
	}
	for n := 1; n <= workers*each; n++ {
		// A write is refused (503, nothing sent) while its intent cannot
		// be recorded; every read is answered.
		if s := <-answered; s != 200 && s != 503 {
			t.Fatalf("request %d: status %d", n, s)
		}
		switch n {
		case workers * each / 3:
			srv.Stop()
		case 2 * workers * each / 3:
			srv.Restart(t)
		}
	}
	if r[0].p.Summary().L2Errors+r[1].p.Summary().L2Errors == 0 {
		t.Fatal("no Redis call failed: Redis was not down under load")
	}
	waitUntil(t, "both replicas trust the stream again", func() bool { return r[0].inv.Trusted() && r[1].inv.Trusted() })
	for i := range 20 { // sharing resumes (bounded: reconnects take a moment)
		path := fmt.Sprintf("%s?after=%d", pathConv, i)
		r[0].get(path)
		if _, cs, _ := r[1].get(path); strings.HasSuffix(cs, "detail=l2") {
			return
		}
	}
	t.Fatal("sharing did not resume after Redis came back")
}

// Stale windows work across the fleet: a replica that never read the
// participant serves the shared copy, expired but within
// cache.stale_if_error, when Twilio fails.
func TestFleetStaleIfErrorFromL2(t *testing.T) {
	srv := redistest.Start(t)
	r := replicas(t, 2, srv, func(s *setup) { s.cfg.Cache.StaleIfError = config.Duration(time.Minute) })
	a, b := r[0], r[1]
	_, _, fresh := a.get(pathConv)
	a.conv.Before = func(w http.ResponseWriter, req *http.Request) bool {
		twiliofake.Error(w, 500, 20500, "Internal Server Error")
		return true
	}
	// Shared entries age on Redis's clock (their time left), not on a
	// replica's: 45 s pass there. Expired (ttl 30s), inside stale_if_error.
	passInRedis(t, srv, 45*time.Second)
	s, cs, body := b.get(pathConv)
	if s != 200 || cs != "cacheproxy; fwd=stale; fwd-status=500" || body != fresh {
		t.Fatalf("B with Twilio failing: %d %q", s, cs)
	}
}

// passInRedis makes d pass for the shared entries in srv: each entry's
// time left (PTTL), which is what readers measure their age by, drops by d.
func passInRedis(t *testing.T, srv *redistest.Server, d time.Duration) {
	t.Helper()
	keys := strings.Fields(srv.CLI(t, "--scan", "--pattern", "cacheproxy:e:*"))
	if len(keys) == 0 {
		t.Fatal("no shared entries in Redis")
	}
	for _, k := range keys {
		left, err := strconv.ParseInt(strings.TrimSpace(srv.CLI(t, "PTTL", k)), 10, 64)
		if err != nil || left <= d.Milliseconds() {
			t.Fatalf("PTTL of an entry: %d %v", left, err)
		}
		srv.CLI(t, "PEXPIRE", k, strconv.FormatInt(left-d.Milliseconds(), 10))
	}
}

// One limiter for the fleet. After one read with API key SK…11 through
// replica 1, 100 cold reads with the account's own credentials on replica
// 1 and 100 each with the key on replicas 2 and 3, all at once, against a
// fake Twilio that refuses more than 10 of the account's calls in flight
// (100 ms each): no upstream 429 (the key's account, learned on replica 1,
// is known on every replica), and no polling: the budget sends at most 3
// commands per upstream call (a take, a give, at most one take that found
// the slots full and waited to be handed one). Before: 12 upstream 429s,
// and 15 commands per call in all, the budget's polls most of them. In
// all, the cache tier's included, at most 8 commands per upstream call
// (counted with MONITOR: 14 while each waiting fill renewed its own claim,
// 6.4 since one key per replica says its claims' holder is alive).
func TestFleetBudgetIsOneLimiter(t *testing.T) {
	srv := redistest.Start(t)
	r := replicas(t, 3, srv, realRetries, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 10, config.Duration(time.Minute)
	})
	paths := twilioLimit(r[0], 10, 301)
	r[0].conv.Latency = 100 * time.Millisecond
	key, secret := twiliofake.SID("SK", 11), "keysecretxxxxxxxxxxxxxxxxxxxxxxx"
	r[0].conv.Accounts[key] = secret
	r[0].conv.KeyOwner = map[string]string{key: acctA}
	if s, _, _ := readResp(t, r[0].do("GET", paths[300], basic(key, secret))); s != 200 {
		t.Fatalf("the key's first read: %d", s)
	}
	book := fleet.NewKeyBook(r[1].fleet)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) { // replica 1 stores it off the answer's path
		if acct, ok := book.Lookup(context.Background(), key); ok && acct == acctA {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the key's account never reached the fleet's book")
		}
	}
	calls := r[0].conv.Total()
	mon := srv.Monitor(t)
	answers := make(chan int, 300)
	for i, h := range r {
		auth := basic(key, secret)
		if i == 0 {
			auth = basic(acctA, tokenA)
		}
		for _, path := range paths[i*100 : (i+1)*100] {
			go func() {
				s, _, _ := readResp(t, h.do("GET", path, auth))
				answers <- s
			}()
		}
	}
	for range 300 {
		if s := <-answers; s != 200 {
			t.Fatalf("status %d", s)
		}
	}
	for _, h := range r {
		h.settle()
	}
	commands, byName := mon.Stop()
	upstream := r[0].conv.Total() - calls
	if n, peak := r[0].conv.TooMany(), r[0].conv.Peak(acctA); n != 0 || peak > 10 {
		t.Fatalf("Twilio answered %d 429s, peak in flight %d: want 0, <= 10", n, peak)
	}
	handed, budget := int64(0), int64(0)
	for _, h := range r {
		handed += h.budget.Stats().Handed
		budget += h.budget.Stats().Sent
	}
	t.Logf("%d commands for %d upstream calls (%.1f per call), %d of them the budget's (%.1f per call): %v",
		commands, upstream, float64(commands)/float64(upstream), budget, float64(budget)/float64(upstream), byName)
	if perCall := float64(budget) / float64(upstream); perCall > 3 {
		t.Fatalf("%.1f budget commands per upstream call, want at most 3 (no polling)", perCall)
	}
	if perCall := float64(commands) / float64(upstream); perCall > 8 {
		t.Fatalf("%.1f Redis commands per upstream call, want at most 8 (cache tier included)", perCall)
	}
	if handed == 0 {
		t.Fatal("no slot was handed to a waiting call: the test did not fill the fleet's cap")
	}
}

// Issue 35, point 1, for a fleet: three replicas on one Redis, Twilio
// allowing 10 calls in flight and max_concurrent 10, 20 rounds of 3 × 100
// distinct cold reads at once: Twilio never sees 11 in flight nor
// answers 429, and every read is answered.
func TestFleetBurstsNeverGoOverTheLimit(t *testing.T) {
	r := replicas(t, 3, redistest.Start(t), realRetries, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent, s.cfg.RateLimit.MaxWait = 10, config.Duration(time.Minute)
	})
	const rounds = 20
	paths := twilioLimit(r[0], 10, rounds*300)
	for round := range rounds {
		answers := make(chan int, 300)
		for i, h := range r {
			for _, path := range paths[round*300+i*100 : round*300+(i+1)*100] {
				go func() {
					s, _, _ := readResp(t, h.do("GET", path, basic(acctA, tokenA)))
					answers <- s
				}()
			}
		}
		for range 300 {
			if s := <-answers; s != 200 {
				t.Fatalf("round %d: status %d", round+1, s)
			}
		}
		if n, peak := r[0].conv.TooMany(), r[0].conv.Peak(acctA); n != 0 || peak > 10 {
			t.Fatalf("round %d: Twilio answered %d 429s, peak in flight %d: want 0, <= 10", round+1, n, peak)
		}
	}
}
