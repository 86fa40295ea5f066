package main

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/sha1"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"cacheproxy/internal/config"
	"cacheproxy/internal/redistest"
	"cacheproxy/internal/twiliofake"
)

var binary string

// TestMain builds the real binary once; the tests run it as a process.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "cacheproxy-bin")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "cacheproxy")
	// -buildvcs=auto: stamp the checkout's revision (-version) even where
	// GOFLAGS says -buildvcs=false.
	if out, err := exec.Command("go", "build", "-buildvcs=auto", "-o", binary, ".").CombinedOutput(); err != nil {
		panic("go build: " + err.Error() + "\n" + string(out))
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

var (
	acct  = twiliofake.SID("AC", 1)
	token = "binaryTestTokenSECRETxxxxxxxxxxx"
	conv  = twiliofake.SID("CH", 1)
	mb    = twiliofake.SID("MB", 1)
	path  = "/v1/Conversations/" + conv + "/Participants/" + mb
)

func auth() string { return "Basic " + base64.StdEncoding.EncodeToString([]byte(acct+":"+token)) }

// proc is a running cacheproxy with its log lines.
type proc struct {
	cmd    *exec.Cmd
	addr   string
	admin  string
	mu     sync.Mutex
	lines  []string
	stderr strings.Builder
	events chan string // log messages as they arrive
	done   chan error
}

func (p *proc) logs() string { p.mu.Lock(); defer p.mu.Unlock(); return strings.Join(p.lines, "\n") }

// start runs the binary with a config file and waits for its start line.
func start(t *testing.T, config string, env ...string) *proc {
	t.Helper()
	cfg := filepath.Join(t.TempDir(), "cacheproxy.toml")
	if err := os.WriteFile(cfg, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: exec.Command(binary, "-config", cfg), events: make(chan string, 100), done: make(chan error, 1)}
	// The runtime's own settings are main's to choose unless a test says.
	p.cmd.Env = append(slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "GOGC=") || strings.HasPrefix(kv, "GOMEMLIMIT=")
	}), env...)
	p.cmd.Stderr = &p.stderr
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	started := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.lines = append(p.lines, line)
			p.mu.Unlock()
			var m map[string]any
			if json.Unmarshal([]byte(line), &m) == nil {
				msg, _ := m["message"].(string)
				if msg == "cacheproxy started" {
					p.admin = m["admin_listen"].(string)
					started <- m["listen"].(string)
				}
				select {
				case p.events <- msg:
				default:
				}
			}
		}
		close(p.events)
		p.done <- p.cmd.Wait()
	}()
	t.Cleanup(func() { _ = p.cmd.Process.Kill() })
	select {
	case p.addr = <-started:
	case err := <-p.done:
		t.Fatalf("cacheproxy exited at start: %v\n%s", err, p.stderr.String())
	}
	return p
}

func waitFor(t *testing.T, p *proc, msg string) {
	t.Helper()
	for m := range p.events {
		if m == msg {
			return
		}
	}
	t.Fatalf("no %q log line; process ended: %v\nstderr: %s\nlogs:\n%s", msg, <-p.done, p.stderr.String(), p.logs())
}

func upstreamConfig(url string) string {
	return `listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstreams.conversations]
url = "` + url + `"
[upstreams.proxy]
url = "` + url + `"
`
}

func newFake(t *testing.T) (*twiliofake.Fake, *httptest.Server) {
	f := twiliofake.New(map[string]string{acct: token})
	f.AddConversation(conv, "", "")
	f.AddParticipant(conv, twiliofake.Participant{Sid: mb, Identity: "alice"})
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return f, srv
}

func TestSIGTERMFinishesInFlightRequests(t *testing.T) {
	fake, up := newFake(t)
	arrived, gate := make(chan struct{}, 1), make(chan struct{})
	fake.Before = func(w http.ResponseWriter, r *http.Request) bool { arrived <- struct{}{}; <-gate; return false }
	p := start(t, upstreamConfig(up.URL))

	type result struct {
		status int
		body   string
		err    error
	}
	res := make(chan result, 1)
	go func() {
		req, _ := http.NewRequest("GET", "http://"+p.addr+path, nil)
		req.Header.Set("Authorization", auth())
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			res <- result{err: err}
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		res <- result{status: resp.StatusCode, body: string(b)}
	}()
	<-arrived // the request is in flight, held upstream
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, p, "no longer accepting; finishing in-flight requests")
	// No longer accepting, and no longer ready.
	if c, err := net.Dial("tcp", p.addr); err == nil {
		c.Close()
		t.Fatalf("still accepting connections after SIGTERM")
	}
	if resp, err := http.Get("http://" + p.admin + "/readyz"); err != nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("/readyz while draining: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	close(gate)
	r := <-res
	if r.err != nil || r.status != 200 || !strings.Contains(r.body, mb) {
		t.Fatalf("in-flight request: %+v", r)
	}
	if err := <-p.done; err != nil {
		t.Fatalf("exit after SIGTERM: %v\n%s", err, p.stderr.String())
	}
	if strings.Contains(p.logs(), token) || strings.Contains(p.logs(), auth()) {
		t.Fatalf("process logs hold the credential")
	}
}

// TestShutdownDelayKeepsServingUntilASecondSignal: after SIGTERM /readyz
// is 503 at once but new connections are still accepted and served for
// shutdown_delay (an hour here, so only the second signal can end it);
// a second SIGTERM skips the rest, and the process drains and exits 0,
// logging "no longer accepting" before "stopped".
func TestShutdownDelayKeepsServingUntilASecondSignal(t *testing.T) {
	_, up := newFake(t)
	p := start(t, "shutdown_delay = \"1h\"\n"+upstreamConfig(up.URL))
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, p, "shutting down: not ready; still serving for shutdown_delay")
	if resp, err := http.Get("http://" + p.admin + "/readyz"); err != nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("/readyz during shutdown_delay: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	fresh := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}} // a new connection each time
	for i := 0; i < 3; i++ {
		req, _ := http.NewRequest("GET", "http://"+p.addr+path, nil)
		req.Header.Set("Authorization", auth())
		resp, err := fresh.Do(req)
		if err != nil {
			t.Fatalf("request %d during shutdown_delay: %v", i, err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("request %d during shutdown_delay: %d", i, resp.StatusCode)
		}
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, p, "second signal: skipping the rest of shutdown_delay")
	waitFor(t, p, "no longer accepting; finishing in-flight requests")
	waitFor(t, p, "stopped")
	if err := <-p.done; err != nil {
		t.Fatalf("exit: %v\n%s", err, p.stderr.String())
	}
}

// trickle sends a write whose body stops after its first sent bytes and
// returns the connection: the rest of the body never comes.
func trickle(t *testing.T, addr string, sent int) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	req := "POST /v1/Conversations/" + conv + "/Messages HTTP/1.1\r\nHost: localhost\r\nAuthorization: " + auth() +
		"\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\nBody=" + strings.Repeat("x", sent)
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	return c
}

// accessLine returns the access-log line of the first request with method.
func accessLine(t *testing.T, p *proc, method string) map[string]any {
	t.Helper()
	for _, l := range strings.Split(p.logs(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil && m["message"] == "request" && m["method"] == method {
			return m
		}
	}
	t.Fatalf("no access line for %s:\n%s", method, p.logs())
	return nil
}

// TestATricklingBodyGets408: a body that stops coming is answered 408 in
// Twilio's shape once server.read_timeout passes, and logged.
func TestATricklingBodyGets408(t *testing.T) {
	fake, up := newFake(t)
	fake.Before = func(w http.ResponseWriter, r *http.Request) bool {
		_, _ = io.Copy(io.Discard, r.Body) // Twilio reads the whole form before answering
		return false
	}
	p := start(t, upstreamConfig(up.URL)+"[server]\nread_timeout = \"300ms\"\n")
	c := trickle(t, p.addr, 3)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var e struct {
		Code   int `json:"code"`
		Status int `json:"status"`
	}
	if resp.StatusCode != http.StatusRequestTimeout || json.Unmarshal(b, &e) != nil || e.Code != 20408 {
		t.Fatalf("trickled body: %d %s\n%s", resp.StatusCode, b, p.logs())
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	<-p.done
	if line := accessLine(t, p, "POST"); line["status"] != float64(408) {
		t.Fatalf("access line: %v", line)
	}
}

// TestShutdownLogsTheRequestsItCuts: a request still running when
// shutdown_timeout passes (a body that never completes, with a read
// timeout far away) has its connection closed, and still gets its
// access-log line before the process exits.
func TestShutdownLogsTheRequestsItCuts(t *testing.T) {
	fake, up := newFake(t)
	arrived := make(chan struct{}, 1)
	fake.Before = func(w http.ResponseWriter, r *http.Request) bool {
		select {
		case arrived <- struct{}{}:
		default:
		}
		return false
	}
	p := start(t, "shutdown_timeout = \"300ms\"\n"+upstreamConfig(up.URL)+"[server]\nread_timeout = \"1h\"\n")
	trickle(t, p.addr, 16<<10) // enough to push the head through the proxy's buffers
	<-arrived                  // the proxy is streaming the body upstream
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, p, "shutdown_timeout passed: closing the connections of requests still running")
	err := <-p.done
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("exit: %v (want 1: shutdown did not finish in time)", err)
	}
	if line := accessLine(t, p, "POST"); line["status"] == nil {
		t.Fatalf("access line: %v", line)
	}
}

func TestInvalidConfigExitsNonZeroNamingTheKey(t *testing.T) {
	for name, tc := range map[string]struct {
		config string
		env    []string
		key    string
	}{
		"bad value":                {"[cache]\nttl = \"-1s\"\n", nil, "cache.ttl"},
		"unknown key":              {"[ratelimit]\nrequests_per_sec = 5\n", nil, "ratelimit.requests_per_sec"},
		"bad env":                  {"", []string{"CACHEPROXY_CACHE_MAX_BYTES=huge"}, "cache.max_bytes"},
		"redis without key_secret": {"", []string{"CACHEPROXY_REDIS_URL=redis://127.0.0.1:1"}, "cache.key_secret"},
	} {
		t.Run(name, func(t *testing.T) {
			cfg := filepath.Join(t.TempDir(), "c.toml")
			if err := os.WriteFile(cfg, []byte(tc.config), 0o600); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(binary, "-config", cfg)
			cmd.Env = append(os.Environ(), tc.env...)
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() == 0 || !strings.Contains(string(out), tc.key) {
				t.Fatalf("err %v, output %q; want non-zero exit naming %s", err, out, tc.key)
			}
		})
	}
	out, err := exec.Command(binary, "-config", "/nonexistent.toml").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "nonexistent.toml") {
		t.Fatalf("missing file: %v %q", err, out)
	}
}

// TestKubernetesServiceLinksDoNotStopStartup: a Service named cacheproxy
// puts CACHEPROXY_PORT=tcp://… and friends into every pod; the sidecar
// starts, and one warning names them without their values.
func TestKubernetesServiceLinksDoNotStopStartup(t *testing.T) {
	_, up := newFake(t)
	p := start(t, upstreamConfig(up.URL), "CACHEPROXY_PORT=tcp://10.0.0.1:8080", "CACHEPROXY_SERVICE_HOST=10.0.0.99",
		"CACHEPROXY_PORT_8080_TCP_ADDR=10.0.0.98")
	var warning map[string]any
	for _, l := range strings.Split(p.logs(), "\n") {
		if strings.Contains(l, "ignoring environment") {
			_ = json.Unmarshal([]byte(l), &warning)
		}
	}
	vars := fmt.Sprint(warning["variables"])
	if warning["level"] != "warn" || !strings.Contains(vars, "CACHEPROXY_SERVICE_HOST") || !strings.Contains(vars, "CACHEPROXY_PORT_8080_TCP_ADDR") {
		t.Fatalf("warning: %v\nlogs:\n%s", warning, p.logs())
	}
	if strings.Contains(p.logs(), "10.0.0.9") {
		t.Fatalf("a variable's value reached the log:\n%s", p.logs())
	}
}

func TestHelpListsEveryKey(t *testing.T) {
	out, err := exec.Command(binary, "-help").CombinedOutput()
	if err != nil {
		t.Fatalf("-help: %v", err)
	}
	for _, k := range []string{"-config", "-set", "cache.ttl", "CACHEPROXY_CACHE_TTL", "ratelimit.max_wait", "upstreams.proxy.url"} {
		if !strings.Contains(string(out), k) {
			t.Errorf("-help lacks %s", k)
		}
	}
}

func TestServerHeaderLimits(t *testing.T) {
	_, up := newFake(t)
	p := start(t, upstreamConfig(up.URL)+"[server]\nread_header_timeout = \"200ms\"\nmax_header_bytes = \"4KiB\"\n")

	// A client that never finishes its headers is cut off.
	c, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: x\r\n")
	c.SetReadDeadline(time.Now().Add(30 * time.Second)) // a safety net, not the assertion
	b, err := io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection with unfinished headers was kept open")
	}
	if len(b) > 0 && !strings.Contains(string(b), "408") {
		t.Fatalf("unexpected answer to a slow client: %q", b)
	}

	// Oversized headers get 431.
	req, _ := http.NewRequest("GET", "http://"+p.addr+path, nil)
	req.Header.Set("X-Big", strings.Repeat("a", 64<<10))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("big headers: %d", resp.StatusCode)
	}
}

func TestAdminEndpoints(t *testing.T) {
	_, up := newFake(t)
	p := start(t, upstreamConfig(up.URL))
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + p.admin + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, ep := range []string{"/healthz", "/readyz"} {
		if s, _ := get(ep); s != 200 {
			t.Fatalf("%s: %d", ep, s)
		}
	}
	// Two reads: a miss, then a hit; then the metrics say so.
	for i := 0; i < 2; i++ {
		req, _ := http.NewRequest("GET", "http://"+p.addr+path, nil)
		req.Header.Set("Authorization", auth())
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	s, body := get("/metrics")
	for _, want := range []string{
		`cacheproxy_requests_total{cache="hit",route="conversations.v1.participant"} 1`,
		`cacheproxy_requests_total{cache="miss",route="conversations.v1.participant"} 1`,
		`cacheproxy_upstream_requests_total{status="200",upstream="conversations"} 1`,
		"cacheproxy_upstream_latency_seconds_bucket", "cacheproxy_queue_wait_seconds_bucket",
		"cacheproxy_coalesced_requests_total 0", "cacheproxy_rejections_total 0", "cacheproxy_retries_total 0",
		"cacheproxy_cache_entries 1", "cacheproxy_cache_bytes", "cacheproxy_cache_evictions_total",
		"go_goroutines", "process_resident_memory_bytes",
		// The account's budget, by account SID: slow start's cap (a
		// quarter of max_concurrent 25), nothing in flight or waiting.
		`cacheproxy_budget_concurrency_cap{account="` + acct + `"} 7`, `cacheproxy_budget_in_flight{account="` + acct + `"} 0`,
		`cacheproxy_budget_queued{account="` + acct + `"} 0`, `cacheproxy_budget_rate_limit{account="` + acct + `"} 0`,
		`cacheproxy_budget_learned_keys{account="` + acct + `"} 0`,
		// The GC settings main makes when GOGC and GOMEMLIMIT are unset.
		fmt.Sprintf("go_gc_gogc_percent %d\n", gcPercent),
		fmt.Sprintf("go_gc_gomemlimit_bytes %g\n", float64(64<<20+memoryOverhead)),
	} {
		if s != 200 || !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if strings.Contains(body, token) {
		t.Fatal("metrics hold the token")
	}
	// -healthcheck probes the admin listener of its configuration.
	if out, err := exec.Command(binary, "-healthcheck", "-set", "admin_listen="+p.admin).CombinedOutput(); err != nil {
		t.Fatalf("-healthcheck against a healthy proxy: %v %s", err, out)
	}
	if err := exec.Command(binary, "-healthcheck", "-set", "admin_listen="+deadAddr(t)).Run(); err == nil {
		t.Fatal("-healthcheck against nothing succeeded")
	}
}

func deadAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func TestVersion(t *testing.T) {
	out, err := exec.Command(binary, "-version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "cacheproxy ") || !strings.Contains(string(out), "go1.") {
		t.Fatalf("-version: %v %q", err, out)
	}
}

// The console format prints every line: the log's buffer flushes
// batches, and each of its lines reaches the console on its own, those
// written through zerolog's events (an error's) and those written
// directly (a read's).
func TestConsoleLogFormat(t *testing.T) {
	_, up := newFake(t)
	cmd := exec.Command(binary, "-set", "log.format=console", "-set", "listen=127.0.0.1:0", "-set", "admin_listen=127.0.0.1:0",
		"-set", "upstreams.conversations.url="+up.URL)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	r := bufio.NewReader(out)
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	if strings.HasPrefix(line, "{") || !strings.Contains(line, "cacheproxy started") || !strings.Contains(line, "INF") {
		t.Fatalf("console line: %q", line)
	}
	addr := regexp.MustCompile(`[ m]listen=(?:\x1b\[0m)?(127\.0\.0\.1:[0-9]+)`).FindStringSubmatch(line)
	if addr == nil {
		t.Fatalf("no listen address in %q", line)
	}
	const n = 5
	for _, p := range []string{"/nowhere", path} {
		for range n { // unrouted, with an error; a miss, then hits
			req, _ := http.NewRequest("GET", "http://"+addr[1]+p, nil)
			req.Header.Set("Authorization", auth())
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
		}
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	rest, _ := io.ReadAll(r)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit: %v\n%s", err, rest)
	}
	text := regexp.MustCompile("\x1b\\[[0-9;]*m").ReplaceAllString(string(rest), "")
	if errs, reads := strings.Count(text, "no Twilio API route"), strings.Count(text, "route=conversations.v1.participant"); errs != n || reads != n {
		t.Fatalf("%d and %d access lines of %d unrouted requests and %d reads:\n%s", errs, reads, n, n, text)
	}
}

func TestDemoShowsAMissThenAHit(t *testing.T) {
	curls := demoCurls(t, 2)
	for i, want := range []string{"cacheproxy; fwd=uri-miss; stored", "cacheproxy; hit; ttl="} {
		req, _ := http.NewRequest("GET", curls[i].url.String(), nil)
		req.SetBasicAuth(curls[i].user, curls[i].pass)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Cache-Status"), want) {
			t.Fatalf("curl %d: %d %q, want %q", i+1, resp.StatusCode, resp.Header.Get("Cache-Status"), want)
		}
	}
}

// TestEveryFlagAndKeyIsDocumented keeps -help, the README's flags and
// docs/configuration.md's keys complete.
func TestEveryFlagAndKeyIsDocumented(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	reference, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	help, _ := exec.Command(binary, "-help").CombinedOutput()
	for _, f := range []string{"-config", "-set", "-demo", "-version", "-healthcheck"} {
		if !strings.Contains(string(readme), "`"+f) || !strings.Contains(string(help), f) {
			t.Errorf("flag %s is not documented in the README and -help", f)
		}
	}
	for _, k := range config.Keys() {
		if !strings.Contains(string(reference), "`"+k+"`") || !strings.Contains(string(help), k) {
			t.Errorf("key %s is not documented in docs/configuration.md and -help", k)
		}
	}
}

// fleetOfTwo starts two cacheproxy processes with env (a shared Redis) in
// front of one fake upstream, waits until both hear the fleet, and checks
// that a read through the first is answered by the second from Redis with
// one upstream call.
func fleetOfTwo(t *testing.T, env []string) (a, b *proc) {
	t.Helper()
	fake, up := newFake(t)
	a, b = start(t, upstreamConfig(up.URL), env...), start(t, upstreamConfig(up.URL), env...)
	for _, p := range []*proc{a, b} {
		waitFor(t, p, "connected to Redis: sharing entries and invalidations")
	}
	if cs := cacheStatus(t, a); !strings.HasPrefix(cs, "cacheproxy; fwd=uri-miss") {
		t.Fatalf("A: %q", cs)
	}
	if cs := cacheStatus(t, b); !strings.HasSuffix(cs, "detail=l2") {
		t.Fatalf("B: %q, want an answer from L2", cs)
	}
	if n := fake.Calls("GET", path); n != 1 {
		t.Fatalf("upstream calls %d, want 1", n)
	}
	return a, b
}

// cacheStatus reads the participant through p and returns its Cache-Status.
func cacheStatus(t *testing.T, p *proc) string {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+p.addr+path, nil)
	req.Header.Set("Authorization", auth())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.Header.Get("Cache-Status")
}

// write updates the participant's attributes through p.
func write(t *testing.T, p *proc, attrs string) {
	t.Helper()
	req, _ := http.NewRequest("POST", "http://"+p.addr+path, strings.NewReader(url.Values{"Attributes": {attrs}}.Encode()))
	req.Header.Set("Authorization", auth())
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("write through %s: %v %v", p.addr, resp, err)
	}
	resp.Body.Close()
}

// read reads the participant through p: its Cache-Status and body.
func read(t *testing.T, p *proc) (string, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+p.addr+path, nil)
	req.Header.Set("Authorization", auth())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.Header.Get("Cache-Status"), string(body)
}

// TestFleetReaderPausedPastTheWait: replica B is stopped (SIGSTOP) across
// a write through A for twice redis.invalidation_wait; the first read
// through B after SIGCONT returns the write's data, never B's own older
// copy (B hears its own heartbeats back late, so it trusts nothing in its
// memory until its stream is current). Five rounds.
func TestFleetReaderPausedPastTheWait(t *testing.T) {
	srv := redistest.Start(t)
	a, b := fleetOfTwo(t, []string{"CACHEPROXY_REDIS_URL=" + srv.URL(), "CACHEPROXY_CACHE_KEY_SECRET=fleet-secret-0123456789",
		"CACHEPROXY_REDIS_INVALIDATION_WAIT=100ms"})
	for round := 1; round <= 5; round++ {
		deadline := time.Now().Add(30 * time.Second)
		for cs, _ := read(t, b); !strings.HasPrefix(cs, "cacheproxy; hit") || strings.HasSuffix(cs, "detail=l2"); cs, _ = read(t, b) {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: B never answered from its own memory: %q", round, cs)
			}
		}
		if err := b.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		want := `{"v":` + strconv.Itoa(round) + `}`
		write(t, a, want)
		time.Sleep(200 * time.Millisecond) // the fault: B stays stopped past the wait
		if err := b.cmd.Process.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		if cs, body := read(t, b); !strings.Contains(body, strings.ReplaceAll(want, `"`, `\"`)) {
			t.Fatalf("round %d: B after its pause: %q %s, want %s", round, cs, body, want)
		}
	}
}

// webhookAddr is where p listens for Twilio's webhooks.
func webhookAddr(t *testing.T, p *proc) string {
	t.Helper()
	for _, l := range strings.Split(p.logs(), "\n") {
		var line map[string]any
		if json.Unmarshal([]byte(l), &line) == nil && line["message"] == "listening for Twilio's webhooks" {
			if addr, _ := line["webhooks_listen"].(string); addr != "" {
				return addr
			}
		}
	}
	t.Fatalf("no webhook listener line:\n%s", p.logs())
	return ""
}

// twilioSignature is Twilio's X-Twilio-Signature of a form POST to u:
// base64 of HMAC-SHA1 under the auth token of the URL followed by each
// parameter's name and value, sorted by name.
func twilioSignature(token, u string, form url.Values) string {
	keys := make([]string, 0, len(form))
	for k := range form {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	m := hmac.New(sha1.New, []byte(token))
	m.Write([]byte(u))
	for _, k := range keys {
		m.Write([]byte(k + form.Get(k)))
	}
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// peakRSS is a process's peak resident memory (VmHWM), in MiB.
func peakRSS(t *testing.T, pid int) int {
	t.Helper()
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(raw), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, _ := strconv.Atoi(f[1])
			return kb / 1024
		}
	}
	t.Fatal("no VmHWM")
	return 0
}

// Hostile input, point 1: the webhook port is the one that faces the
// internet. 1000 connections each declare a 1 MiB form body and send all
// of it but its last byte, and 200 more send a chunked body slowly and
// hold it; meanwhile a correctly signed webhook gets its 204, and the
// process's peak resident memory stays within 300 MiB (before: every body
// was read whole first, 1196 MiB for the first thousand).
func TestWebhookFloodStaysSmall(t *testing.T) {
	const hookToken = "hook-token-flood-0123456789abcdef"
	_, up := newFake(t)
	p := start(t, upstreamConfig(up.URL), "CACHEPROXY_WEBHOOKS_LISTEN=127.0.0.1:0", "CACHEPROXY_WEBHOOKS_PUBLIC_URL=https://hooks.example.com",
		"CACHEPROXY_WEBHOOKS_AUTH_TOKENS="+hookToken)
	addr := webhookAddr(t, p)
	body := bytes.Repeat([]byte("a"), 1<<20)
	hold := make(chan struct{})
	var sent sync.WaitGroup
	var conns []net.Conn
	defer func() {
		close(hold)
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := range 1200 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		sent.Add(1)
		go func() {
			defer sent.Done()
			if i < 1000 {
				fmt.Fprintf(c, "POST /webhooks/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n", len(body))
				_, _ = c.Write(body[:len(body)-1]) // fails once the server has refused it: that is the point
				return
			}
			fmt.Fprintf(c, "POST /webhooks/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n", 32<<10, body[:32<<10])
		}()
	}
	sent.Wait()
	form := url.Values{"EventType": {"onParticipantUpdated"}, "ConversationSid": {conv}, "ParticipantSid": {mb}}
	req, _ := http.NewRequest("POST", "http://"+addr+"/webhooks/conversations", strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("X-Twilio-Signature", twilioSignature(hookToken, "https://hooks.example.com/webhooks/conversations", form))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("a signed webhook during the flood: %d, want 204", resp.StatusCode)
	}
	rss := peakRSS(t, p.cmd.Process.Pid)
	t.Logf("peak resident memory under the flood: %d MiB", rss)
	if rss > 300 {
		t.Fatalf("peak resident memory %d MiB, want at most 300", rss)
	}
}

// readyz is the status of p's /readyz.
func readyz(t *testing.T, p *proc) int {
	t.Helper()
	resp, err := http.Get("http://" + p.admin + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestReadyOnlyOnceTrusted: with redis.url set, /readyz is 503 while the
// replica cannot hear the fleet's invalidations (Redis unreachable: for
// good), and turns 200 once it does and every writer counts it.
func TestReadyOnlyOnceTrusted(t *testing.T) {
	_, up := newFake(t)
	secret := "CACHEPROXY_CACHE_KEY_SECRET=fleet-secret-0123456789"
	dead := start(t, upstreamConfig(up.URL), "CACHEPROXY_REDIS_URL=redis://"+deadAddr(t), secret)
	srv := redistest.Start(t)
	live := start(t, upstreamConfig(up.URL), "CACHEPROXY_REDIS_URL="+srv.URL(), secret)
	if s := readyz(t, live); s != http.StatusServiceUnavailable {
		t.Fatalf("/readyz at start: %d, want 503 until the replica is trusted", s)
	}
	deadline := time.Now().Add(30 * time.Second)
	for readyz(t, live) != http.StatusOK {
		if time.Now().After(deadline) {
			t.Fatal("/readyz never 200 with Redis up")
		}
		time.Sleep(10 * time.Millisecond) // the process's own progress
	}
	if s := readyz(t, dead); s != http.StatusServiceUnavailable {
		t.Fatalf("/readyz without Redis: %d, want 503", s)
	}
	if m := scrape(t, live); !strings.Contains(m, "cacheproxy_fleet_trusted 1") || !strings.Contains(m, "cacheproxy_fleet_stream_lapses_total 0") {
		t.Fatal("/metrics lacks cacheproxy_fleet_trusted 1 or cacheproxy_fleet_stream_lapses_total 0")
	}
}

// noSecretsLogged fails if a process's output holds any of secrets.
func noSecretsLogged(t *testing.T, procs []*proc, secrets ...string) {
	t.Helper()
	for _, p := range procs {
		for _, s := range secrets {
			if strings.Contains(p.logs()+p.stderr.String(), s) {
				t.Fatal("a log holds a secret (a password, key secret or auth token)")
			}
		}
	}
}

// TestFleetOfTwoBinaries: two cacheproxy processes share entries through a
// password-protected redis-server, and a write through one reaches the
// other's copy; the password and the key secret are never logged.
func TestFleetOfTwoBinaries(t *testing.T) {
	const password, secret, previous = "redis-pass-0123456789", "fleet-secret-0123456789", "old-fleet-secret-987654321"
	srv := redistest.Start(t, "--requirepass", password)
	a, b := fleetOfTwo(t, []string{"CACHEPROXY_REDIS_URL=redis://:" + password + "@" + srv.Addr, "CACHEPROXY_CACHE_KEY_SECRET=" + secret,
		"CACHEPROXY_CACHE_PREVIOUS_KEY_SECRETS=" + previous, "CACHEPROXY_LOG_SUMMARY_INTERVAL=100ms"})
	// A write through B reaches A's copy before B answers it.
	write(t, b, `{"v":2}`)
	if cs := cacheStatus(t, a); !strings.HasPrefix(cs, "cacheproxy; fwd=uri-miss") {
		t.Fatalf("A after B's write: %q, want a miss", cs)
	}
	metrics := scrape(t, a)
	for _, want := range []string{"cacheproxy_redis_up 1", "cacheproxy_fleet_invalidations_received_total 1", "cacheproxy_l2_hits_total 0",
		"cacheproxy_l2_latency_seconds_count 2", "cacheproxy_fleet_replicas ", "cacheproxy_fleet_budget_waits_total 0", "cacheproxy_fleet_claims_won_total 2"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("A's /metrics lacks %q", want)
		}
	}
	// The summary line carries the fleet's state and totals.
	var summary string
	for range 50 { // summaries every 100ms; the first may predate the write
		waitFor(t, a, "summary")
		for _, l := range strings.Split(a.logs(), "\n") {
			if strings.Contains(l, `"message":"summary"`) {
				summary = l
			}
		}
		if strings.Contains(summary, `"invalidations_received_total":1`) {
			break
		}
	}
	for _, want := range []string{`"redis_up":true`, `"invalidations_received_total":1`, `"l2_hits":`, `"claims_won":`, `"budget_fallbacks_total":0`} {
		if !strings.Contains(summary, want) {
			t.Errorf("summary line lacks %s: %s", want, summary)
		}
	}
	noSecretsLogged(t, []*proc{a, b}, password, secret, previous)
}

// TestFleetOverTLSWithAnACLUser: the fleet over rediss:// to a
// redis-server that accepts only TLS (its certificate signed by a CA the
// processes trust through SSL_CERT_FILE) and only an ACL user.
func TestFleetOverTLSWithAnACLUser(t *testing.T) {
	const user, password, secret = "cacheproxy", "acl-pass-0123456789", "fleet-secret-0123456789"
	srv, caFile := redistest.StartTLS(t, "--user", "default", "off", "--user", user, "on", ">"+password, "~cacheproxy:*", "&cacheproxy:*", "+@all")
	a, b := fleetOfTwo(t, []string{"CACHEPROXY_REDIS_URL=rediss://" + user + ":" + password + "@" + srv.Addr,
		"CACHEPROXY_CACHE_KEY_SECRET=" + secret, "SSL_CERT_FILE=" + caFile})
	noSecretsLogged(t, []*proc{a, b}, password, secret)
}

// TestWebhookListenerServesOnlyWebhooks: with webhooks.listen set, the
// binary serves Twilio's webhook endpoints there (an unsigned request gets
// 403 in Twilio's error shape), never the proxy; the tokens are not logged.
func TestWebhookListenerServesOnlyWebhooks(t *testing.T) {
	const token1, token2 = "hook-token-one-0123456789abcdef", "hook-token-two-0123456789abcdef"
	_, up := newFake(t)
	p := start(t, upstreamConfig(up.URL), "CACHEPROXY_WEBHOOKS_LISTEN=127.0.0.1:0", "CACHEPROXY_WEBHOOKS_PUBLIC_URL=https://hooks.example.com",
		"CACHEPROXY_WEBHOOKS_AUTH_TOKENS="+token1+","+token2)
	addr := webhookAddr(t, p)
	resp, err := http.Post("http://"+addr+"/webhooks/conversations", "application/x-www-form-urlencoded", strings.NewReader("EventType=onParticipantUpdated"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 403 || !strings.Contains(string(body), `"code":20403`) {
		t.Fatalf("unsigned webhook: %d %s", resp.StatusCode, body)
	}
	req, _ := http.NewRequest("GET", "http://"+addr+path, nil)
	req.Header.Set("Authorization", auth())
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Fatalf("a proxy read on the webhook listener: %d, want 404", resp.StatusCode)
	}
	metrics := scrape(t, p)
	for _, want := range []string{`cacheproxy_webhooks_total{outcome="rejected",source="conversations"} 1`, `cacheproxy_webhooks_total{outcome="rejected",source="unknown"} 1`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	noSecretsLogged(t, []*proc{p}, token1, token2)
}

// scrape returns p's /metrics.
func scrape(t *testing.T, p *proc) string {
	t.Helper()
	resp, err := http.Get("http://" + p.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// The binary's page URLs name its listen address, or a name in
// public_hosts, never a Host a client made up.
func TestPageURLsNameTheListenAddress(t *testing.T) {
	f, up := newFake(t)
	f.AddParticipant(conv, twiliofake.Participant{Sid: twiliofake.SID("MB", 2), Identity: "bob"})
	p := start(t, "public_hosts = [\"sidecar.internal:8080\"]\n"+upstreamConfig(up.URL))
	for host, want := range map[string]string{"evil.example.com": p.addr, "sidecar.internal:8080": "sidecar.internal:8080", p.addr: p.addr} {
		req, _ := http.NewRequest("GET", "http://"+p.addr+"/v1/Conversations/"+conv+"/Participants?PageSize=1", nil)
		req.Host = host
		req.Header.Set("Authorization", auth())
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var page struct {
			Meta struct {
				Next string `json:"next_page_url"`
			} `json:"meta"`
		}
		err = json.NewDecoder(resp.Body).Decode(&page)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 || !strings.HasPrefix(page.Meta.Next, "http://"+want+"/v1/Conversations/") {
			t.Fatalf("Host %q: %d, next_page_url %q, want it on %s (%v)", host, resp.StatusCode, page.Meta.Next, want, err)
		}
	}
}
