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
	Cmd         *exec.Cmd
	Addr, Admin string
	dir         string
}

// Start builds ./cmd/cacheproxy and runs it with env (CACHEPROXY_*
// settings; listeners default to free loopback ports), returning once it
// logged its start line.
func Start(env ...string) (*Proxy, error) {
	dir, err := os.MkdirTemp("", "cacheproxy-bench")
	if err != nil {
		return nil, err
	}
	bin := filepath.Join(dir, "cacheproxy")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/cacheproxy").CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("go build: %v\n%s", err, out)
	}
	p := &Proxy{Cmd: exec.Command(bin), dir: dir}
	p.Cmd.Env = append(append(os.Environ(), "CACHEPROXY_LISTEN=127.0.0.1:0", "CACHEPROXY_ADMIN_LISTEN=127.0.0.1:0"), env...)
	stdout, err := p.Cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := p.Cmd.Start(); err != nil {
		os.RemoveAll(dir)
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

// Stop ends the process and removes the build.
func (p *Proxy) Stop() {
	_ = p.Cmd.Process.Kill()
	_ = p.Cmd.Wait()
	os.RemoveAll(p.dir)
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
