package proxy

import (
	"net/http"
	"time"

	"cacheproxy/internal/clock"
	"cacheproxy/internal/load"
	"cacheproxy/internal/route"
	"cacheproxy/internal/tier"
	"cacheproxy/internal/tracing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// Upstream configures one Twilio API.
type Upstream struct {
	// URL is where its calls go (https://conversations.twilio.com).
	URL string
	// Hosts are the Host header values that select it (Twilio's own
	// host names, for clients that keep them).
	Hosts []string
	// Timeout bounds one call, retries included.
	Timeout time.Duration
}

// Freshness configures what is cached, and for how long.
type Freshness struct {
	// TTL is how long a 200 is fresh; NegativeTTL a 404.
	TTL, NegativeTTL time.Duration
	// WriteLag: a 404 to a read whose scopes were written (through this
	// replica or the fleet, as its Invalidator heard) less than this long
	// ago is answered but not stored (Twilio's read-after-create lag).
	WriteLag time.Duration
	// StaleIfError serves an expired entry for this long past expiry when
	// the upstream fails; StaleWhileRevalidate serves it at once while one
	// background fetch refreshes it. 0: off.
	StaleIfError, StaleWhileRevalidate time.Duration
	// MaxEntryBytes: larger bodies are served, not stored.
	MaxEntryBytes int64
	// Routes are cache.routes: a route's own ttl by its name (route.Named):
	// a route cached on request is cached with it, one cached by default
	// takes it instead of TTL; 0 turns either off.
	Routes map[string]time.Duration
}

// Retry configures how upstream 429s are retried.
type Retry struct {
	// Max is the number of retries of one call.
	Max int
	// Base and Cap bound the full-jitter backoff (base·2^attempt, capped)
	// when the upstream gives no Retry-After.
	Base, Cap time.Duration
	// ReplayBytes: write bodies up to this size are buffered so that a
	// retry can send them again; larger ones are not retried.
	ReplayBytes int64
	// MaxWait is ratelimit.max_wait: a retry whose backoff would end
	// past it, counted from the request's arrival, is not made (the
	// client gets the upstream's 429, or a stale answer). 0: no bound.
	MaxWait time.Duration
}

// Options are the proxy's dependencies. Upstream URLs, Store, Invalidator
// and Budget are required.
type Options struct {
	Upstreams   [route.NumUpstreams]Upstream // indexed by route.Upstream
	Store       Store
	Invalidator Invalidator
	Budget      Budget
	// Intents, if set, announces each write before it is sent (the
	// fleet's); nil: writes invalidate once answered, as alone.
	Intents Intender
	// L2 is the fleet's tier in Redis (docs/fleet.md): entries
	// other replicas fetched, and the claims that make one fetch of a cold
	// key for the fleet. If nil, tier.None: this replica alone.
	L2 tier.Tier
	// SummaryFields, if set, adds fields to each summary line (the fleet's
	// state and totals).
	SummaryFields func(*zerolog.Event)
	Freshness     Freshness
	Retry         Retry
	// MaxBodyBytes bounds a request body (413 beyond it).
	MaxBodyBytes int64
	// WriteTimeout bounds writing a response to the client, from its
	// first byte, on a connection no connwatch.Watch watches (an HTTP/2
	// one, or a server without a Watch): each such response sets a write
	// deadline. 0: no bound.
	WriteTimeout time.Duration
	// MaxAccountSeries bounds the accounts named in per-account metrics and
	// the summary line (metrics.max_accounts; 0: 100): only verified ones,
	// the rest summed as "other".
	MaxAccountSeries int
	// UnauthorizedTTL is how long the upstream's 401 for a credential is
	// answered locally, spending no budget. 0: never.
	UnauthorizedTTL time.Duration
	// Logger receives one JSON line per request, with its own "time" field
	// (so give it no Timestamp()). Zero value: no logs.
	Logger zerolog.Logger
	// Transport carries upstream calls. If nil, NewTransport() is used.
	Transport http.RoundTripper
	// Tracing, if set, traces each request (a server span continuing the
	// client's traceparent, with spans for the budget wait, the fleet
	// claim and the upstream call). Nil: off, and nothing of it runs.
	Tracing *tracing.Tracing
	// Clock is the time source (retry waits, ages, the access log's
	// times). If nil, the real clock.
	Clock clock.Clock
	// KeySecret keys credential fingerprints. If empty, a random one.
	KeySecret []byte
	// Registerer receives the proxy's metrics. If nil, they are kept in a
	// registry of their own that nobody scrapes.
	Registerer prometheus.Registerer

	flights load.FlightGroup // nil: singleflight (tests count who waits)
}
