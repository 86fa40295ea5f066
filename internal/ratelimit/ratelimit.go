// Package ratelimit keeps each Twilio account's upstream calls within its
// budget, without ever leaving a caller waiting longer than a bound. It
// knows nothing of HTTP or caching: what it needs to know of an answer (the
// upstream's 429, its Twilio-Concurrent-Requests header, an API key's
// account) is passed in.
//
// Twilio limits an account's requests in flight (error 20429, "too many
// concurrent requests"), so the budget is concurrency first:
//
//   - Cap. Each account has an adaptive cap on calls in flight, never above
//     MaxConcurrent. A new account starts in slow start at a quarter of
//     MaxConcurrent and grows by one for each call served while it is in
//     use, up to MaxConcurrent. An upstream 429 cuts the cap to below the
//     number that was in flight when it came, and by a tenth once per round
//     of calls made at the cut cap; the cap then climbs back linearly to
//     MaxConcurrent over Recover.
//   - Twilio's header. When answers carry Twilio-Concurrent-Requests (the
//     account's requests in flight at Twilio, from all its clients), a
//     429's tells the account's limit, and the cap becomes that limit
//     (no probing); the others' share (the header beyond this replica's or
//     fleet's own calls) is taken off the cap as each answer reports it.
//   - Rate (optional). Each call holds one of Rate places from its start
//     until a second after its end, so any one second of the upstream's,
//     sliding, counts at most Rate calls: bursts pass at once as long as
//     the window has room. Once this replica's window is full, turns go one at a
//     time, each taking its place before the next is granted, in the
//     queue's order. The window is the Slots' (this replica's, or the
//     fleet's in Redis).
//   - Order. Writes go first, then reads a client waits for, then
//     background refreshes (WithPriority); while writes wait or are in
//     flight, the others leave WriteShare of the cap to them, and while
//     reads wait too, writes get WriteShare of the turns.
//   - Fairness. Within a priority, an account's waiting calls queue per
//     credential and are served round-robin across credentials, so one
//     credential (a wrong token, say) cannot take more than its share of
//     turns. When the queue is full, the longest credential queue gives up
//     its newest place.
//   - Accounts. API keys (SK…) count against their account (AC…) once it
//     is known, from Config.KeyAccounts, Learn or the KeyBook (the fleet's);
//     until then a key has its own budget.
//
// A caller whose context ends, or whose max wait passes, leaves the queue at
// once and costs no turn. No goroutine runs while no call waits for the
// rate window.
package ratelimit

import (
	"context"
	"fmt"
	"math"
	"sync"
	"time"

	"cacheproxy/internal/clock"
	"cacheproxy/internal/inflight"
)

// Config sets the per-account budget.
type Config struct {
	// MaxConcurrent caps one account's calls in flight; the adaptive cap
	// stays at or below it. Required (> 0).
	MaxConcurrent int
	// Rate is the most calls that start in any one second for one account
	// (for this replica's own Slots; the fleet's take theirs). 0: none.
	Rate int
	// MaxWait bounds how long Acquire waits for a turn.
	MaxWait time.Duration
	// Recover is how long a cut cap takes to climb back to MaxConcurrent.
	// Default 30s.
	Recover time.Duration
	// WriteShare is the share of the cap that reads and refreshes leave to
	// writes while writes wait or are in flight (0 to 1; 0: none).
	WriteShare float64
	// KeyAccounts maps API key SIDs to their account SIDs, known in advance.
	KeyAccounts map[string]string
	// Slots are where a granted call takes its place; nil: this replica's
	// own (the rate window on its clock).
	Slots Slots
	// Keys, if set, is told of every key learned and asked of every key
	// not known (at most once a second each): the fleet's book.
	Keys KeyBook
	// OnEvent, if set, is told of every decision (never under a lock that
	// Acquire waits on for long; it must not call the Limiter).
	OnEvent func(Event)
}

// KeyBook is where API keys' accounts are known beyond this replica.
type KeyBook interface {
	// Lookup returns key's account, if known.
	Lookup(ctx context.Context, key string) (string, bool)
	// Store records key's account (it may do so later, off the caller's
	// path).
	Store(key, acct string)
}

// EventKind names a budget decision.
type EventKind uint8

const (
	// CapCut: an upstream 429 lowered an account's cap.
	CapCut EventKind = iota + 1
	// CapGrown: an account's cap rose (slow start or recovery).
	CapGrown
	// KeyLearned: an API key was found to belong to an account.
	KeyLearned
	// ReportIgnored: answers' Twilio-Concurrent-Requests reported more
	// calls in flight than any account can have (MaxReported): InFlight
	// is the last such report, To how many were ignored since the last
	// event (at most one a minute).
	ReportIgnored
)

func (k EventKind) String() string {
	switch k {
	case CapCut:
		return "cap_cut"
	case CapGrown:
		return "cap_grown"
	case KeyLearned:
		return "key_learned"
	case ReportIgnored:
		return "report_ignored"
	}
	return "unknown"
}

// Event is one decision: for CapCut and CapGrown, the cap went From → To
// with InFlight calls in flight; for KeyLearned, Key now counts against
// Account.
type Event struct {
	Kind     EventKind
	Account  string
	Key      string
	From, To int
	InFlight int
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

// Outcome is what the upstream answered a call, as far as the budget cares.
type Outcome uint8

const (
	// Served is an answer that says the account is within its limit.
	Served Outcome = iota
	// Throttled is the upstream's 429 (Twilio's 20429): the account had
	// more calls in flight than Twilio allows.
	Throttled
	// Limited is a 429 for another limit (a per-service or per-endpoint
	// rate): the call backs off, the account's cap stays.
	Limited
	// Failed is a call that got no answer (a transport error): it says
	// nothing about the limit.
	Failed
	// Unused is a turn given back without a call.
	Unused
)

// Turn is one turn: one upstream call in flight. Done ends it.
type Turn interface {
	// Waited is how long Acquire waited for the turn (its place in the
	// fleet's slots included).
	Waited() time.Duration
	// Saw passes the answer's Twilio-Concurrent-Requests (n > 0), before
	// Done.
	Saw(n int)
	// Done frees the turn and tells the budget how the call went.
	// Calls after the first do nothing.
	Done(Outcome)
}

// State is one account's budget at a moment (for metrics and the summary).
type State struct {
	Account   string
	Cap       int  // calls allowed in flight now
	InFlight  int  // calls in flight
	Taking    int  // calls granted a turn, taking their place in the Slots
	Queued    int  // calls waiting for a turn
	Rate      int  // calls allowed per second (0: no rate limit)
	Keys      int  // API keys known to count against this account
	SlowStart bool // the cap has not yet met a 429 or MaxConcurrent
	// Verified: the upstream has accepted one of the account's credentials
	// (a 2xx), so it is a real account, not a name anyone can make up.
	Verified bool
	// Limit is the account's limit told by a 429's Twilio-Concurrent-
	// Requests (0: not known); Others the calls its other clients had in
	// flight, as the answers' headers last reported (0: none or not known).
	Limit, Others int
}

const (
	// backoff is the multiplicative cut, once per round at the cut cap.
	backoff = 0.9
	// maxQueue bounds an account's waiting calls when no rate bounds it.
	maxQueue = 4096
	// maxKeys bounds the learned key → account map.
	maxKeys = 10000
)

// Limiter holds one budget per account.
type Limiter struct {
	cfg   Config
	clock clock.Clock
	slots Slots
	local bool // slots are this replica's own (newLocalSlots)

	mu        sync.Mutex
	accounts  map[string]*account
	keys      map[string]string        // API key SID -> account SID
	asked     map[string]time.Time     // keys last asked of the KeyBook
	asking    map[string]chan struct{} // keys being asked, closed with the answer
	timers    inflight.Tracker         // goroutines waiting for a rate window
	lastPrune time.Time
	lastCrowd time.Time // the last prune of unverified idle accounts
	// Reports of Twilio's header that cannot be true: ignored in all, and
	// since the last event about them (told at ignoredAt).
	ignored, ignoredSince int64
	ignoredAt             time.Time
	changed               chan struct{} // closed at the next change, if anyone asked (Changed)
}

type account struct {
	id       string
	inflight int
	taking   int // granted a turn, taking their place in the Slots
	writes   int // writes taking a place or in flight
	queued   int
	q        [numPriorities]fairQueue

	// The cap: in slow start, cap itself; after, cap at cutAt recovering
	// linearly to MaxConcurrent over Recover.
	slowStart bool
	cap       float64
	cutAt     time.Time
	gen       uint64 // cuts so far: a turn granted before the last cut is old news
	shown     int    // the cap last reported in an event
	// From Twilio's header: the account's limit (0: not known), and its
	// other clients' calls in flight as last reported at sawAt.
	limit, others int
	sawAt         time.Time
	// others is the median of the recent reports (seeOthers).
	samples     [othersSamples]othersSample
	nextSample  int
	throttledAt time.Time // the last 429 with the header

	holdUntil time.Time // the rate window is full until then
	timer     bool      // a goroutine waits for it to open
	// paced: this replica's own rate window sent a turn back since the
	// queue was last empty. Turns are then granted one at a time, each
	// taking its place before the next is granted, so places go in the
	// queue's order: turns granted together race for the window's one
	// free place, and the scheduler runs the last woken first, so the call
	// at the head lost every race and waited out its max_wait behind
	// later ones (12 of the rate bench's 723 cold keys,
	// TestTheRateBenchsColdKeysFitThePace). Only the local window, whose
	// place is taken at once: the fleet's takes are round trips to Redis,
	// which orders its waiters itself, and taken one at a time over a slow
	// link they would not keep up (the fault run's reads waited out
	// max_wait).
	paced bool
	// owed is the writes' credit in turns while writes and reads both
	// wait (popLocked): WriteShare more at each such turn, one less at
	// each that goes to a write; 0 again once they stop both waiting.
	owed float64

	lastUse time.Time

	verified bool // the upstream accepted one of its credentials
	// accepted are the credentials the upstream accepted (at most
	// maxVerifiedCreds). Once there is one, the others share one queue
	// and one call in flight between them (unverified counts it, from
	// the grant of its turn).
	accepted   map[string]bool
	unverified int
	live       map[*turn]struct{} // calls in flight, with their credentials
}

// unverifiedQueue is the one queue of an account's credentials the
// upstream never accepted, once it accepted one: N made-up tokens get one
// turn between them, not N/(N+1) of the turns, and one call in flight in
// all. An account none of whose credentials was accepted yet (a new one)
// queues each credential on its own, as before.
const unverifiedQueue = "\x00unverified"

// maxVerifiedCreds bounds the credentials remembered as accepted per
// account; past it, new ones wait as unverified ones do.
const maxVerifiedCreds = 1024

// queueLocked is the queue credential waits in, and whether it is the
// unverified one.
func (a *account) queueLocked(credential string) (string, bool) {
	if len(a.accepted) == 0 || a.accepted[credential] {
		return credential, false
	}
	return unverifiedQueue, true
}

// New returns a Limiter on clk (the real clock if nil).
func New(cfg Config, clk clock.Clock) *Limiter {
	if cfg.Recover <= 0 {
		cfg.Recover = 30 * time.Second
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = 1
	}
	cfg.WriteShare = min(max(cfg.WriteShare, 0), 1)
	l := &Limiter{cfg: cfg, clock: clock.Or(clk), accounts: map[string]*account{}, keys: map[string]string{},
		asked: map[string]time.Time{}, asking: map[string]chan struct{}{}, slots: cfg.Slots}
	if l.slots == nil {
		l.slots, l.local = newLocalSlots(cfg.Rate, l.clock), true
	}
	for k, a := range cfg.KeyAccounts {
		l.keys[k] = a
	}
	return l
}

// Acquire waits for a turn to call upstream as user (an account or API key
// SID, or "" for a request without one) with credential (an opaque
// fingerprint that tells callers apart within the account), in ctx's
// priority (WithPriority): first its turn in this replica's queue, then
// its place in the Slots, within MaxWait in all, counted from the
// request's arrival (WithWaited).
func (l *Limiter) Acquire(ctx context.Context, user, credential string) (Turn, error) {
	now := l.clock.Now()
	start := now.Add(-waitedOf(ctx))
	l.resolveKey(ctx, user)
	a, w, queued, err := l.join(user, credential, PriorityOf(ctx), now, start)
	if err != nil {
		return nil, err
	}
	var timeout <-chan time.Time
	for {
		if queued { // wait for the turn
			if timeout == nil {
				timeout = l.clock.After(l.cfg.MaxWait - l.clock.Since(start))
			}
			if err := l.await(ctx, a, w, timeout); err != nil {
				return nil, err
			}
		}
		if ls, err := l.take(ctx, a, w); ls != nil || err != nil {
			return ls, err
		}
		queued = true // the rate window sent it back to its queue
	}
}

// join grants a new waiter a turn at once if nothing waits ahead of it
// and the cap has room, else queues it (queued), or refuses it when the
// queue is full.
func (l *Limiter) join(user, credential string, prio Priority, now, start time.Time) (_ *account, _ *waiter, queued bool, _ error) {
	var events []Event
	l.mu.Lock()
	defer func() { l.mu.Unlock(); l.emit(events) }()
	l.pruneLocked(now)
	a := l.accountLocked(user)
	a.lastUse = now
	w := &waiter{start: start, asked: now, reply: make(chan grant, 1), credential: credential, prio: prio}
	queue, unverified := a.queueLocked(credential)
	if a.queued == 0 && l.roomLocked(a, prio, now) && (!unverified || a.unverified == 0) {
		l.grantTurnLocked(a, w, unverified, now)
		return a, w, false, nil
	}
	if a.queued >= l.boundLocked() && !l.evictLocked(a, prio, queue) {
		return nil, nil, false, &RejectedError{RetryAfter: l.retryAfterLocked(a), Reason: "queue full"}
	}
	a.q[prio].push(queue, w)
	a.queued++
	l.changedLocked()
	l.grantLocked(a, now, &events)
	return a, w, true, nil
}

// await waits for queued w's turn, for ctx to end or for timeout.
func (l *Limiter) await(ctx context.Context, a *account, w *waiter, timeout <-chan time.Time) error {
	select {
	case g := <-w.reply:
		return g.err
	case <-ctx.Done():
		l.leave(a, w)
		return ctx.Err()
	case <-timeout:
		l.leave(a, w)
		l.mu.Lock()
		retry := l.retryAfterLocked(a)
		l.mu.Unlock()
		return &RejectedError{RetryAfter: retry, Reason: "waited max_wait"}
	}
}

// take has w, granted its turn, take its place in the Slots. A nil turn
// and error: the rate window sent it back to the head of its queue.
func (l *Limiter) take(ctx context.Context, a *account, w *waiter) (Turn, error) {
	left := l.cfg.MaxWait - l.clock.Since(w.start)
	place, retry, err := l.slots.Take(ctx, Ticket{Account: a.id, Limit: w.limit, Priority: w.prio, Wait: left})
	var events []Event
	l.mu.Lock()
	defer func() { l.mu.Unlock(); l.emit(events) }()
	now := l.clock.Now()
	a.taking--
	l.changedLocked()
	if err != nil || place == nil {
		l.ungrantLocked(a, w)
		if err == nil { // the rate window: first in line again when it opens
			a.holdUntil, a.paced = now.Add(retry), l.local
			queue, _ := a.queueLocked(w.credential)
			a.q[w.prio].pushFront(queue, w)
			a.queued++
		}
		l.grantLocked(a, now, &events)
		return nil, err
	}
	ls := l.startLocked(a, w, place, now, &events)
	if a.paced { // the next in line takes its place now
		l.grantLocked(a, now, &events)
	}
	return ls, nil
}

// grantTurnLocked gives w a turn: it is counted as taking its place.
func (l *Limiter) grantTurnLocked(a *account, w *waiter, unverified bool, now time.Time) {
	w.cred, w.limit, w.unverified = nil, l.slotLimitLocked(a, now), unverified
	a.taking++
	if w.prio == Write {
		a.writes++
	}
	if unverified {
		a.unverified++
	}
	l.changedLocked()
}

// ungrantLocked takes back w's turn, which took no place.
func (l *Limiter) ungrantLocked(a *account, w *waiter) {
	if w.prio == Write {
		a.writes--
	}
	if w.unverified {
		a.unverified--
	}
}

// roomLocked reports whether a call of priority p may be granted a turn
// at now: the cap has room (beyond what is left of the writes' share, for
// the others while writes wait or are in flight) and the rate window is
// not full.
func (l *Limiter) roomLocked(a *account, p Priority, now time.Time) bool {
	if now.Before(a.holdUntil) || a.paced && a.taking > 0 {
		return false
	}
	c := l.capLocked(a, now)
	free := c - a.inflight - a.taking
	if p != Write && (a.writes > 0 || a.q[Write].n > 0) {
		free -= max(0, min(c-1, int(math.Ceil(l.cfg.WriteShare*float64(c))))-a.writes)
	}
	return free > 0
}

// startLocked starts w's call in place.
func (l *Limiter) startLocked(a *account, w *waiter, place Place, now time.Time, events *[]Event) *turn {
	a.inflight++
	if c := l.capLocked(a, now); c > a.shown {
		*events = append(*events, Event{Kind: CapGrown, Account: a.id, From: a.shown, To: c, InFlight: a.inflight})
		a.shown = c
	}
	ls := &turn{l: l, a: a, gen: a.gen, began: now, waited: now.Sub(w.asked), place: place, own: max(place.Held(), a.inflight),
		cred: w.credential, unverified: w.unverified, write: w.prio == Write}
	if a.live == nil {
		a.live = map[*turn]struct{}{}
	}
	a.live[ls] = struct{}{}
	return ls
}

// grantLocked gives turns to waiting calls, by priority and round-robin
// across credentials, while the budget allows; if only the rate window
// stops it, a goroutine comes back when the window opens.
func (l *Limiter) grantLocked(a *account, now time.Time, events *[]Event) {
	for a.queued > 0 {
		w := l.popLocked(a, now)
		if w == nil {
			break
		}
		a.queued--
		l.grantTurnLocked(a, w, w.cred.id == unverifiedQueue, now)
		w.reply <- grant{}
	}
	if a.queued == 0 {
		a.paced = false
	}
	if a.queued == 0 || a.timer || !now.Before(a.holdUntil) {
		return
	}
	wait := a.holdUntil.Sub(now)
	a.timer = true
	l.timers.Add()
	go func() {
		defer l.timers.Done()
		<-l.clock.After(wait)
		var events []Event
		l.mu.Lock()
		a.timer = false
		l.grantLocked(a, l.clock.Now(), &events)
		l.mu.Unlock()
		l.emit(events)
	}()
}

// popLocked takes the next call to grant a turn: the first priority with
// a waiting call that has room, passing over the unverified queue while
// one of its calls is in flight; nil if none may go now. Writes go first,
// but while writes and reads both wait they get WriteShare of the turns
// and the reads the rest (owed), so a flood of writes does not starve
// the reads (it took every turn: 80 of 300 reads got 429 beside 60
// writers).
func (l *Limiter) popLocked(a *account, now time.Time) *waiter {
	both := a.q[Write].n > 0 && a.q[Read].n > 0
	if !both {
		a.owed = 0
	}
	for p := range numPriorities {
		if p == Write && both && a.owed+l.cfg.WriteShare < -1e-9 && l.roomLocked(a, Read, now) {
			continue // the reads' turn
		}
		if a.q[p].n == 0 {
			continue
		}
		if !l.roomLocked(a, p, now) {
			return nil
		}
		if w := a.q[p].pop(a.unverified > 0); w != nil {
			if both && p <= Read {
				a.owed += l.cfg.WriteShare
				if p == Write {
					a.owed--
				}
			}
			return w
		}
	}
	return nil
}

// boundLocked is how many calls may wait per account: as many as the rate
// can serve within MaxWait, or maxQueue.
func (l *Limiter) boundLocked() int {
	if l.cfg.Rate > 0 {
		return max(1, int(float64(l.cfg.Rate)*l.cfg.MaxWait.Seconds()))
	}
	return maxQueue
}

// evictLocked makes room in a full queue for a call of priority p and
// queue credential: the longest credential queue of its priority or a
// lower one gives up its newest waiter, unless the newcomer's own queue
// would then be the longest.
func (l *Limiter) evictLocked(a *account, p Priority, credential string) bool {
	own := a.q[p].waiting(credential)
	var longest *credQueue
	var from *fairQueue
	for i := p; i < numPriorities; i++ {
		if c := a.q[i].longest(); c != nil && (longest == nil || len(c.waiters) > len(longest.waiters)) {
			longest, from = c, &a.q[i]
		}
	}
	if longest == nil || len(longest.waiters) <= own+1 {
		return false
	}
	w := longest.waiters[len(longest.waiters)-1]
	from.remove(w)
	a.queued--
	l.changedLocked()
	w.reply <- grant{err: &RejectedError{RetryAfter: l.retryAfterLocked(a), Reason: "queue full"}}
	return true
}

// retryAfterLocked estimates when a turn would be free.
func (l *Limiter) retryAfterLocked(a *account) time.Duration {
	if l.cfg.Rate > 0 {
		return time.Duration(float64(a.queued+1) / float64(l.cfg.Rate) * float64(time.Second))
	}
	return max(time.Second, l.cfg.MaxWait)
}

// leave takes a waiter out of the queue; if it was granted a turn
// meanwhile, the turn is given back.
func (l *Limiter) leave(a *account, w *waiter) {
	var events []Event
	l.mu.Lock()
	defer func() { l.mu.Unlock(); l.emit(events) }()
	if a.q[w.prio].remove(w) {
		a.queued--
		l.changedLocked()
		return
	}
	if g := <-w.reply; g.err == nil { // granted meanwhile
		a.taking--
		l.ungrantLocked(a, w)
		l.changedLocked()
		l.grantLocked(a, l.clock.Now(), &events)
	}
}

// Changed returns a channel that is closed at the next change of any
// account's calls in flight or waiting: tests wait on it instead of
// polling.
func (l *Limiter) Changed() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.changed == nil {
		l.changed = make(chan struct{})
	}
	return l.changed
}

func (l *Limiter) changedLocked() {
	if l.changed != nil {
		close(l.changed)
		l.changed = nil
	}
}

// Wait blocks until no goroutine waits for a rate window (each ends within
// a second of its queue emptying) or ctx ends.
func (l *Limiter) Wait(ctx context.Context) error {
	return l.timers.Wait(ctx)
}

type turn struct {
	l      *Limiter
	a      *account
	place  Place
	gen    uint64
	began  time.Time
	waited time.Duration
	own    int  // the account's calls in flight (fleet-wide with Redis) once this one started
	saw    int  // the answer's Twilio-Concurrent-Requests (0: none)
	done   bool // guarded by l.mu
	write  bool
	// unverified: the one turn an account's unverified credentials share.
	unverified bool
	cred       string
}

func (s *turn) Waited() time.Duration { return s.waited }

// MaxReported is the most calls in flight Twilio-Concurrent-Requests is
// believed to report: ten times Twilio's default concurrency limit (100),
// or MaxConcurrent if that is higher. A report above it cannot be true (an
// upstream that answers 2^63-1 held an account to one call at a time): it
// is ignored, as if the answer had no header, counted (IgnoredReports)
// and told at most once a minute (ReportIgnored).
const MaxReported = 1000

func (s *turn) Saw(n int) {
	l := s.l
	var events []Event
	l.mu.Lock()
	if n <= max(MaxReported, l.cfg.MaxConcurrent) {
		s.saw = n
	} else {
		l.ignored++
		l.ignoredSince++
		if now := l.clock.Now(); l.ignoredAt.IsZero() || now.Sub(l.ignoredAt) >= time.Minute {
			events = append(events, Event{Kind: ReportIgnored, Account: s.a.id, InFlight: n, To: int(min(l.ignoredSince, math.MaxInt32))})
			l.ignoredAt, l.ignoredSince = now, 0
		}
	}
	l.mu.Unlock()
	l.emit(events)
}

// IgnoredReports counts the reports of Twilio's header ignored as
// impossible (MaxReported).
func (l *Limiter) IgnoredReports() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ignored
}

func (s *turn) Done(o Outcome) {
	l, a := s.l, s.a
	var events []Event
	l.mu.Lock()
	if s.done {
		l.mu.Unlock()
		return
	}
	s.done = true
	l.changedLocked()
	now := l.clock.Now()
	n := a.inflight
	a.inflight--
	if s.unverified {
		a.unverified--
	}
	if s.write {
		a.writes--
	}
	delete(a.live, s)
	a.lastUse = now
	switch {
	case s.saw > 0:
		// Ours in the header: at least those in flight at its start or at
		// its end (calls that started before it may have reached Twilio
		// after it; calls still in flight at its end were there with it).
		s.own = max(s.own, n)
		l.sawLocked(a, s, o, n, now, &events)
	case o == Throttled:
		a.limit = 0 // a 429 without the header: probe as without it
		l.cutLocked(a, s, n, now, &events)
	}
	if o == Served && a.slowStart && (a.queued > 0 || n >= int(a.cap)) {
		// Slow start: each call served while the cap is in use adds one.
		a.cap++
		if a.cap >= float64(l.cfg.MaxConcurrent) {
			a.slowStart, a.cap, a.cutAt = false, float64(l.cfg.MaxConcurrent), time.Time{}
		}
	}
	l.grantLocked(a, now, &events)
	l.mu.Unlock()
	s.place.Release()
	l.emit(events)
}
