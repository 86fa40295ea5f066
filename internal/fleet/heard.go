package fleet

import (
	"sync"
	"time"
)

// heard is what this replica heard of the fleet's invalidations since it
// last subscribed: for each scope, the epoch of its last invalidation,
// as Redis's marks hold it. A shared entry whose fetch began at or after
// the epoch read once the subscription was confirmed (since) is checked
// here, without reading its marks from Redis (an L2 hit in one round
// trip): every invalidation that could make it invalid raised the epoch
// past since, so it was published after this replica subscribed, and
// heard in order. The reasoning that lets a replica trust its L1 (a writer
// waits for its acknowledgement, or for InvalidationWait, past which the
// replica trusts nothing: Invalidator) covers this too. Older entries,
// and every entry while since is unknown, are checked against Redis.
type heard struct {
	mu        sync.Mutex
	since     uint64 // valid while known
	known     bool   // false: not subscribed, or the epoch not yet read
	gen       uint64 // the subscription since belongs to
	marks     map[string]heardMark
	retention time.Duration
	added     int // since the last sweep
}

type heardMark struct {
	epoch uint64
	at    time.Time
}

// subscribed forgets since (a new subscription: what was sent before it is
// unknown) and returns the subscription's number, for start.
func (h *heard) subscribed() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.gen++
	h.known = false
	return h.gen
}

// is reports whether gen is still the current subscription.
func (h *heard) is(gen uint64) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.gen == gen
}

// start sets since for subscription gen, with the fleet's epoch read after
// it was confirmed (unless another has begun meanwhile).
func (h *heard) start(gen, epoch uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if gen == h.gen {
		h.since, h.known = epoch, true
	}
}

// add records an invalidation of tags at epoch (the writer's, as in
// Redis's marks).
func (h *heard) add(tags []string, epoch uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.marks == nil {
		h.marks = map[string]heardMark{}
	}
	now := time.Now()
	for _, t := range tags {
		if m := h.marks[t]; m.epoch < epoch {
			h.marks[t] = heardMark{epoch, now}
		}
	}
	// Marks older than the retention cannot hide an entry still in Redis
	// (entries outlive no fetch by more); sweep them now and then.
	if h.added += len(tags); h.added > 4096 {
		h.added = 0
		for t, m := range h.marks {
			if now.Sub(m.at) > h.retention {
				delete(h.marks, t)
			}
		}
	}
}

// check reports whether an entry whose fetch began at epoch can be checked
// here (known), and if so whether none of tags was invalidated after it.
func (h *heard) check(epoch uint64, tags []string) (valid, known bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.known || epoch < h.since {
		return false, false
	}
	for _, t := range tags {
		if h.marks[t].epoch > epoch {
			return false, true
		}
	}
	return true, true
}
