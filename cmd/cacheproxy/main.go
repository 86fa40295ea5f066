// Command cacheproxy is a caching reverse-proxy sidecar for Twilio's
// participant reads. main only wires: flags, config, New, listen, shut down.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/config"
	"cacheproxy/internal/connwatch"
	"cacheproxy/internal/fleet"
	"cacheproxy/internal/inflight"
	"cacheproxy/internal/invalidation"
	"cacheproxy/internal/logbuf"
	"cacheproxy/internal/proxy"
	"cacheproxy/internal/ratelimit"
	"cacheproxy/internal/tracing"
	"cacheproxy/internal/webhooks"
	"cacheproxy/internal/wire"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/rs/zerolog"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		switch {
		case errors.Is(err, flag.ErrHelp):
			os.Exit(0)
		case errors.Is(err, errReported):
			os.Exit(1)
		}
		fmt.Fprintln(os.Stderr, "cacheproxy:", err)
		os.Exit(1)
	}
}

// setFlags collects repeated -set key=value flags.
type setFlags []string

func (s *setFlags) String() string     { return strings.Join(*s, " ") }
func (s *setFlags) Set(v string) error { *s = append(*s, v); return nil }

func run(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("cacheproxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "TOML config `file` (see config.example.toml); without it the defaults apply")
	version := fs.Bool("version", false, "print the version and build info, then exit")
	demo := fs.Bool("demo", false, "start a built-in Twilio-like upstream on loopback, point the proxy at it, and print two curl commands (a miss, then a hit): no Twilio account needed")
	checkCfg := fs.Bool("check-config", false, "load the configuration as a start would (file, environment, -set), run every check a start runs without binding or connecting, print each problem naming its key, and exit non-zero on any")
	printCfg := fs.Bool("print-config", false, "print the effective configuration as TOML (secrets shown as \"<redacted>\"), then exit")
	healthcheck := fs.Bool("healthcheck", false, "probe this configuration's admin /healthz and exit 0 if healthy (for container HEALTHCHECKs: no shell tools needed)")
	var sets setFlags
	fs.Var(&sets, "set", "override one config key, `key=value` (repeatable), e.g. -set cache.ttl=10s")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: cacheproxy [-config FILE] [-set key=value ...] [-demo] [-check-config] [-print-config] [-version] [-healthcheck]\n\nFlags:\n")
		fs.PrintDefaults()
		fmt.Fprintf(stderr, "\nConfig keys (TOML; env %sKEY overrides the file, -set overrides env):\n", config.EnvPrefix)
		for _, k := range config.Keys() {
			fmt.Fprintf(stderr, "  %-32s %s\n", k, config.EnvName(k))
		}
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if *version && !*checkCfg { // with -check-config, the check is what was asked
		fmt.Fprintln(stdout, versionInfo())
		return nil
	}
	cfg, err := config.Load(*configPath, os.Environ(), sets)
	if *checkCfg {
		return checkConfig(cfg, err, os.Environ(), stdout)
	}
	if err != nil {
		return err
	}
	if *printCfg {
		return printConfig(cfg, stdout)
	}
	if *healthcheck {
		return probe(cfg.AdminListen)
	}
	level, _ := zerolog.ParseLevel(cfg.Log.Level)
	var out io.Writer = stdout
	if cfg.Log.Format == "console" {
		// logbuf flushes batches of lines; the ConsoleWriter reads one a Write.
		out = logbuf.EachLine(zerolog.ConsoleWriter{Out: stdout, TimeFormat: time.RFC3339})
	}
	logw := logbuf.New(out, int(cfg.Log.Buffer))
	stopFlush, flushed := make(chan struct{}), make(chan struct{})
	go func() { logw.Run(cfg.Log.FlushInterval.D(), stopFlush); close(flushed) }()
	defer func() { close(stopFlush); <-flushed }()
	logger := zerolog.New(logw).Level(level).With().Timestamp().Logger()
	if unknown := config.UnknownEnv(os.Environ()); len(unknown) > 0 {
		// Names only: a value may be a secret.
		logger.Warn().Strs("variables", unknown).Msg("ignoring environment variables that name no config key")
	}

	// Two signals may matter: the first starts shutdown, a second skips
	// the rest of shutdown_delay.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	var onListen func(addr string)
	if *demo {
		stopDemo, err := startDemo(&cfg, stderr, &onListen)
		if err != nil {
			return err
		}
		defer stopDemo()
	}
	// The access log stamps its lines itself (once per second, not per line).
	accessLog := zerolog.New(logw).Level(level)
	return serve(sigs, cfg, logger, accessLog, logw, onListen)
}

// The Go runtime's settings unless GOMEMLIMIT or GOGC say otherwise. The
// limit counts only the memory the runtime maps; the binary's own pages
// (about 17 MiB resident once it has served) come on top, so the limit is
// max_bytes + 16 MiB for the process to stay within max_bytes + 32 MiB: a
// full 64 MiB cache is resident in about 92 MiB (docs/performance.md,
// "Memory").
const (
	memoryOverhead = 16 << 20
	gcPercent      = 400
)

// serve runs the proxy and admin listeners until a signal arrives on sigs,
// then shuts down gracefully: not ready at once, still serving for
// shutdown_delay (unless a second signal comes), then stop accepting and
// finish in-flight requests within shutdown_timeout.
func serve(sigs <-chan os.Signal, cfg config.Config, logger, accessLog zerolog.Logger, logw *logbuf.Writer, onListen func(string)) error {
	// A soft memory limit (unless GOMEMLIMIT is set) makes the GC work
	// harder before garbage doubles the cache's footprint: resident memory
	// stays near cache.max_bytes plus the server's own needs. Under that
	// limit the GC may let garbage reach four times the live heap (unless
	// GOGC is set): while the cache is small it collects a quarter as
	// often, and once the cache is full the limit decides.
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(int64(cfg.Cache.MaxBytes) + memoryOverhead)
	}
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(gcPercent)
	}
	store, err := cache.New(int64(cfg.Cache.MaxBytes), nil)
	if err != nil {
		return err
	}
	defer store.Close()
	limiter := ratelimit.New(wire.Limiter(cfg.RateLimit, logger), nil)
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	opts := wire.ProxyOptions(cfg)
	trusted := func() bool { return true } // with Redis: while the replica hears the fleet's stream
	opts.Store, opts.Invalidator, opts.Budget = store, invalidation.New(wire.Retention(cfg), nil), limiter
	if cfg.Redis.URL != "" {
		f, err := fleet.Open(wire.Fleet(cfg))
		if err != nil {
			return err
		}
		defer f.Close()
		opts.Shared = f
		inv := fleet.NewInvalidator(f, invalidation.New(wire.Retention(cfg), nil), cfg.Redis.InvalidationWait.D(), func(err error) {
			fleetTrouble(logger, err)
		})
		trusted = inv.Trusted
		defer inv.Close()
		opts.Invalidator = inv
		var budget *fleet.Slots
		limiter, budget = wire.FleetLimiter(cfg, f, logger)
		defer budget.Close()
		opts.Budget = limiter
		fleetMetrics(reg, f, inv, budget)
		opts.SummaryFields = func(e *zerolog.Event) {
			e.Bool("redis_up", f.Up() && inv.Subscribed()).Int("replicas", budget.Replicas()).
				Int64("invalidations_sent_total", inv.Sent.Load()).Int64("invalidations_received_total", inv.Received.Load()).
				Int64("invalidations_unacked_total", inv.Unacked.Load()).
				Int64("budget_waits_total", budget.Waited.Load()).Int64("budget_fallbacks_total", budget.Fallbacks.Load())
		}
		go func() {
			if inv.WaitTrusted(context.Background()) == nil {
				logger.Info().Str("component", "fleet").Str("key_prefix", cfg.Redis.KeyPrefix).Msg("connected to Redis: sharing entries and invalidations")
			}
		}()
	}
	opts.Logger, opts.LogOutput, opts.Registerer = accessLog, logw, reg
	tr, err := tracing.Setup(context.Background(), os.Getenv, versionInfo())
	if err != nil {
		return err
	}
	if tr != nil {
		opts.Tracing = tr
		defer func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := tr.Shutdown(ctx); err != nil {
				logger.Warn().Str("component", "tracing").Err(err).Msg("spans not sent at shutdown")
			}
		}()
		// The endpoint's headers may hold a token: none of it is logged.
		logger.Info().Str("component", "tracing").Msg("tracing on: spans go to the OTLP/HTTP endpoint of OTEL_EXPORTER_OTLP_*")
	}
	p, err := proxy.New(opts)
	if err != nil {
		return err
	}
	if cfg.Admin.PurgeToken == "" && !isLoopback(cfg.AdminListen) {
		logger.Warn().Str("admin_listen", cfg.AdminListen).Msg("admin_listen is not loopback and admin.purge_token is not set: /purge is disabled")
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	adminLn, err := net.Listen("tcp", cfg.AdminListen)
	if err != nil {
		ln.Close()
		return fmt.Errorf("admin_listen: %w", err)
	}
	hooks, hooksLn, err := webhookServer(cfg, opts.Invalidator, logger, reg)
	if err != nil {
		ln.Close()
		adminLn.Close()
		return err
	}
	var conns connTracker
	srv := &http.Server{
		Handler:           p,
		ReadHeaderTimeout: cfg.Server.ReadHeaderTimeout.D(),
		ReadTimeout:       cfg.Server.ReadTimeout.D(),
		// No WriteTimeout: it would count the upstream's time too. A
		// response's write is bounded from its start (writes, below; the
		// proxy sets a deadline per response on HTTP/2).
		IdleTimeout:    cfg.Server.IdleTimeout.D(),
		MaxHeaderBytes: int(cfg.Server.MaxHeaderBytes),
		ErrorLog:       proxy.StdLog(logger, "http"),
		ConnState:      conns.track,
		Protocols:      proxyProtocols(),
	}
	var ready atomic.Bool
	admin := &http.Server{
		Handler:           adminMux(reg, &ready, trusted, p.PurgeHandler(cfg.Admin.PurgeToken, isLoopback(cfg.AdminListen))),
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       cfg.Server.IdleTimeout.D(),
		ErrorLog:          proxy.StdLog(logger, "admin"),
	}
	// Shutdown runs this (in a goroutine of its own) once the listener is
	// closed; "stopped" waits for it, so the lines come in order.
	closed := make(chan struct{})
	srv.RegisterOnShutdown(func() {
		logger.Info().Msg("no longer accepting; finishing in-flight requests")
		_ = logw.Flush()
		close(closed)
	})
	writes := connwatch.New(cfg.Server.WriteTimeout.D(), nil)
	watched := writes.Wrap(srv, ln)
	stopWatch := make(chan struct{})
	defer close(stopWatch)
	go writes.Run(stopWatch)
	errc := make(chan error, 3)
	go func() { errc <- srv.Serve(watched) }()
	go func() { errc <- admin.Serve(adminLn) }()
	if hooks != nil {
		go func() { errc <- hooks.Serve(hooksLn) }()
		logger.Info().Str("webhooks_listen", hooksLn.Addr().String()).Bool("forward", cfg.Webhooks.ForwardTo != "").Msg("listening for Twilio's webhooks")
	}
	ready.Store(true)
	logger.Info().Str("listen", ln.Addr().String()).Str("admin_listen", adminLn.Addr().String()).
		Str("conversations", cfg.Upstreams.Conversations.URL).Str("proxy", cfg.Upstreams.Proxy.URL).Msg("cacheproxy started")
	_ = logw.Flush() // tooling waits for this line
	if onListen != nil {
		onListen(ln.Addr().String())
	}

	stopSummary := make(chan struct{})
	defer close(stopSummary)
	go func() {
		t := time.NewTicker(cfg.Log.SummaryInterval.D())
		defer t.Stop()
		var prev proxy.Summary
		for {
			select {
			case <-t.C:
				prev = p.LogSummary(prev)
			case <-stopSummary:
				return
			}
		}
	}()
	select {
	case sig := <-sigs:
		ready.Store(false) // the pod leaves rotation at once
		delay := cfg.ShutdownDelay.D()
		logger.Info().Str("signal", sig.String()).Dur("shutdown_delay", delay).Msg("shutting down: not ready; still serving for shutdown_delay")
		_ = logw.Flush()
		if delay > 0 {
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case sig := <-sigs:
				t.Stop()
				logger.Info().Str("signal", sig.String()).Msg("second signal: skipping the rest of shutdown_delay")
			}
		}
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	}
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout.D())
	defer cancel()
	// The admin listener goes last: /readyz answers 503 while requests drain.
	err = srv.Shutdown(sctx)
	if err != nil {
		// Requests still running past shutdown_timeout: cut their
		// connections so that they end now, and wait (briefly) for their
		// handlers, so that each still gets its access-log line.
		logger.Warn().Dur("shutdown_timeout", cfg.ShutdownTimeout.D()).Msg("shutdown_timeout passed: closing the connections of requests still running")
		_ = srv.Close()
		grace, cancelGrace := context.WithTimeout(context.Background(), closeGrace)
		_ = conns.wait(grace)
		cancelGrace()
	}
	if hooks != nil {
		err = errors.Join(err, hooks.Shutdown(sctx))
	}
	err = errors.Join(err, p.Wait(sctx), limiter.Wait(sctx), admin.Shutdown(sctx))
	<-closed
	_ = logw.Flush()
	if err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	logger.Info().Msg("stopped")
	return nil
}

// webhookServer is the listener for Twilio's webhooks (webhooks.listen),
// or nil when it is off. It serves only the webhook endpoints.
func webhookServer(cfg config.Config, inv proxy.Invalidator, logger zerolog.Logger, reg prometheus.Registerer) (*http.Server, net.Listener, error) {
	w := cfg.Webhooks
	if w.Listen == "" {
		return nil, nil, nil
	}
	h, err := webhooks.New(webhooks.Config{PublicURL: w.PublicURL, AuthTokens: w.AuthTokens, ForwardTo: w.ForwardTo,
		Invalidator: inv, Logger: logger, Registerer: reg})
	if err != nil {
		return nil, nil, err
	}
	ln, err := net.Listen("tcp", w.Listen)
	if err != nil {
		return nil, nil, fmt.Errorf("webhooks.listen: %w", err)
	}
	return &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		IdleTimeout: cfg.Server.IdleTimeout.D(), ErrorLog: proxy.StdLog(logger, "webhooks")}, ln, nil
}

// proxyProtocols are the proxy listener's: HTTP/1.1, and HTTP/2 in
// cleartext with prior knowledge (h2c: a client that knows the sidecar
// speaks it, such as curl --http2-prior-knowledge or Go's transport with
// Protocols.SetUnencryptedHTTP2). There is no TLS on this listener, so no
// HTTP/2 by ALPN, and no Upgrade: h2c either (Go's server does not offer it).
func proxyProtocols() *http.Protocols {
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	return &p
}

// closeGrace bounds the wait for handlers whose connections shutdown cut.
const closeGrace = 5 * time.Second

// connTracker counts the proxy listener's open connections (a handler runs
// on its connection's goroutine, so a closed connection's handler is done).
// It is told only of new and closed connections, not of every request.
type connTracker struct {
	open inflight.Tracker
}

func (c *connTracker) track(_ net.Conn, s http.ConnState) {
	switch s {
	case http.StateNew:
		c.open.Add()
	case http.StateClosed, http.StateHijacked:
		c.open.Done()
	}
}

func (c *connTracker) wait(ctx context.Context) error { return c.open.Wait(ctx) }

// revision is the VCS revision given at link time (-ldflags "-X
// main.revision=…": the Dockerfile's build has no .git to read it from).
var revision string

// versionInfo is the module version (set for go install'ed builds) and the
// VCS revision recorded at build time (by go build in a checkout, else
// the one given at link time).
func versionInfo() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "cacheproxy (no build info)"
	}
	out := "cacheproxy " + bi.Main.Version + " " + bi.GoVersion
	vcs := false
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			vcs = true
			fallthrough
		case "vcs.time", "vcs.modified", "GOOS", "GOARCH", "CGO_ENABLED":
			out += " " + s.Key + "=" + s.Value
		}
	}
	if !vcs && revision != "" {
		out += " vcs.revision=" + revision
	}
	return out
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
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

// fleetMetrics registers the fleet tier's state and invalidation counts.
func fleetMetrics(reg prometheus.Registerer, f *fleet.Fleet, inv *fleet.Invalidator, budget *fleet.Slots) {
	counter := func(name, help string, v func() int64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 { return float64(v()) })
	}
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cacheproxy_redis_up",
			Help: "1 while the last Redis call succeeded, the fleet's state in Redis reads right and this replica hears the fleet's invalidations, else 0."},
			func() float64 {
				if f.Up() && f.Healthy() && inv.Subscribed() {
					return 1
				}
				return 0
			}),
		counter("cacheproxy_fleet_invalidations_sent_total", "Invalidations this replica sent to the fleet.", inv.Sent.Load),
		counter("cacheproxy_fleet_invalidations_received_total", "Other replicas' invalidations applied here.", inv.Received.Load),
		counter("cacheproxy_fleet_invalidations_acked_total", "Acknowledgements this replica's invalidations got.", inv.Acked.Load),
		counter("cacheproxy_fleet_invalidations_unacked_total", "Replicas that did not acknowledge within redis.invalidation_wait.", inv.Unacked.Load),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cacheproxy_fleet_replicas", Help: "Replicas seen in the last five seconds."},
			func() float64 { return float64(budget.Replicas()) }),
		counter("cacheproxy_fleet_budget_waits_total", "Upstream calls that waited for a slot of their account's fleet-wide cap.", budget.Waited.Load),
		counter("cacheproxy_fleet_budget_handed_total", "Fleet slots a release handed to this replica's waiting calls (no call polls).", budget.Handed.Load),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cacheproxy_fleet_trusted",
			Help: "1 while this replica trusts its L1: it hears the fleet's invalidations and every writer counts it (also /readyz)."},
			func() float64 { return b2f(inv.Trusted()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cacheproxy_fleet_invalidations_unsent",
			Help: "Invalidations applied here that Redis has not taken yet (retried; 1 for 'everything' once over 1024)."},
			func() float64 { return float64(inv.Unsent()) }),
		counter("cacheproxy_fleet_invalidations_unopened_total", "Invalidations this replica could not open (another cache.key_secret): each dropped its whole L1.", inv.Unopened.Load),
		counter("cacheproxy_fleet_stream_lapses_total", "Times this replica's invalidation stream fell more than redis.invalidation_wait behind (its own heartbeat came back late): each dropped its whole L1.", inv.Lapses.Load),
		counter("cacheproxy_fleet_state_errors_total", "Reads of the fleet's epoch, floor or marks in Redis that were not valid numbers (garbage).", f.CorruptReads),
		counter("cacheproxy_fleet_rewinds_total", "Times this replica found Redis's epoch lower than one it had seen (a restart from older data, a failover) and raised the floor.", f.Rewinds),
		counter("cacheproxy_fleet_budget_slots_regiven_total", "Fleet slots given back late: their release, or a take that timed out after Redis may have run it, failed and was retried.", budget.Regiven.Load),
		counter("cacheproxy_fleet_budget_fallbacks_total", "Upstream calls made on this replica's share of the cap because Redis could not be asked.", budget.Fallbacks.Load),
	)
}
