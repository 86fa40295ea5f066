package proxy

import (
	"context"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/clock"
	"cacheproxy/internal/tier"

	"github.com/prometheus/client_golang/prometheus"
)

// timedTier measures L2's lookups.
type timedTier struct {
	tier.Tier
	clock   clock.Clock
	latency prometheus.Histogram
}

func (t timedTier) Get(ctx context.Context, key, auth string) (*cache.Entry, tier.Claim, error) {
	start := t.clock.Now()
	e, cl, err := t.Tier.Get(ctx, key, auth)
	t.latency.Observe(t.clock.Since(start).Seconds())
	return e, cl, err
}
