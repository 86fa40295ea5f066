package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// demoCurl is one curl command the demo printed: curl -si -u USER:PASS URL.
type demoCurl struct {
	user, pass string
	url        *url.URL
}

// demoCurls runs the binary with -demo and returns the first n curl
// commands it prints.
func demoCurls(t *testing.T, n int) []demoCurl {
	t.Helper()
	cmd := exec.Command(binary, "-demo", "-set", "listen=127.0.0.1:0", "-set", "admin_listen=127.0.0.1:0")
	errOut, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	sc := bufio.NewScanner(errOut)
	var out []demoCurl
	for len(out) < n && sc.Scan() {
		if line := strings.TrimSpace(sc.Text()); strings.HasPrefix(line, "curl ") {
			f := strings.Fields(line)
			user, pass, _ := strings.Cut(f[3], ":")
			u, err := url.Parse(f[4])
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, demoCurl{user, pass, u})
		}
	}
	if len(out) != n {
		t.Fatalf("demo printed %d curl commands, want %d", len(out), n)
	}
	go func() { // the rest of its output, until it is killed
		for sc.Scan() {
		}
	}()
	return out
}

// demo is the first curl command the demo prints.
func demo(t *testing.T) (user, pass string, u *url.URL) {
	t.Helper()
	c := demoCurls(t, 1)[0]
	return c.user, c.pass, c.url
}

// The README's twilio-go snippet, as printed, fetches the demo's
// participant: the demo's token is one twilio-go accepts (it refuses
// non-alphanumeric ones: ApiError 21224).
func TestReadmeTwilioGoSnippetAgainstTheDemo(t *testing.T) {
	readme := repoFile(t, "README.md")
	_, rest, ok := strings.Cut(readme, "**twilio-go**")
	if !ok {
		t.Fatal("the README has no twilio-go section")
	}
	_, rest, _ = strings.Cut(rest, "```go\n")
	snippet, _, _ := strings.Cut(rest, "```")
	cut := strings.LastIndex(snippet, "\n\n") // the Transport, then the calls
	if cut < 0 || !strings.Contains(snippet[cut:], "FetchConversationParticipant") {
		t.Fatalf("unexpected snippet:\n%s", snippet)
	}
	decls, stmts := snippet[:cut], snippet[cut:]
	user, pass, u := demo(t)
	parts := strings.Split(strings.Trim(u.Path, "/"), "/") // v1/Conversations/CH…/Participants/MB…
	program := `package main

import (
	"fmt"
	"net/http"
	"os"
	"time"

	"github.com/twilio/twilio-go"
	"github.com/twilio/twilio-go/client"
)

` + decls + `

func main() {
	accountSid, authToken, conversationSid, participantSid := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
` + strings.ReplaceAll(stmts, `"127.0.0.1:8080"`, `os.Args[5]`) + `
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	fmt.Println("participant", *p.Sid)
}
`
	// Inside the module, so that twilio-go resolves from go.mod; a "."
	// directory, so that ./... never sees it.
	dir, err := os.MkdirTemp(filepath.Join("..", ".."), ".readme-snippet-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(program), 0o600); err != nil {
		t.Fatal(err)
	}
	run := exec.Command("go", "run", "./"+filepath.Base(dir), user, pass, parts[2], parts[4], u.Host)
	run.Dir = filepath.Join("..", "..")
	out, err := run.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "participant "+parts[4]) {
		t.Fatalf("the README's twilio-go snippet against -demo: %v\n%s\nprogram:\n%s", err, out, program)
	}
}

// The proxy listener speaks HTTP/1.1 and HTTP/2 in cleartext with prior
// knowledge (curl --http2-prior-knowledge got "Empty reply from server");
// a hit is a hit either way.
func TestHTTP2CleartextWithPriorKnowledge(t *testing.T) {
	user, pass, u := demo(t)
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	h2 := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Protocols: &protos}}
	for i, want := range []string{"cacheproxy; fwd=uri-miss; stored", "cacheproxy; hit; ttl="} {
		req, _ := http.NewRequest("GET", u.String(), nil)
		req.SetBasicAuth(user, pass)
		resp, err := h2.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.ProtoMajor != 2 || resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Cache-Status"), want) {
			t.Fatalf("read %d over h2c: %s %d %q, want HTTP/2 and %q", i+1, resp.Proto, resp.StatusCode, resp.Header.Get("Cache-Status"), want)
		}
	}
	// HTTP/1.1 is unchanged.
	req, _ := http.NewRequest("GET", u.String(), nil)
	req.SetBasicAuth(user, pass)
	resp, err := (&http.Client{Transport: &http.Transport{TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.ProtoMajor != 1 || !strings.HasPrefix(resp.Header.Get("Cache-Status"), "cacheproxy; hit") {
		t.Fatalf("HTTP/1.1: %s %q", resp.Proto, resp.Header.Get("Cache-Status"))
	}
	// curl, as the README shows it.
	out, err := exec.Command("curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", "-u", user+":"+pass, u.String()).Output()
	if err != nil || string(out) != "2 200" {
		t.Fatalf("curl --http2-prior-knowledge: %v %q, want \"2 200\"", err, out)
	}
	// A client that sends the preface to a listener is answered over h2,
	// never "PRI" read as an HTTP/1 method.
	conn, err := (&net.Dialer{}).DialContext(context.Background(), "tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	frame := make([]byte, 9)
	if _, err := conn.Read(frame); err != nil || frame[3] != 0x4 { // the server's SETTINGS frame
		t.Fatalf("after the h2 preface: %v % x, want a SETTINGS frame", err, frame)
	}
}
