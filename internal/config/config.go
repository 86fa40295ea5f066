// Package config loads cacheproxy's settings: defaults, then a TOML file,
// then CACHEPROXY_* environment variables, then -set flags. Every key has a
// dotted name (cache.ttl); errors always name the key they are about.
package config

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/url"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"cacheproxy/internal/route"

	"github.com/BurntSushi/toml"
)

// Config is the whole configuration. Each field documents its default; the
// same text, key by key, is in config.example.toml.
type Config struct {
	// Listen is the address the proxy serves clients on. Default 127.0.0.1:8080.
	Listen string `toml:"listen"`
	// PublicHosts are other names clients reach the proxy by (host or
	// host:port, as in their Host header), for the page URLs of list
	// answers: a request whose Host is neither one of them nor the listen
	// address gets page URLs on the listen address. Default none.
	PublicHosts []string `toml:"public_hosts"`
	// AdminListen serves /healthz, /readyz and /metrics. Default 127.0.0.1:9090.
	AdminListen string `toml:"admin_listen"`
	// ShutdownTimeout bounds how long SIGTERM waits for in-flight requests. Default 25s.
	ShutdownTimeout Duration `toml:"shutdown_timeout"`
	// ShutdownDelay is how long the proxy keeps accepting and serving
	// after SIGTERM, with /readyz already 503, before it stops accepting:
	// in a pod the app gets SIGTERM at the same moment and may still need
	// Twilio while it finishes. A second SIGTERM or SIGINT skips the rest.
	// Default 0s (a plain process); the container config sets 5s.
	ShutdownDelay Duration `toml:"shutdown_delay"`

	Admin     Admin     `toml:"admin"`
	Upstreams Upstreams `toml:"upstreams"`
	Cache     Cache     `toml:"cache"`
	Server    Server    `toml:"server"`
	RateLimit RateLimit `toml:"ratelimit"`
	Log       Log       `toml:"log"`
	Metrics   Metrics   `toml:"metrics"`
	Redis     Redis     `toml:"redis"`
	Webhooks  Webhooks  `toml:"webhooks"`
}

// Webhooks is the listener for Twilio's own events (docs/webhooks.md):
// signed webhooks and Event Streams that invalidate what they change.
type Webhooks struct {
	// Listen is the webhook listener's address. Default "": off.
	Listen string `toml:"listen"`
	// PublicURL is the base URL Twilio calls, as Twilio signs it.
	PublicURL string `toml:"public_url"`
	// AuthTokens are the auth tokens that may have signed a request
	// (CACHEPROXY_WEBHOOKS_AUTH_TOKENS, comma-separated). Never logged.
	AuthTokens []string `toml:"auth_tokens"`
	// ForwardTo, if set, is the app's own webhook base URL: each request
	// is forwarded after invalidating, and the app's answer relayed.
	ForwardTo string `toml:"forward_to"`
}

// Metrics bounds what /metrics and the summary line name.
type Metrics struct {
	// MaxAccounts is how many accounts get series of their own: only
	// accounts the upstream accepted a credential of (a made-up account
	// SID costs nothing to send); the rest are summed as account="other".
	// Default 100.
	MaxAccounts int `toml:"max_accounts"`
}

// Redis is the fleet tier (docs/fleet.md): replicas share entries and
// invalidations through it. An empty URL keeps everything local.
type Redis struct {
	// URL is redis://[user:pass@]host:port/db (rediss:// for TLS). Default
	// "": local only. Requires cache.key_secret, the same on every replica.
	URL string `toml:"url"`
	// KeyPrefix starts every key cacheproxy writes. Default "cacheproxy:".
	KeyPrefix string `toml:"key_prefix"`
	// Timeout bounds each Redis call; a slow Redis never slows an L1 hit,
	// which makes none. Default 50ms.
	Timeout Duration `toml:"timeout"`
	// InvalidationWait bounds how long a write's response waits for the
	// other replicas to apply its invalidation. Default 100ms.
	InvalidationWait Duration `toml:"invalidation_wait"`
}

// Admin configures the admin listener's endpoints.
type Admin struct {
	// PurgeToken, if set, is required as "Authorization: Bearer <token>" by
	// POST /purge. Without it purge works only on a loopback admin_listen.
	PurgeToken string `toml:"purge_token"`
}

// Upstreams are the only hosts cacheproxy ever connects to.
type Upstreams struct {
	Conversations Upstream `toml:"conversations"`
	Proxy         Upstream `toml:"proxy"`
}

// Upstream is one Twilio API host.
type Upstream struct {
	// URL is where requests for this API go (scheme and host, no path).
	URL string `toml:"url"`
	// Hosts are the Host header values that select this upstream when a
	// client keeps Twilio's host name. Default: the Twilio host of the API.
	Hosts []string `toml:"hosts"`
	// Timeout bounds one upstream call, headers and body. Default 15s.
	Timeout Duration `toml:"timeout"`
}

// Cache configures the participant-read cache.
type Cache struct {
	// TTL is how long a 200 participant read is served from memory. Default 30s.
	TTL Duration `toml:"ttl"`
	// NegativeTTL is how long a 404 is remembered. Default 5s; 0 disables.
	NegativeTTL Duration `toml:"negative_ttl"`
	// Routes turns caching on for a route by its name (`cacheproxy
	// -routes` lists them: every GET path of the three APIs), with its
	// own ttl; a route cached by default takes its ttl from here too, and
	// "0s" turns it off. In a file: [cache.routes."conversations.v1.conversation"]
	// ttl = "10s"; with -set or the environment:
	// cache.routes=conversations.v1.conversation=10s,conversations.v1.messages=5s.
	Routes Routes `toml:"routes"`
	// WriteLag is how long after a write through the fleet a 404 to a read
	// of its scopes is answered but not stored: Twilio's own
	// read-after-write lag can answer 404 for a moment right after a
	// create. Default 5s; 0 stores such a 404 as any other.
	WriteLag Duration `toml:"write_lag"`
	// MaxBytes bounds the memory of cached entries (body + headers). Default 64MiB.
	MaxBytes ByteSize `toml:"max_bytes"`
	// MaxEntryBytes is the largest response body that is stored. Default 1MiB.
	MaxEntryBytes ByteSize `toml:"max_entry_bytes"`
	// KeySecret keys the credential fingerprint in cache keys. Default: a
	// random secret per process.
	KeySecret string `toml:"key_secret"`
	// PreviousKeySecrets are secrets the fleet's entries and invalidations
	// may still be sealed under during a rotation of key_secret: read,
	// never written (README, "Rotating cache.key_secret"). Default none.
	PreviousKeySecrets []string `toml:"previous_key_secrets"`
	// StaleIfError serves an entry up to this long past its TTL when the
	// upstream answers 429 or 5xx, cannot be reached, or the account's
	// budget is spent. Default 60s; 0 disables.
	StaleIfError Duration `toml:"stale_if_error"`
	// StaleWhileRevalidate serves an entry up to this long past its TTL at
	// once while one background fetch per key refreshes it. Default 0 (off).
	StaleWhileRevalidate Duration `toml:"stale_while_revalidate"`
}

// Routes are the [cache.routes] tables, by route name.
type Routes map[string]RouteCache

// RouteCache is one route's [cache.routes."<name>"] table.
type RouteCache struct {
	// TTL is how long its 200s are fresh (its 404s keep negative_ttl).
	TTL Duration `toml:"ttl"`
}

// UnmarshalText reads cache.routes from -set or the environment:
// name=ttl pairs, comma-separated.
func (r *Routes) UnmarshalText(b []byte) error {
	out := Routes{}
	for _, kv := range strings.Split(string(b), ",") {
		if kv = strings.TrimSpace(kv); kv == "" {
			continue
		}
		name, ttl, ok := strings.Cut(kv, "=")
		if !ok {
			return fmt.Errorf("want name=ttl pairs, comma-separated: %q", kv)
		}
		var d Duration
		if err := d.UnmarshalText([]byte(ttl)); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		out[strings.TrimSpace(name)] = RouteCache{TTL: d}
	}
	*r = out
	return nil
}

// Server holds the client-facing HTTP server's limits.
type Server struct {
	// ReadHeaderTimeout bounds reading a request's headers. Default 10s.
	ReadHeaderTimeout Duration `toml:"read_header_timeout"`
	// ReadTimeout bounds reading a whole request, headers and body: a body
	// that trickles in gets 408 instead of holding its request. Default 30s.
	ReadTimeout Duration `toml:"read_timeout"`
	// WriteTimeout bounds writing a response to the client, from its first
	// byte: a client that stops reading loses its connection instead of
	// holding it (and its account's upstream slot). Default 30s.
	WriteTimeout Duration `toml:"write_timeout"`
	// IdleTimeout closes idle keep-alive connections. Default 120s.
	IdleTimeout Duration `toml:"idle_timeout"`
	// MaxHeaderBytes bounds request headers. Default 64KiB.
	MaxHeaderBytes ByteSize `toml:"max_header_bytes"`
	// MaxBodyBytes bounds request bodies; larger ones get 413. Default 10MiB.
	MaxBodyBytes ByteSize `toml:"max_body_bytes"`
}

// RateLimit is each account's upstream budget (docs/budget.md).
type RateLimit struct {
	// RequestsPerSecond, if not 0, is the most upstream calls one account
	// starts in any one second (a sliding window: bursts pass while the
	// window has room). Default 0: concurrency alone.
	RequestsPerSecond int `toml:"requests_per_second"`
	// MaxWait bounds how long a request waits for its turn. Default 2s.
	MaxWait Duration `toml:"max_wait"`
	// MaxConcurrent caps one account's upstream calls in flight, the
	// budget's primary control: Twilio limits an account's concurrent
	// requests (20429). The cap adapts below it on 429s. Default 25.
	MaxConcurrent int `toml:"max_concurrent"`
	// MaxRetries bounds retries of an upstream 429. Default 3; 0 disables.
	MaxRetries int `toml:"max_retries"`
	// BackoffBase and BackoffMax shape the retry wait: full jitter over
	// base·2^attempt, at most max, unless the upstream sends Retry-After.
	// Defaults 200ms and 5s.
	BackoffBase Duration `toml:"backoff_base"`
	BackoffMax  Duration `toml:"backoff_max"`
	// ReplayBytes is the largest write body buffered so it can be retried.
	// Default 64KiB.
	ReplayBytes ByteSize `toml:"replay_bytes"`
	// Recover is how long an account's concurrency cap, cut by an upstream
	// 429, takes to climb back to max_concurrent. Default 30s.
	Recover Duration `toml:"recover"`
	// KeyAccounts maps API key SIDs to their account SIDs, so a key's calls
	// count against its account's budget from the first one (otherwise
	// learned from the key's first answer). Environment and -set form:
	// "SK…=AC…,SK…=AC…".
	KeyAccounts KeyAccounts `toml:"key_accounts"`
	// UnauthorizedTTL is how long the upstream's 401 for a credential is
	// answered locally, spending none of the account's budget: a flood of
	// wrong tokens cannot crowd out the right one. Default 10s; 0 disables.
	UnauthorizedTTL Duration `toml:"unauthorized_ttl"`
	// WriteShare is the share of an account's cap that reads and
	// background refreshes leave to writes while writes wait or are in
	// flight, and of the turns writes get while reads wait too (writes
	// go first, but a flood of them leaves reads the rest). Default 0.2;
	// 0 to 1.
	WriteShare float64 `toml:"write_share"`
}

// Log configures the JSON logs.
type Log struct {
	// Level is debug, info, warn or error. Default info.
	Level string `toml:"level"`
	// Format is "json" (for machines) or "console" (zerolog's ConsoleWriter,
	// for people at a terminal). Default json.
	Format string `toml:"format"`
	// Buffer batches log lines into writes of up to this size; warnings and
	// errors are written at once. 0 writes every line. Default 64KiB.
	Buffer ByteSize `toml:"buffer"`
	// FlushInterval bounds how long a buffered line waits. Default 200ms.
	FlushInterval Duration `toml:"flush_interval"`
	// SummaryInterval is the period of the summary line. Default 60s.
	SummaryInterval Duration `toml:"summary_interval"`
}

// Default returns the configuration cacheproxy runs on without a file.
func Default() Config {
	return Config{
		Listen:          "127.0.0.1:8080",
		AdminListen:     "127.0.0.1:9090",
		ShutdownTimeout: Duration(25 * time.Second),
		Upstreams: Upstreams{
			Conversations: Upstream{URL: "https://conversations.twilio.com", Hosts: []string{"conversations.twilio.com"}, Timeout: Duration(15 * time.Second)},
			Proxy:         Upstream{URL: "https://proxy.twilio.com", Hosts: []string{"proxy.twilio.com"}, Timeout: Duration(15 * time.Second)},
		},
		Cache: Cache{
			TTL:           Duration(30 * time.Second),
			NegativeTTL:   Duration(5 * time.Second),
			WriteLag:      Duration(5 * time.Second),
			MaxBytes:      64 << 20,
			MaxEntryBytes: 1 << 20,
			StaleIfError:  Duration(60 * time.Second),
		},
		Server: Server{
			ReadHeaderTimeout: Duration(10 * time.Second),
			ReadTimeout:       Duration(30 * time.Second),
			WriteTimeout:      Duration(30 * time.Second),
			IdleTimeout:       Duration(120 * time.Second),
			MaxHeaderBytes:    64 << 10,
			MaxBodyBytes:      10 << 20,
		},
		RateLimit: RateLimit{MaxWait: Duration(2 * time.Second), MaxConcurrent: 25, MaxRetries: 3,
			BackoffBase: Duration(200 * time.Millisecond), BackoffMax: Duration(5 * time.Second), ReplayBytes: 64 << 10,
			Recover: Duration(30 * time.Second), UnauthorizedTTL: Duration(10 * time.Second), WriteShare: 0.2},
		Redis:   Redis{KeyPrefix: "cacheproxy:", Timeout: Duration(50 * time.Millisecond), InvalidationWait: Duration(100 * time.Millisecond)},
		Metrics: Metrics{MaxAccounts: 100},
		Log: Log{Level: "info", Format: "json", Buffer: 64 << 10, FlushInterval: Duration(200 * time.Millisecond),
			SummaryInterval: Duration(60 * time.Second)},
	}
}

// EnvPrefix starts every environment override: CACHEPROXY_CACHE_TTL=10s.
const EnvPrefix = "CACHEPROXY_"

// Load builds the configuration: defaults, the TOML file at path (if path is
// not empty), environment overrides from environ (os.Environ() form), then
// sets ("key=value" each). The result is validated.
func Load(path string, environ, sets []string) (Config, error) {
	c := Default()
	keys := leaves(reflect.ValueOf(&c).Elem(), "")
	var errs []error // every problem, each naming its key
	if path != "" {
		fileErrs, err := loadFile(path, keys)
		if err != nil {
			return c, err // the file cannot be read or parsed: nothing else is worth checking
		}
		errs = append(errs, fileErrs...)
	}
	for _, kv := range environ {
		name, val, ok := strings.Cut(kv, "=")
		if !ok || !strings.HasPrefix(name, EnvPrefix) {
			continue
		}
		key := envKey(keys, name)
		if key == "" {
			continue // see UnknownEnv
		}
		if err := set(keys[key], val); err != nil {
			errs = append(errs, fmt.Errorf("environment %s (%s): %w", name, key, err))
		}
	}
	errs = append(errs, misspelt(environ, keys)...)
	for _, kv := range sets {
		key, val, ok := strings.Cut(kv, "=")
		if !ok {
			errs = append(errs, fmt.Errorf("-set %q: want key=value", kv))
			continue
		}
		f, found := keys[key]
		if !found {
			errs = append(errs, fmt.Errorf("-set: unknown key %s%s", key, didYouMean(key, keys)))
			continue
		}
		if err := set(f, val); err != nil {
			errs = append(errs, fmt.Errorf("-set %s: %w", key, err))
		}
	}
	return c, errors.Join(append(errs, c.Validate())...)
}

// loadFile sets the keys the TOML file at path holds, each on its own: a
// bad value or an unknown key is a problem of its own, and the others are
// still set and checked. Only a file that cannot be read or parsed is an
// error on its own.
func loadFile(path string, keys map[string]reflect.Value) ([]error, error) {
	var top map[string]toml.Primitive
	md, err := toml.DecodeFile(path, &top)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	var errs []error
	var walk func(prefix string, table map[string]toml.Primitive)
	walk = func(prefix string, table map[string]toml.Primitive) {
		names := make([]string, 0, len(table))
		for name := range table {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			key, v := prefix+name, table[name]
			if f, ok := keys[key]; ok {
				if err := decode(md, v, f); err != nil {
					errs = append(errs, fmt.Errorf("config %s: %s: %w", path, key, unwrapTOML(err)))
				}
				continue
			}
			var sub map[string]toml.Primitive
			if hasPrefix(keys, key+".") && md.PrimitiveDecode(v, &sub) == nil {
				walk(key+".", sub)
				continue
			}
			errs = append(errs, fmt.Errorf("config %s: unknown key %s%s", path, key, didYouMean(key, keys)))
		}
	}
	walk("", top)
	for _, k := range md.Undecoded() { // a route's table holds ttl only
		if len(k) == 4 && k[0] == "cache" && k[1] == "routes" {
			errs = append(errs, fmt.Errorf("config %s: unknown key %s in [cache.routes.%q] (it takes ttl)", path, k[3], k[2]))
		}
	}
	return errs, nil
}

// decode sets f from the TOML value v. A map (cache.routes) may be a
// table of tables, or a string its UnmarshalText reads.
func decode(md toml.MetaData, v toml.Primitive, f reflect.Value) error {
	err := md.PrimitiveDecode(v, f.Addr().Interface())
	if err == nil || f.Kind() != reflect.Map {
		return err
	}
	plain := reflect.New(reflect.MapOf(f.Type().Key(), f.Type().Elem()))
	if md.PrimitiveDecode(v, plain.Interface()) != nil {
		return err
	}
	f.Set(plain.Elem().Convert(f.Type()))
	return nil
}

// hasPrefix reports whether a key begins with prefix (a table of keys).
func hasPrefix(keys map[string]reflect.Value, prefix string) bool {
	for k := range keys {
		if strings.HasPrefix(k, prefix) {
			return true
		}
	}
	return false
}

// unwrapTOML is the value's own error, without the decoder's wrapping
// where it has one.
func unwrapTOML(err error) error {
	if u := errors.Unwrap(err); u != nil {
		return u
	}
	return err
}

// UnknownEnv lists the CACHEPROXY_* variables of environ that name no key
// (names only, never values). Load ignores them: Kubernetes injects
// CACHEPROXY_PORT, CACHEPROXY_SERVICE_HOST and friends into every pod of a
// namespace with a Service named cacheproxy, and a sidecar must not
// crash-loop on them. The caller warns.
func UnknownEnv(environ []string) []string {
	c := Default()
	keys := leaves(reflect.ValueOf(&c).Elem(), "")
	var out []string
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, EnvPrefix) && envKey(keys, name) == "" {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

// Keys lists every dotted key, sorted; used by -help.
func Keys() []string {
	c := Default()
	m := leaves(reflect.ValueOf(&c).Elem(), "")
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// EnvName is the environment variable that overrides key.
func EnvName(key string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

func envKey(keys map[string]reflect.Value, name string) string {
	for k := range keys {
		if EnvName(k) == name {
			return k
		}
	}
	return ""
}

// leaves maps each dotted key to its settable field.
func leaves(v reflect.Value, prefix string) map[string]reflect.Value {
	out := map[string]reflect.Value{}
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		name := t.Field(i).Tag.Get("toml")
		fv := v.Field(i)
		key := prefix + name
		if fv.Kind() == reflect.Struct {
			for k, f := range leaves(fv, key+".") {
				out[k] = f
			}
			continue
		}
		out[key] = fv
	}
	return out
}

// set parses s into the field f.
func set(f reflect.Value, s string) error {
	if u, ok := f.Addr().Interface().(interface{ UnmarshalText([]byte) error }); ok {
		return u.UnmarshalText([]byte(s))
	}
	switch f.Kind() {
	case reflect.String:
		f.SetString(s)
	case reflect.Int:
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("not an integer: %q", s)
		}
		f.SetInt(int64(n))
	case reflect.Float64:
		x, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
		if err != nil {
			return fmt.Errorf("not a number: %q", s)
		}
		f.SetFloat(x)
	case reflect.Slice:
		var parts []string
		for _, p := range strings.Split(s, ",") {
			if p = strings.TrimSpace(p); p != "" {
				parts = append(parts, p)
			}
		}
		f.Set(reflect.ValueOf(parts))
	default:
		return fmt.Errorf("unsupported kind %s", f.Kind())
	}
	return nil
}

// Validate reports the first bad value, naming its key.
func (c Config) Validate() error {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, a...)))
	}
	for key, addr := range map[string]string{"listen": c.Listen, "admin_listen": c.AdminListen} {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			bad(key, "want host:port, got %q", addr)
		}
	}
	for _, h := range c.PublicHosts {
		if u, err := url.Parse("http://" + h); err != nil || h == "" || u.Host != h || u.Hostname() == "" {
			bad("public_hosts", "want host or host:port, got %q", h)
		}
	}
	for name, u := range map[string]Upstream{"conversations": c.Upstreams.Conversations, "proxy": c.Upstreams.Proxy} {
		p, err := url.Parse(u.URL)
		if err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "" || (p.Path != "" && p.Path != "/") || p.RawQuery != "" {
			bad("upstreams."+name+".url", "want http(s)://host[:port] with no path, got %q", u.URL)
		}
		if u.Timeout <= 0 {
			bad("upstreams."+name+".timeout", "must be > 0")
		}
	}
	errs = append(errs, c.redactedSecrets()...)
	if c.ShutdownTimeout <= 0 {
		bad("shutdown_timeout", "must be > 0")
	}
	if c.Metrics.MaxAccounts < 1 {
		bad("metrics.max_accounts", "must be >= 1")
	}
	if u := c.Redis.URL; u != "" {
		if !strings.HasPrefix(u, "redis://") && !strings.HasPrefix(u, "rediss://") {
			bad("redis.url", "want redis://[user:pass@]host:port[/db] or rediss://…")
		} else if c.Cache.KeySecret == "" {
			bad("cache.key_secret", "is required with redis.url: every replica must derive the same keys (set it from a Secret, e.g. CACHEPROXY_CACHE_KEY_SECRET)")
		}
	}
	if len(c.Cache.PreviousKeySecrets) > 0 && c.Cache.KeySecret == "" {
		bad("cache.previous_key_secrets", "needs cache.key_secret (the secret rotated to)")
	}
	if w := c.Webhooks; w.Listen != "" {
		if _, _, err := net.SplitHostPort(w.Listen); err != nil {
			bad("webhooks.listen", "want host:port")
		}
		if u, err := url.Parse(w.PublicURL); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			bad("webhooks.public_url", "want the absolute URL Twilio calls (https://…), as it signs it")
		}
		if len(w.AuthTokens) == 0 {
			bad("webhooks.auth_tokens", "at least one auth token is needed to check Twilio's signatures")
		}
		if w.ForwardTo != "" {
			if u, err := url.Parse(w.ForwardTo); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
				bad("webhooks.forward_to", "want an absolute http(s) URL")
			}
		}
	}
	if c.Redis.Timeout <= 0 {
		bad("redis.timeout", "must be > 0")
	}
	if c.Redis.InvalidationWait <= 0 {
		bad("redis.invalidation_wait", "must be > 0")
	}
	if c.RateLimit.UnauthorizedTTL < 0 {
		bad("ratelimit.unauthorized_ttl", "must be >= 0")
	}
	if !(c.RateLimit.WriteShare >= 0 && c.RateLimit.WriteShare <= 1) {
		bad("ratelimit.write_share", "must be between 0 and 1")
	}
	if c.ShutdownDelay < 0 {
		bad("shutdown_delay", "must be >= 0")
	}
	if c.Cache.TTL <= 0 {
		bad("cache.ttl", "must be > 0")
	}
	if c.Cache.NegativeTTL < 0 {
		bad("cache.negative_ttl", "must be >= 0")
	}
	if c.Cache.WriteLag < 0 {
		bad("cache.write_lag", "must be >= 0")
	}
	for _, name := range slices.Sorted(maps.Keys(c.Cache.Routes)) {
		switch {
		case !route.Known(name):
			bad(fmt.Sprintf("cache.routes.%q", name), "no such route (cacheproxy -routes lists them)")
		case c.Cache.Routes[name].TTL < 0:
			bad(fmt.Sprintf("cache.routes.%q.ttl", name), "must be >= 0")
		}
	}
	if c.Cache.MaxBytes < 1<<20 {
		bad("cache.max_bytes", "must be at least 1MiB")
	}
	if c.Cache.MaxEntryBytes <= 0 || c.Cache.MaxEntryBytes > c.Cache.MaxBytes {
		bad("cache.max_entry_bytes", "must be > 0 and at most cache.max_bytes")
	}
	if c.Server.ReadHeaderTimeout <= 0 {
		bad("server.read_header_timeout", "must be > 0")
	}
	if c.Server.ReadTimeout <= 0 {
		bad("server.read_timeout", "must be > 0")
	}
	if c.Server.WriteTimeout <= 0 {
		bad("server.write_timeout", "must be > 0")
	}
	if c.Server.IdleTimeout <= 0 {
		bad("server.idle_timeout", "must be > 0")
	}
	if c.Server.MaxHeaderBytes < 4<<10 {
		bad("server.max_header_bytes", "must be at least 4KiB")
	}
	if c.Server.MaxBodyBytes <= 0 {
		bad("server.max_body_bytes", "must be > 0")
	}
	if c.RateLimit.RequestsPerSecond < 0 || c.RateLimit.RequestsPerSecond > maxRequestsPerSecond {
		bad("ratelimit.requests_per_second", "must be between 0 (off) and %d", maxRequestsPerSecond)
	}
	if c.RateLimit.MaxConcurrent > maxConcurrent {
		bad("ratelimit.max_concurrent", "must be <= %d", maxConcurrent)
	}
	for k, a := range c.RateLimit.KeyAccounts {
		if !isSID(k, "SK") || !isSID(a, "AC") {
			bad("ratelimit.key_accounts", "want API key SIDs (SK + 32 hex digits) mapped to account SIDs (AC + 32 hex digits)")
			break
		}
	}
	if c.RateLimit.MaxWait <= 0 {
		bad("ratelimit.max_wait", "must be > 0")
	}
	if c.RateLimit.MaxConcurrent <= 0 {
		bad("ratelimit.max_concurrent", "must be > 0")
	}
	if c.RateLimit.MaxRetries < 0 || c.RateLimit.MaxRetries > 10 {
		bad("ratelimit.max_retries", "must be between 0 and 10")
	}
	if c.RateLimit.BackoffBase <= 0 {
		bad("ratelimit.backoff_base", "must be > 0")
	}
	if c.RateLimit.BackoffMax < c.RateLimit.BackoffBase {
		bad("ratelimit.backoff_max", "must be >= ratelimit.backoff_base")
	}
	if c.RateLimit.ReplayBytes < 0 {
		bad("ratelimit.replay_bytes", "must be >= 0")
	}
	if c.RateLimit.Recover <= 0 {
		bad("ratelimit.recover", "must be > 0")
	}
	if c.Cache.StaleIfError < 0 {
		bad("cache.stale_if_error", "must be >= 0")
	}
	if c.Cache.StaleWhileRevalidate < 0 {
		bad("cache.stale_while_revalidate", "must be >= 0")
	}
	if c.Log.SummaryInterval <= 0 {
		bad("log.summary_interval", "must be > 0")
	}
	if c.Log.Buffer < 0 || c.Log.Buffer > 16<<20 {
		bad("log.buffer", "must be between 0 and 16MiB")
	}
	if c.Log.FlushInterval <= 0 {
		bad("log.flush_interval", "must be > 0")
	}
	if c.Log.Format != "json" && c.Log.Format != "console" {
		bad("log.format", "want json or console, got %q", c.Log.Format)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "want debug, info, warn or error, got %q", c.Log.Level)
	}
	errs = append(errs, c.listenerClashes()...)
	sort.Slice(errs, func(i, j int) bool { return errs[i].Error() < errs[j].Error() })
	return errors.Join(errs...)
}

// Duration is a time.Duration written as "30s" in TOML and the environment.
type Duration time.Duration

// UnmarshalText parses a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("not a duration (want e.g. 30s, 500ms): %q", b)
	}
	*d = Duration(v)
	return nil
}

// MarshalText writes the duration as Go does.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// ByteSize is a size in bytes written as "64MiB", "512KiB", "1GB" or "1024".
type ByteSize int64

var units = []struct {
	suffix string
	mult   int64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30},
	{"KB", 1000}, {"MB", 1000 * 1000}, {"GB", 1000 * 1000 * 1000}, {"B", 1},
}

// UnmarshalText parses a byte size.
func (b *ByteSize) UnmarshalText(text []byte) error {
	s := strings.TrimSpace(string(text))
	mult := int64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return fmt.Errorf("not a byte size (want e.g. 64MiB, 512KiB, 1024): %q", text)
	}
	*b = ByteSize(n * mult)
	return nil
}

// UnmarshalTOML accepts a plain TOML integer as well as a string.
func (b *ByteSize) UnmarshalTOML(v any) error {
	switch v := v.(type) {
	case int64:
		return b.UnmarshalText([]byte(strconv.FormatInt(v, 10)))
	case string:
		return b.UnmarshalText([]byte(v))
	}
	return fmt.Errorf("not a byte size: %v", v)
}

// MarshalText writes the size in bytes.
func (b ByteSize) MarshalText() ([]byte, error) { return []byte(strconv.FormatInt(int64(b), 10)), nil }

// Bounds that keep the budget's memory small: the rate window holds one
// timestamp (8 bytes) per call of the last second.
const (
	maxRequestsPerSecond = 10_000
	maxConcurrent        = 100_000
)

// isSID reports whether s is a Twilio SID with prefix (route.IsSID).
func isSID(s, prefix string) bool {
	return strings.HasPrefix(s, prefix) && route.IsSID(s)
}

// KeyAccounts maps API key SIDs to account SIDs: a TOML table
// { "SK…" = "AC…" }, or "SK…=AC…,SK…=AC…" in the environment and -set.
type KeyAccounts map[string]string

// UnmarshalText parses the "SK…=AC…,SK…=AC…" form; "" is empty.
func (k *KeyAccounts) UnmarshalText(b []byte) error {
	m := KeyAccounts{}
	for _, pair := range strings.Split(string(b), ",") {
		if pair = strings.TrimSpace(pair); pair == "" {
			continue
		}
		key, acct, ok := strings.Cut(pair, "=")
		if !ok {
			return fmt.Errorf("want SK…=AC… pairs separated by commas, got %q", pair)
		}
		m[strings.TrimSpace(key)] = strings.TrimSpace(acct)
	}
	*k = m
	return nil
}

// UnmarshalTOML accepts a table of strings, or the string form.
func (k *KeyAccounts) UnmarshalTOML(v any) error {
	switch v := v.(type) {
	case string:
		return k.UnmarshalText([]byte(v))
	case map[string]any:
		m := KeyAccounts{}
		for key, a := range v {
			s, ok := a.(string)
			if !ok {
				return fmt.Errorf("key_accounts.%s: want an account SID string", key)
			}
			m[key] = s
		}
		*k = m
		return nil
	}
	return fmt.Errorf("want a table of API key SIDs to account SIDs, got %T", v)
}

// MarshalText writes the string form, keys sorted.
func (k KeyAccounts) MarshalText() ([]byte, error) {
	keys := make([]string, 0, len(k))
	for key := range k {
		keys = append(keys, key)
	}
	sort.Strings(keys)
	var b strings.Builder
	for i, key := range keys {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(key + "=" + k[key])
	}
	return []byte(b.String()), nil
}
