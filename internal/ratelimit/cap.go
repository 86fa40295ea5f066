package ratelimit

import (
	"math"
	"time"
)

// capLocked is the account's cap at now, in whole calls.
func (l *Limiter) capLocked(a *account, now time.Time) int {
	return max(1, int(l.capAtLocked(a, now)))
}

// capAtLocked is the account's cap at now. Without Twilio's header: in
// slow start, a.cap; after, a cut cap on its linear way back to
// MaxConcurrent. Once a 429's header told the account's limit, the limit
// (no probing); while answers' headers report the account's other
// clients, at most the limit (or MaxConcurrent) minus theirs.
func (l *Limiter) capAtLocked(a *account, now time.Time) float64 {
	top := float64(l.cfg.MaxConcurrent)
	c := top
	switch {
	case a.limit > 0:
		top = min(top, float64(a.limit))
		c = top
	case a.slowStart:
		c = a.cap
	case !a.cutAt.IsZero():
		if f := float64(now.Sub(a.cutAt)) / float64(l.cfg.Recover); f < 1 {
			c = a.cap + (top-a.cap)*f
		}
	}
	if l.othersFreshLocked(a, now) {
		c = min(c, top-float64(a.others))
	}
	return c
}

// othersFreshLocked reports whether the account's other clients were
// reported recently enough (within Recover) to count.
func (l *Limiter) othersFreshLocked(a *account, now time.Time) bool {
	return !a.sawAt.IsZero() && now.Sub(a.sawAt) < l.cfg.Recover
}

// cutLocked lowers the cap after a 429 that came with n calls in flight
// (this one included): the upstream allows fewer than n, and, once per
// round at the current cap, a tenth less than the cap.
func (l *Limiter) cutLocked(a *account, s *lease, n int, now time.Time, events *[]Event) {
	cur := l.capAtLocked(a, now)
	target := float64(n - 1)
	if s.gen == a.gen {
		target = min(target, cur*backoff)
	}
	target = max(1, math.Floor(min(cur, target)))
	if target >= cur && !a.slowStart {
		return
	}
	from := l.capLocked(a, now)
	a.slowStart, a.cap, a.cutAt = false, target, now
	a.gen++
	a.shown = int(target)
	if int(target) < from {
		*events = append(*events, Event{Kind: CapCut, Account: a.id, From: from, To: int(target), InFlight: n})
	}
}

// sawLocked learns from the Twilio-Concurrent-Requests header of the
// call s (the account's requests in flight at Twilio when it arrived,
// from every client, this one included). On a 429 it is one over the
// account's limit; on another answer, what it reports beyond this
// replica's (or fleet's) own calls, s.own, is the other clients'.
func (l *Limiter) sawLocked(a *account, s *lease, o Outcome, now time.Time, events *[]Event) {
	from := l.capLocked(a, now)
	switch o {
	case Throttled:
		a.limit = max(1, s.saw-1)
		a.slowStart, a.cutAt = false, time.Time{}
	case Served:
		a.others = max(0, s.saw-s.own)
		if a.limit > 0 && s.saw > a.limit {
			a.limit = s.saw // the account took more: its limit is at least that
		}
	default:
		return
	}
	a.sawAt = now
	if to := l.capLocked(a, now); to < from {
		*events = append(*events, Event{Kind: CapCut, Account: a.id, From: from, To: to, InFlight: a.inflight + 1})
		a.shown = to
	}
}
