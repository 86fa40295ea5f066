package main

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"cacheproxy/internal/config"
	"cacheproxy/internal/fleet"
	"cacheproxy/internal/route"

	"github.com/BurntSushi/toml"
)

// checkConfig runs every check a start runs on cfg (loaded as a start
// loads it, with loadErr its problems) without binding or connecting
// anything, and prints each problem on a line of its own, naming its key,
// then their count; the variables a start would ignore are named as a
// warning. It returns errReported when there is any problem.
func checkConfig(cfg config.Config, loadErr error, environ []string, stdout io.Writer) error {
	problems := split(loadErr)
	if loadErr == nil && cfg.Redis.URL != "" {
		problems = append(problems, split(fleet.CheckURL(cfg.Redis.URL))...)
	}
	for _, p := range problems {
		fmt.Fprintln(stdout, p)
	}
	if unknown := config.UnknownEnv(environ); len(unknown) > 0 {
		// Names only: a value may be a secret.
		fmt.Fprintf(stdout, "warning: ignoring environment variables that name no config key: %s\n", strings.Join(unknown, ", "))
	}
	if len(problems) > 0 {
		fmt.Fprintf(stdout, "config: %d problem(s)\n", len(problems))
		return errReported
	}
	fmt.Fprintln(stdout, "config ok")
	return nil
}

// errReported is an error whose details were printed already: the
// command exits 1 and prints nothing more.
var errReported = errors.New("reported")

// split is the problems joined in err, one per line.
func split(err error) []string {
	if err == nil {
		return nil
	}
	var out []string
	for _, l := range strings.Split(err.Error(), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out
}

// redacted is shown in place of a secret; a config that holds it is
// refused (config.Redacted).
const redacted = config.Redacted

// printConfig writes cfg as TOML, secrets shown as "<redacted>" (and a
// Redis URL's password).
func printConfig(cfg config.Config, stdout io.Writer) error {
	hide := func(s *string) {
		if *s != "" {
			*s = redacted
		}
	}
	hide(&cfg.Cache.KeySecret)
	hide(&cfg.Admin.PurgeToken)
	for _, list := range []*[]string{&cfg.Cache.PreviousKeySecrets, &cfg.Webhooks.AuthTokens} {
		out := make([]string, len(*list))
		for i := range out {
			out[i] = redacted
		}
		*list = out
	}
	cfg.Redis.URL = hideURLPasswords(cfg.Redis.URL)
	return toml.NewEncoder(stdout).Encode(cfg)
}

// hideURLPasswords redacts the password of each comma-separated URL
// (scheme://user:password@host…), by position: a password need not parse.
func hideURLPasswords(s string) string {
	parts := strings.Split(s, ",")
	for i, p := range parts {
		scheme, rest, ok := strings.Cut(p, "://")
		at := strings.LastIndex(rest, "@")
		if !ok || at < 0 {
			continue
		}
		if user, _, has := strings.Cut(rest[:at], ":"); has {
			parts[i] = scheme + "://" + user + ":" + redacted + rest[at:]
		}
	}
	return strings.Join(parts, ",")
}

// printRoutes lists every named route (route.Named: each GET path of the
// three APIs), its upstream and path, and what this configuration does
// with it: cached for how long, or not.
func printRoutes(cfg config.Config, w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ROUTE\tUPSTREAM\tGET PATH\tCACHED")
	for _, r := range route.Named() {
		state := "on request ([cache.routes] ttl)"
		if r.Cached {
			state = "by default, " + cfg.Cache.TTL.D().String()
		}
		if rc, set := cfg.Cache.Routes[r.Name]; set {
			state = "yes, " + rc.TTL.D().String()
			if rc.TTL == 0 {
				state = "no (ttl 0s)"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", r.Name, r.Upstream, shownPattern(r), state)
	}
	return tw.Flush()
}

// shownPattern is a route's path with its variables named as the README
// names them: {C} a conversation, {IS} or {KS} a service, {KC} a session,
// {Sid} anything else.
func shownPattern(r route.Row) string {
	segs := strings.Split(r.Pattern, "/")
	for i, s := range segs {
		switch {
		case s == "{conv}":
			segs[i] = "{C}"
		case s == "{svc}" && r.Upstream == route.Proxy:
			segs[i] = "{KS}"
		case s == "{svc}":
			segs[i] = "{IS}"
		case s == "{sess}":
			segs[i] = "{KC}"
		case strings.HasPrefix(s, "{"):
			segs[i] = "{Sid}"
		}
	}
	return strings.Join(segs, "/")
}
