package fleet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"strconv"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/tier"

	"github.com/redis/rueidis"
)

// ClaimTTL is how long a cold key's claim outlives its holder: while a
// replica holds claims it renews one key of its own (alive.go), so a
// replica that dies mid-fetch holds up the others for about this long at
// most (and a quarter of it more, the waiters' look at the holder), then
// one of them takes over.
const ClaimTTL = time.Second

// ClaimHold is how long a claim lives in Redis when it is never given
// back while its holder lives: longer than a fill's turn and call.
const ClaimHold = 30 * time.Second

// claimPoll is how often a replica waiting for another's fill looks for
// it (a wait on another process, on the real clock).
const claimPoll = 5 * time.Millisecond

// claim is one replica's claim on a cold key (tier.Claim): the fleet's
// epoch read before it was made (what its fill is checked against), and
// the token of the key's claim in Redis if this replica holds it.
type claim struct {
	f     *Fleet
	key   string
	auth  string
	name  string // of the claim in Redis
	epoch uint64
	token string
	found *cache.Entry // a fresh fill found instead, for Wait
	force bool         // the last look found an entry it could not use
}

var _ tier.Tier = (*Fleet)(nil)

// Claim claims key for this replica's fill when its lookup (Get) gave no
// claim: one round trip reads the epoch and the entry and takes the claim
// if it is free; a fresh entry found then (another replica's fill, shared
// just before) is what Wait returns. On an error the claim is not won and
// cannot wait: the caller fetches by itself.
func (f *Fleet) Claim(ctx context.Context, key, auth string) (tier.Claim, error) {
	_, name := f.keys[0].entryNames(f.cfg.Prefix, entryID(key, auth))
	l, err := f.look(ctx, key, auth, true)
	if err != nil {
		if l.token != "" {
			f.unclaimLater(name, l.token)
		}
		return tier.Alone{}, err
	}
	cl := &claim{f: f, key: key, auth: auth, name: name, epoch: l.epoch, token: l.token}
	switch {
	case l.entry != nil && f.clock.Now().Before(l.entry.Expires.Time()):
		cl.found = l.entry
		if cl.token != "" {
			f.unclaimLater(name, cl.token)
			cl.token = ""
		}
	case cl.token != "":
		cl.hold()
	}
	return cl, nil
}

// hold keeps a claim won alive: its replica's key is renewed while it
// holds any claim (alive.go).
func (cl *claim) hold() { cl.f.holding.Add(1) }

// Won reports whether this replica holds the key's claim.
func (cl *claim) Won() bool { return cl.token != "" }

// Wait returns the holder's fresh fill when it appears, or nil once this
// replica holds the claim instead (the holder let it lapse or gave it
// back with nothing shared); each look is one round trip that takes the
// claim if it is free and there is no entry (or only one this replica
// cannot use). Bounded by ctx.
func (cl *claim) Wait(ctx context.Context) (*cache.Entry, error) {
	if e := cl.found; e != nil {
		cl.found = nil
		return e, nil
	}
	tick := time.NewTicker(claimPoll)
	defer tick.Stop()
	look := time.Now().Add(cl.f.cfg.ClaimTTL / 4) // at the holder: alive?
	for {
		select {
		case <-ctx.Done():
			return nil, nil
		case <-tick.C:
		}
		l, err := cl.f.look(ctx, cl.key, cl.auth, cl.force)
		switch {
		case err != nil:
			if l.token != "" {
				cl.f.unclaimLater(cl.name, l.token)
			}
			if ended(ctx) {
				return nil, nil // the waiter left
			}
			return nil, err
		case l.entry != nil && cl.f.clock.Now().Before(l.entry.Expires.Time()):
			if l.token != "" {
				cl.f.unclaimLater(cl.name, l.token)
			}
			return l.entry, nil
		case l.token != "":
			cl.token, cl.epoch = l.token, l.epoch // taken over: the fetch begins after this epoch
			cl.hold()
			return nil, nil
		case l.holder != "" && time.Now().After(look):
			look = time.Now().Add(cl.f.cfg.ClaimTTL / 4)
			if token := cl.f.takeOver(ctx, cl.name, l.holder); token != "" {
				cl.token, cl.epoch = token, l.epoch
				cl.hold()
				return nil, nil
			}
		}
		cl.force = l.present
	}
}

// ended reports whether ctx is done or past its deadline (a client may
// see the deadline before ctx's own timer does).
func ended(ctx context.Context) bool {
	dl, ok := ctx.Deadline()
	return ctx.Err() != nil || ok && !time.Now().Before(dl)
}

// Share writes e to Redis, sealed under the claim's credential and checked
// later against the marks raised since the claim's epoch, and gives the
// claim back in the same round trip.
func (cl *claim) Share(ctx context.Context, e *cache.Entry) error {
	c := cl.f.c()
	if c == nil {
		return errNotConnected
	}
	se, ok, err := cl.f.seal(e, cl.auth, cl.epoch, cl.f.clock.Now())
	if err != nil {
		return err
	}
	token := cl.token
	var do func(ctx context.Context) rueidis.RedisResult
	switch {
	case token != "" && ok:
		cl.end()
		do = func(ctx context.Context) rueidis.RedisResult {
			return shareClaim.Exec(ctx, c, []string{se.name, cl.name},
				[]string{rueidis.BinaryString(se.val), strconv.FormatInt(se.ttl.Milliseconds(), 10), token})
		}
	case token != "":
		cl.end()
		do = func(ctx context.Context) rueidis.RedisResult {
			return unclaim.Exec(ctx, c, []string{cl.name}, []string{token})
		}
	case ok:
		do = func(ctx context.Context) rueidis.RedisResult {
			return c.Do(ctx, c.B().Set().Key(se.name).Value(rueidis.BinaryString(se.val)).Px(se.ttl).Build())
		}
	default:
		return nil
	}
	ctx, cancel := cl.f.ctx(ctx)
	defer cancel()
	trip(ctx)
	err = cl.f.result(do(ctx).Error())
	if err != nil && token != "" {
		cl.f.giveBackLater(cl.name, token)
	}
	return err
}

// end lets the claim go here: its replica no longer keeps it alive for it.
func (cl *claim) end() {
	cl.f.holding.Add(-1)
	cl.token = ""
}

// Release gives the claim back if this replica still holds it (nothing
// was shared).
func (cl *claim) Release() {
	if token := cl.token; token != "" {
		cl.end()
		if cl.f.unclaimNow(context.Background(), cl.name, token) != nil {
			cl.f.giveBackLater(cl.name, token)
		}
	}
}

func (f *Fleet) unclaimNow(ctx context.Context, name, token string) error {
	c, ctx, cancel, err := f.conn(ctx)
	defer cancel()
	if err != nil {
		return err
	}
	trip(ctx)
	return f.result(unclaim.Exec(ctx, c, []string{name}, []string{token}).Error())
}

// unclaimLater gives back a claim taken but not needed, off the request's
// path (again later if Redis does not answer).
func (f *Fleet) unclaimLater(name, token string) {
	go func() {
		if f.unclaimNow(context.Background(), name, token) != nil {
			f.giveBackLater(name, token)
		}
	}()
}

// newToken is a claim's random token (32 hex digits); newID, a replica's
// or a slot's (24): the fleet's one id generator.
func newToken() string { return randomHex(16) }

func newID() string { return randomHex(12) }

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
