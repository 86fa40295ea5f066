package config

import (
	"fmt"
	"net"
	"reflect"
	"slices"
	"strings"
)

// listenerClashes names each pair of listeners set to one address (the
// same port on the same host, or on every address): the second could not
// bind, and "address already in use" would not say which keys clash.
// Port 0 (any free port) never clashes.
func (c Config) listenerClashes() []error {
	type listener struct{ key, addr string }
	ls := []listener{{"listen", c.Listen}, {"admin_listen", c.AdminListen}}
	if c.Webhooks.Listen != "" {
		ls = append(ls, listener{"webhooks.listen", c.Webhooks.Listen})
	}
	var errs []error
	for i, a := range ls {
		for _, b := range ls[i+1:] {
			if clash(a.addr, b.addr) {
				errs = append(errs, fmt.Errorf("%s (%s) and %s (%s) take the same port; give each listener its own address", a.key, a.addr, b.key, b.addr))
			}
		}
	}
	return errs
}

// clash reports whether listeners on a and b would take the same port.
func clash(a, b string) bool {
	ha, pa, err1 := net.SplitHostPort(a)
	hb, pb, err2 := net.SplitHostPort(b)
	if err1 != nil || err2 != nil || pa != pb || pa == "0" {
		return false
	}
	every := func(h string) bool { return h == "" || h == "0.0.0.0" || h == "::" }
	return ha == hb || every(ha) || every(hb)
}

// misspelt returns an error for each CACHEPROXY_* variable of environ that
// names no key but is close to one (the same words in another order, or
// at most two letters apart): a typo, which would otherwise leave the
// setting at its default with only a warning. Variables far from every key
// (Kubernetes' service links, CACHEPROXY_PORT and friends) stay warnings.
func misspelt(environ []string, keys map[string]reflect.Value) []error {
	var errs []error
	for _, name := range UnknownEnv(environ) {
		if s := suggest(name, keys); s != "" {
			errs = append(errs, fmt.Errorf("%s is not a setting; did you mean %s?", name, s))
		}
	}
	return errs
}

// didYouMean is ", did you mean K?" for the key K closest to the unknown
// dotted key (as suggest finds it for variables), or "".
func didYouMean(key string, keys map[string]reflect.Value) string {
	s := suggest(EnvName(key), keys)
	for k := range keys {
		if s != "" && EnvName(k) == s {
			return "; did you mean " + k + "?"
		}
	}
	return ""
}

func suggest(name string, keys map[string]reflect.Value) string {
	words := sortedWords(name)
	best, bestD := "", 3
	for k := range keys {
		known := EnvName(k)
		if slices.Equal(words, sortedWords(known)) {
			return known
		}
		if d := distance(name, known); d < bestD || d == bestD && known < best {
			best, bestD = known, d
		}
	}
	if bestD <= 2 {
		return best
	}
	return ""
}

func sortedWords(name string) []string {
	w := strings.Split(name, "_")
	slices.Sort(w)
	return w
}

// distance is the Levenshtein distance between a and b (bytes).
func distance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// Redacted is what -print-config prints in place of a secret.
const Redacted = "<redacted>"

// redactedSecrets refuses a secret that is -print-config's placeholder: its
// output, fed back as a config, would run with "<redacted>" as the secret.
func (c Config) redactedSecrets() []error {
	var errs []error
	check := func(key string, vs ...string) {
		for _, v := range vs {
			if strings.Contains(v, Redacted) {
				errs = append(errs, fmt.Errorf("%s: holds %q, the placeholder -print-config prints for a secret; set the secret itself", key, Redacted))
				return
			}
		}
	}
	check("cache.key_secret", c.Cache.KeySecret)
	check("cache.previous_key_secrets", c.Cache.PreviousKeySecrets...)
	check("admin.purge_token", c.Admin.PurgeToken)
	check("webhooks.auth_tokens", c.Webhooks.AuthTokens...)
	check("redis.url", c.Redis.URL)
	return errs
}
