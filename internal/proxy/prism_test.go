package proxy

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// startPrism serves one of Twilio's specs with Prism on loopback and
// returns its base URL once Prism says it listens.
func startPrism(t *testing.T, spec string) string {
	t.Helper()
	bin := "../../clients/node/node_modules/.bin/prism"
	if _, err := os.Stat(bin); err != nil {
		t.Fatal("Prism is not installed: run npm ci --prefix clients/node (.ci/run does)")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, port, _ := net.SplitHostPort(addr)
	cmd := exec.Command(bin, "mock", "-h", "127.0.0.1", "-p", port, "../../testdata/twilio-oai/"+spec)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	sc := bufio.NewScanner(out)
	var log []string
	for sc.Scan() {
		log = append(log, sc.Text())
		if strings.Contains(sc.Text(), "Prism is listening") {
			go io.Copy(io.Discard, out)
			return "http://" + addr
		}
	}
	t.Fatalf("Prism did not start for %s:\n%s", spec, strings.Join(log, "\n"))
	return ""
}

func getRaw(t *testing.T, url, auth string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("Authorization", auth)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

// TestPrismParticipantsComeBackByteForByte: each participant operation of
// Twilio's specs, served by Prism, goes through the proxy (a miss, then a
// hit) and comes back exactly as Prism sent it, with the caching headers
// added.
func TestPrismParticipantsComeBackByteForByte(t *testing.T) {
	convV1 := startPrism(t, "twilio_conversations_v1.json")
	convV2 := startPrism(t, "twilio_conversations_v2.json")
	prox := startPrism(t, "twilio_proxy_v1.json")
	for _, tc := range []struct {
		name, convUpstream, path string
	}{
		{"conversations v1", convV1, "/v1/Conversations/" + conv1 + "/Participants/" + member1},
		{"conversations v1 service", convV1, pathSvc},
		{"proxy v1", convV1, pathProxy},
		{"conversations v2", convV2, pathV2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarnessWithURLs(t, tc.convUpstream, prox)
			upstream := tc.convUpstream
			if tc.path == pathProxy {
				upstream = prox
			}
			auth := basic(acctA, tokenA)
			direct, want := getRaw(t, upstream+tc.path, auth)
			if direct.StatusCode != 200 || len(want) == 0 {
				t.Fatalf("Prism answered %d: %s", direct.StatusCode, want)
			}
			for i, cs := range []string{"cacheproxy; fwd=uri-miss; stored", "cacheproxy; hit; ttl="} {
				resp, got := getRaw(t, h.srv.URL+tc.path, auth)
				h.settle()
				if string(got) != string(want) {
					t.Fatalf("read %d: body differs from Prism's:\n got %s\nwant %s", i+1, got, want)
				}
				if !strings.HasPrefix(resp.Header.Get("Cache-Status"), cs) {
					t.Fatalf("read %d: Cache-Status %q, want %q", i+1, resp.Header.Get("Cache-Status"), cs)
				}
				for k, v := range direct.Header {
					switch k {
					case "Date", "Connection", "Keep-Alive":
						continue
					}
					if strings.Join(resp.Header[k], ",") != strings.Join(v, ",") {
						t.Errorf("read %d: header %s = %q, Prism sent %q", i+1, k, resp.Header[k], v)
					}
				}
			}
		})
	}
}
