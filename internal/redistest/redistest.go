// Package redistest starts real redis-server processes on loopback for
// tests. A missing redis-server fails the test with what to install: it is
// never skipped (.ci/run installs it).
package redistest

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// T is what the package needs of a test (testing.TB has it); a load
// program outside of tests gives its own.
type T interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Cleanup(func())
	TempDir() string
}

// Server is a running redis-server.
type Server struct {
	Addr string // 127.0.0.1:port
	Dir  string // its working directory (the RDB file goes there)
	cmd  *exec.Cmd
	args []string
	tls  bool // Addr is a TLS port
}

// URL is the server's redis:// URL.
func (s *Server) URL() string { return "redis://" + s.Addr }

// Start runs redis-server on a free loopback port with extra config
// arguments (e.g. "--requirepass", "x") until the test ends.
func Start(t T, args ...string) *Server {
	t.Helper()
	return run(t, false, args)
}

// StartTLS runs redis-server accepting only TLS on its port, with a
// certificate for 127.0.0.1 signed by a CA made for the test; the CA's
// certificate is at CAFile (for SSL_CERT_FILE).
func StartTLS(t T, args ...string) (s *Server, caFile string) {
	t.Helper()
	dir := t.TempDir()
	caFile, certFile, keyFile := writeCerts(t, dir)
	return run(t, true, append([]string{"--tls-cert-file", certFile, "--tls-key-file", keyFile, "--tls-ca-cert-file", caFile,
		"--tls-auth-clients", "no"}, args...)), caFile
}

func run(t T, tls bool, args []string) *Server {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatal("redis-server not found: install it (apt-get install redis-server), or run bash .ci/run, which does")
	}
	s := &Server{Addr: freeAddr(t), Dir: t.TempDir(), args: args, tls: tls}
	s.start(t)
	t.Cleanup(s.Stop)
	return s
}

// writeCerts makes a CA and a server certificate for 127.0.0.1 signed by
// it, and writes them (PEM) into dir.
func writeCerts(t T, dir string) (caFile, certFile, keyFile string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "cacheproxy test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, typ string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	return write("ca.pem", "CERTIFICATE", caDER), write("server.pem", "CERTIFICATE", der), write("server.key", "EC PRIVATE KEY", keyDER)
}

func (s *Server) start(t T) {
	t.Helper()
	_, port, _ := net.SplitHostPort(s.Addr)
	ports := []string{"--port", port}
	if s.tls {
		ports = []string{"--port", "0", "--tls-port", port}
	}
	argv := append([]string{"--bind", "127.0.0.1"}, ports...)
	argv = append(argv, "--dir", s.Dir, "--save", "", "--appendonly", "no", "--daemonize", "no",
		"--logfile", filepath.Join(s.Dir, "redis.log"))
	argv = append(argv, s.args...)
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

// Pause stops the server's process (SIGSTOP): it holds its connections
// and answers nothing until Resume (SIGCONT).
func (s *Server) Pause() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Signal(syscall.SIGSTOP)
	}
}

// Resume continues a paused server.
func (s *Server) Resume() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Signal(syscall.SIGCONT)
	}
}

// Restart starts a stopped server again on its address.
func (s *Server) Restart(t T) { s.start(t) }

// CLI runs redis-cli against the server and returns its output.
func (s *Server) CLI(t T, args ...string) string {
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
func (s *Server) Dump(t T) string {
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

func freeAddr(t T) string {
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
func StartCluster(t T, n int, args ...string) *Cluster {
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
func (c *Cluster) Dump(t T) string {
	var b strings.Builder
	for _, s := range c.Nodes {
		b.WriteString(s.Dump(t))
	}
	return b.String()
}
