package fleet

import (
	"context"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/tier"
)

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

// try takes the lease if it is free.
func (cl *claim) try(ctx context.Context) error {
	token, err := cl.f.Lease(ctx, cl.key, cl.f.cfg.ClaimTTL)
	cl.token = token
	return err
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

// Release gives the lease back if this replica holds it.
func (cl *claim) Release() {
	if cl.token != "" {
		_ = cl.f.Unlease(context.Background(), cl.key, cl.token)
		cl.token = ""
	}
}
