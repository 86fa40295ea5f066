// Package cache stores immutable responses in memory, bounded in bytes
// (ristretto), and invalidates them by scope: a write to a conversation
// invalidates every entry tagged with it, whatever key the entry has.
//
// It knows nothing of HTTP: an Entry's header is a plain map.
package cache

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/ristretto/v2"
)

// Entry is one stored response. It is a value shared by every reader and is
// never changed after Set: readers must not modify Header or Body.
type Entry struct {
	Key    string // the full cache key, checked on Get against hash collisions
	Status int
	Header map[string][]string
	Body   []byte
	// Stored is when the response arrived; Expires ends its freshness;
	// Keep (>= Expires) is when it leaves the cache for good, so that a
	// stale copy can still be served on upstream errors.
	Stored, Expires, Keep time.Time
	// Epoch is the store's epoch when the fetch that produced this entry
	// started; Tags are the scopes it belongs to. An invalidation of any tag
	// at a later epoch makes the entry invisible.
	Epoch uint64
	Tags  []string
}

// Approximate bytes of an Entry beyond its strings and body, measured with
// bench/memory: the struct and ristretto's item and map slot (≈400), the
// header map's buckets (≈300 plus ≈64 a key), a slice header per value and
// per tag.
const (
	entryOverhead  = 700
	headerOverhead = 64
	sliceOverhead  = 24
)

// Cost is the entry's memory in bytes, as ristretto accounts it.
func (e *Entry) Cost() int64 {
	n := len(e.Key) + len(e.Body) + entryOverhead
	for k, vs := range e.Header {
		n += len(k) + headerOverhead
		for _, v := range vs {
			n += len(v) + sliceOverhead
		}
	}
	for _, t := range e.Tags {
		n += len(t) + sliceOverhead
	}
	return int64(n)
}

// Store is a byte-bounded cache of entries plus the scope epochs that
// invalidate them.
type Store struct {
	c   *ristretto.Cache[string, *Entry]
	now func() time.Time
	// life guards Set and Del against Close: a detached fetch may finish
	// after shutdown closed the store, and ristretto must not be written then.
	life   sync.RWMutex
	closed bool

	evictions, rejections atomic.Uint64

	epoch     atomic.Uint64
	mu        sync.RWMutex
	marks     map[string]mark // scope tag -> last invalidation
	retention time.Duration
	lastPrune time.Time
}

type mark struct {
	epoch uint64
	at    time.Time
}

// New returns a store holding at most maxBytes of entries. retention is the
// longest an entry can live (its keep time plus the longest fetch); scope
// marks older than that are forgotten. now is the clock (time.Now if nil).
func New(maxBytes int64, retention time.Duration, now func() time.Time) (*Store, error) {
	if now == nil {
		now = time.Now
	}
	// Participants are about 1 KiB: ten counters per expected entry.
	counters := max(maxBytes/1024*10, 1000)
	s := &Store{now: now, marks: map[string]mark{}, retention: retention, lastPrune: now()}
	c, err := ristretto.NewCache(&ristretto.Config[string, *Entry]{
		NumCounters: counters,
		MaxCost:     maxBytes,
		BufferItems: 64,
		// ristretto's own metrics put shared counters on every Get (3% of
		// a hit served over loopback); the callbacks below run in its
		// background goroutine instead.
		Metrics:  false,
		OnEvict:  func(*ristretto.Item[*Entry]) { s.evictions.Add(1) },
		OnReject: func(*ristretto.Item[*Entry]) { s.rejections.Add(1) },
	})
	if err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	s.c = c
	return s, nil
}

// Close stops the store's background goroutines. Later Sets are dropped.
func (s *Store) Close() {
	s.life.Lock()
	defer s.life.Unlock()
	if !s.closed {
		s.closed = true
		s.c.Close()
	}
}

// Wait blocks until pending Sets are applied (ristretto applies them
// asynchronously); tests and purges use it.
func (s *Store) Wait() {
	s.life.RLock()
	defer s.life.RUnlock()
	if !s.closed {
		s.c.Wait()
	}
}

// Epoch is the current invalidation epoch. A fetch records it before it
// starts and stores it in its Entry.
func (s *Store) Epoch() uint64 { return s.epoch.Load() }

// Get returns the entry under key unless it is absent, past its Keep time
// at now, or invalidated since its fetch began. The caller passes now (the
// time its request arrived) to save a clock read on the hit path.
func (s *Store) Get(key string, now time.Time) (*Entry, bool) {
	e, ok := s.c.Get(key)
	if !ok || e.Key != key || !now.Before(e.Keep) || !s.Valid(e.Epoch, e.Tags) {
		return nil, false
	}
	return e, true
}

// Set stores e until e.Keep and returns once ristretto has applied it (its
// Sets are asynchronous): a read that starts after Set returns finds the
// entry, unless the admission policy dropped it, which is not an error. It
// reports whether ristretto accepted the item. An entry whose scopes were
// invalidated during its fetch is not stored.
func (s *Store) Set(e *Entry) bool {
	ttl := e.Keep.Sub(s.now())
	if ttl <= 0 || !s.Valid(e.Epoch, e.Tags) {
		return false
	}
	s.life.RLock()
	defer s.life.RUnlock()
	if s.closed || !s.c.SetWithTTL(e.Key, e, e.Cost(), ttl) {
		return false
	}
	s.c.Wait()
	return true
}

// Del removes one key.
func (s *Store) Del(key string) {
	s.life.RLock()
	defer s.life.RUnlock()
	if !s.closed {
		s.c.Del(key)
	}
}

// Invalidate makes every entry tagged with any of tags, fetched at an epoch
// before this call, invisible from now on, and returns the new epoch.
func (s *Store) Invalidate(tags ...string) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.epoch.Add(1)
	now := s.now()
	for _, t := range tags {
		s.marks[t] = mark{epoch: e, at: now}
	}
	if now.Sub(s.lastPrune) > s.retention {
		for t, m := range s.marks {
			if now.Sub(m.at) > s.retention {
				delete(s.marks, t)
			}
		}
		s.lastPrune = now
	}
	return e
}

// Valid reports whether data fetched at epoch is still good for tags. When
// nothing was invalidated since epoch (Invalidate raises the epoch before it
// returns) the scopes need not be read.
func (s *Store) Valid(epoch uint64, tags []string) bool {
	return s.epoch.Load() <= epoch || s.Since(tags) <= epoch
}

// Since returns the latest invalidation epoch of any of tags (0 if none).
func (s *Store) Since(tags []string) uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var latest uint64
	for _, t := range tags {
		if m, ok := s.marks[t]; ok && m.epoch > latest {
			latest = m.epoch
		}
	}
	return latest
}

// Stats is a snapshot for logs and metrics.
type Stats struct {
	// Entries and Bytes are what the cache holds (Entries counts expired
	// entries not yet swept).
	Entries, Bytes int64
	// Evictions and Rejections count entries ristretto's policy evicted or
	// refused admission.
	Evictions, Rejections uint64
	// Scopes is the number of remembered invalidations.
	Scopes int
}

// Stats reports the store's state. It walks the entries: for periodic
// summaries and metric scrapes, not for the request path.
func (s *Store) Stats() Stats {
	s.life.RLock()
	defer s.life.RUnlock()
	if s.closed {
		return Stats{}
	}
	var n int64
	s.c.IterValues(func(*Entry) bool { n++; return false })
	s.mu.RLock()
	scopes := len(s.marks)
	s.mu.RUnlock()
	return Stats{
		Entries: n, Bytes: s.c.MaxCost() - s.c.RemainingCost(),
		Evictions: s.evictions.Load(), Rejections: s.rejections.Load(), Scopes: scopes,
	}
}
