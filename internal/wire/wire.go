// Package wire builds the whole graph of a cacheproxy from its
// configuration (Build): the binary, the fault run and the benchmarks
// that run a proxy in process all get theirs here, none by hand.
package wire

import (
	"time"

	"cacheproxy/internal/config"
	"cacheproxy/internal/fleet"
	"cacheproxy/internal/proxy"
	"cacheproxy/internal/ratelimit"
	"cacheproxy/internal/route"

	"github.com/rs/zerolog"
)

// proxyOptions is the part of the proxy's options that comes from
// configuration alone: the caller adds the store, invalidator, budget,
// logger and registry.
func proxyOptions(cfg config.Config) proxy.Options {
	up := func(u config.Upstream) proxy.Upstream {
		return proxy.Upstream{URL: u.URL, Hosts: u.Hosts, Timeout: u.Timeout.D()}
	}
	c, rl := cfg.Cache, cfg.RateLimit
	return proxy.Options{
		Upstreams: [route.NumUpstreams]proxy.Upstream{
			route.Conversations: up(cfg.Upstreams.Conversations),
			route.Proxy:         up(cfg.Upstreams.Proxy),
		},
		Freshness: proxy.Freshness{
			TTL: c.TTL.D(), NegativeTTL: c.NegativeTTL.D(), WriteLag: c.WriteLag.D(),
			StaleIfError: c.StaleIfError.D(), StaleWhileRevalidate: c.StaleWhileRevalidate.D(),
			MaxEntryBytes: int64(c.MaxEntryBytes), Routes: routeTTLs(c.Routes),
		},
		Retry:            proxy.Retry{Max: rl.MaxRetries, Base: rl.BackoffBase.D(), Cap: rl.BackoffMax.D(), ReplayBytes: int64(rl.ReplayBytes), MaxWait: rl.MaxWait.D()},
		MaxBodyBytes:     int64(cfg.Server.MaxBodyBytes),
		MaxAccountSeries: cfg.Metrics.MaxAccounts,
		WriteTimeout:     cfg.Server.WriteTimeout.D(),
		UnauthorizedTTL:  rl.UnauthorizedTTL.D(),
		KeySecret:        []byte(c.KeySecret),
	}
}

// routeTTLs are cache.routes as the proxy takes them.
func routeTTLs(r config.Routes) map[string]time.Duration {
	out := make(map[string]time.Duration, len(r))
	for name, rc := range r {
		out[name] = rc.TTL.D()
	}
	return out
}

// limiterConfig is the budget's configuration; its decisions go to log (cuts and
// learned keys at info, growth at debug).
func limiterConfig(rl config.RateLimit, log zerolog.Logger) ratelimit.Config {
	return ratelimit.Config{
		MaxConcurrent: rl.MaxConcurrent, Rate: rl.RequestsPerSecond, MaxWait: rl.MaxWait.D(), Recover: rl.Recover.D(), WriteShare: rl.WriteShare,
		KeyAccounts: rl.KeyAccounts, OnEvent: proxy.BudgetLog(log),
	}
}

// retention is the longest an entry can outlive the invalidation of its
// scope: its lifetime plus the slowest fetch.
func retention(cfg config.Config) time.Duration {
	return max(cfg.Cache.TTL.D(), cfg.Cache.NegativeTTL.D()) + max(cfg.Cache.StaleIfError.D(), cfg.Cache.StaleWhileRevalidate.D()) +
		max(cfg.Upstreams.Conversations.Timeout.D(), cfg.Upstreams.Proxy.Timeout.D()) + time.Minute
}

// fleetConfig is L2's configuration.
func fleetConfig(cfg config.Config) fleet.Config {
	return fleet.Config{URL: cfg.Redis.URL, Prefix: cfg.Redis.KeyPrefix, Timeout: cfg.Redis.Timeout.D(),
		Secret: []byte(cfg.Cache.KeySecret), Previous: bytesOf(cfg.Cache.PreviousKeySecrets), Retention: retention(cfg),
		ClaimTTL: fleet.ClaimTTL, ClaimHold: max(fleet.ClaimHold, writeHold(cfg)), WriteHold: writeHold(cfg), IntentWait: cfg.RateLimit.MaxWait.D()}
}

// writeHold is the longest a write may take: its budget wait and its
// upstream call (the proxy bounds a write announced to the fleet by it).
func writeHold(cfg config.Config) time.Duration {
	return cfg.RateLimit.MaxWait.D() + max(cfg.Upstreams.Conversations.Timeout.D(), cfg.Upstreams.Proxy.Timeout.D())
}

func bytesOf(ss []string) [][]byte {
	out := make([][]byte, len(ss))
	for i, s := range ss {
		out[i] = []byte(s)
	}
	return out
}
