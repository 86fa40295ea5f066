package ratelimit

import (
	"context"
	"math"
	"slices"
	"strings"
	"time"
)

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
	a := &account{id: id, slowStart: true, cap: math.Ceil(float64(l.cfg.MaxConcurrent) / 4)}
	a.shown = int(a.cap)
	return a
}

// Learn records that API key key belongs to account acct, so the key's
// calls count against the account's budget from now on (on every replica,
// with a KeyBook). Keys given in Config.KeyAccounts are not overridden.
func (l *Limiter) Learn(key, acct string) {
	if l.learn(key, acct) && l.cfg.Keys != nil {
		l.cfg.Keys.Store(key, acct)
	}
}

// learn records key's account here; false if it was known already.
func (l *Limiter) learn(key, acct string) bool {
	if !strings.HasPrefix(key, "SK") || !strings.HasPrefix(acct, "AC") {
		return false
	}
	l.mu.Lock()
	if _, ok := l.keys[key]; ok || len(l.keys) >= maxKeys {
		l.mu.Unlock() // configured or learned before: the first answer stands
		return false
	}
	l.keys[key] = acct
	l.mu.Unlock()
	l.emit([]Event{{Kind: KeyLearned, Account: acct, Key: key}})
	return true
}

// keyAsk is how often a key not known is asked of the KeyBook.
const keyAsk = time.Second

// resolveKey asks the KeyBook for an API key's account not known here (at
// most once per keyAsk for each key). Calls with the key that arrive while
// it is being asked wait for the answer (or for ctx): they would count
// against a budget of their own otherwise.
func (l *Limiter) resolveKey(ctx context.Context, user string) {
	if l.cfg.Keys == nil || !strings.HasPrefix(user, "SK") {
		return
	}
	now := l.clock.Now()
	l.mu.Lock()
	if _, known := l.keys[user]; known {
		l.mu.Unlock()
		return
	}
	if wait, ok := l.asking[user]; ok {
		l.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done():
		}
		return
	}
	if last, asked := l.asked[user]; asked && now.Sub(last) < keyAsk {
		l.mu.Unlock()
		return
	}
	if len(l.asked) >= maxKeys {
		clear(l.asked)
	}
	l.asked[user] = now
	done := make(chan struct{})
	l.asking[user] = done
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		delete(l.asking, user)
		l.mu.Unlock()
		close(done)
	}()
	if acct, ok := l.cfg.Keys.Lookup(ctx, user); ok {
		l.learn(user, acct)
	}
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
	st := State{Account: a.id, Cap: l.capLocked(a, now), InFlight: a.inflight, Taking: a.taking, Queued: a.queued,
		Rate: l.cfg.Rate, Keys: keys, SlowStart: a.slowStart, Verified: a.verified, Limit: a.limit}
	if l.othersFreshLocked(a, now) {
		st.Others = a.others
	}
	return st
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

// busy reports whether an account has calls waiting, taking a place or in
// flight, or a goroutine coming back for it.
func (a *account) busy() bool {
	return a.queued > 0 || a.inflight > 0 || a.taking > 0 || a.timer
}

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
			if !a.verified && !a.busy() {
				delete(l.accounts, id)
			}
		}
	}
	if now.Sub(l.lastPrune) < l.idleFor() {
		return
	}
	l.lastPrune = now
	for id, a := range l.accounts {
		if !a.busy() && now.Sub(a.lastUse) > l.idleFor() {
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
