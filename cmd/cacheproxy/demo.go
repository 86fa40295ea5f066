package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"cacheproxy/internal/config"
	"cacheproxy/internal/twiliofake"
)

// Demo credentials: they exist only in the built-in upstream. The token
// is alphanumeric, as Twilio's are: twilio-go refuses others (ApiError
// 21224, "Invalid Password. Illegal chars").
var (
	demoAccount = twiliofake.SID("AC", 1)
	demoToken   = "demotoken0123456789abcdef0123456"
)

// startDemo runs the built-in Twilio-like upstream on loopback, points both
// upstreams of cfg at it, and arranges (through onListen) for two curl
// commands to be printed once the proxy listens.
func startDemo(cfg *config.Config, out io.Writer, onListen *func(string)) (stop func(), err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("demo upstream: %w", err)
	}
	srv := &http.Server{Handler: twiliofake.Seeded(demoAccount, demoToken, 100), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	url := "http://" + ln.Addr().String()
	cfg.Upstreams.Conversations.URL, cfg.Upstreams.Proxy.URL = url, url
	*onListen = func(addr string) {
		cmd := fmt.Sprintf("curl -si -u %s:%s http://%s%s", demoAccount, demoToken, addr, twiliofake.SeededPaths(1)[0])
		fmt.Fprintf(out, "\ncacheproxy demo: a built-in Twilio-like upstream runs at %s.\n"+
			"Run this twice: the first answer says \"Cache-Status: cacheproxy; fwd=uri-miss; stored\", the second \"cacheproxy; hit\".\n\n"+
			"  %s\n  %s\n\n", url, cmd, cmd)
	}
	return func() { srv.Close() }, nil
}
