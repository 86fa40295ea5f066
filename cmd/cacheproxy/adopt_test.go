package main

import (
	"errors"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"cacheproxy/internal/route"
)

// repoFile is a file of the repository, from this package's directory.
func repoFile(t *testing.T, rel string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", rel))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// The project is licensed Apache-2.0; the Twilio OpenAPI files in
// testdata keep their own licence.
func TestLicense(t *testing.T) {
	l := repoFile(t, "LICENSE")
	if !strings.Contains(l, "Apache License\n                           Version 2.0, January 2004") || !strings.Contains(l, "END OF TERMS AND CONDITIONS") {
		t.Fatalf("LICENSE is not the Apache License 2.0 (%d bytes)", len(l))
	}
	if !strings.Contains(repoFile(t, "testdata/twilio-oai/LICENSE"), "MIT") {
		t.Fatal("testdata/twilio-oai/LICENSE must keep Twilio's licence")
	}
}

// exit runs the binary and returns its output and exit code.
func exit(t *testing.T, env []string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		return string(out), ee.ExitCode()
	case err != nil:
		t.Fatal(err)
	}
	return string(out), 0
}

// -check-config loads the configuration as a start does and prints every
// problem, each naming its key, exiting non-zero; a good one exits 0.
func TestCheckConfig(t *testing.T) {
	out, code := exit(t, nil, "-config", "/nonexistent.toml", "-set", "cache.ttl=banana", "-version", "-check-config")
	if code == 0 || !strings.Contains(out, "nonexistent.toml") {
		t.Fatalf("a missing file: exit %d, %q", code, out)
	}
	out, code = exit(t, []string{"CACHEPROXY_REDIS_URI=redis://x"}, "-set", "cache.ttl=banana", "-set", "listen=127.0.0.1:9090", "-set", "log.level=loud", "-check-config")
	for _, want := range []string{
		`-set cache.ttl: not a duration (want e.g. 30s, 500ms): "banana"`,
		"listen (127.0.0.1:9090) and admin_listen (127.0.0.1:9090) take the same port",
		"CACHEPROXY_REDIS_URI is not a setting; did you mean CACHEPROXY_REDIS_URL?",
		"log.level: want debug, info, warn or error",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("-check-config output lacks %q:\n%s", want, out)
		}
	}
	if code == 0 || strings.Contains(out, "redis://x") {
		t.Fatalf("exit %d (want non-zero), never a value:\n%s", code, out)
	}
	if out, code := exit(t, nil, "-check-config"); code != 0 || !strings.Contains(out, "config ok") {
		t.Fatalf("the defaults: exit %d, %q", code, out)
	}
	// A start refuses the same clash before it binds anything.
	if out, code := exit(t, nil, "-set", "listen=127.0.0.1:0", "-set", "webhooks.listen=127.0.0.1:9090", "-set", "webhooks.public_url=https://x.example/",
		"-set", "webhooks.auth_tokens=tok"); code == 0 || !strings.Contains(out, "admin_listen (127.0.0.1:9090) and webhooks.listen (127.0.0.1:9090)") {
		t.Fatalf("a start with two listeners on one address: exit %d, %q", code, out)
	}
}

// Every configuration the project ships passes -check-config: the
// container's, the example, and each Kubernetes manifest's ConfigMap (with
// the secrets the manifest takes from a Secret given as placeholders).
func TestShippedConfigsPassTheCheck(t *testing.T) {
	dir := t.TempDir()
	type shipped struct {
		file string
		env  []string
	}
	configs := []shipped{{file: filepath.Join("..", "..", "deploy", "container.toml")}, {file: filepath.Join("..", "..", "config.example.toml")}}
	manifests, _ := filepath.Glob(filepath.Join("..", "..", "deploy", "k8s", "*.yaml"))
	fromSecret := regexp.MustCompile(`- name: (CACHEPROXY_[A-Z_]+)\s+valueFrom:\s+secretKeyRef`)
	for _, m := range manifests {
		b, _ := os.ReadFile(m)
		toml := configMapTOML(string(b))
		if toml == "" {
			continue
		}
		f := filepath.Join(dir, filepath.Base(m)+".toml")
		if err := os.WriteFile(f, []byte(toml), 0o600); err != nil {
			t.Fatal(err)
		}
		c := shipped{file: f}
		for _, v := range fromSecret.FindAllStringSubmatch(string(b), -1) {
			placeholder := "placeholder"
			if v[1] == "CACHEPROXY_REDIS_URL" {
				placeholder = "redis://127.0.0.1:6379"
			}
			c.env = append(c.env, v[1]+"="+placeholder)
		}
		configs = append(configs, c)
	}
	if len(configs) < 5 {
		t.Fatalf("found %d configs, want the container's, the example and the three manifests'", len(configs))
	}
	for _, c := range configs {
		if out, code := exit(t, c.env, "-config", c.file, "-check-config"); code != 0 {
			t.Errorf("%s (with %v from Secrets): exit %d\n%s", c.file, c.env, code, out)
		}
	}
}

// configMapTOML is the config.toml block of a manifest's ConfigMap.
func configMapTOML(manifest string) string {
	m := regexp.MustCompile(`(?m)^  config\.toml: \|\n((?:    .*\n|\n)+)`).FindStringSubmatch(manifest)
	if m == nil {
		return ""
	}
	var b strings.Builder
	for _, l := range strings.Split(m[1], "\n") {
		b.WriteString(strings.TrimPrefix(l, "    ") + "\n")
	}
	return b.String()
}

// -print-config prints the effective configuration as TOML, secrets shown
// as "<redacted>": it loads back to the same once the secrets are given
// again (here by environment, as a deployment's Secrets give them; alone,
// its placeholders are refused: TestCheckConfigPrintsOneReport).
func TestPrintConfigRedactsSecrets(t *testing.T) {
	secret := "sEcReTvalue0123"
	args := []string{"-set", "cache.key_secret=" + secret, "-set", "redis.url=redis://user:" + secret + "@127.0.0.1:6379",
		"-set", "cache.previous_key_secrets=" + secret + "2", "-set", "admin.purge_token=" + secret + "3", "-set", "webhooks.listen=127.0.0.1:0",
		"-set", "webhooks.public_url=https://hooks.example/", "-set", "webhooks.auth_tokens=" + secret + "4", "-set", "cache.ttl=17s"}
	out, code := exit(t, nil, append(args, "-print-config")...)
	if code != 0 || strings.Contains(out, secret) {
		t.Fatalf("exit %d; a secret in the output:\n%s", code, out)
	}
	for _, want := range []string{`key_secret = "<redacted>"`, `url = "redis://user:<redacted>@127.0.0.1:6379"`, `purge_token = "<redacted>"`,
		`auth_tokens = ["<redacted>"]`, `previous_key_secrets = ["<redacted>"]`, `ttl = "17s"`} {
		if !strings.Contains(out, want) {
			t.Errorf("-print-config lacks %q:\n%s", want, out)
		}
	}
	f := filepath.Join(t.TempDir(), "printed.toml")
	if err := os.WriteFile(f, []byte(out), 0o600); err != nil {
		t.Fatal(err)
	}
	secrets := []string{"CACHEPROXY_CACHE_KEY_SECRET=" + secret, "CACHEPROXY_REDIS_URL=redis://user:" + secret + "@127.0.0.1:6379",
		"CACHEPROXY_CACHE_PREVIOUS_KEY_SECRETS=" + secret + "2", "CACHEPROXY_ADMIN_PURGE_TOKEN=" + secret + "3", "CACHEPROXY_WEBHOOKS_AUTH_TOKENS=" + secret + "4"}
	again, code := exit(t, secrets, "-config", f, "-print-config")
	if code != 0 || again != out {
		t.Fatalf("the printed config does not load back to itself: exit %d\n%s", code, again)
	}
}

// -version names the module version and the VCS revision: the one go
// build read from the checkout, or the one given at link time (the
// Dockerfile's build, which has no .git).
func TestVersionNamesTheRevision(t *testing.T) {
	head, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		t.Fatalf("git rev-parse HEAD: %v (the tests run in a checkout)", err)
	}
	out, _ := exit(t, nil, "-version")
	if !strings.Contains(out, "vcs.revision="+strings.TrimSpace(string(head))) {
		t.Fatalf("-version in a checkout: %q, want vcs.revision=%s", out, head)
	}
	bin := filepath.Join(t.TempDir(), "cacheproxy")
	build := exec.Command("go", "build", "-buildvcs=false", "-ldflags", "-X main.revision=cafe1234", "-o", bin, ".")
	if b, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	got, err := exec.Command(bin, "-version").Output()
	if err != nil || !strings.Contains(string(got), "vcs.revision=cafe1234") || !strings.HasPrefix(string(got), "cacheproxy ") {
		t.Fatalf("-version built without .git: %v %q", err, got)
	}
}

// section is the README's text from heading to the next heading of the
// same or a higher level.
func section(t *testing.T, readme, heading string) string {
	t.Helper()
	i := strings.Index(readme, "\n"+heading+"\n")
	if i < 0 {
		t.Fatalf("the README has no %q", heading)
	}
	level := strings.Index(heading, " ") + 1 // "## " → 3
	rest := readme[i+1+len(heading):]
	for j := 0; j < len(rest); {
		k := strings.Index(rest[j:], "\n#")
		if k < 0 {
			break
		}
		j += k + 1
		if n := strings.Index(rest[j:], " "); n >= 0 && n+1 <= level {
			return rest[:j]
		}
	}
	return rest
}

// The README is a manual of at most 400 lines: what it is, the
// quickstart, pointing a client at it, the configuration's essentials,
// the fleet, webhooks, operations, limitations and a Performance table
// with one current figure per row and the command that measures it;
// everything deeper is in docs/, where every link of the README leads.
// Its Docker section warns that a mounted config replaces the image's,
// its fleet walkthrough waits for readiness and cleans up, and its
// Console steps list the same Conversations events as its API example.
func TestReadmeIsAManual(t *testing.T) {
	readme := repoFile(t, "README.md")
	if n := strings.Count(readme, "\n"); n > 400 {
		t.Errorf("the README is %d lines, want at most 400", n)
	}
	for _, h := range []string{"## Quickstart", "## Pointing a client at it", "## Configuration", "## Fleet", "## Writes made elsewhere",
		"## Operations", "## Limitations", "## Performance", "## Changes"} {
		section(t, readme, h)
	}
	rows := 0
	for _, row := range strings.Split(section(t, readme, "## Performance"), "\n") {
		cells := strings.Split(row, "|")
		if len(cells) != 6 || strings.HasPrefix(row, "| measure") || strings.HasPrefix(row, "|---") {
			continue
		}
		rows++
		now, cmd := cells[2], strings.TrimSpace(cells[4])
		if strings.ContainsAny(now, ";(") || regexp.MustCompile(`(?i)before|after|earlier|run|day`).MatchString(now) {
			t.Errorf("a Performance row's figure carries its history: %q", now)
		}
		if !strings.HasPrefix(cmd, "`") {
			t.Errorf("a Performance row has no command: %q", row)
		}
	}
	if rows < 10 {
		t.Errorf("the Performance table has %d rows", rows)
	}
	for _, m := range regexp.MustCompile(`\]\(([^)#]+)\)`).FindAllStringSubmatch(readme, -1) {
		if _, err := os.Stat(filepath.Join("..", "..", m[1])); err != nil {
			t.Errorf("the README links %s: %v", m[1], err)
		}
	}
	for _, h := range []string{"## Limitations", "### Production checklist"} {
		section(t, readme, h)
	}
	if docker := section(t, readme, "### Docker"); !strings.Contains(docker, "replaces the image's\nown") || !strings.Contains(docker, "-check-config") {
		t.Error("the Docker section does not warn that a mounted config replaces deploy/container.toml")
	}
	walk := section(t, readme, "## Fleet")
	if !strings.Contains(walk, "/readyz") || !strings.Contains(walk, "kill $(jobs -p)") {
		t.Error("the fleet walkthrough neither waits for readiness nor cleans up")
	}
	section(t, readme, "## Writes made elsewhere")
	hooks := repoFile(t, "docs/webhooks.md") // the setup steps the README points at
	console, api := map[string]bool{}, map[string]bool{}
	_, after, _ := strings.Cut(hooks, "Global webhooks")
	consoleText, apiText, _ := strings.Cut(after, "Or by API")
	for _, m := range regexp.MustCompile("`(on[A-Z][A-Za-z]+)`").FindAllStringSubmatch(consoleText, -1) {
		console[m[1]] = true
	}
	apiText, _, _ = strings.Cut(apiText, "per service")
	for _, m := range regexp.MustCompile(`Filters=(on[A-Za-z]+)`).FindAllStringSubmatch(apiText, -1) {
		api[m[1]] = true
	}
	if len(console) < 5 || !maps.Equal(console, api) {
		t.Errorf("Console events %v, API Filters %v: want the same list", console, api)
	}
}

// -check-config prints every problem and their count on standard output,
// nothing on standard error, warns about the variables a start would
// ignore (names only), and refuses -print-config's output with its
// secrets' placeholders.
func TestCheckConfigPrintsOneReport(t *testing.T) {
	run := func(env []string, args ...string) (string, string, int) {
		t.Helper()
		cmd := exec.Command(binary, args...)
		cmd.Env = append(os.Environ(), env...)
		var stdout, stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatal(err)
		}
		return stdout.String(), stderr.String(), cmd.ProcessState.ExitCode()
	}
	out, errOut, code := run([]string{"CACHEPROXY_PORT=tcp://10.0.0.1:8080"}, "-set", "cache.ttl=banana", "-set", "cache.tll=1s", "-check-config")
	for _, want := range []string{"cache.ttl", "did you mean cache.ttl?", "config: 2 problem(s)", "ignoring environment variables that name no config key: CACHEPROXY_PORT"} {
		if !strings.Contains(out, want) {
			t.Errorf("stdout lacks %q:\n%s", want, out)
		}
	}
	if code != 1 || errOut != "" || strings.Contains(out, "10.0.0.1") {
		t.Errorf("exit %d, stderr %q (want 1 and nothing), a value in stdout:\n%s", code, errOut, out)
	}
	printed, _, code := run(nil, "-set", "cache.key_secret=abcdefghijklmnopqrstuvwxyz012345", "-set", "admin.purge_token=tok", "-print-config")
	f := filepath.Join(t.TempDir(), "printed.toml")
	if err := os.WriteFile(f, []byte(printed), 0o600); code != 0 || err != nil {
		t.Fatalf("-print-config: exit %d, %v", code, err)
	}
	if out, _, code := run(nil, "-config", f, "-check-config"); code != 1 || !strings.Contains(out, `cache.key_secret: holds "<redacted>"`) || !strings.Contains(out, "admin.purge_token") {
		t.Errorf("-print-config's output fed back: exit %d\n%s", code, out)
	}
}

// Issue 36, point 4: -routes lists every GET path of the three APIs by
// the name [cache.routes] takes, with what this configuration caches;
// -check-config refuses a name that is no route.
func TestRoutesAreListedAndChecked(t *testing.T) {
	out, code := exit(t, nil, "-routes", "-set", "cache.routes=conversations.v1.conversation=10s,conversations.v1.participants=0s")
	for _, want := range []string{
		"conversations.v1.conversation                         conversations  /v1/Conversations/{C}                                                         yes, 10s",
		"conversations.v1.participants                         conversations  /v1/Conversations/{C}/Participants                                            no (ttl 0s)",
		"proxy.v1.participant                                  proxy          /v1/Services/{KS}/Sessions/{KC}/Participants/{Sid}                            by default, 30s",
		"conversations.v1.messages                             conversations  /v1/Conversations/{C}/Messages                                                on request",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("-routes lacks %q:\n%s", want, out)
		}
	}
	if code != 0 || strings.Count(out, "\n") != len(route.Named())+1 {
		t.Fatalf("-routes: exit %d, %d lines for %d routes", code, strings.Count(out, "\n"), len(route.Named()))
	}
	out, code = exit(t, nil, "-check-config", "-set", "cache.routes=conversations.v1.convo=10s")
	if code == 0 || !strings.Contains(out, `cache.routes."conversations.v1.convo": no such route`) {
		t.Fatalf("a route that does not exist: exit %d, %q", code, out)
	}
}
