package fleet

import (
	"context"
	"sync/atomic"
)

// Listening reports whether this replica's slots hear their channel,
// where releases hand them slots.
func (s *Slots) Listening() bool { return s.subscribed.Load() }

// CountTrips returns a context in which every Redis round trip the fleet
// makes for a request (lookups, claims, fills, budget slots) is counted
// in n.
func CountTrips(ctx context.Context, n *atomic.Int64) context.Context {
	return context.WithValue(ctx, tripsKey{}, n)
}
