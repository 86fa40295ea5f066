// Package invalidation keeps the freshness guarantee's state: an epoch that
// every invalidation raises, and per scope tag the epoch of its last
// invalidation. An entry records the epoch its fetch began at and the tags
// it belongs to; it is valid while none of its tags was invalidated at a
// later epoch (docs/architecture.md, "Freshness").
//
// Local is this process's state. It knows nothing of HTTP or of how entries
// are stored.
package invalidation

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"cacheproxy/internal/clock"
)

// Local is the invalidation state of one process. Reads never lock:
// marks are a sync.Map, and a writer publishes an epoch only after its
// marks (so every mark of an epoch is visible to whoever reads that epoch).
type Local struct {
	clock     clock.Clock
	epoch     atomic.Uint64
	floor     atomic.Uint64 // data fetched before this epoch is invalid (InvalidateAll)
	mu        sync.Mutex    // serialises writers
	marks     sync.Map      // scope tag (string) -> mark
	retention time.Duration
	lastPrune time.Time
}

type mark struct {
	epoch uint64
	at    time.Time
}

// New returns an empty Local on clk (the real clock if nil). retention is
// the longest an entry can live (its keep time plus the longest fetch):
// marks older than that can no longer hide anything and are forgotten.
func New(retention time.Duration, clk clock.Clock) *Local {
	clk = clock.Or(clk)
	return &Local{clock: clk, retention: retention, lastPrune: clk.Now()}
}

// Epoch is the current epoch. A fetch records it before it starts. Every
// mark of the epoch it returns is already visible to Valid.
func (l *Local) Epoch() uint64 { return l.epoch.Load() }

// Invalidate makes everything tagged with any of tags and fetched at an
// epoch before this call invalid from now on, and returns the new epoch.
// It is applied when it returns; ctx is for implementations that must
// reach other processes (this one never waits).
func (l *Local) Invalidate(_ context.Context, tags []string) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.epoch.Load() + 1
	now := l.clock.Now()
	for _, t := range tags {
		l.marks.Store(t, mark{epoch: e, at: now})
	}
	l.epoch.Store(e) // published after its marks
	if now.Sub(l.lastPrune) > l.retention {
		l.marks.Range(func(t, m any) bool {
			if now.Sub(m.(mark).at) > l.retention {
				l.marks.Delete(t)
			}
			return true
		})
		l.lastPrune = now
	}
	return e
}

// InvalidateAll makes everything fetched before this call invalid, whatever
// its tags (a process that may have missed invalidations from elsewhere
// trusts nothing it holds), and returns the new epoch.
func (l *Local) InvalidateAll() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.epoch.Load() + 1
	l.floor.Store(e)
	l.epoch.Store(e) // published after the floor
	return e
}

// Valid reports whether data fetched at epoch is still good for tags. When
// nothing was invalidated since epoch (Invalidate raises the epoch before
// it returns) the marks need not be read.
func (l *Local) Valid(epoch uint64, tags []string) bool {
	return l.epoch.Load() <= epoch || (epoch >= l.floor.Load() && l.since(tags) <= epoch)
}

// since returns the latest invalidation epoch of any of tags (0 if none).
func (l *Local) since(tags []string) uint64 {
	var latest uint64
	for _, t := range tags {
		if m, ok := l.marks.Load(t); ok && m.(mark).epoch > latest {
			latest = m.(mark).epoch
		}
	}
	return latest
}

// WrittenWithin reports whether any of tags was invalidated less than d
// ago (marks are kept for the retention, longer than any d asked).
func (l *Local) WrittenWithin(tags []string, d time.Duration) bool {
	since := l.clock.Now().Add(-d)
	for _, t := range tags {
		if m, ok := l.marks.Load(t); ok && m.(mark).at.After(since) {
			return true
		}
	}
	return false
}

// Scopes is the number of remembered invalidations (it walks them: for
// tests and stats, not the request path).
func (l *Local) Scopes() int {
	n := 0
	l.marks.Range(func(any, any) bool { n++; return true })
	return n
}

// Intent is a write announced to the other replicas before it is sent
// (the fleet's, docs/fleet.md "Read-your-writes across replicas"): the scopes it names are pending
// everywhere until it ends. End ends it once it is answered (applied: it
// may have changed something; extra: scopes only its answer named) and
// returns the new epoch; the write must end by Deadline.
type Intent interface {
	End(ctx context.Context, applied bool, extra []string) uint64
	Deadline() time.Time
}
