package proxy

import (
	"context"
	"strings"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/clock"
	"cacheproxy/internal/tier"

	"github.com/prometheus/client_golang/prometheus"
)

// tiers sequences the cache's tiers in one place that knows no HTTP (as
// groupcache's Group.load does): this replica's L1 (Store), the fleet's
// shared tier (tier.None for a replica alone), and the Invalidator that
// says what in either is still valid (docs/architecture.md, "Glossary").
type tiers struct {
	l1     Store
	l2     tier.Tier
	inv    Invalidator
	clock  clock.Clock
	c      *counters
	tracer *tracer // nil: tracing off
}

// source is where an answer came from.
type source uint8

const (
	fromUpstream source = iota // this replica's fetch
	fromL1                     // this replica's own tier
	fromL2                     // the shared tier, fetched by any replica
	fromFleet                  // another replica's fetch of a cold key, waited for
)

// found is what lookup found under a key.
type found struct {
	fresh *cache.Entry // a fresh, valid entry, or nil
	from  source       // fresh's tier
	// stale is, when nothing fresh was found, the expired entry with the
	// latest expiry still within its stale windows, or nil.
	stale *cache.Entry
	// key is the key, copied once lookup went past L1 (a hit looks up a
	// view of the request's buffer; what comes after keeps the key).
	key string
}

// lookup looks for key in L1, then in the shared tier for the credential
// auth; now is when the request arrived.
func (t *tiers) lookup(ctx context.Context, key, auth string, now time.Time) found {
	var f found
	if e, ok := t.local(key, now); ok {
		if e.Expires.After(now) {
			return found{fresh: e, from: fromL1, key: key}
		}
		f.stale = e
	}
	f.key = strings.Clone(key)
	// The local epoch is read before the lookup, as for a fetch: an
	// invalidation that arrives meanwhile makes the copy invalid here.
	e := t.shared(ctx, f.key, auth, t.inv.Epoch())
	switch {
	case e == nil:
	case e.Expires.After(now):
		f.fresh, f.from = e, fromL2
	case f.stale == nil || e.Expires > f.stale.Expires:
		f.stale = e // expired, still within its stale windows: as good as a local one
	}
	return f
}

// local returns the entry under key if it is in L1 and still valid.
// Validity is memoised per entry and epoch (Entry.ValidAt): under write
// traffic a hit reads the scope marks once per epoch, not on every hit.
// That is sound because every mark of an epoch is visible before Epoch
// returns it (Invalidator).
func (t *tiers) local(key string, now time.Time) (*cache.Entry, bool) {
	e, ok := t.l1.Get(key, now)
	if !ok {
		return nil, false
	}
	cur := t.inv.Epoch()
	if e.Epoch >= cur || e.ValidAt.Load() >= cur {
		return e, true
	}
	if !t.inv.Valid(e.Epoch, e.Tags) {
		return nil, false
	}
	if v := e.ValidAt.Load(); v < cur {
		e.ValidAt.CompareAndSwap(v, cur)
	}
	return e, true
}

// keep stores a fetched entry in L1 unless its scopes were invalidated
// during its fetch (it would be invisible anyway).
func (t *tiers) keep(e *cache.Entry) bool {
	return t.inv.Valid(e.Epoch, e.Tags) && t.l1.Set(e)
}

// shared is key's entry in the shared tier for auth, if it is valid here
// too for data fetched from the local epoch on; it is kept in L1.
func (t *tiers) shared(ctx context.Context, key, auth string, epoch uint64) *cache.Entry {
	e, err := t.l2.Get(ctx, key, auth)
	t.failed(err)
	if e == nil {
		return nil
	}
	e.Epoch = epoch
	if !t.inv.Valid(epoch, e.Tags) {
		return nil
	}
	t.l1.Set(e)
	return e
}

// failed counts a shared-tier error (a miss, never a client error).
func (t *tiers) failed(err error) {
	if err != nil {
		t.c.sharedErrors.Add(1)
	}
}

// fetchFunc makes the upstream call for a fill, under its own timeout:
// entries it returns carry epoch, and Expires and Keep are set when they
// may be stored.
type fetchFunc func(epoch uint64) (*fetchResult, error)

// fill runs inside a flight. It looks in L1 once more (a flight that
// ended just before this one began may have filled it), claims the key
// for the fleet, or waits for the claim's holder and answers with its
// fill, fetches, and puts what it fetched into both tiers before the
// flight's waiters are answered: a read through another replica that
// starts after their answer finds it.
//
// A fetch the client asked for (no-cache) neither looks nor waits.
func (t *tiers) fill(ctx context.Context, key, auth string, noCache bool, fetch fetchFunc) (*fetchResult, error) {
	epoch := t.inv.Epoch()
	if !noCache {
		if e, ok := t.local(key, t.clock.Now()); ok && e.Expires.After(t.clock.Now()) {
			return &fetchResult{entry: e, upStatus: e.Status, from: fromL1}, nil
		}
	}
	cctx, endClaim := t.tracer.claim(ctx)
	cl, err := t.l2.Claim(cctx, key, auth)
	t.failed(err)
	defer cl.Release()
	if !noCache && err == nil {
		if e := t.claimed(cctx, cl, epoch); e != nil {
			endClaim(cl, true)
			return &fetchResult{entry: e, upStatus: e.Status, stored: true, from: fromFleet}, nil
		}
	}
	endClaim(cl, false)
	res, err := fetch(epoch)
	if err != nil || res.entry.Expires.Time().IsZero() {
		return res, err
	}
	res.stored = t.keep(res.entry)
	if res.stored { // the wait may have used up ctx; Redis calls have their own bound
		t.failed(cl.Share(context.WithoutCancel(ctx), res.entry))
	}
	return res, nil
}

// claimed returns a fresh fill of key that another replica shared, found
// when this replica claimed the key or while it waited for the holder;
// nil when this replica is to fetch, having won the claim (the key had no
// entry when it did: nothing to look for) or failed to wait.
func (t *tiers) claimed(ctx context.Context, cl tier.Claim, epoch uint64) *cache.Entry {
	if cl.Won() {
		t.c.claimsWon.Add(1)
		return nil
	}
	t.c.claimsWaited.Add(1)
	e, err := cl.Wait(ctx)
	t.failed(err)
	if e == nil {
		if cl.Won() { // the holder let its claim go, or died: fetch
			t.c.claimsWon.Add(1)
		}
		return nil
	}
	e.Epoch = epoch
	if !t.inv.Valid(epoch, e.Tags) {
		return nil // invalidated here since: fetch
	}
	t.l1.Set(e)
	return e
}

// timedTier measures the shared tier's lookups.
type timedTier struct {
	tier.Tier
	clock   clock.Clock
	latency prometheus.Histogram
}

func (t timedTier) Get(ctx context.Context, key, auth string) (*cache.Entry, error) {
	start := t.clock.Now()
	e, err := t.Tier.Get(ctx, key, auth)
	t.latency.Observe(t.clock.Since(start).Seconds())
	return e, err
}
