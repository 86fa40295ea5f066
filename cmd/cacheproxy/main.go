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

	"cacheproxy/internal/config"
	"cacheproxy/internal/connwatch"
	"cacheproxy/internal/inflight"
	"cacheproxy/internal/logbuf"
	"cacheproxy/internal/proxy"
	"cacheproxy/internal/wire"

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

// flags are the command line's.
type flags struct {
	configPath                                     string
	version, demo, checkCfg, printCfg, healthcheck bool
	routes                                         bool
	sets                                           setFlags
}

// parseFlags parses args; -help prints the flags and every config key.
func parseFlags(args []string, stderr io.Writer) (*flags, error) {
	var f flags
	fs := flag.NewFlagSet("cacheproxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.configPath, "config", "", "TOML config `file` (see config.example.toml); without it the defaults apply")
	fs.BoolVar(&f.version, "version", false, "print the version and build info, then exit")
	fs.BoolVar(&f.demo, "demo", false, "start a built-in Twilio-like upstream on loopback, point the proxy at it, and print two curl commands (a miss, then a hit): no Twilio account needed")
	fs.BoolVar(&f.checkCfg, "check-config", false, "load the configuration as a start would (file, environment, -set), run every check a start runs without binding or connecting, print each problem naming its key, and exit non-zero on any")
	fs.BoolVar(&f.printCfg, "print-config", false, "print the effective configuration as TOML (secrets shown as \"<redacted>\", which a config may not hold), then exit")
	fs.BoolVar(&f.healthcheck, "healthcheck", false, "probe this configuration's admin /healthz and exit 0 if healthy (for container HEALTHCHECKs: no shell tools needed)")
	fs.BoolVar(&f.routes, "routes", false, "list every route [cache.routes] may name (each GET path of the three APIs) with its path and whether this configuration caches it, then exit")
	fs.Var(&f.sets, "set", "override one config key, `key=value` (repeatable), e.g. -set cache.ttl=10s")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: cacheproxy [-config FILE] [-set key=value ...] [-demo] [-check-config] [-print-config] [-routes] [-version] [-healthcheck]\n\nFlags:\n")
		fs.PrintDefaults()
		fmt.Fprintf(stderr, "\nConfig keys (TOML; env %sKEY overrides the file, -set overrides env):\n", config.EnvPrefix)
		for _, k := range config.Keys() {
			fmt.Fprintf(stderr, "  %-32s %s\n", k, config.EnvName(k))
		}
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return &f, nil
}

func run(args []string, stdout, stderr io.Writer) error {
	f, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	if f.version && !f.checkCfg { // with -check-config, the check is what was asked
		fmt.Fprintln(stdout, versionInfo())
		return nil
	}
	cfg, err := config.Load(f.configPath, os.Environ(), f.sets)
	switch {
	case f.checkCfg:
		return checkConfig(cfg, err, os.Environ(), stdout)
	case err != nil:
		return err
	case f.printCfg:
		return printConfig(cfg, stdout)
	case f.routes:
		return printRoutes(cfg, stdout)
	case f.healthcheck:
		return probe(cfg.AdminListen)
	}
	level, _ := zerolog.ParseLevel(cfg.Log.Level)
	logw, stopLogs := startLogs(cfg, stdout)
	defer stopLogs()
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
	if f.demo {
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

// startLogs starts the log writer that batches lines to stdout (one by
// one through a ConsoleWriter with log.format = console) and flushes them
// every log.flush_interval; stop flushes the last.
func startLogs(cfg config.Config, stdout io.Writer) (logw *logbuf.Writer, stop func()) {
	var out io.Writer = stdout
	if cfg.Log.Format == "console" {
		// logbuf flushes batches of lines; the ConsoleWriter reads one a Write.
		out = logbuf.EachLine(zerolog.ConsoleWriter{Out: stdout, TimeFormat: time.RFC3339})
	}
	logw = logbuf.New(out, int(cfg.Log.Buffer))
	stopFlush, flushed := make(chan struct{}), make(chan struct{})
	go func() { logw.Run(cfg.Log.FlushInterval.D(), stopFlush); close(flushed) }()
	return logw, func() { close(stopFlush); <-flushed }
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

// serve runs the proxy, admin and webhook listeners until a signal
// arrives on sigs, then shuts down gracefully (shutdown).
func serve(sigs <-chan os.Signal, cfg config.Config, logger, accessLog zerolog.Logger, logw *logbuf.Writer, onListen func(string)) error {
	setMemory(cfg)
	g, err := wire.Build(cfg, wire.Deps{Logger: logger, AccessLog: accessLog, Getenv: os.Getenv, Version: versionInfo()})
	if err != nil {
		return err
	}
	defer g.Close()
	if g.Tracing() {
		// The endpoint's headers may hold a token: none of it is logged.
		logger.Info().Str("component", "tracing").Msg("tracing on: spans go to the OTLP/HTTP endpoint of OTEL_EXPORTER_OTLP_*")
	}
	if cfg.Admin.PurgeToken == "" && !isLoopback(cfg.AdminListen) {
		logger.Warn().Str("admin_listen", cfg.AdminListen).Msg("admin_listen is not loopback and admin.purge_token is not set: /purge is disabled")
	}
	s, err := newServers(cfg, g, logger)
	if err != nil {
		return err
	}
	// Shutdown runs this (in a goroutine of its own) once the listener is
	// closed; "stopped" waits for it, so the lines come in order.
	closed := make(chan struct{})
	s.proxy.RegisterOnShutdown(func() {
		logger.Info().Msg("no longer accepting; finishing in-flight requests")
		_ = logw.Flush()
		close(closed)
	})
	stopWatch := make(chan struct{})
	defer close(stopWatch)
	go s.writes.Run(stopWatch)
	errc := s.start()
	if s.hooks != nil {
		logger.Info().Str("webhooks_listen", s.hooksLn.Addr().String()).Bool("forward", cfg.Webhooks.ForwardTo != "").Msg("listening for Twilio's webhooks")
	}
	s.ready.Store(true)
	logger.Info().Str("listen", s.ln.Addr().String()).Str("admin_listen", s.adminLn.Addr().String()).
		Str("conversations", cfg.Upstreams.Conversations.URL).Str("proxy", cfg.Upstreams.Proxy.URL).Msg("cacheproxy started")
	_ = logw.Flush() // tooling waits for this line
	if onListen != nil {
		onListen(s.ln.Addr().String())
	}
	stopSummary := make(chan struct{})
	defer close(stopSummary)
	go summarise(g.Proxy, cfg.Log.SummaryInterval.D(), stopSummary)
	if err := awaitSignal(sigs, errc, &s.ready, cfg.ShutdownDelay.D(), logger, logw); err != nil {
		return err
	}
	err = s.shutdown(cfg, g, logger)
	<-closed
	_ = logw.Flush()
	if err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	logger.Info().Msg("stopped")
	return nil
}

// setMemory sets the Go runtime's memory limit and GC percentage unless
// GOMEMLIMIT or GOGC say otherwise. The soft limit makes the GC work
// harder before garbage doubles the cache's footprint: resident memory
// stays near cache.max_bytes plus the server's own needs. Under it the GC
// may let garbage reach four times the live heap: while the cache is
// small it collects a quarter as often, and once the cache is full the
// limit decides.
func setMemory(cfg config.Config) {
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(int64(cfg.Cache.MaxBytes) + memoryOverhead)
	}
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(gcPercent)
	}
}

// servers are the binary's listeners and their servers; hooks and
// hooksLn are nil when webhooks.listen is unset.
type servers struct {
	ln, adminLn, hooksLn net.Listener
	proxy, admin, hooks  *http.Server
	writes               *connwatch.Watch
	conns                connTracker
	ready                atomic.Bool
}

// newServers binds the listeners and makes their servers.
func newServers(cfg config.Config, g *wire.Graph, logger zerolog.Logger) (*servers, error) {
	s := &servers{}
	var err error
	if s.ln, err = net.Listen("tcp", cfg.Listen); err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	g.Proxy.AnswerOn(s.ln.Addr().String(), cfg.PublicHosts)
	if s.adminLn, err = net.Listen("tcp", cfg.AdminListen); err != nil {
		s.ln.Close()
		return nil, fmt.Errorf("admin_listen: %w", err)
	}
	if g.Webhooks != nil {
		if s.hooksLn, err = net.Listen("tcp", cfg.Webhooks.Listen); err != nil {
			s.ln.Close()
			s.adminLn.Close()
			return nil, fmt.Errorf("webhooks.listen: %w", err)
		}
		s.hooks = &http.Server{Handler: g.Webhooks, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
			IdleTimeout: cfg.Server.IdleTimeout.D(), ErrorLog: proxy.StdLog(logger, "webhooks")}
	}
	s.writes = connwatch.New(cfg.Server.WriteTimeout.D(), nil)
	s.proxy = &http.Server{
		// HTTP/2 rapid reset: a request cancelled before it began costs
		// nothing, and a connection that cancels more than
		// connwatch.ResetLimit a second is closed.
		Handler:           s.writes.Guard(g.Proxy),
		ReadHeaderTimeout: cfg.Server.ReadHeaderTimeout.D(),
		ReadTimeout:       cfg.Server.ReadTimeout.D(),
		// No WriteTimeout: it would count the upstream's time too. A
		// response's write is bounded from its start (writes; the proxy
		// sets a deadline per response on HTTP/2).
		IdleTimeout:    cfg.Server.IdleTimeout.D(),
		MaxHeaderBytes: int(cfg.Server.MaxHeaderBytes),
		ErrorLog:       proxy.StdLog(logger, "http"),
		ConnState:      s.conns.track,
		Protocols:      proxyProtocols(),
	}
	s.admin = &http.Server{
		Handler:           adminMux(g.Registry, &s.ready, g.Trusted, g.Proxy.PurgeHandler(cfg.Admin.PurgeToken, isLoopback(cfg.AdminListen))),
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       cfg.Server.IdleTimeout.D(),
		ErrorLog:          proxy.StdLog(logger, "admin"),
	}
	return s, nil
}

// start serves every listener; the channel gets the first to fail.
func (s *servers) start() <-chan error {
	errc := make(chan error, 3)
	watched := s.writes.Wrap(s.proxy, s.ln)
	go func() { errc <- s.proxy.Serve(watched) }()
	go func() { errc <- s.admin.Serve(s.adminLn) }()
	if s.hooks != nil {
		go func() { errc <- s.hooks.Serve(s.hooksLn) }()
	}
	return errc
}

// summarise logs the proxy's summary line every interval until stop.
func summarise(p *proxy.Proxy, interval time.Duration, stop <-chan struct{}) {
	t := time.NewTicker(interval)
	defer t.Stop()
	var prev proxy.Summary
	for {
		select {
		case <-t.C:
			prev = p.LogSummary(prev)
		case <-stop:
			return
		}
	}
}

// awaitSignal waits for the first signal (or a listener's failure), then
// keeps serving for delay, not ready, unless a second signal comes.
func awaitSignal(sigs <-chan os.Signal, errc <-chan error, ready *atomic.Bool, delay time.Duration, logger zerolog.Logger, logw *logbuf.Writer) error {
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case sig := <-sigs:
		ready.Store(false) // the pod leaves rotation at once
		logger.Info().Str("signal", sig.String()).Dur("shutdown_delay", delay).Msg("shutting down: not ready; still serving for shutdown_delay")
		_ = logw.Flush()
	}
	if delay <= 0 {
		return nil
	}
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-t.C:
	case sig := <-sigs:
		logger.Info().Str("signal", sig.String()).Msg("second signal: skipping the rest of shutdown_delay")
	}
	return nil
}

// shutdown stops accepting and finishes in-flight requests within
// shutdown_timeout; the admin listener goes last, so /readyz answers 503
// while requests drain.
func (s *servers) shutdown(cfg config.Config, g *wire.Graph, logger zerolog.Logger) error {
	ctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout.D())
	defer cancel()
	err := s.proxy.Shutdown(ctx)
	if err != nil {
		// Requests still running past shutdown_timeout: cut their
		// connections so that they end now, and wait (briefly) for their
		// handlers, so that each still gets its access-log line.
		logger.Warn().Dur("shutdown_timeout", cfg.ShutdownTimeout.D()).Msg("shutdown_timeout passed: closing the connections of requests still running")
		_ = s.proxy.Close()
		grace, cancelGrace := context.WithTimeout(context.Background(), closeGrace)
		_ = s.conns.wait(grace)
		cancelGrace()
	}
	if s.hooks != nil {
		err = errors.Join(err, s.hooks.Shutdown(ctx))
	}
	return errors.Join(err, g.Proxy.Wait(ctx), g.Budget.Wait(ctx), s.admin.Shutdown(ctx))
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
