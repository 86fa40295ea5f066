package faultrun

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"cacheproxy/internal/config"
	"cacheproxy/internal/fleet"
	"cacheproxy/internal/redistest"
	"cacheproxy/internal/twiliofake"
	"cacheproxy/internal/wire"
)

// Config is one run.
type Config struct {
	// Duration is how long the load runs.
	Duration time.Duration
	// Every is how often a fault is injected; 0: never (the same load
	// without faults).
	Every time.Duration
	// Readers read concurrently, each every ReadEvery (defaults 4, 5 ms);
	// one writer per participant writes every WriteEvery (default 250 ms).
	Readers               int
	ReadEvery, WriteEvery time.Duration
}

// Result is a run's history, checked.
type Result struct {
	Report
	// Faults counts the faults injected, by kind; Timeline says when each
	// began (from the load's start), what it was and where.
	Faults   map[string]int
	Timeline []string
	// Hits counts reads answered from a tier (L1 or L2); P99 is the 99th
	// percentile of the reads' latency.
	Hits int
	P99  time.Duration
	// Answered counts the reads by how they were answered: their
	// Cache-Status, its numbers left out (where the hit ratio goes).
	Answered map[string]int
}

// numbers are a Cache-Status's numbers (ttl, age).
var numbers = regexp.MustCompile(`=-?[0-9]+`)

// cacheForm is a Cache-Status without its numbers.
func cacheForm(cs string) string { return numbers.ReplaceAllString(cs, "") }

// The participants read and written, each in a conversation of its own (a
// write to one does not invalidate the others); two accounts read them,
// each with its own credentials.
const participants = 3

var accounts = map[string]string{twiliofake.SID("AC", 1): "token-one-0123456789", twiliofake.SID("AC", 2): "token-two-0123456789"}

func participantPath(i int) string {
	return "/v1/Conversations/" + twiliofake.SID("CH", i+1) + "/Participants/" + twiliofake.SID("MB", i+1)
}

// Run runs the scenario: a redis-server (AOF, appendfsync always), three
// replicas each reaching it through a Toxiproxy link, a fake Twilio, the
// load, and a fault every cfg.Every.
func Run(cfg Config) (res Result, err error) {
	cfg.Readers, cfg.ReadEvery, cfg.WriteEvery = max(cfg.Readers, 4), cmpOr(cfg.ReadEvery, 5*time.Millisecond), cmpOr(cfg.WriteEvery, 250*time.Millisecond)
	env := &env{}
	defer env.close()
	defer func() {
		switch p := recover().(type) {
		case nil:
		case fatal:
			err = p
		default:
			panic(p)
		}
	}()
	srv := redistest.Start(env, "--appendonly", "yes", "--appendfsync", "always")
	fake := twiliofake.New(accounts)
	for i := range participants {
		fake.AddConversation(twiliofake.SID("CH", i+1), "", "")
		fake.AddParticipant(twiliofake.SID("CH", i+1), twiliofake.Participant{Sid: twiliofake.SID("MB", i+1), Identity: "user" + strconv.Itoa(i), Attributes: `{"v":0}`})
	}
	up := httptest.NewServer(fake)
	env.Cleanup(up.Close)
	var rs []*replica
	for range 3 {
		link := redistest.NewLink(env, srv.Addr)
		r, err := startReplica(env, up.URL, link)
		if err != nil {
			return res, err
		}
		rs = append(rs, r)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, r := range rs {
		if err := r.inv.WaitTrusted(ctx); err != nil {
			return res, fmt.Errorf("replica not trusted within 30 s: %w", err)
		}
	}
	h := &history{start: time.Now()}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for _, r := range rs {
		wg.Go(func() { r.monitor(stop) })
	}
	deadline := time.Now().Add(cfg.Duration)
	var load sync.WaitGroup
	for k := range participants {
		load.Go(func() { writer(h, rs, k, deadline, cfg.WriteEvery) })
	}
	for n := range cfg.Readers {
		load.Go(func() { reader(h, rs, n, deadline, cfg.ReadEvery) })
	}
	faults := map[string]int{}
	var injectErr error
	if cfg.Every > 0 {
		wg.Go(func() {
			defer func() {
				if f, ok := recover().(fatal); ok {
					injectErr = f
				}
			}()
			res.Timeline = inject(env, srv, rs, faults, h.start, deadline, cfg.Every)
		})
	}
	load.Wait()
	close(stop)
	wg.Wait()
	if injectErr != nil {
		return res, fmt.Errorf("injecting a fault: %w", injectErr)
	}
	replicas := map[int]Replica{}
	for i, r := range rs {
		replicas[i] = r.report()
	}
	res.Report, res.Faults = Check(h.ops, replicas), faults
	res.reads(h.ops)
	return res, nil
}

// reads counts the reads' hits and how they were answered, and their
// latency's 99th percentile.
func (res *Result) reads(ops []Op) {
	var lat []time.Duration
	res.Answered = map[string]int{}
	for _, op := range ops {
		if !op.Write {
			lat = append(lat, op.End.Sub(op.Start))
			res.Answered[cacheForm(op.Cache)]++
			if strings.HasPrefix(op.Cache, "cacheproxy; hit") {
				res.Hits++
			}
		}
	}
	slices.Sort(lat)
	if len(lat) > 0 {
		res.P99 = lat[len(lat)*99/100]
	}
}

func cmpOr(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// history records operations from many goroutines.
type history struct {
	start time.Time
	mu    sync.Mutex
	ops   []Op
}

func (h *history) add(op Op) {
	h.mu.Lock()
	h.ops = append(h.ops, op)
	h.mu.Unlock()
}

var client = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}

// writer writes version 1, 2, … of participant k, through each replica in
// turn, one write at a time (so its versions are in the order of time).
func writer(h *history, rs []*replica, k int, deadline time.Time, every time.Duration) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for v := 1; time.Now().Before(deadline); v++ {
		i := (v + k) % len(rs)
		acct := twiliofake.SID("AC", 1)
		body := url.Values{"Attributes": {`{"v":` + strconv.Itoa(v) + `}`}}.Encode()
		req, _ := http.NewRequest("POST", rs[i].url+participantPath(k), strings.NewReader(body))
		req.SetBasicAuth(acct, accounts[acct])
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		op := Op{Replica: i, Key: strconv.Itoa(k), Write: true, Version: v, Start: time.Now()}
		if resp, err := client.Do(req); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			op.Status = resp.StatusCode
			// Refused before anything was sent: the next write, with the
			// next version, is its retry (a read of this version would
			// show it was sent after all).
			op.Refused = op.Status == http.StatusServiceUnavailable && strings.Contains(string(b), "nothing was sent upstream")
		}
		op.End = time.Now()
		h.add(op)
		<-tick.C
	}
}

var versionRE = regexp.MustCompile(`\\"v\\":(\d+)`)

// reader reads a random participant through a random replica with a
// random account's credentials every every, without waiting for the
// previous read (a slow replica does not slow the reads of the others),
// with at most 64 of its reads in flight.
func reader(h *history, rs []*replica, n int, deadline time.Time, every time.Duration) {
	rnd := rand.New(rand.NewPCG(uint64(n), 7))
	tick := time.NewTicker(every)
	defer tick.Stop()
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	defer wg.Wait()
	for time.Now().Before(deadline) {
		i, k, acct := rnd.IntN(len(rs)), rnd.IntN(participants), twiliofake.SID("AC", 1+rnd.IntN(2))
		select {
		case sem <- struct{}{}:
			wg.Go(func() {
				defer func() { <-sem }()
				h.add(read(rs[i], i, k, acct))
			})
		default: // 64 in flight: this one is not sent
		}
		<-tick.C
	}
}

// read reads participant k through replica r (number i) as acct.
func read(r *replica, i, k int, acct string) Op {
	req, _ := http.NewRequest("GET", r.url+participantPath(k), nil)
	req.SetBasicAuth(acct, accounts[acct])
	op := Op{Replica: i, Key: strconv.Itoa(k), Start: time.Now(), Version: -1}
	if resp, err := client.Do(req); err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		op.Status, op.Cache = resp.StatusCode, resp.Header.Get("Cache-Status")
		if m := versionRE.FindSubmatch(b); m != nil {
			op.Version, _ = strconv.Atoi(string(m[1]))
		}
		op.Foreign = op.Status == 200 && !strings.Contains(string(b), `"account_sid":"`+acct+`"`)
		op.Message = message(op.Status, b)
	}
	op.End = time.Now()
	return op
}

// replica is one cacheproxy in this process, reaching Redis through its
// link, and what it reported.
type replica struct {
	url  string
	link *redistest.Link
	inv  *fleet.Invalidator
	mu   sync.Mutex
	rep  Replica
}

// startReplica starts a replica with the defaults (redis.timeout 50 ms,
// redis.invalidation_wait 100 ms) in front of upURL.
func startReplica(env *env, upURL string, link *redistest.Link) (*replica, error) {
	cfg := config.Default()
	cfg.Upstreams.Conversations.URL, cfg.Upstreams.Proxy.URL = upURL, upURL
	cfg.Cache.KeySecret, cfg.Redis.URL = "faults-fleet-secret", link.URL()
	g, err := wire.Build(cfg, wire.Deps{})
	if err != nil {
		return nil, err
	}
	env.Cleanup(g.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := g.Fleet.Connected(ctx); err != nil {
		return nil, err
	}
	p, inv := g.Proxy, g.FleetInvalidator
	srv := httptest.NewServer(p)
	env.Cleanup(srv.Close)
	return &replica{url: srv.URL, link: link, inv: inv}, nil
}

// monitor records, every millisecond until stop, whether the replica
// hears its stream.
func (r *replica) monitor(stop chan struct{}) {
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	var lostSince time.Time
	for {
		select {
		case <-stop:
			r.mu.Lock()
			if !lostSince.IsZero() {
				r.rep.Lost = append(r.rep.Lost, Window{lostSince, time.Now()})
			}
			r.mu.Unlock()
			return
		case <-tick.C:
		}
		now := time.Now()
		r.mu.Lock()
		switch sub := r.inv.Subscribed(); {
		case !sub && lostSince.IsZero():
			lostSince = now
		case sub && !lostSince.IsZero():
			r.rep.Lost = append(r.rep.Lost, Window{lostSince, now})
			lostSince = time.Time{}
		}
		r.mu.Unlock()
	}
}

func (r *replica) report() Replica {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.rep
}

// The kinds of fault, injected in turn.
var kinds = []string{"latency 200 ms", "connections reset", "link down", "redis paused (SIGSTOP)", "redis killed (SIGKILL), restarted from its AOF", "garbage epoch"}

// inject injects a fault every every until deadline, each for a third of
// the interval (a restart for as long as it takes), on one replica's link
// or on Redis itself, in turn.
func inject(env *env, srv *redistest.Server, rs []*replica, faults map[string]int, start, deadline time.Time, every time.Duration) (timeline []string) {
	hold := every / 3
	rnd := rand.New(rand.NewPCG(3, 4))
	for n := 0; time.Now().Add(every).Before(deadline); n++ {
		time.Sleep(every - hold) // the load runs without a fault meanwhile
		kind, on := kinds[n%len(kinds)], rnd.IntN(len(rs))
		link := rs[on].link
		faults[kind]++
		where := "Redis"
		if n%len(kinds) < 3 {
			where = "replica " + strconv.Itoa(on) + "'s link"
		}
		timeline = append(timeline, fmt.Sprintf("+%s %s on %s", time.Since(start).Round(time.Millisecond), kind, where))
		switch kind {
		case "latency 200 ms":
			link.Latency(env, 200)
			time.Sleep(hold)
			link.Clear()
		case "connections reset":
			link.Reset(env)
			time.Sleep(hold)
			link.Clear()
		case "link down":
			link.Down()
			time.Sleep(hold)
			link.Up(env)
		case "redis paused (SIGSTOP)":
			srv.Pause()
			time.Sleep(hold)
			srv.Resume()
		case "redis killed (SIGKILL), restarted from its AOF":
			srv.Stop()
			srv.Restart(env)
		case "garbage epoch":
			n, _ := strconv.ParseUint(strings.TrimSpace(srv.CLI(env, "GET", "cacheproxy:epoch")), 10, 64)
			srv.CLI(env, "SET", "cacheproxy:epoch", "garbage")
			time.Sleep(hold)
			srv.CLI(env, "SET", "cacheproxy:epoch", strconv.FormatUint(n+1000, 10))
		}
	}
	return timeline
}

// env gives redistest what it needs of a test: cleanups, run at the end,
// and fatal errors, which end the run with an error.
type env struct {
	cleanups []func()
	dirs     []string
}

type fatal struct{ msg string }

func (f fatal) Error() string { return f.msg }

func (e *env) Helper()                      {}
func (e *env) Fatal(args ...any)            { panic(fatal{fmt.Sprint(args...)}) }
func (e *env) Fatalf(f string, args ...any) { panic(fatal{fmt.Sprintf(f, args...)}) }
func (e *env) Cleanup(f func())             { e.cleanups = append(e.cleanups, f) }
func (e *env) TempDir() string {
	d, err := os.MkdirTemp("", "cacheproxy-faults")
	if err != nil {
		e.Fatal(err)
	}
	e.dirs = append(e.dirs, d)
	return d
}

func (e *env) close() {
	for i := len(e.cleanups) - 1; i >= 0; i-- {
		e.cleanups[i]()
	}
	for _, d := range e.dirs {
		os.RemoveAll(d)
	}
}

// message is the message of an error answer (Twilio's JSON error shape).
func message(status int, body []byte) string {
	var e struct {
		Message string `json:"message"`
	}
	if status/100 == 2 || json.Unmarshal(body, &e) != nil {
		return ""
	}
	return e.Message
}
