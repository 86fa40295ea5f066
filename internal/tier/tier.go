// Package tier names the seam of L2 (L2, behind each
// replica's own L1; docs/architecture.md, "Glossary"). The proxy uses it
// and internal/fleet implements it; it lives in a leaf package of its own
// so that neither has to import the other (the proxy's tests build fleets).
//
// The seam speaks of the tier, not of Redis: an entry is looked up with
// Get, which claims a key it finds no entry for and returns that claim,
// and a cold key is fetched by whoever wins its claim, the others waiting
// for that winner's fill. None is the tier of a replica alone.
package tier

import (
	"context"

	"cacheproxy/internal/cache"
)

// Tier is L2. Its errors are misses: a caller counts them and
// goes on with L1 and the upstream.
type Tier interface {
	// Get returns key's entry, opened for the credential auth, if one is
	// valid fleet-wide (fresh, or expired and within its stale windows);
	// nil if none is. When the tier has no entry for the key, Get claims
	// it in the same call and returns the claim (won, or another
	// replica's to wait for); else the claim is nil, and a caller that
	// fetches all the same asks Claim. The caller ends a claim it got
	// with Release.
	Get(ctx context.Context, key, auth string) (*cache.Entry, Claim, error)
	// Claim asks for the right to fetch key for the fleet: won only while
	// the key has no fresh fill (another replica's fill shared just before
	// is what Wait returns). Whatever the answer (and on an error too),
	// the caller ends the claim with Release.
	Claim(ctx context.Context, key, auth string) (Claim, error)
}

// Claim is one replica's claim on fetching a cold key for the fleet.
type Claim interface {
	// Won reports whether this replica holds the key's claim: it fetches,
	// then shares what it fetched.
	Won() bool
	// Wait, for a claim not won, waits for the holder's fill and returns
	// it; it returns nil once this replica holds the claim instead (the
	// holder let it lapse), or when it cannot wait (ctx ended, the tier
	// failed). Then Won says which.
	Wait(ctx context.Context) (*cache.Entry, error)
	// Share puts e (fetched for this claim's key and credential) into the
	// tier, valid unless an invalidation of its scopes reached the tier
	// after the claim was made, and gives a claim won back with it. A
	// claim that was not won may share too (a no-cache fetch, or one made
	// after a failed wait).
	Share(ctx context.Context, e *cache.Entry) error
	// Release gives the claim back (if won) and stops anything the claim
	// keeps running.
	Release()
}

// None is the tier of a replica that shares nothing: every Get misses and
// every claim is won, with nothing to share it with.
type None struct{}

// Get finds nothing, and claims the key.
func (None) Get(context.Context, string, string) (*cache.Entry, Claim, error) {
	return nil, Alone{}, nil
}

// Claim is always won.
func (None) Claim(context.Context, string, string) (Claim, error) { return Alone{}, nil }

// Alone is a claim won by default: the replica fetches by itself and
// shares nothing.
type Alone struct{}

// Won is always true.
func (Alone) Won() bool { return true }

// Wait has nobody to wait for.
func (Alone) Wait(context.Context) (*cache.Entry, error) { return nil, nil }

// Share shares nothing.
func (Alone) Share(context.Context, *cache.Entry) error { return nil }

// Release has nothing to give back.
func (Alone) Release() {}
