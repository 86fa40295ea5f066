// Package load answers one cached read through the cache's tiers, and
// knows no HTTP, as groupcache's Group.load does. Load is the whole read:
//
//  1. read the invalidation epoch, once: the flight's key, the validity of
//     what the tiers hold and the epoch of what is fetched all use it;
//  2. this replica's L1: a fresh entry is the answer; an expired one within
//     stale-while-revalidate is the answer while a background flight
//     refreshes it;
//  3. the flight (key @ epoch, shared by identical reads) fills: L1 once
//     more, then the fleet's L2 (tier.Tier; tier.None alone), whose lookup
//     takes the key's claim when it has no entry and returns it; a claim
//     another replica holds is waited for (its fill is the answer); a claim
//     won is this replica's to fetch (the Fetcher), and what it fetched goes
//     into L1 and L2 before any waiter is answered;
//  4. a fill that failed (an error, a 429 or a 5xx) is replaced by the
//     stale entry L1 or L2 held within stale-if-error.
//
// Load returns the entry, where it came from (Source) and why it is stale
// (Stale), if it is: the proxy turns that into a status, headers and a
// Cache-Status value, and nothing else (docs/architecture.md, "A read").
package load

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/clock"
	"cacheproxy/internal/inflight"
	"cacheproxy/internal/ratelimit"
	"cacheproxy/internal/tier"

	"golang.org/x/sync/singleflight"
)

// Store is L1, this replica's own tier (cache.Store).
type Store interface {
	Get(key string, now time.Time) (*cache.Entry, bool)
	Set(e *cache.Entry) bool
}

// Invalidator says what in either tier is still valid (the proxy's
// Invalidator: its Epoch and Valid).
type Invalidator interface {
	Epoch() uint64
	Valid(epoch uint64, tags []string) bool
}

// FlightGroup is singleflight's DoChan: an interface, as groupcache's
// flightGroup, so that tests can count who waits.
type FlightGroup interface {
	DoChan(key string, fn func() (any, error)) <-chan singleflight.Result
}

// Fetcher makes the upstream call of a fill, as groupcache's Getter: for
// q, under ctx (detached from the client, bounded by q.Timeout), with the
// fill's epoch, which the entry it returns carries; it sets the entry's
// Expires and Keep when it may be stored. info is the caller's account of
// the call (its status, time, retries), returned in Result.Info, also
// with an error when the call had begun.
type Fetcher func(ctx context.Context, q *Query, epoch uint64) (e *cache.Entry, info any, err error)

// Source is where an answer came from.
type Source uint8

const (
	FromUpstream Source = iota // this replica's fetch
	FromL1                     // this replica's own tier
	FromL2                     // L2, fetched by any replica
	FromPeer                   // another replica's fetch of a cold key, waited for on its claim
)

// Stale is why an answer is an expired entry.
type Stale uint8

const (
	Fresh           Stale = iota // it is not stale
	WhileRevalidate              // within stale-while-revalidate; a background fill refreshes it
	IfError                      // within stale-if-error; the fill failed
)

// Windows are how long an expired entry may still answer.
type Windows struct {
	WhileRevalidate, IfError time.Duration
}

// Query is one read.
type Query struct {
	// Key is the cache key. It may be a view of a buffer the caller
	// reuses: Load copies it before anything keeps it.
	Key string
	// Auth is the credential, for L2.
	Auth string
	// Variant holds what else two reads must agree on to share a fetch
	// (the proxy's Accept and Accept-Language values): part of the
	// flight's key. Config.Variant fills it, on a miss only.
	Variant [2][]string
	// NoCache asks for a fetch: no entry, no other replica's fill.
	NoCache bool
	// Now is when the read arrived.
	Now time.Time
	// Timeout bounds the fill, and the upstream call from its start.
	Timeout time.Duration
	// Arg is the caller's, handed to the Fetcher (the proxy's request).
	Arg any
}

// Result is what Load answers with.
type Result struct {
	Entry *cache.Entry // nil with Err
	From  Source
	Stale Stale
	// Flight is set when the answer came through a flight (L1 had
	// nothing fresh at arrival), Joined when the read joined a flight
	// another read started.
	Flight, Joined bool
	// Stored is set when the fill was kept (L1 and, in a fleet, L2).
	Stored bool
	// Info is the Fetcher's account of the flight's upstream call, if one
	// was made (with Stale IfError too: what failed).
	Info any
	// Err is why the fill failed: with Stale IfError, what the stale
	// entry stands in for; else there is no entry.
	Err error
}

// Hooks are optional observers; a nil one is not called.
type Hooks struct {
	// Claim starts watching a fill's lookup and claim in L2
	// (a span); end is told the claim (nil when there was none) and
	// whether the fill came from the tier.
	Claim func(ctx context.Context) (context.Context, func(cl tier.Claim, filled bool))
	// Panic hears a Fetcher's panic, recovered into ErrPanic.
	Panic func(q *Query, v any)
}

// Config sets up a Loader.
type Config struct {
	L1      Store
	L2      tier.Tier // nil: tier.None
	Inv     Invalidator
	Fetch   Fetcher
	Windows Windows
	Clock   clock.Clock // nil: the real clock
	Flights FlightGroup // nil: a singleflight.Group
	// Variant, if set, is a query's Variant from its Arg, asked only when
	// the read goes to a flight (a hit pays nothing for it).
	Variant func(arg any) [2][]string
	Hooks   Hooks
}

// Loader answers reads through the tiers.
type Loader struct {
	l1      Store
	l2      tier.Tier
	inv     Invalidator
	fetch   Fetcher
	win     Windows
	clock   clock.Clock
	flights FlightGroup
	variant func(arg any) [2][]string
	hooks   Hooks
	fills   inflight.Tracker // flights still running (detached ones too)

	claimsWon, claimsWaited, tierErrors atomic.Int64
}

// ErrPanic is a fill whose Fetcher panicked.
var ErrPanic = errors.New("upstream fetch failed")

// New returns a Loader.
func New(c Config) *Loader {
	l := &Loader{l1: c.L1, l2: c.L2, inv: c.Inv, fetch: c.Fetch, win: c.Windows, clock: clock.Or(c.Clock), flights: c.Flights, variant: c.Variant, hooks: c.Hooks}
	if l.l2 == nil {
		l.l2 = tier.None{}
	}
	if l.flights == nil {
		l.flights = &singleflight.Group{}
	}
	return l
}

// Stats are a Loader's counts since it started.
type Stats struct {
	// ClaimsWon counts cold keys this replica fetched for the fleet;
	// ClaimsWaited, those it waited for another replica to fetch.
	ClaimsWon, ClaimsWaited int64
	// TierErrors counts L2 calls that failed (each a miss).
	TierErrors int64
}

// Stats returns the counts.
func (l *Loader) Stats() Stats {
	return Stats{ClaimsWon: l.claimsWon.Load(), ClaimsWaited: l.claimsWaited.Load(), TierErrors: l.tierErrors.Load()}
}

// Wait blocks until every flight has ended (those whose readers all left
// too), or ctx ends.
func (l *Loader) Wait(ctx context.Context) error { return l.fills.Wait(ctx) }

// Load answers q: from L1, or through the flight of its key at this
// epoch, or with a stale entry (package comment). ctx is the reader's:
// when it ends Load returns its error, and the flight goes on for the
// others.
func (l *Loader) Load(ctx context.Context, q *Query) Result {
	epoch := l.inv.Epoch()
	var stale *cache.Entry
	if !q.NoCache {
		if e, ok := l.local(q.Key, epoch, q.Now); ok {
			if e.Expires.After(q.Now) {
				return Result{Entry: e, From: FromL1}
			}
			if q.Now.Before(e.Expires.Time().Add(l.win.WhileRevalidate)) {
				l.revalidate(ctx, q, epoch)
				return Result{Entry: e, From: FromL1, Stale: WhileRevalidate}
			}
			stale = e
		}
	}
	fq := l.own(q)
	f, joined, err := l.join(ctx, &fq, epoch, true)
	if joined && l.invalid(f, err) {
		// The fill this read joined found an answer (upstream's, L2's or
		// a peer's) that this replica now finds invalid (a write to its
		// scopes pending, or answered and told here meanwhile; its stream
		// lagging): this read may have begun after that write's answer,
		// so it joins a fill begun after that one ended, once.
		f, _, err = l.join(ctx, &fq, l.inv.Epoch(), true)
	}
	if f != nil && f.stale != nil && (stale == nil || f.stale.Expires > stale.Expires) {
		stale = f.stale
	}
	if f != nil && f.swr {
		return Result{Entry: f.entry, From: f.from, Stale: WhileRevalidate, Flight: true, Joined: joined}
	}
	res := Result{Flight: true, Joined: joined, Err: err}
	if f != nil {
		res.Info = f.info
	}
	if failed(f, err) && stale != nil && q.Now.Before(stale.Expires.Time().Add(l.win.IfError)) && ctx.Err() == nil {
		res.Entry, res.Stale, res.From = stale, IfError, FromL1
		return res
	}
	if err != nil {
		return res
	}
	res.Entry, res.From, res.Stored = f.entry, f.from, f.stored
	return res
}

// truster is an Invalidator that may not hear the fleet (the fleet's,
// docs/fleet.md): while it does not, nothing is valid, and a fill's
// answer is shared with its joiners all the same (its stream lost, a
// reader's data is as old as it was then).
type truster interface{ Trusted() bool }

// invalid reports whether f's answer is one this replica, trusting its
// marks, finds invalid now.
func (l *Loader) invalid(f *flight, err error) bool {
	if err != nil || f == nil || f.entry == nil || f.swr || f.entry.Expires.Time().IsZero() {
		return false
	}
	t, ok := l.inv.(truster)
	return ok && t.Trusted() && !l.inv.Valid(f.entry.Epoch, f.entry.Tags)
}

// own is a flight's own copy of q (q may be reused once its read ends),
// with its variant.
func (l *Loader) own(q *Query) Query {
	c := *q
	c.Key = strings.Clone(q.Key)
	if l.variant != nil {
		c.Variant = l.variant(c.Arg)
	}
	return c
}

// flight is what one flight produced, shared by its readers.
type flight struct {
	entry  *cache.Entry
	from   Source
	stored bool
	swr    bool         // entry is L2's, stale within stale-while-revalidate
	stale  *cache.Entry // L2's expired entry within its windows, for stale-if-error
	info   any
}

// failed reports a fill that an older answer should replace: no answer at
// all, a 429 or a 5xx.
func failed(f *flight, err error) bool {
	if err != nil || f == nil || f.entry == nil {
		return true
	}
	return f.from == FromUpstream && (f.entry.Status == 429 || f.entry.Status >= 500)
}

// flightKey keys a fill by the epoch the read arrived at: a read that
// arrives after a write's answer never joins a fill that began before it
// (docs/architecture.md, "Freshness"). Reads between writes share.
func flightKey(q *Query, epoch uint64) string {
	k := q.Key + "@" + strconv.FormatUint(epoch, 10)
	if a, b := q.Variant[0], q.Variant[1]; len(a)+len(b) > 0 {
		k += " " + strings.Join(a, ",") + " " + strings.Join(b, ",")
	}
	if q.NoCache {
		k = "no-cache " + k
	}
	return k
}

// join joins or starts the flight of q at epoch and waits for it or for
// ctx; joined reports a flight another read started. swr lets the fill
// answer with L2's stale entry within stale-while-revalidate.
func (l *Loader) join(ctx context.Context, q *Query, epoch uint64, swr bool) (*flight, bool, error) {
	ran := false // written by the flight's goroutine; read only after its result arrives
	ch := l.start(flightKey(q, epoch), func() (any, error) {
		ran = true
		return l.run(ctx, q, epoch, swr)
	})
	select {
	case r := <-ch:
		l.fills.Done()
		f, _ := r.Val.(*flight) // may carry the call's account on error; nil after a panic
		if f != nil && f.swr && ran {
			l.revalidate(ctx, q, epoch)
		}
		return f, !ran, r.Err
	case <-ctx.Done():
		l.doneLater(ch)
		return nil, false, ctx.Err()
	}
}

// revalidate starts (or joins) q's fill in the background, behind the
// reads a client waits for, answering none of them with a stale entry.
func (l *Loader) revalidate(ctx context.Context, q *Query, epoch uint64) {
	bq := l.own(q)
	ctx = ratelimit.WithPriority(ctx, ratelimit.Background)
	l.doneLater(l.start(flightKey(&bq, epoch), func() (any, error) { return l.run(ctx, &bq, epoch, false) }))
}

// start joins or starts the flight under key. Wait waits for it: the
// caller is counted before DoChan (so a flight cannot start unseen) and
// must call l.fills.Done once the result has arrived; a caller that
// leaves first hands that to doneLater.
func (l *Loader) start(key string, fn func() (any, error)) <-chan singleflight.Result {
	l.fills.Add()
	return l.flights.DoChan(key, fn)
}

// doneLater uncounts a caller that left before its flight's result came.
func (l *Loader) doneLater(ch <-chan singleflight.Result) {
	go func() {
		<-ch
		l.fills.Done()
	}()
}

// run runs a flight's fill, detached from the reader that started it (so
// the others get their answer if it leaves) and bounded by q.Timeout; a
// panic is recovered into ErrPanic for its readers.
func (l *Loader) run(ctx context.Context, q *Query, epoch uint64, swr bool) (v any, err error) {
	defer func() {
		if x := recover(); x != nil {
			if l.hooks.Panic != nil {
				l.hooks.Panic(q, x)
			}
			v, err = nil, ErrPanic
		}
	}()
	detached := context.WithoutCancel(ctx)
	fctx, cancel := context.WithTimeout(detached, q.Timeout)
	defer cancel()
	return l.fill(fctx, detached, q, epoch, swr)
}

// fill looks in L1 once more (a flight that ended just before this one
// began may have filled it), then in L2, whose lookup claims a key it has
// no entry for; waits for another replica's claim or fetches on its own,
// and puts what it fetched into both tiers before the flight's readers
// are answered: a read through another replica that starts after their
// answer finds it. A fetch the reader asked for (no-cache) neither looks
// nor waits. The upstream call has q.Timeout of its own, from its start:
// a replica that takes over the claim of one that died mid-fetch still
// has its whole timeout.
func (l *Loader) fill(ctx, detached context.Context, q *Query, epoch uint64, swr bool) (*flight, error) {
	f := &flight{}
	if !q.NoCache {
		if e, ok := l.local(q.Key, epoch, l.clock.Now()); ok && e.Expires.After(l.clock.Now()) {
			return &flight{entry: e, from: FromL1}, nil
		}
	}
	cctx, endClaim := l.watchClaim(ctx)
	var cl tier.Claim
	var err error
	if !q.NoCache {
		var e *cache.Entry
		e, cl, err = l.l2.Get(cctx, q.Key, q.Auth)
		l.failed(err)
		if e = l.fromL2(e, epoch); e != nil {
			now := l.clock.Now()
			switch {
			case e.Expires.After(now):
				release(cl)
				endClaim(nil, true)
				return &flight{entry: e, from: FromL2}, nil
			case swr && now.Before(e.Expires.Time().Add(l.win.WhileRevalidate)):
				release(cl)
				endClaim(nil, true)
				return &flight{entry: e, from: FromL2, swr: true}, nil
			}
			f.stale = e // expired, still within its stale windows: as good as a local one
		}
	}
	if cl == nil {
		cl, err = l.l2.Claim(cctx, q.Key, q.Auth)
		l.failed(err)
	}
	defer cl.Release()
	if !q.NoCache && err == nil {
		if e := l.claimed(cctx, cl, epoch); e != nil {
			endClaim(cl, true)
			f.entry, f.from, f.stored = e, FromPeer, true
			return f, nil
		}
	}
	endClaim(cl, false)
	fctx, cancel := context.WithTimeout(detached, q.Timeout)
	defer cancel()
	e, info, err := l.fetch(fctx, q, epoch)
	f.info = info
	if err != nil {
		return f, err
	}
	f.entry, f.from = e, FromUpstream
	if e.Expires.Time().IsZero() {
		return f, nil
	}
	f.stored = l.inv.Valid(e.Epoch, e.Tags) && l.l1.Set(e)
	if f.stored { // the wait may have used up ctx; the tier's calls have their own bound
		l.failed(cl.Share(context.WithoutCancel(ctx), e))
	}
	return f, nil
}

// watchClaim starts the Claim hook, if any.
func (l *Loader) watchClaim(ctx context.Context) (context.Context, func(tier.Claim, bool)) {
	if l.hooks.Claim == nil {
		return ctx, func(tier.Claim, bool) {}
	}
	return l.hooks.Claim(ctx)
}

// release gives back a claim a lookup took, if it took one.
func release(cl tier.Claim) {
	if cl != nil {
		cl.Release()
	}
}

// local returns the entry under key if it is in L1 and valid at epoch.
// Validity is memoised per entry and epoch (Entry.ValidAt): under write
// traffic a hit reads the scope marks once per epoch, not on every hit.
// That is sound because every mark of an epoch is visible before Epoch
// returns it (the proxy's Invalidator).
func (l *Loader) local(key string, epoch uint64, now time.Time) (*cache.Entry, bool) {
	e, ok := l.l1.Get(key, now)
	if !ok {
		return nil, false
	}
	if e.Epoch >= epoch || e.ValidAt.Load() >= epoch {
		return e, true
	}
	if !l.inv.Valid(e.Epoch, e.Tags) {
		return nil, false
	}
	if v := e.ValidAt.Load(); v < epoch {
		e.ValidAt.CompareAndSwap(v, epoch)
	}
	return e, true
}

// fromL2 is e, an entry of L2, if it is valid here too for
// data fetched from epoch on; it is kept in L1.
func (l *Loader) fromL2(e *cache.Entry, epoch uint64) *cache.Entry {
	if e == nil {
		return nil
	}
	e.Epoch = epoch
	if !l.inv.Valid(epoch, e.Tags) {
		return nil
	}
	l.l1.Set(e)
	return e
}

// claimed returns a fresh fill of the key that another replica shared,
// found while this replica waited for the claim's holder; nil when this
// replica is to fetch, having won the claim or failed to wait.
func (l *Loader) claimed(ctx context.Context, cl tier.Claim, epoch uint64) *cache.Entry {
	if cl.Won() {
		l.claimsWon.Add(1)
		return nil
	}
	l.claimsWaited.Add(1)
	e, err := cl.Wait(ctx)
	l.failed(err)
	if e == nil {
		if cl.Won() { // the holder let its claim go, or died: fetch
			l.claimsWon.Add(1)
		}
		return nil
	}
	return l.fromL2(e, epoch) // nil if invalidated here since: fetch
}

// failed counts a L2 error (a miss, never a reader's error).
func (l *Loader) failed(err error) {
	if err != nil {
		l.tierErrors.Add(1)
	}
}
