package fleet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"strconv"
	"sync"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/tier"

	"github.com/redis/rueidis"
)

// ClaimTTL is how long a cold key's claim outlives its holder: the holder
// renews it while it fetches, so a replica that dies mid-fetch holds up
// the others for this long at most, then one of them takes over.
const ClaimTTL = time.Second

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
	found *cache.Entry  // a fresh fill found instead, for Wait
	force bool          // the last look found an entry it could not use
	stop  chan struct{} // ends the heartbeat of a claim held
	beat  chan struct{} // closed when the heartbeat has ended
}

var _ tier.Tier = (*Fleet)(nil)

// Claim claims key for this replica's fill. A lookup (Get) that found no
// entry has claimed it already: that claim is adopted, without a round
// trip. Otherwise one round trip reads the epoch and the entry and takes
// the claim if it is free; a fresh entry found then (another replica's
// fill, shared just before) is what Wait returns. On an error the claim is
// not won and cannot wait: the caller fetches by itself.
func (f *Fleet) Claim(ctx context.Context, key, auth string) (tier.Claim, error) {
	_, name := f.keys[0].entryNames(f.cfg.Prefix, entryID(key, auth))
	if held, ok := f.claims.take(name, f.cfg.ClaimTTL); ok {
		cl := &claim{f: f, key: key, auth: auth, name: name, epoch: held.epoch, token: held.token}
		cl.hold()
		return cl, nil
	}
	l, err := f.look(ctx, key, auth, true)
	if err != nil {
		if l.token != "" {
			f.unclaimLater(name, l.token)
		}
		return tier.Alone{}, err
	}
	cl := &claim{f: f, key: key, auth: auth, name: name, epoch: l.epoch, token: l.token}
	switch {
	case l.entry != nil && f.clock.Now().Before(l.entry.Expires):
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

// hold starts the heartbeat of a claim won: it is renewed until Share or
// Release, and lapses ClaimTTL after its holder died (or lost Redis).
func (cl *claim) hold() {
	cl.stop, cl.beat = make(chan struct{}), make(chan struct{})
	go cl.heartbeat()
}

// renew extends a claim only if it still holds the token that took it.
var renew = rueidis.NewLuaScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0`)

// unclaim deletes a claim only if it still holds the token that took it.
const unclaim = `
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`

// heartbeat renews the claim three times a ClaimTTL until stop.
func (cl *claim) heartbeat() {
	defer close(cl.beat)
	ttl := cl.f.cfg.ClaimTTL
	tick := time.NewTicker(ttl / 3)
	defer tick.Stop()
	for {
		select {
		case <-cl.stop:
			return
		case <-tick.C:
		}
		c := cl.f.c()
		if c == nil {
			continue
		}
		ctx, cancel := cl.f.ctx(context.Background())
		held, err := renew.Exec(ctx, c, []string{cl.name}, []string{cl.token, strconv.FormatInt(ttl.Milliseconds(), 10)}).AsInt64()
		cancel()
		if cl.f.result(err) == nil && held == 0 {
			return // lapsed and taken: another replica fetches too
		}
	}
}

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
			return nil, err
		case l.entry != nil && cl.f.clock.Now().Before(l.entry.Expires):
			if l.token != "" {
				cl.f.unclaimLater(cl.name, l.token)
			}
			return l.entry, nil
		case l.token != "":
			cl.token, cl.epoch = l.token, l.epoch // taken over: the fetch begins after this epoch
			cl.hold()
			return nil, nil
		}
		cl.force = l.present
	}
}

// Share writes e to Redis, sealed under the claim's credential and checked
// later against the marks raised since the claim's epoch, and gives the
// claim back in the same round trip.
func (cl *claim) Share(ctx context.Context, e *cache.Entry) error {
	c := cl.f.c()
	if c == nil {
		return errNotConnected
	}
	set, ok, err := cl.f.set(c, e, cl.auth, cl.epoch, cl.f.clock.Now())
	if err != nil {
		return err
	}
	cmds := make(rueidis.Commands, 0, 2)
	if ok {
		cmds = append(cmds, set)
	}
	if cl.token != "" {
		cl.end()
		cmds = append(cmds, c.B().Eval().Script(unclaim).Numkeys(1).Key(cl.name).Arg(cl.token).Build())
		cl.token = ""
	}
	if len(cmds) == 0 {
		return nil
	}
	ctx, cancel := cl.f.ctx(ctx)
	defer cancel()
	trip(ctx)
	for _, r := range c.DoMulti(ctx, cmds...) {
		if err := cl.f.result(r.Error()); err != nil {
			return err
		}
	}
	return nil
}

// end stops the heartbeat.
func (cl *claim) end() {
	close(cl.stop)
	<-cl.beat
}

// Release gives the claim back if this replica still holds it (nothing
// was shared), and stops its heartbeat.
func (cl *claim) Release() {
	if cl.token != "" {
		cl.end()
		cl.f.unclaimNow(context.Background(), cl.name, cl.token)
		cl.token = ""
	}
}

func (f *Fleet) unclaimNow(ctx context.Context, name, token string) {
	c, ctx, cancel, err := f.conn(ctx)
	defer cancel()
	if err != nil {
		return // it lapses by itself
	}
	trip(ctx)
	f.result(c.Do(ctx, c.B().Eval().Script(unclaim).Numkeys(1).Key(name).Arg(token).Build()).Error())
}

// unclaimLater gives back a claim taken but not needed, off the request's
// path (it lapses by itself if Redis does not answer).
func (f *Fleet) unclaimLater(name, token string) {
	go f.unclaimNow(context.Background(), name, token)
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

// claims are the claims lookups took (Get found no entry), until the fill
// that follows adopts them; one not adopted lapses in Redis by itself.
type claims struct {
	mu sync.Mutex
	m  map[string]heldClaim
}

type heldClaim struct {
	token string
	epoch uint64
	at    time.Time
}

// put keeps a claim for its fill; past 10,000 unadopted ones (swept once
// they would have lapsed) it gives it back instead.
func (cs *claims) put(name string, h heldClaim, f *Fleet) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.m == nil {
		cs.m = map[string]heldClaim{}
	}
	if len(cs.m) >= 1000 {
		for n, old := range cs.m {
			if time.Since(old.at) > f.cfg.ClaimTTL {
				delete(cs.m, n)
			}
		}
	}
	if old, ok := cs.m[name]; ok && old.token != h.token {
		f.unclaimLater(name, old.token) // never adopted
	}
	if len(cs.m) >= 10_000 {
		f.unclaimLater(name, h.token)
		return
	}
	cs.m[name] = h
}

// take hands a kept claim to its fill, if it is young enough to be held
// still (the heartbeat renews it from then on).
func (cs *claims) take(name string, ttl time.Duration) (heldClaim, bool) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	h, ok := cs.m[name]
	delete(cs.m, name)
	return h, ok && time.Since(h.at) < ttl/2
}
