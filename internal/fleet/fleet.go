// Package fleet is the tier that replicas of cacheproxy share through
// Redis (docs/fleet.md): a second cache tier behind each replica's own
// (L2 behind ristretto's L1), and the fleet's invalidation marks.
//
// Nothing readable goes into Redis. Key names are keyed hashes (HMAC-SHA256
// under cache.key_secret) of the cache key or scope; values are sealed with
// AES-256-GCM under a key derived (HKDF-SHA256) from cache.key_secret and
// the request's Authorization value, with the key name as additional data:
// an entry opens only for the credential that fetched it.
//
// Freshness across the fleet follows the local design (docs/architecture.md,
// "Freshness"): Redis holds an epoch counter and, per scope, the epoch of
// its last invalidation. A fetch reads the epoch before it starts; its
// shared entry is valid while none of its scopes has a mark above that
// epoch. An invalidation raises the epoch and sets the marks in one script,
// before the write's response is sent.
//
// Redis errors never reach a client: a failed or slow call (bounded by
// redis.timeout) is a miss, and the caller goes on with L1 and the
// upstream. The client is github.com/redis/rueidis (RESP3, pipelining,
// Cluster and TLS support, Lua helpers); its client-side cache is off: it
// is flushed when a connection drops, and L1 must survive that.
package fleet

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"

	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/clock"
	"cacheproxy/internal/tier"

	"github.com/redis/rueidis"
)

// Config sets up the fleet tier.
type Config struct {
	// URL is redis://… or rediss://… (rueidis.ParseURL).
	URL string
	// Prefix starts every key.
	Prefix string
	// Timeout bounds each call.
	Timeout time.Duration
	// Secret is cache.key_secret: the same on every replica.
	Secret []byte
	// Previous are cache.previous_key_secrets: read, never written (a
	// rotation of the secret, docs/fleet.md).
	Previous [][]byte
	// Retention is how long an invalidation mark must outlive it: the
	// longest an entry fetched before it can stay in Redis.
	Retention time.Duration
	// ClaimTTL is how long a cold key's claim outlives its holder
	// (fleet.ClaimTTL if zero).
	ClaimTTL time.Duration
	// ClaimHold is how long a claim never given back lives while its
	// holder lives (fleet.ClaimHold if zero).
	ClaimHold time.Duration
	// Clock is the replica's clock (the proxy's); if nil, the real one.
	Clock clock.Clock
	// WriteHold is the longest a write through this replica may take, its
	// budget wait and upstream call (ratelimit.max_wait plus the upstream
	// timeout; ClaimHold if zero): a write's intent is pending that long,
	// and a second more, on every replica (docs/fleet.md, "Read-your-writes across replicas").
	WriteHold time.Duration
	// IntentWait is the longest a write waits for its intent to be
	// recorded (ratelimit.max_wait; a second if zero).
	IntentWait time.Duration
}

// Fleet is the connection to Redis and what is derived from the secret.
type Fleet struct {
	cfg    Config
	id     string // this replica's, in its claims' tokens
	clock  clock.Clock
	client atomic.Pointer[rueidis.Client] // nil until connected
	keys   []secret                       // the current secret, then the previous ones
	up     atomic.Bool
	errors atomic.Int64
	stop   chan struct{}
	done   chan struct{}
	closed sync.Once
	st     state
	unsent unsent  // invalidations not yet in Redis (the Invalidator's)
	pend   pending // writes announced and not yet ended (the Invalidator's)
	heard  heard   // invalidations heard since subscribing (the Invalidator's)
	// holding counts the claims this replica's fills hold; aliveAt is when
	// the last renewal of its key that Redis took was sent (alive.go).
	holding atomic.Int64
	aliveAt atomic.Int64
	ungiven chan ungivenClaim // releases Redis did not take, for keepAlive
	wg      sync.WaitGroup
}

// errNotConnected: Redis has not been reached yet (a miss, like any error).
var errNotConnected = errors.New("redis: not connected yet")

// ErrNoSecret: the fleet tier needs cache.key_secret.
var ErrNoSecret = errors.New("fleet: cache.key_secret is required")

// CheckURL reports whether redis.url is one Open accepts, without
// connecting (-check-config).
func CheckURL(u string) error {
	_, err := parseURL(u)
	return err
}

func parseURL(u string) (rueidis.ClientOption, error) {
	opt, err := rueidis.ParseURL(seeds(u))
	if err != nil {
		// Not %w: the parser's message quotes the URL, password and all.
		return opt, errors.New("redis.url: not a valid redis:// or rediss:// URL (the value is not shown: it may hold a password)")
	}
	return opt, nil
}

// Open checks cfg and connects to Redis in the background: a replica
// starts, and serves from L1 and the upstream, while Redis is unreachable;
// it tries again every second until it connects (rueidis reconnects by
// itself after that).
func Open(cfg Config) (*Fleet, error) {
	if len(cfg.Secret) == 0 {
		return nil, ErrNoSecret
	}
	opt, err := parseURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	if cfg.ClaimTTL <= 0 {
		cfg.ClaimTTL = ClaimTTL
	}
	if cfg.ClaimHold <= 0 {
		cfg.ClaimHold = ClaimHold
	}
	opt.DisableCache = true
	// No retries inside rueidis: an error is a miss here at once, and a
	// dropped subscription returns to Invalidator, which must know.
	opt.DisableRetry = true
	opt.ConnWriteTimeout = max(cfg.Timeout, time.Second)
	opt.Dialer.Timeout = max(cfg.Timeout, time.Second)
	f := &Fleet{cfg: cfg, id: newID(), clock: clock.Or(cfg.Clock), keys: secrets(cfg), stop: make(chan struct{}), done: make(chan struct{}),
		heard: heard{retention: cfg.Retention}, ungiven: make(chan ungivenClaim, 1024)}
	go f.connect(opt)
	f.wg.Go(f.watch)
	f.wg.Go(f.keepAlive)
	return f, nil
}

func (f *Fleet) connect(opt rueidis.ClientOption) {
	defer close(f.done)
	for {
		c, err := rueidis.NewClient(opt)
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), max(f.cfg.Timeout, time.Second))
			loadScripts(ctx, c)
			cancel()
			f.client.Store(&c)
			f.up.Store(true)
			return
		}
		f.result(err)
		select {
		case <-f.stop:
			return
		case <-time.After(time.Second):
		}
	}
}

// Connected blocks until the first connection is made or ctx ends.
func (f *Fleet) Connected(ctx context.Context) error {
	select {
	case <-f.done:
		if f.client.Load() == nil {
			return errNotConnected
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close stops connecting and ends the connections.
func (f *Fleet) Close() {
	f.closed.Do(func() {
		close(f.stop)
		<-f.done
		f.wg.Wait()
		if c := f.client.Load(); c != nil {
			(*c).Close()
		}
	})
}

// c is the client, or nil before the first connection.
func (f *Fleet) c() rueidis.Client {
	if c := f.client.Load(); c != nil {
		return *c
	}
	return nil
}

// Up reports whether the last call succeeded.
func (f *Fleet) Up() bool { return f.up.Load() }

// Errors counts failed calls.
func (f *Fleet) Errors() int64 { return f.errors.Load() }

func (f *Fleet) result(err error) error {
	if err != nil && !rueidis.IsRedisNil(err) {
		f.up.Store(false)
		f.errors.Add(1)
		return err
	}
	f.up.Store(true)
	return nil
}

func (f *Fleet) ctx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, f.cfg.Timeout)
}

// conn is the client, with ctx bounded by redis.timeout (end it with
// cancel), or errNotConnected before the first connection.
func (f *Fleet) conn(ctx context.Context) (rueidis.Client, context.Context, context.CancelFunc, error) {
	c := f.c()
	if c == nil {
		return nil, ctx, func() {}, errNotConnected
	}
	ctx, cancel := f.ctx(ctx)
	return c, ctx, cancel, nil
}

// marks are the names of tags' marks under every secret: a write raises
// them all, and an entry is checked against them all, so that replicas on
// either side of a rotation see each other's invalidations.
func (f *Fleet) marks(tags []string) []string {
	out := make([]string, 0, len(tags)*len(f.keys))
	for i := range f.keys {
		for _, t := range tags {
			out = append(out, f.keys[i].name(f.cfg.Prefix, "m", t))
		}
	}
	return out
}

func (f *Fleet) epochKey() string { return f.cfg.Prefix + "epoch" }

// Epoch reads the fleet's invalidation epoch, before a fetch.
func (f *Fleet) Epoch(ctx context.Context) (uint64, error) {
	c, ctx, cancel, err := f.conn(ctx)
	defer cancel()
	if err != nil {
		return 0, err
	}
	seen := f.st.seen.Load()
	trip(ctx)
	rs := c.DoMulti(ctx, c.B().Get().Key(f.epochKey()).Build(), c.B().Get().Key(f.floorKey()).Build())
	return f.current(ctx, c, rs[0], rs[1], seen)
}

// Invalidate marks tags invalidated now, fleet-wide: it raises the epoch,
// then marks each scope with the new epoch, which it returns. A fetch that
// reads the epoch after the raise began after the write it follows (the
// proxy invalidates once the upstream has answered the write), and the
// marks are in place before the write's response is sent, which is when
// readers may look.
func (f *Fleet) Invalidate(ctx context.Context, tags []string) (uint64, error) {
	ctx, cancel := f.ctx(ctx)
	defer cancel()
	return f.raise(ctx, tags)
}

// raise is Invalidate within ctx's own bound.
func (f *Fleet) raise(ctx context.Context, tags []string) (uint64, error) {
	c := f.c()
	if c == nil {
		return 0, errNotConnected
	}
	if len(tags) == 0 {
		return 0, nil
	}
	epoch, err := f.raiseEpoch(ctx, c)
	if err != nil {
		return 0, err
	}
	for _, r := range raiseMark.ExecMulti(ctx, c, f.markExecs(tags, epoch)...) {
		if err := f.result(r.Error()); err != nil {
			return 0, err
		}
	}
	f.heard.add(tags, epoch)
	return epoch, nil
}

// raiseEpoch raises the fleet's epoch (INCR) and returns it; an epoch that
// went backwards (Redis restarted from older data) is rewound first.
func (f *Fleet) raiseEpoch(ctx context.Context, c rueidis.Client) (uint64, error) {
	seen := f.st.seen.Load()
	epoch, err := c.Do(ctx, c.B().Incr().Key(f.epochKey()).Build()).AsUint64()
	if err := f.result(err); err != nil {
		if garbage(err) { // not an integer, or it would overflow
			return 0, f.corrupt()
		}
		return 0, err
	}
	if epoch > maxEpoch {
		return 0, f.corrupt()
	}
	if epoch <= seen { // went backwards: the floor is raised past what was seen, then the marks
		return f.rewind(ctx, c, seen)
	}
	return f.checked(ctx, c, epoch, seen)
}

// markExecs are the runs of raiseMark that mark tags (under every secret)
// with epoch.
func (f *Fleet) markExecs(tags []string, epoch uint64) []rueidis.LuaExec {
	e, px := strconv.FormatUint(epoch, 10), strconv.FormatInt(f.cfg.Retention.Milliseconds(), 10)
	names := f.marks(tags)
	execs := make([]rueidis.LuaExec, len(names))
	for i, m := range names {
		execs[i] = rueidis.LuaExec{Keys: []string{m}, Args: []string{e, px}}
	}
	return execs
}

// markRuns are markExecs as runs, to share a pipeline.
func (f *Fleet) markRuns(tags []string, epoch uint64) []scriptRun {
	var out []scriptRun
	for _, x := range f.markExecs(tags, epoch) {
		out = append(out, raiseMark.with(x.Keys, x.Args...))
	}
	return out
}

// sealed is an entry as it is stored in Redis, before sealing. Its times
// are lifetimes in milliseconds as the writer measured them when it
// shared the entry, never the writer's wall clock (replicas' clocks
// differ): a reader takes off what Redis says has passed since (the key's
// PTTL against Life) and reads them on its own clock.
type sealed struct {
	Status int                 `json:"s"`
	Header map[string][]string `json:"h"`
	Body   []byte              `json:"b,omitempty"` // the previous format's; now raw after the JSON (rawBody)
	Age    int64               `json:"a"`           // since the response arrived
	Fresh  int64               `json:"f"`           // freshness left
	Life   int64               `json:"l"`           // time left in Redis (the key's PX)
	Tags   []string            `json:"g"`
	Epoch  uint64              `json:"e"` // the fleet epoch when its fetch began
}

// Set shares e (fetched with auth, its fetch begun at fleet epoch epoch)
// until e.Keep.
func (f *Fleet) Set(ctx context.Context, e *cache.Entry, auth string, epoch uint64, now time.Time) error {
	c := f.c()
	if c == nil {
		return errNotConnected
	}
	set, ok, err := f.set(c, e, auth, epoch, now)
	if err != nil || !ok {
		return err
	}
	ctx, cancel := f.ctx(ctx)
	defer cancel()
	trip(ctx)
	return f.result(c.Do(ctx, set).Error())
}

// set is the command that shares e: its value sealed under the current
// secret, kept until e.Keep; none (false) if e is past it.
func (f *Fleet) set(c rueidis.Client, e *cache.Entry, auth string, epoch uint64, now time.Time) (rueidis.Completed, bool, error) {
	s, ok, err := f.seal(e, auth, epoch, now)
	if !ok {
		return rueidis.Completed{}, false, err
	}
	return c.B().Set().Key(s.name).Value(rueidis.BinaryString(s.val)).Px(s.ttl).Build(), true, nil
}

// sealedEntry is an entry ready for Redis: its name, value and lifetime.
type sealedEntry struct {
	name string
	val  []byte
	ttl  time.Duration
}

// seal seals e under the current secret for the credential auth, kept
// until e.Keep. false if e is past it.
func (f *Fleet) seal(e *cache.Entry, auth string, epoch uint64, now time.Time) (sealedEntry, bool, error) {
	ttl := e.Keep.Time().Sub(now).Milliseconds()
	if ttl <= 0 {
		return sealedEntry{}, false, nil
	}
	meta, err := json.Marshal(sealed{Status: e.Status, Header: e.Header().Map(), Age: max(0, now.Sub(e.Stored.Time()).Milliseconds()),
		Fresh: e.Expires.Time().Sub(now).Milliseconds(), Life: ttl, Tags: e.Tags, Epoch: epoch})
	if err != nil {
		return sealedEntry{}, false, err
	}
	// The body goes raw after the rest (JSON, which would base64 it).
	plain := make([]byte, 0, 1+binary.MaxVarintLen64+len(meta)+len(e.Body))
	plain = binary.AppendUvarint(append(plain, rawBody), uint64(len(meta)))
	plain = append(append(plain, meta...), e.Body...)
	a, err := f.keys[0].aead(auth)
	if err != nil {
		return sealedEntry{}, false, err
	}
	name, _ := f.keys[0].entryNames(f.cfg.Prefix, entryID(e.Key, auth))
	nonce := make([]byte, a.NonceSize(), a.NonceSize()+len(plain)+a.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return sealedEntry{}, false, err
	}
	return sealedEntry{name: name, val: a.Seal(nonce, nonce, plain, []byte(name)), ttl: time.Duration(ttl) * time.Millisecond}, true, nil
}

// Get returns the shared entry of key, opened with auth, if it is still
// valid fleet-wide; nil if there is none (or it cannot be opened). It
// looks under every secret, the current one first, in one round trip;
// when there is no entry under the current secret, it also claims the key
// for this replica and returns the claim: won, or held by another replica
// (Wait waits for its fill). With an entry (fresh or within its stale
// windows) the claim is nil.
func (f *Fleet) Get(ctx context.Context, key, auth string) (*cache.Entry, tier.Claim, error) {
	l, err := f.look(ctx, key, auth, false)
	fresh := l.entry != nil && f.clock.Now().Before(l.entry.Expires.Time())
	switch {
	case err != nil:
		if l.token != "" {
			f.unclaimLater(l.claim, l.token)
		}
		return nil, nil, err
	case l.token != "" && fresh:
		f.unclaimLater(l.claim, l.token) // found under a previous secret: no fetch
		return l.entry, nil, nil
	case l.token != "":
		cl := &claim{f: f, key: key, auth: auth, name: l.claim, epoch: l.epoch, token: l.token}
		cl.hold()
		return l.entry, cl, nil
	case l.entry == nil && l.holder != "":
		return nil, &claim{f: f, key: key, auth: auth, name: l.claim, epoch: l.epoch, force: l.present}, nil
	}
	return l.entry, nil, nil
}

// looked is what one look found under a key.
type looked struct {
	entry   *cache.Entry // valid fleet-wide, fresh or not; or nil
	present bool         // an entry is under the current secret's name, valid here or not
	epoch   uint64       // the fleet's epoch, read before the claim
	claim   string       // the key's claim's name
	token   string       // the claim's token, if this replica holds it (this look, or another one's)
	holder  string       // the claim's token, if another replica holds it
}

// look reads the fleet's epoch and floor and key's entry under every
// secret in one round trip, and claims the key when there is no entry
// under the current secret (or always, with force). The entry's marks are
// checked here when this replica heard every invalidation since its fetch
// began (heard), else in Redis (a second round trip).
func (f *Fleet) look(ctx context.Context, key, auth string, force bool) (looked, error) {
	c, ctx, cancel, err := f.conn(ctx)
	defer cancel()
	if err != nil {
		return looked{}, err
	}
	id := entryID(key, auth)
	var l looked
	names := make([]string, len(f.keys))
	names[0], l.claim = f.keys[0].entryNames(f.cfg.Prefix, id)
	token := f.id + newToken()
	seen := f.st.seen.Load()
	cmds := make(rueidis.Commands, 0, 1+2*len(f.keys))
	get := getOrClaim.with([]string{names[0], l.claim}, token, strconv.FormatInt(f.cfg.ClaimHold.Milliseconds(), 10), map[bool]string{true: "1", false: "0"}[force])
	cmds = append(cmds, c.B().Get().Key(f.epochKey()).Build(), c.B().Get().Key(f.floorKey()).Build(), get.cmd(c))
	for i := 1; i < len(f.keys); i++ {
		names[i], _ = f.keys[i].entryNames(f.cfg.Prefix, id)
		cmds = append(cmds, c.B().Get().Key(names[i]).Build(), c.B().Pttl().Key(names[i]).Build())
	}
	renew, renewing := f.aliveCmd(c, false) // this look may claim: its holder is alive
	if renewing {
		cmds = append(cmds, renew)
	}
	sent := time.Now()
	trip(ctx)
	rs := c.DoMulti(ctx, cmds...)
	if renewing {
		f.alive(sent, rs[len(rs)-1].Error())
	}
	epoch, err := f.current(ctx, c, rs[0], rs[1], seen)
	if err != nil {
		return l, err
	}
	l.epoch = epoch
	got, err := get.again(ctx, c, rs[2]).ToArray()
	if err := f.result(err); err != nil {
		return l, err
	}
	if len(got) != 3 {
		return l, f.corrupt()
	}
	// A claim this replica holds (this look's, or a concurrent one's that
	// another request's flight has not adopted yet) is this replica's.
	if holder, err := got[2].ToString(); err == nil && strings.HasPrefix(holder, f.id) {
		l.token = holder
	} else if err == nil {
		l.holder = holder
	}
	val, err := got[0].AsBytes()
	l.present = err == nil
	left, _ := got[1].AsInt64()
	for i := range f.keys {
		if i > 0 {
			if val, err = rs[1+2*i].AsBytes(); err != nil && !rueidis.IsRedisNil(err) {
				return l, f.result(err)
			}
			left, _ = rs[2+2*i].AsInt64()
		}
		s := f.open(&f.keys[i], names[i], auth, val, left)
		if s == nil {
			continue
		}
		ok, err := f.unmarked(ctx, c, s)
		if err != nil || !ok {
			return l, err
		}
		l.entry = s.entry(key, left, f.clock.Now())
		return l, nil
	}
	return l, nil
}

// open opens an entry read under secret k by its name (its value, nil if
// none, and its PTTL): nil if there is none, it is not the credential's
// or it is damaged, or it has no lifetime left.
func (f *Fleet) open(k *secret, name, auth string, val []byte, left int64) *sealed {
	if val == nil || left <= 0 {
		return nil // none, expired meanwhile (-2), or kept without a lifetime (-1): not ours
	}
	a, err := k.aead(auth)
	if err != nil || len(val) < a.NonceSize() {
		return nil
	}
	plain, err := a.Open(nil, val[:a.NonceSize()], val[a.NonceSize():], []byte(name))
	if err != nil {
		return nil // not this credential's, or damaged: a miss
	}
	return unseal(plain)
}

// rawBody starts a sealed entry whose body follows its JSON raw: a format
// byte, the JSON's length (uvarint), the JSON, the body. An entry that
// starts otherwise is the previous format (the whole entry as JSON, which
// replicas of an older version share) and opens too.
const rawBody = 0x01

// unseal decodes an opened entry of either format; nil if it is damaged.
func unseal(plain []byte) *sealed {
	var s sealed
	if len(plain) == 0 || plain[0] != rawBody {
		if json.Unmarshal(plain, &s) != nil {
			return nil
		}
		return &s
	}
	n, k := binary.Uvarint(plain[1:])
	if k <= 0 || n > uint64(len(plain)-1-k) {
		return nil
	}
	meta, body := plain[1+k:1+k+int(n)], plain[1+k+int(n):]
	if json.Unmarshal(meta, &s) != nil {
		return nil
	}
	s.Body = bytes.Clone(body) // the entry keeps only its bytes, not the opened buffer
	return &s
}

// unmarked reports whether s is still valid fleet-wide: shared after the
// floor, not hidden by this replica's unsent invalidations, and no mark of
// its scopes above the epoch its fetch began at, as this replica heard
// them or, when it may not have, as Redis holds them (under any secret).
func (f *Fleet) unmarked(ctx context.Context, c rueidis.Client, s *sealed) (bool, error) {
	if s.Epoch < f.st.floor.Load() || f.unsent.covers(s.Tags) || f.pend.covers(s.Tags) {
		return false, nil // shared before Redis went backwards, or hidden by a write not yet in Redis or not yet ended
	}
	if valid, known := f.heard.check(s.Epoch, s.Tags); known || len(s.Tags) == 0 {
		return valid || len(s.Tags) == 0, nil
	}
	names := f.marks(s.Tags)
	cmds := make(rueidis.Commands, len(names))
	for i, m := range names {
		cmds[i] = c.B().Get().Key(m).Build()
	}
	trip(ctx)
	for _, r := range c.DoMulti(ctx, cmds...) {
		mark, err := f.number(r)
		if err != nil {
			return false, err
		}
		if mark > s.Epoch {
			return false, nil // invalidated after its fetch began
		}
	}
	return true, nil
}

// entry is s as an entry of key on the reader's clock at now, with left
// of its time in Redis: what passed since it was shared is taken off, on
// Redis's clock.
func (s *sealed) entry(key string, left int64, now time.Time) *cache.Entry {
	passed := time.Duration(max(0, s.Life-left)) * time.Millisecond
	ms := func(n int64) time.Duration { return time.Duration(n) * time.Millisecond }
	e := &cache.Entry{Key: key, Status: s.Status, Body: s.Body,
		Stored: cache.At(now.Add(-ms(s.Age) - passed)), Expires: cache.At(now.Add(ms(s.Fresh) - passed)), Keep: cache.At(now.Add(ms(left))), Tags: s.Tags}
	e.Compact(cache.HeaderOf(s.Header))
	return e
}

// current checks the epoch and floor read with an entry and returns the
// epoch: garbage is an error, and a Redis that went backwards is rewound
// before the entry is looked at (its floor then hides it).
func (f *Fleet) current(ctx context.Context, c rueidis.Client, epoch, floor rueidis.RedisResult, seen uint64) (uint64, error) {
	n, err := f.number(epoch)
	if err != nil {
		return 0, err
	}
	fl, err := f.number(floor)
	if err != nil {
		return 0, err
	}
	f.observeFloor(fl)
	return f.checked(ctx, c, n, seen)
}

// seeds turns a URL with several comma-separated hosts (the seeds of a
// Redis Cluster: redis://user:pass@h1:p1,h2:p2/…) into the form rueidis
// parses, the first host and an addr parameter for each other one.
func seeds(u string) string {
	scheme, rest, ok := strings.Cut(u, "://")
	if !ok {
		return u
	}
	end := strings.IndexAny(rest, "/?")
	if end < 0 {
		end = len(rest)
	}
	authority, tail := rest[:end], rest[end:]
	userinfo, hosts := "", authority
	if i := strings.LastIndexByte(authority, '@'); i >= 0 {
		userinfo, hosts = authority[:i+1], authority[i+1:]
	}
	list := strings.Split(hosts, ",")
	if len(list) < 2 {
		return u
	}
	var extra strings.Builder
	for _, h := range list[1:] {
		extra.WriteString("addr=" + url.QueryEscape(strings.TrimSpace(h)) + "&")
	}
	path, query, _ := strings.Cut(tail, "?")
	q := strings.TrimSuffix(extra.String()+query, "&")
	return scheme + "://" + userinfo + strings.TrimSpace(list[0]) + path + "?" + q
}

type tripsKey struct{}

// trip counts a Redis round trip made for a request, in the counter its
// context carries (export_test.go's CountTrips), if any.
func trip(ctx context.Context) {
	if n, ok := ctx.Value(tripsKey{}).(*atomic.Int64); ok {
		n.Add(1)
	}
}
