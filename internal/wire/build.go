package wire

import (
	"context"
	"errors"
	"net/http"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/clock"
	"cacheproxy/internal/config"
	"cacheproxy/internal/fleet"
	"cacheproxy/internal/invalidation"
	"cacheproxy/internal/proxy"
	"cacheproxy/internal/ratelimit"
	"cacheproxy/internal/tracing"
	"cacheproxy/internal/webhooks"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/rs/zerolog"
)

// Deps are what a graph needs beyond its configuration. The zero value
// builds a silent graph on the real clock with tracing off.
type Deps struct {
	// Logger receives the parts' events: the budget's decisions, the
	// fleet's trouble, webhook refusals. Zero value: none.
	Logger zerolog.Logger
	// AccessLog is the proxy's access log (proxy.Options.Logger).
	AccessLog zerolog.Logger
	// Getenv reads the OTEL_* variables that turn tracing on, and Version
	// names the service in spans. Nil Getenv: tracing off.
	Getenv  func(string) string
	Version string
	// Clock is the time source of the store, the invalidator, the budget
	// and the proxy. Nil: the real clock.
	Clock clock.Clock
	// Transport carries upstream calls; nil: proxy.NewTransport().
	Transport http.RoundTripper
	// OnBudgetEvent, if set, also hears the budget's events (benchmarks
	// count its cuts).
	OnBudgetEvent func(ratelimit.Event)
	// WrapBudget, if set, wraps the budget the proxy calls (benchmarks
	// compare an older budget's behaviour with the current one's).
	WrapBudget func(*ratelimit.Limiter) proxy.Budget
	// SoloKeys has each replica of a fleet learn API keys' accounts by
	// itself instead of through the fleet's key book (bench/fleet's
	// comparison with the book).
	SoloKeys bool
}

// Graph is every part of one cacheproxy, built from its configuration by
// Build and ended by Close. The fleet's parts are nil for a replica
// alone (no redis.url), as is Webhooks when webhooks.listen is unset.
type Graph struct {
	Proxy       *proxy.Proxy
	Store       *cache.Store
	Invalidator proxy.Invalidator
	Budget      *ratelimit.Limiter
	Registry    *prometheus.Registry

	Fleet            *fleet.Fleet
	FleetInvalidator *fleet.Invalidator
	Slots            *fleet.Slots

	Webhooks *webhooks.Handler

	log     zerolog.Logger
	tracing *tracing.Tracing
	closers []func()
}

// Build builds the whole graph: store, invalidator, fleet, budget,
// tracing, proxy, webhooks and the metrics registry they report to. On
// an error, what was built is closed.
func Build(cfg config.Config, d Deps) (g *Graph, err error) {
	g = &Graph{log: d.Logger, Registry: prometheus.NewRegistry()}
	defer func() {
		if err != nil {
			g.Close()
			g = nil
		}
	}()
	g.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if g.Store, err = cache.New(int64(cfg.Cache.MaxBytes), d.Clock); err != nil {
		return g, err
	}
	g.onClose(g.Store.Close)
	local := invalidation.New(retention(cfg), d.Clock)
	lc := limiterConfig(cfg.RateLimit, d.Logger)
	if d.OnBudgetEvent != nil {
		logged := lc.OnEvent
		lc.OnEvent = func(e ratelimit.Event) { logged(e); d.OnBudgetEvent(e) }
	}
	opts := proxyOptions(cfg)
	opts.Store, opts.Invalidator = g.Store, local
	opts.Logger, opts.Registerer, opts.Clock, opts.Transport = d.AccessLog, g.Registry, d.Clock, d.Transport
	if cfg.Redis.URL != "" {
		if err := g.buildFleet(cfg, d, &lc, &opts); err != nil {
			return g, err
		}
	}
	g.Budget = ratelimit.New(lc, d.Clock)
	opts.Budget = g.Budget
	if d.WrapBudget != nil {
		opts.Budget = d.WrapBudget(g.Budget)
	}
	if d.Getenv != nil {
		if g.tracing, err = tracing.Setup(context.Background(), d.Getenv, d.Version); err != nil {
			return g, err
		}
		opts.Tracing = g.tracing
	}
	if g.Proxy, err = proxy.New(opts); err != nil {
		return g, err
	}
	g.Invalidator = opts.Invalidator
	if w := cfg.Webhooks; w.Listen != "" {
		g.Webhooks, err = webhooks.New(webhooks.Config{PublicURL: w.PublicURL, AuthTokens: w.AuthTokens, ForwardTo: w.ForwardTo,
			Invalidator: g.Invalidator, Logger: d.Logger, Registerer: g.Registry, Clock: d.Clock})
		if err != nil {
			return g, err
		}
	}
	return g, nil
}

// buildFleet opens the fleet's tier, invalidator and slots, and puts
// them in the budget's configuration and the proxy's options.
func (g *Graph) buildFleet(cfg config.Config, d Deps, lc *ratelimit.Config, opts *proxy.Options) error {
	fc := fleetConfig(cfg)
	fc.Clock = d.Clock
	f, err := fleet.Open(fc)
	if err != nil {
		return err
	}
	g.Fleet = f
	g.onClose(f.Close)
	g.FleetInvalidator = fleet.NewInvalidator(f, invalidation.New(retention(cfg), d.Clock), cfg.Redis.InvalidationWait.D(),
		func(err error) { fleetTrouble(d.Logger, err) })
	g.onClose(g.FleetInvalidator.Close)
	g.Slots = fleet.NewSlots(f, cfg.RateLimit.RequestsPerSecond)
	g.onClose(g.Slots.Close)
	lc.Slots = g.Slots
	if !d.SoloKeys {
		book := fleet.NewKeyBook(f)
		for k, a := range cfg.RateLimit.KeyAccounts {
			book.Store(k, a)
		}
		lc.Keys = book
	}
	opts.L2, opts.Invalidator, opts.Intents = f, g.FleetInvalidator, g.FleetInvalidator
	opts.SummaryFields = g.summaryFields
	g.Registry.MustRegister(fleetMetrics(g)...)
	go func() {
		if g.FleetInvalidator.WaitTrusted(context.Background()) == nil {
			d.Logger.Info().Str("component", "fleet").Str("key_prefix", cfg.Redis.KeyPrefix).Msg("connected to Redis: sharing entries and invalidations")
		}
	}()
	return nil
}

// Trusted reports whether this replica may serve its L1: always alone; in
// a fleet, while it hears the fleet's stream (docs/fleet.md, "Trust").
func (g *Graph) Trusted() bool {
	return g.FleetInvalidator == nil || g.FleetInvalidator.Trusted()
}

// WaitTrusted waits until this replica may serve its L1 (at once alone;
// in a fleet, once it reached Redis and hears the fleet's stream), or ctx
// ends: how a deployment's readiness, a test or a benchmark waits.
func (g *Graph) WaitTrusted(ctx context.Context) error {
	if g.FleetInvalidator == nil {
		return nil
	}
	if err := g.Fleet.Connected(ctx); err != nil {
		return err
	}
	return g.FleetInvalidator.WaitTrusted(ctx)
}

// RedisUp reports, in a fleet, whether the last Redis call succeeded, the
// fleet's state in Redis reads right and this replica hears the fleet's
// stream: cacheproxy_redis_up and the summary line's redis_up.
func (g *Graph) RedisUp() bool {
	return g.Fleet != nil && g.Fleet.Up() && g.Fleet.Healthy() && g.FleetInvalidator.Subscribed()
}

// Close ends every part Build started, the last built first, and sends
// the spans still buffered (within 5 s).
func (g *Graph) Close() {
	if g.tracing != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := g.tracing.Shutdown(ctx); err != nil {
			g.log.Warn().Str("component", "tracing").Err(err).Msg("spans not sent at shutdown")
		}
		cancel()
	}
	for i := len(g.closers) - 1; i >= 0; i-- {
		g.closers[i]()
	}
	g.closers = nil
}

// Tracing reports whether spans are exported.
func (g *Graph) Tracing() bool { return g.tracing != nil }

func (g *Graph) onClose(f func()) { g.closers = append(g.closers, f) }

// summaryFields adds the fleet's state and totals to each summary line.
func (g *Graph) summaryFields(e *zerolog.Event) {
	inv, slots := g.FleetInvalidator.Stats(), g.Slots.Stats()
	e.Bool("redis_up", g.RedisUp()).Int("replicas", g.Slots.Replicas()).
		Int64("invalidations_sent_total", inv.Sent).Int64("invalidations_received_total", inv.Received).
		Int64("invalidations_unacked_total", inv.Unacked).
		Int64("budget_waits_total", slots.Waited).Int64("budget_fallbacks_total", slots.Fallbacks)
}

// fleetTrouble logs what the fleet tier reports: garbage in Redis and an
// invalidation this replica cannot open (another cache.key_secret) as
// errors an operator must act on, anything else (Redis away, a replica
// that did not acknowledge) as a warning. Never a secret or a value.
func fleetTrouble(logger zerolog.Logger, err error) {
	ev := logger.Warn()
	msg := "fleet: Redis or another replica did not answer in time; invalidations not yet in Redis are kept and retried, and this replica trusts no shared entry they cover meanwhile"
	switch {
	case errors.Is(err, fleet.ErrCorrupt):
		ev, msg = logger.Error(), "fleet: Redis holds garbage in the fleet's epoch, floor or marks; this replica drops its cache each second until they read right"
	case errors.Is(err, fleet.ErrOtherSecret):
		ev, msg = logger.Error(), "fleet: replicas disagree on cache.key_secret; set the same secret (or list the old one in cache.previous_key_secrets during a rotation)"
	}
	ev.Str("component", "fleet").Str("error", err.Error()).Msg(msg)
}
