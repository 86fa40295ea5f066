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
	"strings"
	"syscall"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/config"
	"cacheproxy/internal/logbuf"
	"cacheproxy/internal/proxy"

	"github.com/rs/zerolog"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
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
	var sets setFlags
	fs.Var(&sets, "set", "override one config key, `key=value` (repeatable), e.g. -set cache.ttl=10s")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: cacheproxy [-config FILE] [-set key=value ...]\n\nFlags:\n")
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
	cfg, err := config.Load(*configPath, os.Environ(), sets)
	if err != nil {
		return err
	}
	level, _ := zerolog.ParseLevel(cfg.Log.Level)
	logw := logbuf.New(stdout, int(cfg.Log.Buffer))
	stopFlush, flushed := make(chan struct{}), make(chan struct{})
	go func() { logw.Run(cfg.Log.FlushInterval.D(), stopFlush); close(flushed) }()
	defer func() { close(stopFlush); <-flushed }()
	logger := zerolog.New(logw).Level(level).With().Timestamp().Logger()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// The access log stamps its lines itself (once per second, not per line).
	accessLog := zerolog.New(logw).Level(level)
	return serve(ctx, cfg, logger, accessLog, logw)
}

// serve runs the proxy and admin listeners until ctx ends, then shuts down
// gracefully: stop accepting, finish in-flight requests.
func serve(ctx context.Context, cfg config.Config, logger, accessLog zerolog.Logger, logw *logbuf.Writer) error {
	store, err := cache.New(int64(cfg.Cache.MaxBytes), retention(cfg), nil)
	if err != nil {
		return err
	}
	defer store.Close()
	p, err := proxy.New(proxy.Options{Config: cfg, Store: store, Logger: accessLog, KeySecret: []byte(cfg.Cache.KeySecret)})
	if err != nil {
		return err
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
	srv := &http.Server{
		Handler:           p,
		ReadHeaderTimeout: cfg.Server.ReadHeaderTimeout.D(),
		IdleTimeout:       cfg.Server.IdleTimeout.D(),
		MaxHeaderBytes:    int(cfg.Server.MaxHeaderBytes),
		ErrorLog:          newStdLog(logger, "http"),
	}
	admin := &http.Server{
		Handler:           adminMux(),
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       cfg.Server.IdleTimeout.D(),
		ErrorLog:          newStdLog(logger, "admin"),
	}
	// Shutdown runs this once the listener is closed.
	srv.RegisterOnShutdown(func() {
		logger.Info().Msg("no longer accepting; finishing in-flight requests")
		_ = logw.Flush()
	})
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(ln) }()
	go func() { errc <- admin.Serve(adminLn) }()
	logger.Info().Str("listen", ln.Addr().String()).Str("admin_listen", adminLn.Addr().String()).
		Str("conversations", cfg.Upstreams.Conversations.URL).Str("proxy", cfg.Upstreams.Proxy.URL).Msg("cacheproxy started")
	_ = logw.Flush() // tooling waits for this line

	go func() {
		t := time.NewTicker(cfg.Log.SummaryInterval.D())
		defer t.Stop()
		var prev proxy.Summary
		for {
			select {
			case <-t.C:
				prev = p.LogSummary(prev)
			case <-ctx.Done():
				return
			}
		}
	}()
	select {
	case <-ctx.Done():
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	}
	logger.Info().Msg("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout.D())
	defer cancel()
	err = errors.Join(srv.Shutdown(sctx), admin.Shutdown(sctx), p.Wait(sctx))
	if err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	logger.Info().Msg("stopped")
	return nil
}

// retention is the longest an entry can outlive the invalidation of its
// scope: its lifetime plus the slowest fetch.
func retention(cfg config.Config) time.Duration {
	return max(cfg.Cache.TTL.D(), cfg.Cache.NegativeTTL.D()) + max(cfg.Cache.StaleIfError.D(), cfg.Cache.StaleWhileRevalidate.D()) +
		max(cfg.Upstreams.Conversations.Timeout.D(), cfg.Upstreams.Proxy.Timeout.D()) + time.Minute
}

func adminMux() *http.ServeMux {
	mux := http.NewServeMux()
	ok := func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		_, _ = io.WriteString(w, "ok\n")
	}
	mux.HandleFunc("GET /healthz", ok)
	mux.HandleFunc("GET /readyz", ok)
	return mux
}
