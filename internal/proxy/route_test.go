package proxy

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestRoutingReachesTheRightUpstream(t *testing.T) {
	h := newHarness(t)
	tests := []struct {
		name, method, path, host string
		wantProxy                bool   // else Conversations
		wantPath                 string // path the upstream saw (default: path)
	}{
		{"host kept conversations participant", "GET", pathConv, "conversations.twilio.com", false, ""},
		{"host kept proxy participant", "GET", pathProxy, "proxy.twilio.com", true, ""},
		{"host kept with port", "GET", "/v1/Services/" + ksvc + "/Sessions", "proxy.twilio.com:443", true, ""},
		{"host kept conversations list", "GET", "/v1/Services", "conversations.twilio.com", false, ""},
		{"host kept proxy list", "GET", "/v1/Services", "proxy.twilio.com", true, ""},
		{"base url proxy by KS", "GET", "/v1/Services/" + ksvc + "/PhoneNumbers", "", true, ""},
		{"base url proxy participant", "GET", pathProxy, "", true, ""},
		{"base url conversations by IS", "GET", "/v1/Services/" + isvc + "/Roles", "", false, ""},
		{"base url conversations v1", "GET", "/v1/Conversations", "", false, ""},
		{"base url conversations users", "POST", "/v1/Users", "", false, ""},
		{"base url conversations v2", "GET", "/v2/ControlPlane/Configurations", "", false, ""},
		{"base url v2 participant", "GET", pathV2, "", false, ""},
		{"proxy prefix", "GET", "/proxy/v1/Services", "", true, "/v1/Services"},
		{"proxy prefix participant", "GET", "/proxy" + pathProxy, "", true, pathProxy},
		{"conversations prefix", "POST", "/conversations/v1/Services", "", false, "/v1/Services"},
		{"conversations prefix participant", "GET", "/conversations" + pathConv, "", false, pathConv},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			want, other := h.conv, h.prox
			if tc.wantProxy {
				want, other = h.prox, h.conv
			}
			wantPath := tc.wantPath
			if wantPath == "" {
				wantPath = tc.path
			}
			beforeW, beforeO := want.Calls(tc.method, wantPath), other.Total()
			hdr := []string{"Cache-Control", "no-cache"} // every case must reach an upstream
			if tc.host != "" {
				hdr = append(hdr, "Host", tc.host)
			}
			status, _, body := readResp(t, h.do(tc.method, tc.path, basic(acctA, tokenA), hdr...))
			if status >= 400 && status != http.StatusNotFound {
				t.Fatalf("status %d: %s", status, body)
			}
			if got := want.Calls(tc.method, wantPath); got != beforeW+1 {
				t.Fatalf("upstream calls for %s %s = %d, want %d", tc.method, wantPath, got, beforeW+1)
			}
			if other.Total() != beforeO {
				t.Fatalf("the other upstream was called")
			}
		})
	}
}

func TestRoutingRefusesWhatMapsToNoUpstream(t *testing.T) {
	h := newHarness(t)
	// A host the client names in an absolute URI: it must never be contacted.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	evil := &connCounter{Listener: ln}
	evilSrv := &httptest.Server{Listener: evil, Config: &http.Server{Handler: http.NotFoundHandler()}}
	evilSrv.Start()
	t.Cleanup(evilSrv.Close)

	tests := []struct {
		name, raw string
		want      int
	}{
		{"unknown path", "GET /v3/Anything HTTP/1.1\r\nHost: localhost\r\n", 404},
		{"root", "GET / HTTP/1.1\r\nHost: localhost\r\n", 404},
		{"ambiguous services list", "GET /v1/Services HTTP/1.1\r\nHost: localhost\r\n", 404},
		{"ambiguous service id", "GET /v1/Services/MyService HTTP/1.1\r\nHost: localhost\r\n", 404},
		{"other twilio host", "GET /2010-04-01/Accounts HTTP/1.1\r\nHost: api.twilio.com\r\n", 421},
		{"absolute uri to another host", "GET " + evilSrv.URL + pathConv + " HTTP/1.1\r\nHost: " + evilSrv.Listener.Addr().String() + "\r\n", 421},
		{"absolute uri with spoofed host", "GET " + evilSrv.URL + pathConv + " HTTP/1.1\r\nHost: conversations.twilio.com\r\n", 421},
		{"dot segments", "GET /v1/Conversations/" + conv1 + "/Participants/../../x HTTP/1.1\r\nHost: localhost\r\n", 400},
		{"connect", "CONNECT conversations.twilio.com:443 HTTP/1.1\r\nHost: conversations.twilio.com:443\r\n", 405},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := h.conv.Total() + h.prox.Total()
			status, body := rawRequest(t, h.srv.Listener.Addr().String(), tc.raw+"Authorization: "+basic(acctA, tokenA)+"\r\nConnection: close\r\n\r\n")
			checkTwilioError(t, status, body, tc.want)
			if got := h.conv.Total() + h.prox.Total(); got != before {
				t.Fatalf("an upstream was called for a request that maps to none")
			}
		})
	}
	if n := evil.n.Load(); n != 0 {
		t.Fatalf("proxy opened %d connections to a host the client named", n)
	}
}

// rawRequest writes a request verbatim (absolute URIs, odd hosts) and
// returns the status and body.
func rawRequest(t *testing.T, addr, raw string) (int, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestWritesStreamThroughWithHeadersIntact(t *testing.T) {
	h := newHarness(t)
	body := strings.Repeat("x", 3<<20) // larger than any buffer: streamed
	resp := h.doBody(http.MethodPost, "/v1/Conversations/"+conv1+"/Messages?Foo=bar", basic(acctA, tokenA), strings.NewReader(body),
		"X-Twilio-Signature", "sig", "X-Custom", "kept", "Connection", "X-Hop", "X-Hop", "dropped",
		"Content-Type", "application/x-www-form-urlencoded", "I-Twilio-Idempotency-Token", "idem-1")
	status, _, got := readResp(t, resp)
	if status != 200 {
		t.Fatalf("status %d: %s", status, got)
	}
	var echo struct {
		Method, Path, Query, Host string
		Headers                   map[string]string
		BodyBytes                 int `json:"body_bytes"`
	}
	if err := json.Unmarshal([]byte(got), &echo); err != nil {
		t.Fatal(err)
	}
	wantHost := strings.TrimPrefix(h.convSrv.URL, "http://")
	if echo.Method != "POST" || echo.Query != "Foo=bar" || echo.Host != wantHost || echo.BodyBytes != len(body) {
		t.Fatalf("upstream saw %+v, want POST Foo=bar host %s %d bytes", echo, wantHost, len(body))
	}
	for k, v := range map[string]string{"X-Twilio-Signature": "sig", "X-Custom": "kept", "I-Twilio-Idempotency-Token": "idem-1"} {
		if echo.Headers[k] != v {
			t.Errorf("header %s = %q, want %q", k, echo.Headers[k], v)
		}
	}
	if _, ok := echo.Headers["X-Hop"]; ok {
		t.Errorf("hop-by-hop header named in Connection was forwarded")
	}
	if resp.Header.Get("Cache-Status") != "" {
		t.Errorf("pass-through response got a Cache-Status")
	}
}
