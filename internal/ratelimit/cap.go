package ratelimit

import (
	"math"
	"time"
)

// capLocked is the account's cap at now, in whole calls.
func (l *Limiter) capLocked(a *account, now time.Time) int {
	return max(1, int(l.capAtLocked(a, now)))
}

// capAtLocked is the account's cap at now: in slow start, a.cap; after,
// a cut cap on its linear way back to MaxConcurrent. Once a 429's Twilio
// header told the account's limit, never above it; while answers' headers
// report the account's other clients, at most the limit (or
// MaxConcurrent) minus theirs.
func (l *Limiter) capAtLocked(a *account, now time.Time) float64 {
	top := float64(l.cfg.MaxConcurrent)
	c := top
	switch {
	case a.slowStart:
		c = a.cap
	case !a.cutAt.IsZero():
		if f := float64(now.Sub(a.cutAt)) / float64(l.cfg.Recover); f < 1 {
			c = a.cap + (top-a.cap)*f
		}
	}
	return min(c, l.topLocked(a, now))
}

// topLocked is what the account's cap can reach at now: MaxConcurrent,
// or the limit a 429's header told, less the calls its other clients have
// in flight as the answers' headers report them.
func (l *Limiter) topLocked(a *account, now time.Time) float64 {
	top := float64(l.cfg.MaxConcurrent)
	if a.limit > 0 {
		top = min(top, float64(a.limit))
	}
	if l.othersFreshLocked(a, now) {
		top -= float64(a.others)
	}
	return top
}

// slotLimitLocked is a turn's Ticket.Limit: the account's cap, but in slow
// start what the cap can reach. Slow start paces this replica's own calls
// (its cap bounds them here); were it the bound of the fleet's slots too,
// each replica's first cap would bound the whole fleet's calls, and the
// fleet would start three times slower than three replicas alone.
func (l *Limiter) slotLimitLocked(a *account, now time.Time) int {
	if a.slowStart {
		return max(1, int(l.topLocked(a, now)))
	}
	return l.capLocked(a, now)
}

// othersFreshLocked reports whether the account's other clients were
// reported recently enough (within Recover) to count.
func (l *Limiter) othersFreshLocked(a *account, now time.Time) bool {
	return !a.sawAt.IsZero() && now.Sub(a.sawAt) < l.cfg.Recover
}

// cutLocked lowers the cap after a 429 that came with n calls in flight
// (this one included): the upstream allows fewer than n, and, once per
// round at the current cap, a tenth less than the cap.
func (l *Limiter) cutLocked(a *account, s *turn, n int, now time.Time, events *[]Event) {
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
// account's limit, and the cap is cut as without the header (the others'
// share is not known yet, or was more than thought). On another answer,
// what it reports beyond this replica's (or fleet's) own calls, s.own, is
// the other clients'; and an answer with room under the limit, with no
// 429 for a while, lifts a cut at once: the cap is the limit minus the
// others, no climbing back over Recover, no probing.
func (l *Limiter) sawLocked(a *account, s *turn, o Outcome, n int, now time.Time, events *[]Event) {
	switch o {
	case Throttled:
		a.limit, a.throttledAt = max(1, s.saw-1), now
		l.cutLocked(a, s, n, now, events)
	case Served:
		from := l.capLocked(a, now)
		a.seeOthers(max(0, s.saw-s.own), s.saw-1, s.began, now)
		if a.limit > 0 {
			a.limit = max(a.limit, s.saw) // the account took that many: its limit is at least that
		}
		if a.limit > 0 && s.saw < a.limit && now.Sub(a.throttledAt) >= othersWindow {
			a.cutAt = time.Time{}
		}
		if to := l.capLocked(a, now); to < from {
			*events = append(*events, Event{Kind: CapCut, Account: a.id, From: from, To: to, InFlight: n})
			a.shown = to
		}
	default:
		return
	}
	a.sawAt = now
}

// othersWindow is how long a report of the other clients' calls counts.
// One answer's report is noisy both ways: low by calls of ours counted at
// its start that were not at Twilio yet, high by calls of ours that
// started after it and reached Twilio first. Calls that end together start
// together, so the low side is the rule, not the exception: of a round of
// four of ours, the first to reach Twilio sees none of the other three,
// and reports three fewer others than there are. So the others are the
// most reported among the last othersSamples reports within the window: a
// low report (which would cost a 429) changes nothing. But never more than
// the answers that came back since the call reporting began prove: an
// answer that reported n calls in flight, itself among them, proves the
// others held at most n-1 when it arrived, and the first of a round, which
// answers first, proves the others' share for the whole round. (The upper
// quartile let the rounds' low reports through: a 429 about each second
// while the others held their share, 3 to 8 upstream 429s for 300 reads
// in TestTwiliosConcurrencyHeaderSteersTheBudget where the first round's
// 3 are all it needs. The most reported alone held the cap at 6 after the
// others left: bench/limits, 3.77 s for 300 reads against 3.37; with the
// answers' proof, 3.59 s: a call that calls of ours overtook, in a round
// whose first answer came before it began, still reports too many.)
const (
	othersWindow  = 500 * time.Millisecond
	othersSamples = 15
)

// seeOthers records one report of the other clients' calls, by a call
// that began at began: n beyond ours in flight, and at most most (the
// answer's count less itself).
func (a *account) seeOthers(n, most int, began, now time.Time) {
	a.samples[a.nextSample] = othersSample{n: n, most: most, at: now}
	a.nextSample = (a.nextSample + 1) % othersSamples
	others, bound := 0, math.MaxInt
	for _, x := range a.samples {
		if x.at.IsZero() || now.Sub(x.at) >= othersWindow {
			continue
		}
		others = max(others, x.n)
		if !x.at.Before(began) {
			bound = min(bound, x.most)
		}
	}
	a.others = min(others, bound)
}

type othersSample struct {
	n, most int
	at      time.Time
}
