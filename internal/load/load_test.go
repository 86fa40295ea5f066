package load

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/clock"
	"cacheproxy/internal/invalidation"
	"cacheproxy/internal/tier/memtier"

	"golang.org/x/sync/singleflight"
)

// replica is one Loader on a fake clock, with its own L1 and marks, and a
// Fetcher that answers what upstream says.
type replica struct {
	l        *Loader
	clk      *clock.Fake
	store    *cache.Store
	inv      *countingInv
	fetches  atomic.Int64
	upstream func(ctx context.Context) (int, error) // nil: 200
	gate     chan struct{}                          // if set, each fetch waits for it
}

// countingInv counts Epoch calls.
type countingInv struct {
	Invalidator
	epochs atomic.Int64
}

func (c *countingInv) Epoch() uint64 { c.epochs.Add(1); return c.Invalidator.Epoch() }

const ttl = 30 * time.Second

func newReplica(t *testing.T, clk *clock.Fake, l2 *memtier.Replica, inv Invalidator, w Windows) *replica {
	t.Helper()
	store, err := cache.New(64<<20, clk)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	r := &replica{clk: clk, store: store, inv: &countingInv{Invalidator: inv}}
	c := Config{L1: store, Inv: r.inv, Windows: w, Clock: clk, Fetch: r.fetch}
	if l2 != nil {
		c.L2 = l2
	}
	r.l = New(c)
	return r
}

func (r *replica) fetch(ctx context.Context, q *Query, epoch uint64) (*cache.Entry, any, error) {
	r.fetches.Add(1)
	if r.gate != nil {
		<-r.gate
	}
	status := 200
	if r.upstream != nil {
		var err error
		if status, err = r.upstream(ctx); err != nil {
			return nil, "called", err
		}
	}
	now := r.clk.Now()
	e := &cache.Entry{Key: q.Key, Status: status, Body: []byte(`{"n":1}`), Stored: cache.At(now), Epoch: epoch, Tags: []string{"scope"}}
	e.Compact(cache.HeaderOf(map[string][]string{"Content-Type": {"application/json"}}))
	if status == 200 {
		e.Expires, e.Keep = cache.At(now.Add(ttl)), cache.At(now.Add(ttl+time.Minute))
	}
	return e, "called", nil
}

func (r *replica) load(t *testing.T, key string) Result {
	t.Helper()
	res := r.l.Load(context.Background(), &Query{Key: key, Auth: "auth", Now: r.clk.Now(), Timeout: time.Minute})
	r.store.Wait()
	return res
}

// Each tier answers in its turn: a cold read is fetched and stored, the
// next one is L1's, and another replica finds the fill in L2.
func TestLoadAnswersFromEachTier(t *testing.T) {
	hub := memtier.New(clock.NewFake(time.Unix(1000, 0)), time.Second)
	clk := clock.NewFake(time.Unix(5000, 0))
	al2, bl2 := hub.Replica(clk, invalidation.New(time.Hour, clk)), hub.Replica(clk, invalidation.New(time.Hour, clk))
	a, b := newReplica(t, clk, al2, al2, Windows{}), newReplica(t, clk, bl2, bl2, Windows{})
	if res := a.load(t, "k"); res.Err != nil || res.From != FromUpstream || !res.Stored || !res.Flight || res.Joined || res.Info != "called" {
		t.Fatalf("cold: %+v", res)
	}
	if res := a.load(t, "k"); res.From != FromL1 || res.Flight || res.Entry == nil {
		t.Fatalf("again: %+v", res)
	}
	if res := b.load(t, "k"); res.From != FromL2 || !res.Flight || res.Entry == nil || string(res.Entry.Body) != `{"n":1}` {
		t.Fatalf("the other replica: %+v", res)
	}
	if a.fetches.Load()+b.fetches.Load() != 1 {
		t.Fatalf("%d fetches, want 1", a.fetches.Load()+b.fetches.Load())
	}
}

// The epoch is read once per read: for a hit, and for a miss (the
// flight's key, the tiers' validity and the fill all use that one).
func TestTheEpochIsReadOncePerRead(t *testing.T) {
	clk := clock.NewFake(time.Unix(5000, 0))
	a := newReplica(t, clk, nil, invalidation.New(time.Hour, clk), Windows{})
	for _, want := range []Source{FromUpstream, FromL1} {
		before := a.inv.epochs.Load()
		if res := a.load(t, "k"); res.From != want {
			t.Fatalf("%+v, want from %d", res, want)
		}
		if n := a.inv.epochs.Load() - before; n != 1 {
			t.Errorf("read from %d: the epoch read %d times, want once", want, n)
		}
	}
}

// Reads with different variants (the proxy's Accept-Language) share no
// flight; the same variants share one; a no-cache read shares none with a
// read that may use the cache.
func TestVariantsShareNoFlight(t *testing.T) {
	en, fr := []string{"en"}, []string{"fr"}
	a, b := &Query{Key: "k", Variant: [2][]string{nil, en}}, &Query{Key: "k", Variant: [2][]string{nil, fr}}
	if flightKey(a, 7) == flightKey(b, 7) {
		t.Fatal("reads with different Accept-Language share a fetch")
	}
	if c := (&Query{Key: "k", Variant: [2][]string{nil, {"en"}}}); flightKey(a, 7) != flightKey(c, 7) {
		t.Fatal("reads with the same variant do not share")
	}
	if flightKey(a, 7) == flightKey(a, 8) || flightKey(a, 7) == flightKey(&Query{Key: "k", Variant: a.Variant, NoCache: true}, 7) {
		t.Fatal("reads of two epochs, or a no-cache read, share a flight")
	}
}

// A claim another replica holds is waited for, and its fill is the
// answer: the claim came with the lookup, explicitly.
func TestAHeldClaimIsWaitedFor(t *testing.T) {
	hub := memtier.New(clock.NewFake(time.Unix(1000, 0)), time.Second)
	clk := clock.NewFake(time.Unix(5000, 0))
	al2, bl2 := hub.Replica(clk, invalidation.New(time.Hour, clk)), hub.Replica(clk, invalidation.New(time.Hour, clk))
	a, b := newReplica(t, clk, al2, al2, Windows{}), newReplica(t, clk, bl2, bl2, Windows{})
	a.gate = make(chan struct{})
	first := make(chan Result, 1)
	go func() { first <- a.load(t, "k") }()
	for a.fetches.Load() == 0 { // A holds the claim and fetches
		time.Sleep(time.Millisecond) // another goroutine's progress
	}
	second := make(chan Result, 1)
	go func() { second <- b.load(t, "k") }()
	for b.l.Stats().ClaimsWaited == 0 {
		time.Sleep(time.Millisecond)
	}
	close(a.gate)
	if res := <-first; res.From != FromUpstream || !res.Stored {
		t.Fatalf("A: %+v", res)
	}
	if res := <-second; res.From != FromPeer || res.Entry == nil || b.fetches.Load() != 0 {
		t.Fatalf("B: %+v, %d fetches", res, b.fetches.Load())
	}
	if s := a.l.Stats(); s.ClaimsWon != 1 {
		t.Fatalf("A's stats %+v", s)
	}
}

// Stale answers: within stale-while-revalidate an expired entry answers
// at once while a background fill refreshes it; past it, a fill that
// fails is replaced by the entry within stale-if-error, with what failed.
func TestStaleAnswers(t *testing.T) {
	clk := clock.NewFake(time.Unix(5000, 0))
	a := newReplica(t, clk, nil, invalidation.New(time.Hour, clk), Windows{WhileRevalidate: 10 * time.Second, IfError: time.Minute})
	a.load(t, "k")
	clk.Advance(ttl + 5*time.Second)
	res := a.load(t, "k")
	if res.Stale != WhileRevalidate || res.Entry == nil {
		t.Fatalf("within stale-while-revalidate: %+v", res)
	}
	if err := a.l.Wait(context.Background()); err != nil || a.fetches.Load() != 2 {
		t.Fatalf("the background fill: %v, %d fetches", err, a.fetches.Load())
	}
	a.store.Wait()
	clk.Advance(ttl + 20*time.Second)
	a.upstream = func(context.Context) (int, error) { return 503, nil }
	if res := a.load(t, "k"); res.Stale != IfError || res.Entry == nil || res.Err != nil || res.Info != "called" {
		t.Fatalf("a 503 within stale-if-error: %+v", res)
	}
	down := errors.New("unreachable")
	a.upstream = func(context.Context) (int, error) { return 0, down }
	if res := a.load(t, "k"); res.Stale != IfError || !errors.Is(res.Err, down) {
		t.Fatalf("an error within stale-if-error: %+v", res)
	}
	clk.Advance(2 * time.Minute)
	if res := a.load(t, "k"); res.Entry != nil || !errors.Is(res.Err, down) {
		t.Fatalf("past stale-if-error: %+v", res)
	}
}

// A Fetcher's panic is ErrPanic for its readers, and the hook hears it.
func TestAPanicIsAnError(t *testing.T) {
	clk := clock.NewFake(time.Unix(5000, 0))
	var heard atomic.Value
	a := newReplica(t, clk, nil, invalidation.New(time.Hour, clk), Windows{})
	a.l.hooks.Panic = func(q *Query, v any) { heard.Store(v) }
	a.upstream = func(context.Context) (int, error) { panic("boom") }
	if res := a.load(t, "k"); !errors.Is(res.Err, ErrPanic) || heard.Load() != "boom" {
		t.Fatalf("%+v, heard %v", res, heard.Load())
	}
}

// A query's variant is asked for on a miss only: a hit pays nothing for
// it.
func TestTheVariantIsAskedOnAMissOnly(t *testing.T) {
	clk := clock.NewFake(time.Unix(5000, 0))
	a := newReplica(t, clk, nil, invalidation.New(time.Hour, clk), Windows{})
	var asked atomic.Int64
	a.l.variant = func(any) [2][]string { asked.Add(1); return [2][]string{{"application/json"}} }
	a.load(t, "k")
	a.load(t, "k")
	if n := asked.Load(); n != 1 {
		t.Fatalf("the variant was asked %d times for a miss and a hit, want once", n)
	}
}

// pendingInv is a fleet's invalidator in miniature: trusted, and while
// pending (a write to every scope announced and not yet ended) nothing is
// valid.
type pendingInv struct {
	*invalidation.Local
	pending atomic.Bool
}

func (p *pendingInv) Valid(epoch uint64, tags []string) bool {
	return !p.pending.Load() && p.Local.Valid(epoch, tags)
}
func (p *pendingInv) Trusted() bool { return true }

// countingFlights counts the reads that start or join a flight.
type countingFlights struct {
	singleflight.Group
	n atomic.Int64
}

func (c *countingFlights) DoChan(key string, fn func() (any, error)) <-chan singleflight.Result {
	c.n.Add(1)
	return c.Group.DoChan(key, fn)
}

// A read that joined a fill whose answer the replica then found invalid
// (a write became pending while it fetched) is not handed that answer: it
// may have begun after the write's answer. It joins a fill of its own.
// Without a write, the two reads share one fetch.
func TestAReadIsNotHandedAFillFoundInvalid(t *testing.T) {
	for _, pending := range []bool{false, true} {
		clk := clock.NewFake(time.Unix(5000, 0))
		inv := &pendingInv{Local: invalidation.New(time.Hour, clk)}
		r := newReplica(t, clk, nil, inv, Windows{})
		flights := &countingFlights{}
		r.l = New(Config{L1: r.store, Inv: inv, Clock: clk, Fetch: r.fetch, Flights: flights})
		r.gate = make(chan struct{})
		first, second := make(chan Result, 1), make(chan Result, 1)
		go func() { first <- r.load(t, "k") }()
		for r.fetches.Load() == 0 {
			time.Sleep(time.Millisecond) // another goroutine's progress
		}
		inv.pending.Store(pending)
		go func() { second <- r.load(t, "k") }()
		for flights.n.Load() < 2 { // the second read joined
			time.Sleep(time.Millisecond)
		}
		close(r.gate)
		a, b := <-first, <-second
		want := int64(1)
		if pending {
			want = 2
		}
		if a.Err != nil || b.Err != nil || a.From != FromUpstream || !b.Joined || r.fetches.Load() != want {
			t.Fatalf("pending %v: first %+v, second %+v, %d fetches; want %d", pending, a, b, r.fetches.Load(), want)
		}
	}
}
