// Package memtier is an in-memory L2 (tier.Tier) and fleet
// invalidation stream for replicas in one process, on a fake clock: what
// the proxy's tests use to make claim lapses, takeovers, clock skew and
// fault orderings deterministic (docs/architecture.md, "Seams"). Its rules
// are the fleet's (docs/fleet.md), without Redis: an entry carries
// lifetimes, read on the reader's clock less what passed on the hub's; it
// is valid while no mark of its scopes is above the epoch its claim read;
// a claim is its holder's until it gives it back or, once its holder died,
// ClaimTTL later on the hub's clock. The tests against a real redis-server
// stay on top of these.
package memtier

import (
	"context"
	"errors"
	"sync"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/clock"
	"cacheproxy/internal/invalidation"
	"cacheproxy/internal/tier"
)

// ErrDown: the hub is failing every call (Fail), as a Redis that is down.
var ErrDown = errors.New("memtier: down")

// Hub is the tier the replicas share: its clock stands for Redis's.
type Hub struct {
	clock    *clock.Fake
	claimTTL time.Duration

	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every change
	down    bool
	epoch   uint64
	marks   map[string]uint64
	entries map[string]stored
	claims  map[string]held
	members []*Replica
}

type stored struct {
	entry *cache.Entry // its status, header, body, key and tags (never changed)
	auth  string
	epoch uint64    // the hub's epoch when its claim was made
	at    time.Time // shared then, on the hub's clock
	age   time.Duration
	fresh time.Duration
	life  time.Duration
}

type held struct {
	by    *Replica
	until time.Time // once its holder died
}

// New returns a hub on c whose claims lapse claimTTL after their holder
// died.
func New(c *clock.Fake, claimTTL time.Duration) *Hub {
	return &Hub{clock: c, claimTTL: claimTTL, changed: make(chan struct{}), marks: map[string]uint64{},
		entries: map[string]stored{}, claims: map[string]held{}}
}

// notify wakes every waiter; under h.mu.
func (h *Hub) notify() {
	close(h.changed)
	h.changed = make(chan struct{})
}

// Advance moves the hub's clock on (claims lapse, entries expire) and wakes
// the replicas waiting for a claim.
func (h *Hub) Advance(d time.Duration) {
	h.clock.Advance(d)
	h.mu.Lock()
	h.notify()
	h.mu.Unlock()
}

// Fail makes every call fail (on) or succeed again (off).
func (h *Hub) Fail(on bool) {
	h.mu.Lock()
	h.down = on
	h.notify()
	h.mu.Unlock()
}

// Replica is one replica's side of the hub: its L2 and its
// invalidator (proxy.Invalidator) over local, its own marks, read on its
// clock c.
type Replica struct {
	hub   *Hub
	clock clock.Clock
	local *invalidation.Local
	held  bool       // its stream is held: invalidations wait for Deliver
	queue [][]string // held invalidations
	dead  bool
}

var _ tier.Tier = (*Replica)(nil)

// Replica adds a replica with clock c and marks local.
func (h *Hub) Replica(c clock.Clock, local *invalidation.Local) *Replica {
	r := &Replica{hub: h, clock: c, local: local}
	h.mu.Lock()
	h.members = append(h.members, r)
	h.mu.Unlock()
	return r
}

// Kill makes r a replica that died: its claims are renewed no more and
// lapse ClaimTTL from now.
func (r *Replica) Kill() {
	h := r.hub
	h.mu.Lock()
	defer h.mu.Unlock()
	r.dead = true
	for k, c := range h.claims {
		if c.by == r {
			h.claims[k] = held{by: r, until: h.clock.Now().Add(h.claimTTL)}
		}
	}
}

// Hold holds r's stream (its invalidations queue, as on a replica whose
// link to Redis is slow); while held, r trusts nothing in its L1 and drops
// it, as a replica whose heartbeats come back late. Deliver applies what
// queued.
func (r *Replica) Hold() {
	r.hub.mu.Lock()
	r.held = true
	r.hub.mu.Unlock()
	r.local.InvalidateAll() // as the fleet's replica does when its heartbeats lapse
}

// Deliver applies r's held invalidations, in order, and releases its stream.
func (r *Replica) Deliver() {
	r.hub.mu.Lock()
	q := r.queue
	r.queue, r.held = nil, false
	r.hub.mu.Unlock()
	for _, tags := range q {
		r.local.Invalidate(context.Background(), tags)
	}
}

// Epoch is r's own epoch.
func (r *Replica) Epoch() uint64 { return r.local.Epoch() }

// WrittenWithin reports whether r heard of a write to any of tags less
// than d ago.
func (r *Replica) WrittenWithin(tags []string, d time.Duration) bool {
	return r.local.WrittenWithin(tags, d)
}

// Valid checks r's own marks, and nothing is valid while its stream is held.
func (r *Replica) Valid(epoch uint64, tags []string) bool {
	r.hub.mu.Lock()
	held := r.held
	r.hub.mu.Unlock()
	return !held && r.local.Valid(epoch, tags)
}

// Invalidate marks tags on the hub (unless it is down) and here, and tells
// the other replicas (at once, or when a held one is delivered).
func (r *Replica) Invalidate(ctx context.Context, tags []string) uint64 {
	h := r.hub
	h.mu.Lock()
	var now []*Replica
	if !h.down && len(tags) > 0 {
		h.epoch++
		for _, t := range tags {
			h.marks[t] = h.epoch
		}
		for _, o := range h.members {
			switch {
			case o == r:
			case o.held:
				o.queue = append(o.queue, tags)
			default:
				now = append(now, o)
			}
		}
	}
	h.mu.Unlock()
	for _, o := range now {
		o.local.Invalidate(ctx, tags)
	}
	return r.local.Invalidate(ctx, tags)
}

// Get returns key's entry for auth if one is valid on the hub, on r's
// clock; when there is none, the key's claim (won unless another live
// replica holds it).
func (r *Replica) Get(_ context.Context, key, auth string) (*cache.Entry, tier.Claim, error) {
	h := r.hub
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.down {
		return nil, nil, ErrDown
	}
	if e := h.valid(key, auth, r.clock.Now()); e != nil {
		return e, nil, nil
	}
	cl := &claim{r: r, key: key, auth: auth, epoch: h.epoch}
	cl.won = h.take(r, key)
	return nil, cl, nil
}

// valid is key's entry for auth, valid and not expired on the hub, as an
// entry on a reader's clock at now; under h.mu.
func (h *Hub) valid(key, auth string, now time.Time) *cache.Entry {
	s, ok := h.entries[key]
	if !ok {
		return nil
	}
	passed := h.clock.Now().Sub(s.at)
	if s.auth != auth || passed >= s.life {
		return nil
	}
	for _, t := range s.entry.Tags {
		if h.marks[t] > s.epoch {
			return nil
		}
	}
	return s.entry.Restamp(cache.At(now.Add(-s.age-passed)), cache.At(now.Add(s.fresh-passed)), cache.At(now.Add(s.life-passed)))
}

// Claim claims key for r unless another live replica holds it.
func (r *Replica) Claim(_ context.Context, key, auth string) (tier.Claim, error) {
	h := r.hub
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.down {
		return tier.Alone{}, ErrDown
	}
	cl := &claim{r: r, key: key, auth: auth, epoch: h.epoch}
	cl.won = h.take(r, key)
	return cl, nil
}

// take gives key's claim to r if it is free or lapsed; under h.mu.
func (h *Hub) take(r *Replica, key string) bool {
	c, ok := h.claims[key]
	if ok && c.by != r && (!c.by.dead || h.clock.Now().Before(c.until)) {
		return false
	}
	h.claims[key] = held{by: r}
	return true
}

type claim struct {
	r         *Replica
	key, auth string
	epoch     uint64
	won       bool
}

func (c *claim) Won() bool { return c.won }

// Wait returns the holder's fill once it is shared, or nil once r takes
// the claim over (the holder gave it back without a fill, or died and
// ClaimTTL passed on the hub's clock), or when ctx ends or the hub fails.
func (c *claim) Wait(ctx context.Context) (*cache.Entry, error) {
	h := c.r.hub
	for {
		h.mu.Lock()
		if h.down {
			h.mu.Unlock()
			return nil, ErrDown
		}
		if e := h.valid(c.key, c.auth, c.r.clock.Now()); e != nil && c.r.clock.Now().Before(e.Expires.Time()) {
			h.mu.Unlock()
			return e, nil
		}
		if h.take(c.r, c.key) {
			c.won, c.epoch = true, h.epoch
			h.mu.Unlock()
			return nil, nil
		}
		changed := h.changed
		h.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, nil
		case <-changed:
		}
	}
}

// Share stores e (lifetimes measured on r's clock) and gives a claim won
// back.
func (c *claim) Share(_ context.Context, e *cache.Entry) error {
	h := c.r.hub
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.down {
		return ErrDown
	}
	now := c.r.clock.Now()
	if life := e.Keep.Time().Sub(now); life > 0 {
		h.entries[c.key] = stored{entry: e, auth: c.auth, epoch: c.epoch, at: h.clock.Now(),
			age: max(0, now.Sub(e.Stored.Time())), fresh: e.Expires.Time().Sub(now), life: life}
	}
	c.release()
	return nil
}

// Release gives a claim won back.
func (c *claim) Release() {
	h := c.r.hub
	h.mu.Lock()
	defer h.mu.Unlock()
	c.release()
}

func (c *claim) release() {
	h := c.r.hub
	if cur, ok := h.claims[c.key]; c.won && ok && cur.by == c.r {
		delete(h.claims, c.key)
		h.notify()
	}
	c.won = false
}
