package proxy

import (
	"bytes"
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/clock"
	"cacheproxy/internal/config"
	"cacheproxy/internal/connwatch"
	"cacheproxy/internal/fleet"
	"cacheproxy/internal/invalidation"
	"cacheproxy/internal/ratelimit"
	"cacheproxy/internal/route"
	"cacheproxy/internal/tier/memtier"
	"cacheproxy/internal/twiliofake"

	"github.com/rs/zerolog"
	"golang.org/x/sync/singleflight"
)

// Test accounts: A and B are real, and their tokens must never be logged.
var (
	acctA  = twiliofake.SID("AC", 0xa)
	tokenA = "tokenAAAAsecretAAAAAAAAAAAAAAAAA"
	acctB  = twiliofake.SID("AC", 0xb)
	tokenB = "tokenBBBBsecretBBBBBBBBBBBBBBBBB"
)

func basic(user, pass string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
}

// Seeded ids.
var (
	conv1   = twiliofake.SID("CH", 1)
	member1 = twiliofake.SID("MB", 1)
	isvc    = twiliofake.SID("IS", 1)
	conv2   = twiliofake.SID("CH", 2) // in service isvc
	member2 = twiliofake.SID("MB", 2)
	ksvc    = twiliofake.SID("KS", 1)
	sess1   = twiliofake.SID("KC", 1)
	kp1     = twiliofake.SID("KP", 1)
	v2conv  = "conv_conversation_00000000000000000000000001"
	v2part  = "conv_participant_00000000000000000000000001"
)

var (
	pathConv  = "/v1/Conversations/" + conv1 + "/Participants/" + member1
	pathSvc   = "/v1/Services/" + isvc + "/Conversations/" + conv2 + "/Participants/" + member2
	pathProxy = "/v1/Services/" + ksvc + "/Sessions/" + sess1 + "/Participants/" + kp1
	pathV2    = "/v2/Conversations/" + v2conv + "/Participants/" + v2part
)

// syncBuffer collects log lines from concurrent goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string { b.mu.Lock(); defer b.mu.Unlock(); return b.buf.String() }

// lines returns the JSON log lines.
func (b *syncBuffer) lines(t testing.TB) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(b.String()), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line is not JSON: %q", l)
		}
		out = append(out, m)
	}
	return out
}

// countingFlights wraps singleflight and reports each DoChan call, so a test
// knows when N readers are all waiting.
type countingFlights struct {
	g      singleflight.Group
	joined chan string
}

func (c *countingFlights) DoChan(key string, fn func() (any, error)) <-chan singleflight.Result {
	ch := c.g.DoChan(key, fn)
	c.joined <- key
	return ch
}

type harness struct {
	t          testing.TB
	conv, prox *twiliofake.Fake
	convSrv    *httptest.Server
	proxSrv    *httptest.Server
	p          *Proxy
	srv        *httptest.Server
	writes     *connwatch.Watch // bounds the writes of srv's connections; nil: each response sets a deadline
	store      *cache.Store
	lim        *ratelimit.Limiter
	// clk drives the proxy, the cache and the invalidator; budgetClk the
	// limiter when a test asks for it (budgetOnFakeClock), else the
	// limiter runs on the real clock, where the harness's budget never
	// makes anyone wait.
	clk, budgetClk *clock.Fake
	logs           *syncBuffer
	cfg            config.Config
	inv            *fleet.Invalidator // with L2
	invalidator    Invalidator        // the proxy's, whichever
	budget         *fleet.Slots       // with L2: the fleet's slots
	fleet          *fleet.Fleet       // with L2
	member         *memtier.Replica   // with the in-memory L2
}

// setup is what a harness option may change before the proxy is built.
type setup struct {
	cfg               config.Config
	opts              Options
	budgetOnFakeClock bool
	fleetURL          string        // the replica's L2's Redis, if any
	previous          [][]byte      // its cache.previous_key_secrets
	redisTimeout      time.Duration // L2's redis.timeout; 0: 1 s
	invalidationWait  time.Duration // redis.invalidation_wait; 0: 5 s
	writeHold         time.Duration // how long a write's intent is pending without its end; 0: fleet.ClaimHold
	hub               *memtier.Hub  // the in-memory L2, if any
	// unwatched serves without a connwatch.Watch, as an HTTP/2
	// connection is: each response sets its own write deadline.
	unwatched bool
}

type harnessOpt func(*setup)

// newHarness starts two fake upstreams (Conversations and Proxy), seeds
// them, and puts a Proxy in front in a test server.
func newHarness(t testing.TB, opts ...harnessOpt) *harness {
	t.Helper()
	accounts := map[string]string{acctA: tokenA, acctB: tokenB}
	start := time.Now()
	h := &harness{t: t, conv: twiliofake.New(accounts), prox: twiliofake.New(accounts),
		clk: clock.NewFake(start), budgetClk: clock.NewFake(start), logs: &syncBuffer{}}
	h.conv.AddConversation(conv1, "support-room", "")
	h.conv.AddParticipant(conv1, twiliofake.Participant{Sid: member1, Identity: "alice@example.com", Attributes: `{"v":0}`})
	h.conv.AddConversation(conv2, "", isvc)
	h.conv.AddParticipant(conv2, twiliofake.Participant{Sid: member2, Identity: "bob", Attributes: `{"v":0}`})
	h.conv.AddConversation(v2conv, "", "")
	h.conv.AddParticipant(v2conv, twiliofake.Participant{Sid: v2part, Attributes: "Dana"})
	h.prox.AddConversation(sess1, "", ksvc)
	h.prox.AddParticipant(sess1, twiliofake.Participant{Sid: kp1, Identity: "+15005550001", Attributes: "Alice"})
	h.convSrv = httptest.NewServer(h.conv)
	h.proxSrv = httptest.NewServer(h.prox)
	t.Cleanup(h.convSrv.Close)
	t.Cleanup(h.proxSrv.Close)

	s := &setup{cfg: config.Default()}
	s.cfg.Upstreams.Conversations.URL = h.convSrv.URL
	s.cfg.Upstreams.Proxy.URL = h.proxSrv.URL
	// Pacing is tested on its own; elsewhere it must not slow tests down.
	s.cfg.RateLimit.RequestsPerSecond, s.cfg.RateLimit.MaxConcurrent = 0, 10_000
	s.opts = Options{Clock: h.clk, Logger: zerolog.New(h.logs).Level(zerolog.DebugLevel), KeySecret: []byte("test-secret")}
	for _, opt := range opts {
		opt(s)
	}
	h.cfg = s.cfg
	store, err := cache.New(int64(s.cfg.Cache.MaxBytes), h.clk)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	var budgetClock clock.Clock = clock.Real{}
	if s.budgetOnFakeClock {
		budgetClock = h.budgetClk
		// Let the limiter's window timers fire and exit.
		t.Cleanup(func() { h.budgetClk.Advance(time.Hour) })
	}
	h.lim = ratelimit.New(limiterConfig(s.cfg.RateLimit, zerolog.New(h.logs).With().Timestamp().Logger()), budgetClock)
	o := s.opts
	o.Upstreams = [route.NumUpstreams]Upstream{
		route.Conversations: upstreamOptions(s.cfg.Upstreams.Conversations),
		route.Proxy:         upstreamOptions(s.cfg.Upstreams.Proxy),
	}
	o.Store, o.Invalidator, o.Budget = store, invalidation.New(time.Hour, h.clk), h.lim
	if s.hub != nil {
		m := s.hub.Replica(h.clk, invalidation.New(time.Hour, h.clk))
		h.member, o.Invalidator, o.L2 = m, m, m
	}
	if s.fleetURL != "" {
		f, wait := openFleet(t, s), cmp.Or(s.invalidationWait, 5*time.Second)
		inv := fleet.NewInvalidator(f, invalidation.New(time.Hour, h.clk), wait, func(err error) { t.Logf("fleet: %v", err) })
		t.Cleanup(inv.Close)
		waitSubscribed(t, inv)
		h.inv, h.fleet = inv, f
		o.Invalidator, o.L2, o.Intents = inv, f, inv
		// One limiter for the fleet: each turn takes its place in the
		// fleet's slots, and API keys are known fleet-wide.
		slots := fleet.NewSlots(f, s.cfg.RateLimit.RequestsPerSecond)
		t.Cleanup(slots.Close)
		lc := limiterConfig(s.cfg.RateLimit, zerolog.New(h.logs).With().Timestamp().Logger())
		lc.Slots, lc.Keys = slots, fleet.NewKeyBook(f)
		h.lim = ratelimit.New(lc, budgetClock)
		h.budget, o.Budget = slots, h.lim
	}
	h.invalidator = o.Invalidator
	c := s.cfg
	o.Freshness = Freshness{TTL: c.Cache.TTL.D(), NegativeTTL: c.Cache.NegativeTTL.D(), WriteLag: c.Cache.WriteLag.D(), StaleIfError: c.Cache.StaleIfError.D(),
		StaleWhileRevalidate: c.Cache.StaleWhileRevalidate.D(), MaxEntryBytes: int64(c.Cache.MaxEntryBytes), Routes: map[string]time.Duration{}}
	for name, rc := range c.Cache.Routes {
		o.Freshness.Routes[name] = rc.TTL.D()
	}
	o.Retry = Retry{Max: c.RateLimit.MaxRetries, Base: c.RateLimit.BackoffBase.D(), Cap: c.RateLimit.BackoffMax.D(), ReplayBytes: int64(c.RateLimit.ReplayBytes), MaxWait: c.RateLimit.MaxWait.D()}
	o.MaxBodyBytes, o.WriteTimeout = int64(c.Server.MaxBodyBytes), c.Server.WriteTimeout.D()
	o.UnauthorizedTTL = c.RateLimit.UnauthorizedTTL.D()
	p, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	h.p, h.store = p, store
	if !s.unwatched { // as cmd/cacheproxy serves
		h.writes = connwatch.New(c.Server.WriteTimeout.D(), nil)
		stop := make(chan struct{})
		go h.writes.Run(stop)
		t.Cleanup(func() { close(stop) })
	}
	h.srv = h.server(nil)
	t.Cleanup(func() { checkLogLines(t, h.logs) }) // runs after the server closed
	return h
}

// server starts a test server of h's proxy, its listener wrapped by wrap
// (if not nil) and watched by h's connwatch.Watch (if any).
func (h *harness) server(wrap func(net.Listener) net.Listener) *httptest.Server {
	srv := httptest.NewUnstartedServer(h.p)
	if wrap != nil {
		srv.Listener = wrap(srv.Listener)
	}
	if h.writes != nil {
		srv.Listener = h.writes.Wrap(srv.Config, srv.Listener)
	}
	srv.Start()
	h.t.Cleanup(srv.Close)
	return srv
}

// checkLogLines holds every test's logs to the rule that each line is a
// complete zerolog JSON line: a level, a time, and no field that is an
// empty string.
func checkLogLines(t testing.TB, logs *syncBuffer) {
	t.Helper()
	for _, l := range logs.lines(t) {
		if l["level"] == nil || l["level"] == "" || l["time"] == nil || l["time"] == "" {
			t.Errorf("log line without level or time: %v", l)
		}
		for k, v := range l {
			if v == "" {
				t.Errorf("log line with an empty %q: %v", k, l)
			}
		}
	}
}

func limiterConfig(rl config.RateLimit, log zerolog.Logger) ratelimit.Config {
	return ratelimit.Config{Rate: rl.RequestsPerSecond, MaxConcurrent: rl.MaxConcurrent, MaxWait: rl.MaxWait.D(), Recover: rl.Recover.D(),
		WriteShare: rl.WriteShare, KeyAccounts: rl.KeyAccounts, OnEvent: BudgetLog(log)}
}

func upstreamOptions(u config.Upstream) Upstream {
	return Upstream{URL: u.URL, Hosts: u.Hosts, Timeout: u.Timeout.D()}
}

// wait is what shutdown waits for: detached fetches, then the limiter's
// rate-window timers.
func (h *harness) wait(ctx context.Context) error {
	if err := h.p.Wait(ctx); err != nil {
		return err
	}
	return h.lim.Wait(ctx)
}

// do sends a request to the proxy with the sidecar's own Host.
func (h *harness) do(method, path, auth string, hdr ...string) *http.Response {
	h.t.Helper()
	return h.doBody(method, path, auth, nil, hdr...)
}

func (h *harness) doBody(method, path, auth string, body io.Reader, hdr ...string) *http.Response {
	h.t.Helper()
	req, err := http.NewRequest(method, h.srv.URL+path, body)
	if err != nil {
		h.t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		if hdr[i] == "Host" {
			req.Host = hdr[i+1]
			continue
		}
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	return resp
}

// goDo sends a request from another goroutine, for a test that must move a
// clock while the request waits. The channel yields the response, or nil
// if the request failed.
func (h *harness) goDo(method, path, auth string) <-chan *http.Response {
	h.t.Helper()
	req, err := http.NewRequest(method, h.srv.URL+path, nil)
	if err != nil {
		h.t.Fatal(err)
	}
	req.Header.Set("Authorization", auth)
	ch := make(chan *http.Response, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			resp = nil
		}
		ch <- resp
	}()
	return ch
}

// waitedOut sends a request that queues for its account's turn, lets
// ratelimit.max_wait pass on the budget's fake clock (budgetOnFakeClock),
// and returns the answer.
func (h *harness) waitedOut(method, path, auth string) *http.Response {
	h.t.Helper()
	maxWait := h.cfg.RateLimit.MaxWait.D()
	queued := h.budgetClk.ExpectAsked(maxWait)
	answer := h.goDo(method, path, auth)
	queued()
	h.budgetClk.Advance(maxWait)
	resp := <-answer
	if resp == nil {
		h.t.Fatal("request failed")
	}
	return resp
}

// get reads a path as account A and returns status, Cache-Status and body.
func (h *harness) get(path string, hdr ...string) (int, string, string) {
	h.t.Helper()
	return readResp(h.t, h.do(http.MethodGet, path, basic(acctA, tokenA), hdr...))
}

func readResp(t testing.TB, resp *http.Response) (int, string, string) {
	t.Helper()
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header.Get("Cache-Status"), string(b)
}

// settle waits for ristretto's asynchronous Sets.
func (h *harness) settle() { h.store.Wait() }

// jsonField decodes one field of a JSON body.
func jsonField(t testing.TB, body, field string) any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(body), &m); err != nil {
		t.Fatalf("body is not JSON: %q", body)
	}
	return m[field]
}

// checkTwilioError asserts Twilio's JSON error shape and status.
func checkTwilioError(t testing.TB, status int, body string, want int) {
	t.Helper()
	if status != want {
		t.Fatalf("status = %d, want %d (body %s)", status, want, body)
	}
	var e struct {
		Code     int    `json:"code"`
		Message  string `json:"message"`
		MoreInfo string `json:"more_info"`
		Status   int    `json:"status"`
	}
	if err := json.Unmarshal([]byte(body), &e); err != nil {
		t.Fatalf("error body is not JSON: %q", body)
	}
	if e.Status != want || e.Code != 20000+want || e.Message == "" || e.MoreInfo == "" {
		t.Fatalf("error body = %+v, want Twilio shape with status %d", e, want)
	}
}

// deadUpstreamAddr returns an address that refuses connections.
func deadUpstreamAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// connCounter is a listener that counts accepted connections: a host the
// proxy must never contact.
type connCounter struct {
	net.Listener
	n atomic.Int64
}

func (c *connCounter) Accept() (net.Conn, error) {
	conn, err := c.Listener.Accept()
	if err == nil {
		c.n.Add(1)
	}
	return conn, err
}
