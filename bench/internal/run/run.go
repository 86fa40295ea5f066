// Package run builds and starts the real cacheproxy binary for the
// benchmark programs.
package run

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// Proxy is a running cacheproxy.
type Proxy struct {
	Addr, Admin string
	proc
}

// proc is a built program running as a process of its own.
type proc struct {
	cmd *exec.Cmd
	dir string
}

// build compiles the main package pkg (./cmd/cacheproxy, ./bench/upstream)
// into a temporary directory and prepares its command.
func build(pkg string, env []string, args ...string) (proc, error) {
	dir, err := os.MkdirTemp("", "cacheproxy-bench")
	if err != nil {
		return proc{}, err
	}
	bin := filepath.Join(dir, filepath.Base(pkg))
	if out, err := exec.Command("go", "build", "-o", bin, pkg).CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return proc{}, fmt.Errorf("go build %s: %v\n%s", pkg, err, out)
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	return proc{cmd: cmd, dir: dir}, nil
}

// Pid is the process id.
func (p proc) Pid() int { return p.cmd.Process.Pid }

// Stop ends the process and removes the build.
func (p proc) Stop() {
	if p.cmd.Process != nil {
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
	}
	os.RemoveAll(p.dir)
}

// Start builds ./cmd/cacheproxy and runs it with env (CACHEPROXY_*
// settings; listeners default to free loopback ports), returning once it
// logged its start line.
func Start(env ...string) (*Proxy, error) {
	pr, err := build("./cmd/cacheproxy", append([]string{"CACHEPROXY_LISTEN=127.0.0.1:0", "CACHEPROXY_ADMIN_LISTEN=127.0.0.1:0"}, env...))
	if err != nil {
		return nil, err
	}
	p := &Proxy{proc: pr}
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		p.Stop()
		return nil, err
	}
	if err := p.cmd.Start(); err != nil {
		p.Stop()
		return nil, err
	}
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["listen"] != nil {
			p.Addr, p.Admin = m["listen"].(string), m["admin_listen"].(string)
			break
		}
	}
	go io.Copy(io.Discard, stdout)
	if p.Addr == "" {
		p.Stop()
		return nil, fmt.Errorf("cacheproxy did not start")
	}
	return p, nil
}

// Upstream is the fake Twilio upstream (./bench/upstream) in a process of
// its own, so that a load generated in the benchmark's process does not
// delay it.
type Upstream struct {
	URL string
	proc
}

// StartUpstream builds and starts the fake upstream with the given added
// latency.
func StartUpstream(latency time.Duration) (*Upstream, error) {
	pr, err := build("./bench/upstream", nil, "-latency", latency.String())
	if err != nil {
		return nil, err
	}
	u := &Upstream{proc: pr}
	stdout, err := u.cmd.StdoutPipe()
	if err != nil {
		u.Stop()
		return nil, err
	}
	if err := u.cmd.Start(); err != nil {
		u.Stop()
		return nil, err
	}
	sc := bufio.NewScanner(stdout)
	if !sc.Scan() {
		u.Stop()
		return nil, fmt.Errorf("upstream did not start")
	}
	u.URL = "http://" + sc.Text()
	go io.Copy(io.Discard, stdout)
	return u, nil
}

// Calls is the number of API requests the upstream has served.
func (u *Upstream) Calls() (int64, error) {
	resp, err := http.Get(u.URL + "/_bench/calls")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var n int64
	_, err = fmt.Fscan(resp.Body, &n)
	return n, err
}

// Account and Token are the benchmarks' credentials, known to the fake.
const (
	Account = "AC00000000000000000000000000000001"
	Token   = "benchtoken"
)

// Serve serves h on a free loopback port and returns its base URL.
func Serve(h http.Handler) (url string, stop func(), err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	return "http://" + ln.Addr().String(), func() { srv.Close() }, nil
}
