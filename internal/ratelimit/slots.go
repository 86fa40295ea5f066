package ratelimit

import (
	"context"
	"math"
	"slices"
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
// in flight, so a place is only the rate window's: Rate places per
// account, each taken by a call until it ends and for a second after
// (on the Limiter's clock).
//
// A second after the call's end, not its start: Twilio counts a call in
// its window when the call reaches it, some time after it started here,
// and that time varies. Counted from the start, a call that reached
// Twilio late and the call that took its place a second after it started,
// reaching Twilio early, fell in one of Twilio's windows together: paced
// at 45/s under Twilio's 50/s, Twilio answered 429 in 2 of 6 runs. A call
// reaches Twilio before it ends, so the next call, which starts a second
// after that end at the earliest, reaches Twilio more than a second after
// it, however long either took on the way.
type localSlots struct {
	rate  int
	clock clock.Clock

	mu      sync.Mutex
	windows map[string]*window
	swept   time.Time
}

// window is an account's places: when each one's call ended (Unix ns),
// or inFlight while it lasts.
type window struct {
	ends []int64
}

const inFlight = math.MaxInt64

// noPlace is a place nobody counts.
type noPlace struct{}

func (noPlace) Held() int { return 0 }
func (noPlace) Release()  {}

// ratePlace is a place in an account's rate window, given back (its end
// recorded) once.
type ratePlace struct {
	s    *localSlots
	w    *window
	i    int
	once sync.Once
}

func (p *ratePlace) Held() int { return 0 }
func (p *ratePlace) Release() {
	p.once.Do(func() {
		p.s.mu.Lock()
		p.w.ends[p.i] = p.s.clock.Now().UnixNano()
		p.s.mu.Unlock()
	})
}

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
	i := len(w.ends)
	if i < s.rate {
		w.ends = append(w.ends, inFlight)
		return &ratePlace{s: s, w: w, i: i}, 0, nil
	}
	i = 0
	for j, e := range w.ends {
		if e < w.ends[i] {
			i = j
		}
	}
	switch e := w.ends[i]; {
	case e == inFlight: // Rate calls in flight: one ends, then a second passes
		return nil, time.Second, nil
	case e+int64(time.Second) > now.UnixNano():
		return nil, time.Duration(e + int64(time.Second) - now.UnixNano()), nil
	}
	w.ends[i] = inFlight
	return &ratePlace{s: s, w: w, i: i}, 0, nil
}

// sweepLocked forgets, every few seconds, the windows whose calls all
// ended more than a second ago: they allow a full burst again.
func (s *localSlots) sweepLocked(now time.Time) {
	if now.Sub(s.swept) < 5*time.Second {
		return
	}
	s.swept = now
	for id, w := range s.windows {
		if slices.Max(w.ends) < now.UnixNano()-int64(time.Second) {
			delete(s.windows, id)
		}
	}
}
