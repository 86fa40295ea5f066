package fleet

import (
	"context"
	"strconv"
	"time"

	"github.com/redis/rueidis"
)

// A claim's key lives for ClaimHold; what says that its holder still
// fetches is the holder's own key, alive:<replica id>, which the replica
// renews (for ClaimTTL) every third of ClaimTTL while it holds a claim:
// one command for all its claims, where a renewal per claim made most of
// a backlog's commands (docs/fleet.md, "One upstream call per cold key").
// A replica waiting for another's fill looks at the holder's key every
// quarter of ClaimTTL and takes a claim whose holder's key has lapsed.

// aliveKey is the key that says replica id is alive.
func (f *Fleet) aliveKey(id string) string { return f.cfg.Prefix + "alive:" + id }

// holderOf is the replica id in a claim's token (its first idLen hex digits).
func holderOf(token string) string { return token[:min(len(token), idLen)] }

// idLen is the length of newID's ids.
const idLen = 24

// aliveCmd renews this replica's key, always or if the last renewal is
// older than half of ClaimTTL (a lookup that may claim sends it with its
// round trip: the key then lives for half of ClaimTTL at least, and
// keepAlive renews it within a third; one of concurrent lookups sends it);
// ok is false when it is not sent.
func (f *Fleet) aliveCmd(c rueidis.Client, always bool) (rueidis.Completed, bool) {
	if !always {
		last := f.aliveAt.Load()
		if time.Since(time.Unix(0, last)) < f.cfg.ClaimTTL/2 || !f.aliveAt.CompareAndSwap(last, time.Now().UnixNano()) {
			return rueidis.Completed{}, false // young enough, or a concurrent lookup renews it
		}
	}
	return c.B().Set().Key(f.aliveKey(f.id)).Value("1").Px(f.cfg.ClaimTTL).Build(), true
}

// alive notes a renewal that Redis took, sent at sent.
func (f *Fleet) alive(sent time.Time, err error) {
	if f.result(err) == nil {
		f.aliveAt.Store(sent.UnixNano())
	}
}

// keepAlive renews this replica's key every third of ClaimTTL while it
// holds claims (won, or taken by lookups for their fills), gives back the
// claims their fills never adopted, and gives back again those whose
// release Redis did not take.
func (f *Fleet) keepAlive() {
	tick := time.NewTicker(f.cfg.ClaimTTL / 3)
	defer tick.Stop()
	var pending []ungivenClaim
	for {
		select {
		case <-f.stop:
			return
		case u := <-f.ungiven:
			pending = append(pending, u)
			continue
		case <-tick.C:
		}
		if c := f.c(); c != nil && f.holding.Load() > 0 {
			cmd, _ := f.aliveCmd(c, true)
			ctx, cancel := f.ctx(context.Background())
			sent := time.Now()
			f.alive(sent, c.Do(ctx, cmd).Error())
			cancel()
		}
		pending = f.giveBack(pending)
	}
}

// ungivenClaim is a claim whose release Redis did not take.
type ungivenClaim struct {
	name, token string
	until       time.Time // when it lapses by itself
}

// giveBackLater queues a claim to be given back by keepAlive (dropped if
// the queue is full: it lapses by itself, ClaimHold after it was taken).
func (f *Fleet) giveBackLater(name, token string) {
	select {
	case f.ungiven <- ungivenClaim{name: name, token: token, until: time.Now().Add(f.cfg.ClaimHold)}:
	default:
	}
}

// giveBack tries to give pending back and returns those Redis did not take.
func (f *Fleet) giveBack(pending []ungivenClaim) []ungivenClaim {
	kept := pending[:0]
	for _, u := range pending {
		if time.Now().Before(u.until) && f.unclaimNow(context.Background(), u.name, u.token) != nil {
			kept = append(kept, u)
		}
	}
	return kept
}

// takeOver takes claim name from holder (the token a look found) if the
// holder's replica is no longer alive, and returns this replica's token
// for it; "" if the holder lives, the claim changed, or Redis failed.
func (f *Fleet) takeOver(ctx context.Context, name, holder string) string {
	c, ctx, cancel, err := f.conn(ctx)
	defer cancel()
	if err != nil {
		return ""
	}
	trip(ctx)
	n, err := c.Do(ctx, c.B().Exists().Key(f.aliveKey(holderOf(holder))).Build()).AsInt64()
	if f.result(err) != nil || n != 0 {
		return ""
	}
	token := f.id + newToken()
	renew, _ := f.aliveCmd(c, true)
	sent := time.Now()
	trip(ctx)
	take := takeClaim.with([]string{name}, holder, token, strconv.FormatInt(f.cfg.ClaimHold.Milliseconds(), 10))
	rs := c.DoMulti(ctx, renew, take.cmd(c))
	f.alive(sent, rs[0].Error())
	if took, err := take.again(ctx, c, rs[1]).AsInt64(); f.result(err) != nil || took != 1 {
		return ""
	}
	return token
}
