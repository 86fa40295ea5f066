package ratelimit

import (
	"context"
	"sync"
	"time"

	"cacheproxy/internal/clock"
)

// Slots is where a call that the Limiter granted a turn takes its place
// in the account's limits that reach beyond this replica's queue: with no
// fleet, this replica's rate window; with Redis, the account's slots
// across the fleet (internal/fleet), the fleet's rate window included.
// The Limiter decides who goes next (priority, fairness, the adaptive
// cap); Slots only says whether there is room, so the rate window is
// evaluated once, in one place.
type Slots interface {
	// Take takes a place for one call of t.Account while fewer than
	// t.Limit hold one. It may block until a place is released (woken by
	// the release, not by polling), for at most t.Wait, and then answers a
	// *RejectedError; it returns at once with a nil Place and how long to
	// wait when only the rate window stops it (the Limiter queues the call
	// again and comes back then).
	Take(ctx context.Context, t Ticket) (Place, time.Duration, error)
}

// Ticket is what Slots.Take knows of a call.
type Ticket struct {
	Account  string
	Limit    int // the account's cap now: at most this many places held
	Priority Priority
	Wait     time.Duration // what is left of max_wait
}

// Place is one call's place; Release gives it back (once).
type Place interface {
	// Held is how many of the account's places were held once this one
	// was taken, it included (the fleet's count with Redis; 0 if the
	// Slots do not count them, then the Limiter's own count stands).
	Held() int
	Release()
}

// Priority orders an account's waiting calls: writes first, then reads a
// client waits for, then background refreshes.
type Priority uint8

const (
	Write Priority = iota
	Read
	Background
	numPriorities
)

func (p Priority) String() string {
	switch p {
	case Write:
		return "write"
	case Read:
		return "read"
	}
	return "background"
}

type priorityKey struct{}

// WithPriority marks ctx's calls as p (Read when unmarked).
func WithPriority(ctx context.Context, p Priority) context.Context {
	return context.WithValue(ctx, priorityKey{}, p)
}

// PriorityOf is ctx's priority.
func PriorityOf(ctx context.Context) Priority {
	if p, ok := ctx.Value(priorityKey{}).(Priority); ok && p < numPriorities {
		return p
	}
	return Read
}

type waitedKey struct{}

// WithWaited says ctx's request has already waited d (since it arrived:
// for a peer's fill, or a turn before an upstream 429 and its backoff).
// Acquire counts MaxWait from its arrival, not from its own call, so a
// request never waits for turns longer than MaxWait in all.
func WithWaited(ctx context.Context, d time.Duration) context.Context {
	return context.WithValue(ctx, waitedKey{}, d)
}

// waitedOf is what ctx's request has already waited (WithWaited).
func waitedOf(ctx context.Context) time.Duration {
	if d, ok := ctx.Value(waitedKey{}).(time.Duration); ok && d > 0 {
		return d
	}
	return 0
}

// localSlots is a replica on its own: the Limiter's cap counts the calls
// in flight, so a place is only the rate window's (a sliding window of
// the last Rate start times per account, on the Limiter's clock).
type localSlots struct {
	rate  int
	clock clock.Clock

	mu      sync.Mutex
	windows map[string]*window
	swept   time.Time
}

type window struct {
	starts []int64 // start times (Unix ns): grows to rate, then a ring
	pos    int     // once full, the oldest slot (the next to overwrite)
}

// noPlace is a place nobody counts.
type noPlace struct{}

func (noPlace) Held() int { return 0 }
func (noPlace) Release()  {}

func newLocalSlots(rate int, clk clock.Clock) *localSlots {
	return &localSlots{rate: rate, clock: clk, windows: map[string]*window{}}
}

func (s *localSlots) Take(_ context.Context, t Ticket) (Place, time.Duration, error) {
	if s.rate <= 0 {
		return noPlace{}, 0, nil
	}
	now := s.clock.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sweepLocked(now)
	w := s.windows[t.Account]
	if w == nil {
		w = &window{}
		s.windows[t.Account] = w
	}
	if len(w.starts) < s.rate {
		w.starts = append(w.starts, now.UnixNano())
		return noPlace{}, 0, nil
	}
	if wait := time.Duration(w.starts[w.pos] + int64(time.Second) - now.UnixNano()); wait > 0 {
		return nil, wait, nil
	}
	w.starts[w.pos] = now.UnixNano()
	w.pos = (w.pos + 1) % len(w.starts)
	return noPlace{}, 0, nil
}

// sweepLocked forgets, every few seconds, the windows whose calls all
// started more than a second ago: they allow a full burst again.
func (s *localSlots) sweepLocked(now time.Time) {
	if now.Sub(s.swept) < 5*time.Second {
		return
	}
	s.swept = now
	for id, w := range s.windows {
		newest := w.starts[(w.pos+len(w.starts)-1)%len(w.starts)]
		if now.UnixNano()-newest > int64(time.Second) {
			delete(s.windows, id)
		}
	}
}
