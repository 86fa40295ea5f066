// Package ratelimit keeps each Twilio account's upstream calls within its
// budget, without ever leaving a caller waiting longer than a bound. It
// knows nothing of HTTP or caching: what it needs to know of an answer (the
// upstream's 429, an API key's account) is passed in.
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
//   - Rate (optional). At most Rate calls start in any one-second window (a
//     sliding window): bursts pass at once as long as the window has room,
//     which maps one to one onto an upstream limit of N calls per second.
//   - Fairness. An account's waiting calls queue per credential and are
//     served round-robin across credentials, so one credential (a wrong
//     token, say) cannot take more than its share of turns. When the queue
//     is full, the longest credential queue gives up its newest place.
//   - Accounts. API keys (SK…) count against their account (AC…) once it
//     is known, from Config.KeyAccounts or Learn; until then a key has its
//     own budget.
//
// A caller whose context ends, or whose max wait passes, leaves the queue at
// once and costs no turn. No goroutine runs while no call waits for the
// rate window.
package ratelimit

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strings"
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
	// Rate is the most calls that start in any one second for one account.
	// 0: no rate limit.
	Rate int
	// MaxWait bounds how long Acquire waits for a turn.
	MaxWait time.Duration
	// Recover is how long a cut cap takes to climb back to MaxConcurrent.
	// Default 30s.
	Recover time.Duration
	// KeyAccounts maps API key SIDs to their account SIDs, known in advance.
	KeyAccounts map[string]string
	// OnEvent, if set, is told of every decision (never under a lock that
	// Acquire waits on for long; it must not call the Limiter).
	OnEvent func(Event)
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
)

func (k EventKind) String() string {
	switch k {
	case CapCut:
		return "cap_cut"
	case CapGrown:
		return "cap_grown"
	case KeyLearned:
		return "key_learned"
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
	// Failed is a call that got no answer (a transport error): it says
	// nothing about the limit.
	Failed
	// Unused is a turn given back without a call.
	Unused
)

// Lease is one turn: one upstream call in flight. Done ends it.
type Lease interface {
	// Waited is how long Acquire waited for the turn.
	Waited() time.Duration
	// Done frees the turn and tells the budget how the call went.
	// Calls after the first do nothing.
	Done(Outcome)
}

// State is one account's budget at a moment (for metrics and the summary).
type State struct {
	Account   string
	Cap       int  // calls allowed in flight now
	InFlight  int  // calls in flight
	Queued    int  // calls waiting for a turn
	Rate      int  // calls allowed per second (0: no rate limit)
	Keys      int  // API keys known to count against this account
	SlowStart bool // the cap has not yet met a 429 or MaxConcurrent
	// Verified: the upstream has accepted one of the account's credentials
	// (a 2xx), so it is a real account, not a name anyone can make up.
	Verified bool
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

	mu        sync.Mutex
	accounts  map[string]*account
	keys      map[string]string // API key SID -> account SID
	timers    inflight.Tracker  // goroutines waiting for a rate window
	lastPrune time.Time
	lastCrowd time.Time     // the last prune of unverified idle accounts
	changed   chan struct{} // closed at the next change, if anyone asked (Changed)
}

type account struct {
	id       string
	inflight int
	queued   int
	creds    map[string]*credQueue // waiting calls by credential
	ring     []*credQueue          // credentials with waiting calls, served in turn
	next     int                   // index in ring served next

	// The cap: in slow start, cap itself; after, cap at cutAt recovering
	// linearly to MaxConcurrent over Recover.
	slowStart bool
	cap       float64
	cutAt     time.Time
	gen       uint64 // cuts so far: a lease granted before the last cut is old news
	shown     int    // the cap last reported in an event

	window  []int64 // start times (Unix ns) of the last Rate calls: grows to Rate, then a ring
	wpos    int     // once full, the oldest slot (the next to overwrite)
	timer   bool    // a goroutine waits for the window to open
	lastUse time.Time

	verified bool // the upstream accepted one of its credentials
	// accepted are the credentials the upstream accepted (at most
	// maxVerifiedCreds). Once there is one, the others share one queue
	// and one call in flight between them (unverified counts it).
	accepted   map[string]bool
	unverified int
	live       map[*lease]struct{} // calls in flight, with their credentials
}

// trackLocked records a call in flight for credential, counted as an
// unverified one if it is.
func (a *account) trackLocked(ls *lease, credential string, unverified bool) {
	ls.cred, ls.unverified = credential, unverified
	if unverified {
		a.unverified++
	}
	if a.live == nil {
		a.live = map[*lease]struct{}{}
	}
	a.live[ls] = struct{}{}
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

type credQueue struct {
	id      string
	waiters []*waiter
}

type waiter struct {
	cred       *credQueue
	credential string // its own (cred may be the unverified queue)
	start      time.Time
	reply      chan grant // buffered 1: nobody blocks sending on it
}

type grant struct {
	lease *lease
	err   error
}

// New returns a Limiter on clk (the real clock if nil).
func New(cfg Config, clk clock.Clock) *Limiter {
	if cfg.Recover <= 0 {
		cfg.Recover = 30 * time.Second
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = 1
	}
	l := &Limiter{cfg: cfg, clock: clock.Or(clk), accounts: map[string]*account{}, keys: map[string]string{}}
	for k, a := range cfg.KeyAccounts {
		l.keys[k] = a
	}
	return l
}

// Acquire waits for a turn to call upstream as user (an account or API key
// SID, or "" for a request without one) with credential (an opaque
// fingerprint that tells callers apart within the account).
func (l *Limiter) Acquire(ctx context.Context, user, credential string) (Lease, error) {
	start := l.clock.Now()
	var events []Event
	l.mu.Lock()
	l.pruneLocked(start)
	a := l.accountLocked(user)
	a.lastUse = start
	own := credential
	credential, unverified := a.queueLocked(credential)
	if a.queued == 0 && l.canStartLocked(a, start) && (!unverified || a.unverified == 0) {
		ls := l.startLocked(a, start, start, &events)
		a.trackLocked(ls, own, unverified)
		l.mu.Unlock()
		l.emit(events)
		return ls, nil
	}
	if a.queued >= l.boundLocked() && !l.evictLocked(a, credential) {
		retry := l.retryAfterLocked(a)
		l.mu.Unlock()
		return nil, &RejectedError{RetryAfter: retry, Reason: "queue full"}
	}
	w := &waiter{start: start, reply: make(chan grant, 1), credential: own}
	l.enqueueLocked(a, credential, w)
	l.grantLocked(a, start, &events)
	l.mu.Unlock()
	l.emit(events)

	timeout := l.clock.After(l.cfg.MaxWait)
	select {
	case g := <-w.reply:
		if g.err != nil {
			return nil, g.err
		}
		return g.lease, nil
	case <-ctx.Done():
		l.leave(a, w)
		return nil, ctx.Err()
	case <-timeout:
		l.leave(a, w)
		l.mu.Lock()
		retry := l.retryAfterLocked(a)
		l.mu.Unlock()
		return nil, &RejectedError{RetryAfter: retry, Reason: "waited max_wait"}
	}
}

// accountLocked returns user's budget: its account's when user is an API
// key whose account is known.
func (l *Limiter) accountLocked(user string) *account {
	id := l.idLocked(user)
	a := l.accounts[id]
	if a == nil {
		a = l.newAccount(id)
		l.accounts[id] = a
	}
	return a
}

// newAccount is a budget in slow start at a quarter of MaxConcurrent.
func (l *Limiter) newAccount(id string) *account {
	a := &account{id: id, creds: map[string]*credQueue{}, slowStart: true, cap: math.Ceil(float64(l.cfg.MaxConcurrent) / 4)}
	a.shown = int(a.cap)
	return a
}

// capLocked is the account's cap at now, in whole calls.
func (l *Limiter) capLocked(a *account, now time.Time) int {
	return max(1, int(l.capAtLocked(a, now)))
}

// capAtLocked is the account's cap at now: in slow start, a.cap; after, a
// cut cap on its linear way back to MaxConcurrent.
func (l *Limiter) capAtLocked(a *account, now time.Time) float64 {
	top := float64(l.cfg.MaxConcurrent)
	if a.slowStart {
		return a.cap
	}
	f := float64(now.Sub(a.cutAt)) / float64(l.cfg.Recover)
	if f >= 1 || a.cutAt.IsZero() {
		return top
	}
	return a.cap + (top-a.cap)*f
}

// windowOpenLocked reports whether a call may start at now under the rate,
// and if not, how long until one may.
func (l *Limiter) windowOpenLocked(a *account, now time.Time) (bool, time.Duration) {
	if l.cfg.Rate <= 0 || len(a.window) < l.cfg.Rate {
		return true, 0
	}
	wait := time.Duration(a.window[a.wpos] + int64(time.Second) - now.UnixNano())
	return wait <= 0, wait
}

func (l *Limiter) canStartLocked(a *account, now time.Time) bool {
	if a.inflight >= l.capLocked(a, now) {
		return false
	}
	open, _ := l.windowOpenLocked(a, now)
	return open
}

// startLocked gives a turn to a call that began waiting at since.
func (l *Limiter) startLocked(a *account, since, now time.Time, events *[]Event) *lease {
	l.changedLocked()
	a.inflight++
	if l.cfg.Rate > 0 {
		if len(a.window) < l.cfg.Rate {
			a.window = append(a.window, now.UnixNano())
		} else {
			a.window[a.wpos] = now.UnixNano()
			a.wpos = (a.wpos + 1) % len(a.window)
		}
	}
	if c := l.capLocked(a, now); c > a.shown {
		*events = append(*events, Event{Kind: CapGrown, Account: a.id, From: a.shown, To: c, InFlight: a.inflight})
		a.shown = c
	}
	return &lease{l: l, a: a, gen: a.gen, waited: now.Sub(since)}
}

// grantLocked gives turns to waiting calls, round-robin across credentials,
// while the budget allows; if only the rate window stops it, a goroutine
// comes back when the window opens.
func (l *Limiter) grantLocked(a *account, now time.Time, events *[]Event) {
	for a.queued > 0 && l.canStartLocked(a, now) {
		w := l.popLocked(a)
		if w == nil {
			return // only unverified credentials wait, and one of theirs is in flight
		}
		ls := l.startLocked(a, w.start, now, events)
		a.trackLocked(ls, w.credential, w.cred.id == unverifiedQueue)
		w.reply <- grant{lease: ls}
	}
	if a.queued == 0 || a.timer || a.inflight >= l.capLocked(a, now) {
		return
	}
	_, wait := l.windowOpenLocked(a, now)
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

func (l *Limiter) enqueueLocked(a *account, credential string, w *waiter) {
	q := a.creds[credential]
	if q == nil {
		q = &credQueue{id: credential}
		a.creds[credential] = q
		// A new credential joins the rotation just before the one served
		// next, so it waits at most one round.
		a.ring = slices.Insert(a.ring, a.next, q)
		a.next++
		if a.next == len(a.ring) {
			a.next = 0
		}
	}
	w.cred = q
	q.waiters = append(q.waiters, w)
	a.queued++
	l.changedLocked()
}

// popLocked takes the next waiting call in round-robin order, passing
// over the unverified queue while one of its calls is in flight; nil if
// nothing else waits.
func (l *Limiter) popLocked(a *account) *waiter {
	if a.ring[a.next].id == unverifiedQueue && a.unverified > 0 {
		if len(a.ring) == 1 {
			return nil
		}
		if a.next++; a.next == len(a.ring) {
			a.next = 0
		}
	}
	q := a.ring[a.next]
	w := q.waiters[0]
	q.waiters[0] = nil
	q.waiters = q.waiters[1:]
	a.queued--
	if len(q.waiters) == 0 {
		l.dropCredLocked(a, a.next)
	} else {
		a.next++
	}
	if a.next >= len(a.ring) {
		a.next = 0
	}
	return w
}

// dropCredLocked removes the empty credential queue at ring index i.
func (l *Limiter) dropCredLocked(a *account, i int) {
	delete(a.creds, a.ring[i].id)
	a.ring = slices.Delete(a.ring, i, i+1)
	if i < a.next {
		a.next--
	}
	if a.next >= len(a.ring) {
		a.next = 0
	}
}

// removeLocked takes w out of its queue; false if it was not there.
func (l *Limiter) removeLocked(a *account, w *waiter) bool {
	q := w.cred
	i := slices.Index(q.waiters, w)
	if i < 0 {
		return false
	}
	q.waiters = slices.Delete(q.waiters, i, i+1)
	a.queued--
	l.changedLocked()
	if len(q.waiters) == 0 {
		l.dropCredLocked(a, slices.Index(a.ring, q))
	}
	return true
}

// boundLocked is how many calls may wait per account: as many as the rate
// can serve within MaxWait, or maxQueue.
func (l *Limiter) boundLocked() int {
	if l.cfg.Rate > 0 {
		return max(1, int(float64(l.cfg.Rate)*l.cfg.MaxWait.Seconds()))
	}
	return maxQueue
}

// evictLocked makes room in a full queue for a call of credential: the
// longest credential queue gives up its newest waiter, unless the
// newcomer's own queue would then be the longest.
func (l *Limiter) evictLocked(a *account, credential string) bool {
	own := 0
	if q := a.creds[credential]; q != nil {
		own = len(q.waiters)
	}
	var longest *credQueue
	for _, q := range a.ring {
		if longest == nil || len(q.waiters) > len(longest.waiters) {
			longest = q
		}
	}
	if longest == nil || len(longest.waiters) <= own+1 {
		return false
	}
	w := longest.waiters[len(longest.waiters)-1]
	l.removeLocked(a, w)
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
	l.mu.Lock()
	removed := l.removeLocked(a, w)
	l.mu.Unlock()
	if !removed {
		if g := <-w.reply; g.lease != nil {
			g.lease.Done(Unused)
		}
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

type lease struct {
	l      *Limiter
	a      *account
	gen    uint64
	waited time.Duration
	done   bool // guarded by l.mu
	// unverified: the one turn an account's unverified credentials share.
	unverified bool
	cred       string
}

func (s *lease) Waited() time.Duration { return s.waited }

func (s *lease) Done(o Outcome) {
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
	delete(a.live, s)
	a.lastUse = now
	switch o {
	case Throttled:
		l.cutLocked(a, s, n, now, &events)
	case Served:
		// Slow start: each call served while the cap is in use adds one.
		if a.slowStart && (a.queued > 0 || n >= int(a.cap)) {
			a.cap++
			if a.cap >= float64(l.cfg.MaxConcurrent) {
				a.slowStart, a.cap, a.cutAt = false, float64(l.cfg.MaxConcurrent), time.Time{}
			}
		}
	}
	l.grantLocked(a, now, &events)
	l.mu.Unlock()
	l.emit(events)
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

// Learn records that API key key belongs to account acct, so the key's
// calls count against the account's budget from now on. Keys given in
// Config.KeyAccounts are not overridden.
func (l *Limiter) Learn(key, acct string) {
	if !strings.HasPrefix(key, "SK") || !strings.HasPrefix(acct, "AC") {
		return
	}
	l.mu.Lock()
	if _, ok := l.keys[key]; ok || len(l.keys) >= maxKeys {
		l.mu.Unlock() // configured or learned before: the first answer stands
		return
	}
	l.keys[key] = acct
	l.mu.Unlock()
	l.emit([]Event{{Kind: KeyLearned, Account: acct, Key: key}})
}

// AccountOf is the account user counts against: its account if user is an
// API key whose account is known, else user.
func (l *Limiter) AccountOf(user string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.idLocked(user)
}

// idLocked is the account user counts against.
func (l *Limiter) idLocked(user string) string {
	if acct, ok := l.keys[user]; ok {
		return acct
	}
	return user
}

// Verify records that the upstream accepted credential of user (a 2xx
// answer): its account is a real one, and from now on the credential
// keeps its own place while those never accepted share one.
func (l *Limiter) Verify(user, credential string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	a := l.accountLocked(user)
	a.verified, a.lastUse = true, l.clock.Now()
	if a.accepted == nil {
		a.accepted = map[string]bool{}
	}
	if len(a.accepted) < maxVerifiedCreds {
		a.accepted[credential] = true
	}
	// Calls already in flight count as what their credentials are now: the
	// first accepted credential makes the others' calls unverified ones.
	for ls := range a.live {
		if want := !a.accepted[ls.cred]; want != ls.unverified {
			ls.unverified = want
			if want {
				a.unverified++
			} else {
				a.unverified--
			}
		}
	}
}

// Knows reports whether key's account is known.
func (l *Limiter) Knows(key string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, ok := l.keys[key]
	return ok
}

// Accounts reports every remembered account's budget, sorted by account.
func (l *Limiter) Accounts() []State {
	now := l.clock.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	keys := l.keyCountsLocked()
	out := make([]State, 0, len(l.accounts))
	for _, a := range l.accounts {
		out = append(out, l.stateLocked(a, now, keys[a.id]))
	}
	slices.SortFunc(out, func(x, y State) int { return strings.Compare(x.Account, y.Account) })
	return out
}

// State reports the budget user (an account or API key SID) counts
// against; an account not remembered reports a new account's budget.
func (l *Limiter) State(user string) State {
	now := l.clock.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	id := l.idLocked(user)
	a := l.accounts[id]
	if a == nil {
		a = l.newAccount(id)
	}
	return l.stateLocked(a, now, l.keyCountsLocked()[id])
}

func (l *Limiter) stateLocked(a *account, now time.Time, keys int) State {
	return State{Account: a.id, Cap: l.capLocked(a, now), InFlight: a.inflight, Queued: a.queued,
		Rate: l.cfg.Rate, Keys: keys, SlowStart: a.slowStart, Verified: a.verified}
}

func (l *Limiter) keyCountsLocked() map[string]int {
	n := map[string]int{}
	for _, acct := range l.keys {
		n[acct]++
	}
	return n
}

// idleFor is how long an account must be idle before it is forgotten: by
// then its cap has recovered and its rate window is empty.
func (l *Limiter) idleFor() time.Duration { return l.cfg.Recover + 2*time.Second }

// pruneLocked forgets idle accounts, at most once per idleFor, so the map
// does not grow with every account ever seen.
func (l *Limiter) pruneLocked(now time.Time) {
	if len(l.accounts) > maxIdleAccounts && now.Sub(l.lastCrowd) >= time.Second {
		// Made-up accounts cost nothing to send: past maxIdleAccounts, the
		// idle ones the upstream never accepted a credential of go at once
		// (at most once a second, so a crowd of active ones costs a scan a
		// second, not one a call).
		l.lastCrowd = now
		for id, a := range l.accounts {
			if !a.verified && a.queued == 0 && a.inflight == 0 && !a.timer {
				delete(l.accounts, id)
			}
		}
	}
	if now.Sub(l.lastPrune) < l.idleFor() {
		return
	}
	l.lastPrune = now
	for id, a := range l.accounts {
		if a.queued == 0 && a.inflight == 0 && !a.timer && now.Sub(a.lastUse) > l.idleFor() {
			delete(l.accounts, id)
		}
	}
}

// maxIdleAccounts is how many accounts are remembered before the idle ones
// never verified are forgotten without waiting for idleFor.
const maxIdleAccounts = 1000

func (l *Limiter) emit(events []Event) {
	if l.cfg.OnEvent == nil {
		return
	}
	for _, e := range events {
		l.cfg.OnEvent(e)
	}
}
