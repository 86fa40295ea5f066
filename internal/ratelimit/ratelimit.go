// Package ratelimit paces upstream calls per account so that an account
// stays under Twilio's limits (HTTP 429, error 20429), without ever leaving a
// caller waiting longer than a bound. It knows nothing of HTTP or caching.
//
// Pacing is go.uber.org/ratelimit. Its Take() blocks and takes no context, so
// callers never call it themselves: each account has a FIFO of waiters and,
// while the FIFO is not empty, one dispatcher goroutine that calls Take() and
// hands each slot to the first waiter still there. A caller whose context
// ends, or whose max wait passes, leaves the FIFO at once and costs no slot;
// the FIFO is bounded at rate × max wait (a longer queue could not be served
// in time), and a caller beyond it is rejected at once. The dispatcher exits
// when the FIFO empties, so no goroutine outlives the work.
package ratelimit

import (
	"context"
	"fmt"
	"math"
	"sync"
	"time"

	"cacheproxy/internal/clock"
	"cacheproxy/internal/inflight"

	"go.uber.org/ratelimit"
)

// Config sets the per-account budget.
type Config struct {
	// Rate is upstream calls per second for one account.
	Rate float64
	// MaxConcurrent caps one account's calls in flight. <= 0: no cap.
	MaxConcurrent int
	// MaxWait bounds how long Acquire waits for a turn.
	MaxWait time.Duration
	// Recover is how long a cut rate takes to climb back to Rate.
	// Default 30s.
	Recover time.Duration
	// MinRate is the floor of cuts. Default 1 per second.
	MinRate float64
}

// RejectedError is Acquire's answer when the account's budget cannot give
// a turn within MaxWait. RetryAfter estimates when one would be free.
type RejectedError struct {
	RetryAfter time.Duration
	Reason     string
}

func (e *RejectedError) Error() string {
	return fmt.Sprintf("rate limited: %s (retry after %s)", e.Reason, e.RetryAfter)
}

// Limiter holds one budget per account.
type Limiter struct {
	cfg   Config
	clock clock.Clock

	mu        sync.Mutex
	accounts  map[string]*account
	running   inflight.Tracker // dispatcher goroutines
	lastPrune time.Time
}

type account struct {
	queue    []*waiter
	inflight int
	running  bool          // a dispatcher goroutine serves this account
	wake     chan struct{} // nudges a dispatcher waiting for a free call slot

	cutRate  float64   // rate right after the last cut (0: never cut)
	cutAt    time.Time // when
	lim      ratelimit.Limiter
	limRate  float64
	lastTake time.Time // the slot the last Take returned
}

type waiter struct {
	granted chan struct{} // buffered 1: the dispatcher never blocks on it
	gone    bool          // left before being granted (guarded by Limiter.mu)
}

// New returns a Limiter on clk (the real clock if nil).
func New(cfg Config, clk clock.Clock) *Limiter {
	if cfg.Recover <= 0 {
		cfg.Recover = 30 * time.Second
	}
	if cfg.MinRate <= 0 {
		cfg.MinRate = 1
	}
	return &Limiter{cfg: cfg, clock: clock.Or(clk), accounts: map[string]*account{}}
}

// Acquire waits for a turn to call upstream for account. On success it
// returns release, which the caller must call when the call is over (it
// frees the concurrency slot), and how long it waited.
func (l *Limiter) Acquire(ctx context.Context, acct string) (release func(), waited time.Duration, err error) {
	start := l.clock.Now()
	l.mu.Lock()
	l.pruneLocked(start)
	a := l.accounts[acct]
	if a == nil {
		a = &account{wake: make(chan struct{}, 1)}
		l.accounts[acct] = a
	}
	rate := l.rateLocked(a, start)
	if bound := max(1, int(rate*l.cfg.MaxWait.Seconds())); len(a.queue) >= bound {
		retry := time.Duration(float64(len(a.queue)+1) / rate * float64(time.Second))
		l.mu.Unlock()
		return nil, 0, &RejectedError{RetryAfter: retry, Reason: "queue full"}
	}
	// Fast path: nobody queued and this account's next slot already due.
	// All Takes are serialised (here, or in the one dispatcher), so this
	// Take returns at once: no goroutine hop, no wait.
	if len(a.queue) == 0 && !a.running && (l.cfg.MaxConcurrent <= 0 || a.inflight < l.cfg.MaxConcurrent) {
		lim := l.limiterLocked(a, start)
		if !start.Before(a.lastTake.Add(perSlot(a.limRate))) {
			a.lastTake = lim.Take()
			a.inflight++
			l.mu.Unlock()
			return l.releaser(a), 0, nil
		}
	}
	w := &waiter{granted: make(chan struct{}, 1)}
	a.queue = append(a.queue, w)
	if !a.running {
		a.running = true
		l.running.Add()
		go l.dispatch(a)
	}
	l.mu.Unlock()

	timeout := l.clock.After(l.cfg.MaxWait)
	select {
	case <-w.granted:
		return l.releaser(a), l.clock.Now().Sub(start), nil
	case <-ctx.Done():
		l.leave(a, w)
		return nil, l.clock.Now().Sub(start), ctx.Err()
	case <-timeout:
		l.leave(a, w)
		l.mu.Lock()
		retry := time.Duration(float64(len(a.queue)+1) / l.rateLocked(a, l.clock.Now()) * float64(time.Second))
		l.mu.Unlock()
		return nil, l.clock.Now().Sub(start), &RejectedError{RetryAfter: retry, Reason: "waited max_wait"}
	}
}

// leave takes a waiter out of the queue; if the dispatcher granted it a
// slot meanwhile, the slot is given back.
func (l *Limiter) leave(a *account, w *waiter) {
	l.mu.Lock()
	select {
	case <-w.granted:
		a.inflight--
	default:
		w.gone = true
		for i, q := range a.queue {
			if q == w {
				a.queue = append(a.queue[:i], a.queue[i+1:]...)
				break
			}
		}
	}
	l.mu.Unlock()
	nudge(a)
}

func (l *Limiter) releaser(a *account) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			a.inflight--
			l.mu.Unlock()
			nudge(a)
		})
	}
}

func nudge(a *account) {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// Wait blocks until no dispatcher runs (each exits once its queue is
// empty and its last slot has come) or ctx ends.
func (l *Limiter) Wait(ctx context.Context) error {
	return l.running.Wait(ctx)
}

// dispatch serves one account's queue until it is empty.
func (l *Limiter) dispatch(a *account) {
	defer l.running.Done()
	for {
		l.mu.Lock()
		if len(a.queue) == 0 {
			a.running = false
			l.mu.Unlock()
			return
		}
		if l.cfg.MaxConcurrent > 0 && a.inflight >= l.cfg.MaxConcurrent {
			l.mu.Unlock()
			<-a.wake // a release or a departure
			continue
		}
		lim := l.limiterLocked(a, l.clock.Now())
		l.mu.Unlock()

		took := lim.Take() // sleeps (on l.clock) until this account's next slot

		l.mu.Lock()
		a.lastTake = took
		if len(a.queue) > 0 { // else everyone left while we slept: the slot lapses
			w := a.queue[0]
			a.queue = a.queue[1:]
			a.inflight++
			w.granted <- struct{}{}
		}
		l.mu.Unlock()
	}
}

// idleFor is how long an account must be idle before it is forgotten; a
// slot interval is at most 1/MinRate, so forgetting it cannot grant an
// early slot.
func (l *Limiter) idleFor() time.Duration { return perSlot(l.cfg.MinRate) + time.Second }

// pruneLocked forgets idle accounts, at most once per idleFor, so the map
// does not grow with every account ever seen.
func (l *Limiter) pruneLocked(now time.Time) {
	if now.Sub(l.lastPrune) < l.idleFor() {
		return
	}
	l.lastPrune = now
	for id, a := range l.accounts {
		if len(a.queue) == 0 && a.inflight == 0 && !a.running && a.cutRate == 0 && now.Sub(a.lastTake) > l.idleFor() {
			delete(l.accounts, id)
		}
	}
}

// Accounts reports how many accounts the limiter remembers.
func (l *Limiter) Accounts() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.accounts)
}

// Outcome is what the upstream answered a call, as far as the budget cares.
type Outcome uint8

const (
	// Served is any answer that says nothing about the budget.
	Served Outcome = iota
	// Throttled is the upstream's 429 (Twilio's 20429): the account sent
	// more than Twilio allows.
	Throttled
)

// Report tells the budget how an account's call went. Throttled cuts the
// account's rate in half (to at least MinRate); it climbs back linearly
// over Recover.
func (l *Limiter) Report(acct string, o Outcome) {
	if o != Throttled {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	a := l.accounts[acct]
	if a == nil {
		return
	}
	now := l.clock.Now()
	a.cutRate = math.Max(l.rateLocked(a, now)/2, l.cfg.MinRate)
	a.cutAt = now
}

// Rate reports an account's current rate (for logs and tests).
func (l *Limiter) Rate(acct string) float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if a := l.accounts[acct]; a != nil {
		return l.rateLocked(a, l.clock.Now())
	}
	return l.cfg.Rate
}

// rateLocked is the account's rate at now: Rate, or a cut rate recovering.
func (l *Limiter) rateLocked(a *account, now time.Time) float64 {
	if a.cutRate == 0 {
		return l.cfg.Rate
	}
	f := float64(now.Sub(a.cutAt)) / float64(l.cfg.Recover)
	if f >= 1 {
		a.cutRate = 0
		return l.cfg.Rate
	}
	return a.cutRate + (l.cfg.Rate-a.cutRate)*f
}

// limiterLocked returns the uber limiter for the account's current rate,
// rebuilt when the rate has moved by more than 5%.
func (l *Limiter) limiterLocked(a *account, now time.Time) ratelimit.Limiter {
	rate := l.rateLocked(a, now)
	if a.lim == nil || math.Abs(rate-a.limRate) > 0.05*a.limRate {
		// Without slack: an idle account does not save up a burst.
		a.lim = ratelimit.New(1, ratelimit.Per(perSlot(rate)), ratelimit.WithoutSlack, ratelimit.WithClock(l.clock))
		a.limRate = rate
	}
	return a.lim
}

func perSlot(rate float64) time.Duration { return time.Duration(float64(time.Second) / rate) }
