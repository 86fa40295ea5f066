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
	"slices"
	"strconv"
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

// launch builds pkg, starts it, and reads its stdout until ready accepts a
// line (the program's start line); the rest of the output is discarded.
func launch(pkg string, env []string, ready func(line []byte) bool, args ...string) (proc, error) {
	pr, err := build(pkg, env, args...)
	if err != nil {
		return proc{}, err
	}
	stdout, err := pr.cmd.StdoutPipe()
	if err == nil {
		err = pr.cmd.Start()
	}
	if err != nil {
		pr.Stop()
		return proc{}, err
	}
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if ready(sc.Bytes()) {
			go io.Copy(io.Discard, stdout)
			return pr, nil
		}
	}
	pr.Stop()
	return proc{}, fmt.Errorf("%s did not start", pkg)
}

// Start builds ./cmd/cacheproxy and runs it with env (CACHEPROXY_*
// settings; listeners default to free loopback ports), returning once it
// logged its start line.
func Start(env ...string) (*Proxy, error) {
	p := &Proxy{}
	pr, err := launch("./cmd/cacheproxy", append([]string{"CACHEPROXY_LISTEN=127.0.0.1:0", "CACHEPROXY_ADMIN_LISTEN=127.0.0.1:0"}, env...),
		func(line []byte) bool {
			var m struct {
				Listen      string `json:"listen"`
				AdminListen string `json:"admin_listen"`
			}
			if json.Unmarshal(line, &m) != nil || m.Listen == "" {
				return false
			}
			p.Addr, p.Admin = m.Listen, m.AdminListen
			return true
		})
	if err != nil {
		return nil, err
	}
	p.proc = pr
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
// latency; its first line is its address.
func StartUpstream(latency time.Duration) (*Upstream, error) {
	u := &Upstream{}
	pr, err := launch("./bench/upstream", nil, func(line []byte) bool {
		u.URL = "http://" + string(line)
		return true
	}, "-latency", latency.String())
	if err != nil {
		return nil, err
	}
	u.proc = pr
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

// StartRedis runs redis-server on a free loopback port, without
// persistence, with args added; it returns its redis:// URL and how to
// stop it.
func StartRedis(args ...string) (string, func(), error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	dir, err := os.MkdirTemp("", "cacheproxy-bench-redis")
	if err != nil {
		return "", nil, err
	}
	cmd := exec.Command("redis-server", append([]string{"--bind", "127.0.0.1", "--port", port, "--save", "", "--appendonly", "no", "--dir", dir}, args...)...)
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("redis-server (apt-get install redis-server): %w", err)
	}
	stop := func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); os.RemoveAll(dir) }
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err := net.Dial("tcp", "127.0.0.1:"+port); err == nil {
			c.Close()
			return "redis://127.0.0.1:" + port, stop, nil
		}
		if time.Now().After(deadline) {
			stop()
			return "", nil, fmt.Errorf("redis-server did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Pct is the p-th percentile of ls (0 for none).
func Pct(ls []time.Duration, p int) time.Duration {
	if len(ls) == 0 {
		return 0
	}
	s := slices.Clone(ls)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

// Ms is d in milliseconds.
func Ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
