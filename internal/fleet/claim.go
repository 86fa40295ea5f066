package fleet

import (
	"context"
	"strconv"
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
// the token of the key's lease in Redis if this replica won it.
type claim struct {
	f     *Fleet
	key   string
	auth  string
	epoch uint64
	token string
	stop  chan struct{} // ends the heartbeat of a claim won
	beat  chan struct{} // closed when the heartbeat has ended
}

var _ tier.Tier = (*Fleet)(nil)

// Claim reads the fleet's epoch, then takes key's lease in Redis for
// Config.ClaimTTL if it is free. On an error the claim is not won and
// cannot wait: the caller fetches by itself.
func (f *Fleet) Claim(ctx context.Context, key, auth string) (tier.Claim, error) {
	epoch, err := f.Epoch(ctx)
	if err != nil {
		return tier.Alone{}, err
	}
	cl := &claim{f: f, key: key, auth: auth, epoch: epoch}
	return cl, cl.try(ctx)
}

// try takes the lease if it is free. A lease won is renewed by a
// heartbeat until Release: it lapses ClaimTTL after its holder died (or
// lost Redis), and a waiter takes over.
func (cl *claim) try(ctx context.Context) error {
	token, err := cl.f.Lease(ctx, cl.key, cl.f.cfg.ClaimTTL)
	cl.token = token
	if token != "" {
		cl.stop, cl.beat = make(chan struct{}), make(chan struct{})
		go cl.heartbeat()
	}
	return err
}

// renew extends a lease only if it still holds the token that took it.
var renew = rueidis.NewLuaScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0`)

// heartbeat renews the claim's lease three times a ClaimTTL until stop.
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
		held, err := renew.Exec(ctx, c, []string{cl.f.name("l", cl.key)}, []string{cl.token, strconv.FormatInt(ttl.Milliseconds(), 10)}).AsInt64()
		cancel()
		if cl.f.result(err) == nil && held == 0 {
			return // lapsed and taken: another replica fetches too
		}
	}
}

// Won reports whether this replica holds the key's lease.
func (cl *claim) Won() bool { return cl.token != "" }

// Wait polls for the holder's fresh fill, and takes the lease when it
// lapses or is given back; bounded by ctx.
func (cl *claim) Wait(ctx context.Context) (*cache.Entry, error) {
	tick := time.NewTicker(claimPoll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil, nil
		case <-tick.C:
		}
		if err := cl.try(ctx); err != nil || cl.Won() {
			return nil, err
		}
		e, err := cl.f.Get(ctx, cl.key, cl.auth)
		if err != nil {
			return nil, err
		}
		if e != nil && cl.f.clock.Now().Before(e.Expires) {
			return e, nil
		}
	}
}

// Share writes e to Redis, sealed under the claim's credential and
// checked later against the marks raised since the claim's epoch.
func (cl *claim) Share(ctx context.Context, e *cache.Entry) error {
	return cl.f.Set(ctx, e, cl.auth, cl.epoch, cl.f.clock.Now())
}

// Release ends the heartbeat and gives the lease back if this replica
// holds it.
func (cl *claim) Release() {
	if cl.token != "" {
		close(cl.stop)
		<-cl.beat
		_ = cl.f.Unlease(context.Background(), cl.key, cl.token)
		cl.token = ""
	}
}
