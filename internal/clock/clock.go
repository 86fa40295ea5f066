// Package clock is cacheproxy's one source of time. The cache, the
// invalidator, the limiter and the proxy take a Clock, so tests drive time
// with a Fake instead of sleeping (as derper's limiter takes now and uber's
// ratelimit takes WithClock).
package clock

import (
	"sync"
	"time"
)

// Clock is what cacheproxy reads time from. It satisfies
// go.uber.org/ratelimit's Clock (Now, Sleep).
type Clock interface {
	Now() time.Time
	// Since is Now().Sub(t); the real clock reads the monotonic clock once.
	Since(t time.Time) time.Duration
	After(d time.Duration) <-chan time.Time
	Sleep(d time.Duration)
}

// Real is the wall clock.
type Real struct{}

func (Real) Now() time.Time                         { return time.Now() }
func (Real) Since(t time.Time) time.Duration        { return time.Since(t) }
func (Real) After(d time.Duration) <-chan time.Time { return time.After(d) }
func (Real) Sleep(d time.Duration)                  { time.Sleep(d) }

// Or returns c, or Real if c is nil.
func Or(c Clock) Clock {
	if c == nil {
		return Real{}
	}
	return c
}

// Fake is a clock that moves only when Advance is called. Timers and
// sleeps registered on it fire when time reaches them; a test learns who
// waits on the clock with Expect or NextTimer, then advances.
type Fake struct {
	mu         sync.Mutex
	now        time.Time
	timers     []fakeTimer
	registered int             // timers and sleeps ever registered
	changed    chan struct{}   // closed and replaced on every call of After
	asked      []time.Duration // every duration After was called with
}

type fakeTimer struct {
	at time.Time
	ch chan time.Time
}

// NewFake returns a Fake set at start.
func NewFake(start time.Time) *Fake {
	return &Fake{now: start, changed: make(chan struct{})}
}

func (c *Fake) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

func (c *Fake) Since(t time.Time) time.Duration { return c.Now().Sub(t) }

// After returns a channel that receives the time once the clock has been
// advanced by d. A d <= 0 fires at once (and counts as no registration).
func (c *Fake) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	c.asked = append(c.asked, d)
	close(c.changed)
	c.changed = make(chan struct{})
	if d <= 0 {
		ch <- c.now
		return ch
	}
	c.timers = append(c.timers, fakeTimer{c.now.Add(d), ch})
	c.registered++
	return ch
}

func (c *Fake) Sleep(d time.Duration) { <-c.After(d) }

// Advance moves time on and fires what is due.
func (c *Fake) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.timers[:0]
	for _, t := range c.timers {
		if !t.at.After(c.now) {
			t.ch <- c.now
		} else {
			kept = append(kept, t)
		}
	}
	c.timers = kept
}

// Expect returns a function that blocks until n timers or sleeps have been
// registered after this call: the test then knows who waits on the clock.
func (c *Fake) Expect(n int) func() {
	c.mu.Lock()
	target := c.registered + n
	c.mu.Unlock()
	return func() { c.waitFor(func() bool { return c.registered >= target }) }
}

// ExpectAsked returns a function that blocks until After or Sleep has been
// called with d once more after this call.
func (c *Fake) ExpectAsked(d time.Duration) func() {
	count := func() int {
		n := 0
		for _, a := range c.asked {
			if a == d {
				n++
			}
		}
		return n
	}
	c.mu.Lock()
	target := count() + 1
	c.mu.Unlock()
	return func() { c.waitFor(func() bool { return count() >= target }) }
}

// WaitAsked blocks until After or Sleep has been called n times in all
// (zero and negative durations included) and returns those durations in
// order: a test learns what a retry asked to wait for, then advances.
func (c *Fake) WaitAsked(n int) []time.Duration {
	c.waitFor(func() bool { return len(c.asked) >= n })
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Duration(nil), c.asked[:n]...)
}

// waitFor blocks until cond, read under c.mu, holds.
func (c *Fake) waitFor(cond func() bool) {
	for {
		c.mu.Lock()
		ok, changed := cond(), c.changed
		c.mu.Unlock()
		if ok {
			return
		}
		<-changed
	}
}
