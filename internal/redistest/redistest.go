// Package redistest starts real redis-server processes on loopback for
// tests. A missing redis-server fails the test with what to install: it is
// never skipped (.ci/run installs it).
package redistest

import (
	"bufio"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Server is a running redis-server.
type Server struct {
	Addr string // 127.0.0.1:port
	Dir  string // its working directory (the RDB file goes there)
	cmd  *exec.Cmd
	args []string
}

// URL is the server's redis:// URL.
func (s *Server) URL() string { return "redis://" + s.Addr }

// Start runs redis-server on a free loopback port with extra config
// arguments (e.g. "--requirepass", "x") until the test ends.
func Start(t testing.TB, args ...string) *Server {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatal("redis-server not found: install it (apt-get install redis-server), or run bash .ci/run, which does")
	}
	s := &Server{Addr: freeAddr(t), Dir: t.TempDir(), args: args}
	s.start(t)
	t.Cleanup(s.Stop)
	return s
}

func (s *Server) start(t testing.TB) {
	t.Helper()
	_, port, _ := net.SplitHostPort(s.Addr)
	argv := append([]string{"--bind", "127.0.0.1", "--port", port, "--dir", s.Dir, "--save", "", "--appendonly", "no",
		"--daemonize", "no", "--logfile", filepath.Join(s.Dir, "redis.log")}, s.args...)
	s.cmd = exec.Command("redis-server", argv...)
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", s.Addr, time.Second); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis-server on %s did not start", s.Addr)
		}
		time.Sleep(10 * time.Millisecond) // waiting for another process to listen
	}
}

// Stop kills the server (as a crash would); Restart starts it again on the
// same port.
func (s *Server) Stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Kill()
		_ = s.cmd.Wait()
		s.cmd = nil
	}
}

// Restart starts a stopped server again on its address.
func (s *Server) Restart(t testing.TB) { s.start(t) }

// CLI runs redis-cli against the server and returns its output.
func (s *Server) CLI(t testing.TB, args ...string) string {
	t.Helper()
	host, port, _ := net.SplitHostPort(s.Addr)
	out, err := exec.Command("redis-cli", append([]string{"-h", host, "-p", port}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("redis-cli %v: %v %s", args, err, out)
	}
	return string(out)
}

// Dump returns every key and its value (GET for strings, HGETALL for
// hashes), as redis-cli prints them, for tests that search what Redis holds.
func (s *Server) Dump(t testing.TB) string {
	t.Helper()
	var b strings.Builder
	sc := bufio.NewScanner(strings.NewReader(s.CLI(t, "--scan")))
	for sc.Scan() {
		key := sc.Text()
		b.WriteString(key + "\n")
		switch typ := strings.TrimSpace(s.CLI(t, "TYPE", key)); typ {
		case "string":
			b.WriteString(s.CLI(t, "--no-raw", "GET", key))
		case "hash":
			b.WriteString(s.CLI(t, "--no-raw", "HGETALL", key))
		default:
			b.WriteString(typ + "\n")
		}
	}
	return b.String()
}

func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return "127.0.0.1:" + strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// String describes the server for failure messages.
func (s *Server) String() string { return fmt.Sprintf("redis-server on %s", s.Addr) }

// Cluster is a Redis Cluster of masters started by the test.
type Cluster struct {
	Nodes []*Server
}

// URL names every node, comma-separated: the seeds cacheproxy connects to.
func (c *Cluster) URL() string {
	addrs := make([]string, len(c.Nodes))
	for i, n := range c.Nodes {
		addrs[i] = n.Addr
	}
	return "redis://" + strings.Join(addrs, ",")
}

// StartCluster runs n masters with --cluster-enabled, joins them with
// redis-cli --cluster create, and waits until the cluster is ok.
func StartCluster(t testing.TB, n int, args ...string) *Cluster {
	t.Helper()
	c := &Cluster{}
	create := []string{"--cluster", "create"}
	for range n {
		s := Start(t, append([]string{"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"}, args...)...)
		c.Nodes = append(c.Nodes, s)
		create = append(create, s.Addr)
	}
	c.Nodes[0].CLI(t, append(create, "--cluster-replicas", "0", "--cluster-yes")...)
	deadline := time.Now().Add(30 * time.Second)
	for _, s := range c.Nodes {
		for !strings.Contains(s.CLI(t, "CLUSTER", "INFO"), "cluster_state:ok") {
			if time.Now().After(deadline) {
				t.Fatalf("cluster not ok: %s", s.CLI(t, "CLUSTER", "INFO"))
			}
			time.Sleep(50 * time.Millisecond) // waiting for other processes to agree
		}
	}
	return c
}

// Dump is every node's Dump.
func (c *Cluster) Dump(t testing.TB) string {
	var b strings.Builder
	for _, s := range c.Nodes {
		b.WriteString(s.Dump(t))
	}
	return b.String()
}
