package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "c.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaultsWithoutAFile(t *testing.T) {
	c, err := Load("", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:8080" || c.AdminListen != "127.0.0.1:9090" || c.Cache.TTL.D() != 30*time.Second ||
		c.Cache.NegativeTTL.D() != 5*time.Second || c.Cache.MaxBytes != 64<<20 || c.RateLimit.RequestsPerSecond != 0 || c.RateLimit.MaxConcurrent != 25 ||
		c.RateLimit.MaxWait.D() != 2*time.Second || c.Upstreams.Conversations.URL != "https://conversations.twilio.com" ||
		c.Upstreams.Proxy.URL != "https://proxy.twilio.com" {
		t.Fatalf("defaults: %+v", c)
	}
}

func TestFileEnvAndSetOverride(t *testing.T) {
	p := writeFile(t, `
listen = "127.0.0.1:7000"
[upstreams.conversations]
url = "http://127.0.0.1:1234"
[cache]
ttl = "10s"
max_bytes = "128MiB"
max_entry_bytes = 2048
[ratelimit]
requests_per_second = 20
`)
	env := []string{"CACHEPROXY_CACHE_TTL=12s", "CACHEPROXY_UPSTREAMS_PROXY_HOSTS=a.example, b.example", "PATH=/bin"}
	c, err := Load(p, env, []string{"ratelimit.max_wait=750ms"})
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:7000" || c.Upstreams.Conversations.URL != "http://127.0.0.1:1234" || c.Cache.TTL.D() != 12*time.Second ||
		c.Cache.MaxBytes != 128<<20 || c.Cache.MaxEntryBytes != 2048 || c.RateLimit.RequestsPerSecond != 20 ||
		c.RateLimit.MaxWait.D() != 750*time.Millisecond || strings.Join(c.Upstreams.Proxy.Hosts, "|") != "a.example|b.example" ||
		c.Cache.NegativeTTL.D() != 5*time.Second {
		t.Fatalf("loaded: %+v", c)
	}
}

func TestErrorsNameTheKey(t *testing.T) {
	tests := []struct {
		name, file string
		env, sets  []string
		key        string
	}{
		{"unknown key", "[cache]\ntll = \"1s\"\n", nil, nil, "cache.tll"},
		{"bad duration", "[cache]\nttl = \"soon\"\n", nil, nil, "cache.ttl"},
		{"zero ttl", "[cache]\nttl = \"0s\"\n", nil, nil, "cache.ttl"},
		{"bad size", "[cache]\nmax_bytes = \"lots\"\n", nil, nil, "cache.max_bytes"},
		{"tiny cache", "[cache]\nmax_bytes = \"1KiB\"\n", nil, nil, "cache.max_bytes"},
		{"bad url", "[upstreams.proxy]\nurl = \"ftp://x\"\n", nil, nil, "upstreams.proxy.url"},
		{"unknown upstream", "[upstreams.api]\nurl = \"https://api.twilio.com\"\n", nil, nil, "upstreams.api"},
		{"bad rate", "[ratelimit]\nrequests_per_second = -1\n", nil, nil, "ratelimit.requests_per_second"},
		{"redis without key_secret", "[redis]\nurl = \"redis://127.0.0.1:6379\"\n", nil, nil, "cache.key_secret"},
		{"bad redis url", "[redis]\nurl = \"http://x\"\n", nil, nil, "redis.url"},
		{"webhooks without public_url", "[webhooks]\nlisten = \"127.0.0.1:0\"\nauth_tokens = [\"t\"]\n", nil, nil, "webhooks.public_url"},
		{"webhooks without tokens", "[webhooks]\nlisten = \"127.0.0.1:0\"\npublic_url = \"https://h.example.com\"\n", nil, nil, "webhooks.auth_tokens"},
		{"bad forward_to", "[webhooks]\nlisten = \"127.0.0.1:0\"\npublic_url = \"https://h.example.com\"\nauth_tokens = [\"t\"]\nforward_to = \"app\"\n", nil, nil, "webhooks.forward_to"},
		{"bad key account", "[ratelimit]\nkey_accounts = { SK1 = \"AC1\" }\n", nil, nil, "ratelimit.key_accounts"},
		{"bad key account env", "", []string{"CACHEPROXY_RATELIMIT_KEY_ACCOUNTS=SK00000000000000000000000000000001"}, nil, "ratelimit.key_accounts"},
		{"wrong type", "[ratelimit]\nrequests_per_second = \"many\"\n", nil, nil, "ratelimit.requests_per_second"},
		{"bad listen", "listen = \"nowhere\"\n", nil, nil, "listen"},
		{"bad level", "[log]\nlevel = \"loud\"\n", nil, nil, "log.level"},
		{"bad toml", "[cache\n", nil, nil, "c.toml"},
		{"bad env", "", []string{"CACHEPROXY_CACHE_NEGATIVE_TTL=-"}, nil, "cache.negative_ttl"},
		{"bad set", "", nil, []string{"cache.ttl=x"}, "cache.ttl"},
		{"unknown set", "", nil, []string{"cache.tll=1s"}, "cache.tll"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := ""
			if tc.file != "" {
				p = writeFile(t, tc.file)
			}
			_, err := Load(p, tc.env, tc.sets)
			if err == nil || !strings.Contains(err.Error(), tc.key) {
				t.Fatalf("err = %v, want one naming %s", err, tc.key)
			}
		})
	}
}

// TestUnknownEnvironmentIsIgnoredAndNamed: Kubernetes' service links put
// CACHEPROXY_PORT=tcp://… and friends into the pod; they are not keys, so
// Load ignores them and UnknownEnv names them (never their values) for a
// warning. A name close to a key (a typo) is an error that names the key
// meant; a bad value of a known key is an error too.
func TestUnknownEnvironmentIsIgnoredAndNamed(t *testing.T) {
	env := []string{"CACHEPROXY_PORT=tcp://10.0.0.1:8080", "CACHEPROXY_SERVICE_HOST=10.0.0.1", "CACHEPROXY_PORT_8080_TCP_ADDR=10.0.0.1",
		"CACHEPROXY_SERVICE_PORT_ADMIN=9090", "CACHEPROXY_CACHE_TTL=7s", "HOME=/root"}
	c, err := Load("", env, nil)
	if err != nil || c.Cache.TTL.D() != 7*time.Second {
		t.Fatalf("Load: %v %v", err, c.Cache.TTL)
	}
	got := strings.Join(UnknownEnv(env), " ")
	if got != "CACHEPROXY_PORT CACHEPROXY_PORT_8080_TCP_ADDR CACHEPROXY_SERVICE_HOST CACHEPROXY_SERVICE_PORT_ADMIN" {
		t.Fatalf("UnknownEnv = %q", got)
	}
	for typo, meant := range map[string]string{
		"CACHEPROXY_REDIS_URI":        "CACHEPROXY_REDIS_URL",        // one letter
		"CACHEPROXY_CACHE_TLL":        "CACHEPROXY_CACHE_TTL",        // two
		"CACHEPROXY_LISTEN_ADMIN":     "CACHEPROXY_ADMIN_LISTEN",     // words reordered
		"CACHEPROXY_SECRET_KEY_CACHE": "CACHEPROXY_CACHE_KEY_SECRET", // words reordered
	} {
		_, err := Load("", append(env, typo+"=x"), nil)
		want := typo + " is not a setting; did you mean " + meant + "?"
		if err == nil || !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), "=x") {
			t.Fatalf("%s: %v, want %q (and never the value)", typo, err, want)
		}
	}
	if _, err := Load("", append(env, "CACHEPROXY_CACHE_TTL=soon"), nil); err == nil || !strings.Contains(err.Error(), "cache.ttl") {
		t.Fatalf("bad value of a known key: %v", err)
	}
}

// Two listeners on one address are an error naming both keys, before
// anything binds; port 0 and different ports or hosts are fine, and every
// address (0.0.0.0, ::, empty) clashes with any host on the same port.
func TestListenersOnOneAddressAreAnError(t *testing.T) {
	for _, tc := range []struct {
		sets []string
		want string // "" for no clash
	}{
		{[]string{"listen=127.0.0.1:8080", "admin_listen=127.0.0.1:8080"}, "listen (127.0.0.1:8080) and admin_listen (127.0.0.1:8080) take the same port"},
		{[]string{"listen=0.0.0.0:8080", "admin_listen=127.0.0.1:8080"}, "listen (0.0.0.0:8080) and admin_listen (127.0.0.1:8080) take the same port"},
		{[]string{"webhooks.listen=:9090", "webhooks.public_url=https://x.example/", "webhooks.auth_tokens=t"}, "admin_listen (127.0.0.1:9090) and webhooks.listen (:9090) take the same port"},
		{[]string{"listen=127.0.0.1:0", "admin_listen=127.0.0.1:0"}, ""},
		{[]string{"listen=127.0.0.1:8080", "admin_listen=127.0.0.2:8080"}, ""},
		{[]string{"listen=127.0.0.1:8080", "admin_listen=127.0.0.1:8081"}, ""},
	} {
		_, err := Load("", nil, tc.sets)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%v: %v, want no error", tc.sets, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%v: %v, want %q", tc.sets, err, tc.want)
		}
	}
}

func TestByteSize(t *testing.T) {
	for in, want := range map[string]int64{"64MiB": 64 << 20, "1 KiB": 1024, "2GB": 2e9, "10": 10, "5B": 5} {
		var b ByteSize
		if err := b.UnmarshalText([]byte(in)); err != nil || int64(b) != want {
			t.Errorf("%q -> %d, %v; want %d", in, b, err, want)
		}
	}
	for _, in := range []string{"", "-1", "1TiB?", "MiB", "99999999999999GiB"} {
		var b ByteSize
		if err := b.UnmarshalText([]byte(in)); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}

// TestExampleFileDocumentsEveryKey keeps config.example.toml complete and
// true: it loads, every key appears in it, and its values are the defaults.
func TestExampleFileDocumentsEveryKey(t *testing.T) {
	raw, err := os.ReadFile("../../config.example.toml")
	if err != nil {
		t.Fatal(err)
	}
	c, err := Load("../../config.example.toml", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	d := Default()
	if c.Listen != d.Listen || !reflect.DeepEqual(c.Cache, d.Cache) || !reflect.DeepEqual(c.RateLimit, d.RateLimit) || c.Server != d.Server || c.Log != d.Log ||
		c.Upstreams.Conversations.URL != d.Upstreams.Conversations.URL || c.Upstreams.Proxy.Timeout != d.Upstreams.Proxy.Timeout || c.Redis != d.Redis {
		t.Fatalf("example values differ from the defaults:\n%+v\n%+v", c, d)
	}
	for _, k := range Keys() {
		leaf := k[strings.LastIndex(k, ".")+1:]
		if !strings.Contains(string(raw), leaf+" =") && !strings.Contains(string(raw), "# "+leaf+" =") {
			t.Errorf("config.example.toml does not document %s", k)
		}
	}
}

func TestContainerConfigLoads(t *testing.T) {
	c, err := Load("../../deploy/container.toml", nil, nil)
	if err != nil || c.Listen != "0.0.0.0:8080" || c.AdminListen != "0.0.0.0:9090" {
		t.Fatalf("deploy/container.toml: %+v %v", c, err)
	}
}

// TestSidecarManifestConfigLoads keeps the ConfigMaps in deploy/k8s valid;
// the fleet's with the environment its Secret gives.
func TestSidecarManifestConfigLoads(t *testing.T) {
	for file, env := range map[string][]string{
		"sidecar.yaml":        nil,
		"native-sidecar.yaml": nil,
		"fleet.yaml":          {"CACHEPROXY_REDIS_URL=rediss://u:p@redis:6379", "CACHEPROXY_CACHE_KEY_SECRET=s", "CACHEPROXY_WEBHOOKS_AUTH_TOKENS=t"},
	} {
		raw, err := os.ReadFile("../../deploy/k8s/" + file)
		if err != nil {
			t.Fatal(err)
		}
		_, rest, ok := strings.Cut(string(raw), "config.toml: |\n")
		if !ok {
			t.Fatalf("%s: no config.toml in the manifest", file)
		}
		var lines []string
		for _, l := range strings.Split(rest, "\n") {
			if !strings.HasPrefix(l, "    ") {
				break
			}
			lines = append(lines, strings.TrimPrefix(l, "    "))
		}
		c, err := Load(writeFile(t, strings.Join(lines, "\n")), env, nil)
		if err != nil || c.AdminListen != "0.0.0.0:9090" || c.Cache.MaxBytes != 64<<20 || c.RateLimit.MaxConcurrent != 25 {
			t.Fatalf("%s: %+v %v", file, c, err)
		}
		if (env != nil) != (c.Redis.URL != "") || (env != nil) != (c.Webhooks.Listen != "") {
			t.Fatalf("%s: redis.url %q, webhooks.listen %q", file, c.Redis.URL, c.Webhooks.Listen)
		}
	}
}

func TestKeyAccountsFromFileEnvironmentAndSet(t *testing.T) {
	const k1, k2, a1, a2 = "SK00000000000000000000000000000001", "SK00000000000000000000000000000002",
		"AC00000000000000000000000000000001", "AC00000000000000000000000000000002"
	c, err := Load(writeFile(t, "[ratelimit]\nkey_accounts = { "+k1+" = \""+a1+"\", "+k2+" = \""+a2+"\" }\n"), nil, nil)
	if err != nil || len(c.RateLimit.KeyAccounts) != 2 || c.RateLimit.KeyAccounts[k1] != a1 || c.RateLimit.KeyAccounts[k2] != a2 {
		t.Fatalf("from a table: %v %v", c.RateLimit.KeyAccounts, err)
	}
	c, err = Load("", []string{"CACHEPROXY_RATELIMIT_KEY_ACCOUNTS=" + k1 + "=" + a1 + ", " + k2 + "=" + a2}, nil)
	if err != nil || len(c.RateLimit.KeyAccounts) != 2 || c.RateLimit.KeyAccounts[k2] != a2 {
		t.Fatalf("from the environment: %v %v", c.RateLimit.KeyAccounts, err)
	}
	c, err = Load("", nil, []string{"ratelimit.key_accounts=" + k2 + "=" + a1})
	if err != nil || len(c.RateLimit.KeyAccounts) != 1 || c.RateLimit.KeyAccounts[k2] != a1 {
		t.Fatalf("from -set: %v %v", c.RateLimit.KeyAccounts, err)
	}
	if b, _ := (KeyAccounts{k2: a2, k1: a1}).MarshalText(); string(b) != k1+"="+a1+","+k2+"="+a2 {
		t.Fatalf("text form %q", b)
	}
}

// Every problem of a file at once: a bad value no longer hides the keys
// after it, nor the typos; a typo in the file or in -set names the key
// meant, as a typo'd variable does.
func TestEveryProblemAtOnce(t *testing.T) {
	p := writeFile(t, `listen = "127.0.0.1:7001"
[cache]
ttl = "banana"
max_bytez = 5
[ratelimit]
max_wiat = "1s"
max_concurrent = "x"
requests_per_second = 7
[nope]
a = 1
`)
	c, err := Load(p, nil, []string{"cache.tll=5s"})
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{
		"cache.ttl: ", "not a duration",
		"unknown key cache.max_bytez; did you mean cache.max_bytes?",
		"unknown key ratelimit.max_wiat; did you mean ratelimit.max_wait?",
		"ratelimit.max_concurrent: ",
		"unknown key nope",
		"-set: unknown key cache.tll; did you mean cache.ttl?",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("lacks %q:\n%v", want, err)
		}
	}
	if n := strings.Count(err.Error(), "\n") + 1; n != 6 {
		t.Errorf("%d problems, want 6:\n%v", n, err)
	}
	if c.Listen != "127.0.0.1:7001" || c.RateLimit.RequestsPerSecond != 7 {
		t.Errorf("the good keys were not set: listen %q, requests_per_second %d", c.Listen, c.RateLimit.RequestsPerSecond)
	}
}

// -print-config's placeholder is refused wherever a secret goes, so its
// output fed back as a config cannot run with "<redacted>" as a secret.
func TestRedactedSecretsAreRefused(t *testing.T) {
	_, err := Load("", nil, []string{"cache.key_secret=" + Redacted, "admin.purge_token=" + Redacted,
		"redis.url=redis://u:" + Redacted + "@127.0.0.1:6379", "webhooks.auth_tokens=" + Redacted, "cache.previous_key_secrets=" + Redacted})
	for _, key := range []string{"cache.key_secret", "admin.purge_token", "redis.url", "webhooks.auth_tokens", "cache.previous_key_secrets"} {
		if err == nil || !strings.Contains(err.Error(), key+`: holds "<redacted>"`) {
			t.Errorf("%s with the placeholder: %v", key, err)
		}
	}
}

// Issue 36, point 4: [cache.routes."<name>"] tables, or name=ttl pairs
// from -set and the environment; a name that is no route, or a negative
// ttl, is refused naming its key.
func TestCacheRoutes(t *testing.T) {
	dir := t.TempDir()
	file := dir + "/c.toml"
	if err := os.WriteFile(file, []byte(`[cache.routes."conversations.v1.conversation"]
ttl = "10s"
[cache.routes."conversations.v1.participants"]
ttl = "0s"
`), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(file, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := Routes{"conversations.v1.conversation": {Duration(10 * time.Second)}, "conversations.v1.participants": {0}}
	if !reflect.DeepEqual(c.Cache.Routes, want) {
		t.Fatalf("from the file: %+v, want %+v", c.Cache.Routes, want)
	}
	c, err = Load("", []string{"CACHEPROXY_CACHE_ROUTES=proxy.v1.session=5s"}, []string{"cache.routes=conversations.v1.messages=1m, proxy.v1.sessions=2s"})
	if err != nil {
		t.Fatal(err)
	}
	if want := (Routes{"conversations.v1.messages": {Duration(time.Minute)}, "proxy.v1.sessions": {Duration(2 * time.Second)}}); !reflect.DeepEqual(c.Cache.Routes, want) {
		t.Fatalf("from -set (over the environment): %+v, want %+v", c.Cache.Routes, want)
	}
	_, err = Load("", nil, []string{"cache.routes=conversations.v1.conversatoin=10s,proxy.v1.session=-1s"})
	if err == nil || !strings.Contains(err.Error(), `cache.routes."conversations.v1.conversatoin": no such route`) ||
		!strings.Contains(err.Error(), `cache.routes."proxy.v1.session".ttl: must be >= 0`) {
		t.Fatalf("a misspelt name and a negative ttl: %v", err)
	}
	if _, err := Load("", nil, []string{"cache.routes=conversations.v1.conversation"}); err == nil {
		t.Fatal("a name without its ttl was accepted")
	}
	if err := os.WriteFile(file, []byte("[cache.routes.\"conversations.v1.conversation\"]\ntll = \"10s\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(file, nil, nil); err == nil || !strings.Contains(err.Error(), "unknown key tll") {
		t.Fatalf("a misspelt ttl: %v", err)
	}
}
