package proxy

import (
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"testing"

	"cacheproxy/internal/twiliofake"
)

// A list answer's page URLs point back at the base URL the client used
// when it replaced its base URL (scheme, Host and prefix), with
// Content-Length right; with Twilio's Host kept they stay Twilio's.
func TestListPagesStayBehindTheSidecar(t *testing.T) {
	h := newHarness(t)
	for i := range 3 {
		h.conv.AddParticipant(conv1, twiliofake.Participant{Sid: twiliofake.SID("MB", 600+i)})
	}
	list := "/v1/Conversations/" + conv1 + "/Participants?PageSize=2"
	meta := func(resp *http.Response) map[string]any {
		t.Helper()
		_, m := pageMeta(t, resp) // checks the status and Content-Length
		return m
	}
	m := meta(h.do("GET", "/conversations"+list, basic(acctA, tokenA)))
	want := h.srv.URL + "/conversations/v1/Conversations/" + conv1 + "/Participants?PageSize=2&Page="
	if m["next_page_url"] != want+"1" || m["first_page_url"] != want+"0" || m["url"] != want+"0" {
		t.Fatalf("meta through the /conversations prefix: %v, want page URLs under %s", m, want)
	}
	m = meta(h.do("GET", list, basic(acctA, tokenA))) // routed by its path: no prefix
	if next, _ := m["next_page_url"].(string); next != h.srv.URL+"/v1/Conversations/"+conv1+"/Participants?PageSize=2&Page=1" {
		t.Fatalf("meta routed by path: %v", m)
	}
	m = meta(h.do("GET", list, basic(acctA, tokenA), "Host", "conversations.twilio.com"))
	if next, _ := m["next_page_url"].(string); !strings.HasPrefix(next, "https://conversations.twilio.com/v1/") {
		t.Fatalf("meta with Twilio's Host kept: %v, want Twilio's URLs", m)
	}
}

// A pass-through list answer (here a participant list read with
// no-store) too large to buffer (over 1 MiB) streams unchanged, and is
// counted.
func TestALargeListStreamsUnchangedAndIsCounted(t *testing.T) {
	h := newHarness(t)
	long := strings.Repeat("x", 1000)
	for i := range 1200 {
		h.conv.AddParticipant(conv1, twiliofake.Participant{Sid: twiliofake.SID("MB", 2000+i), Identity: long})
	}
	s, _, body := readResp(t, h.do("GET", "/conversations/v1/Conversations/"+conv1+"/Participants?PageSize=1000", basic(acctA, tokenA), "Cache-Control", "no-store"))
	if s != 200 || len(body) <= bufferedResponseBytes {
		t.Fatalf("status %d, %d bytes: want a 200 over %d bytes", s, len(body), bufferedResponseBytes)
	}
	if !strings.Contains(body, `"next_page_url":"https://conversations.twilio.com/`) {
		t.Fatal("the large page's URLs were changed")
	}
	if n := h.p.c.pagesUnrewritten.Load(); n != 1 {
		t.Fatalf("unrewritten pages counted: %d, want 1", n)
	}
}

// Hostile input, round three, point 6: page URLs name only addresses the
// sidecar answers on (its listen address, under its loopback names too,
// and public_hosts), in their one spelling; any other Host a client sends
// gets the listen address.
func TestPageURLsNameOnlyTheSidecarsAddresses(t *testing.T) {
	h := newHarness(t)
	h.conv.AddParticipant(conv1, twiliofake.Participant{Sid: twiliofake.SID("MB", 700)})
	h.conv.AddParticipant(conv1, twiliofake.Participant{Sid: twiliofake.SID("MB", 701)})
	listen := h.srv.Listener.Addr().String()
	_, port, _ := net.SplitHostPort(listen)
	h.p.AnswerOn(listen, []string{"Sidecar.Internal:8080"})
	path := "/v1/Conversations/" + conv1 + "/Participants?PageSize=1&Page=1"
	for host, want := range map[string]string{
		"evil.example.com":              listen,
		"evil.example.com:" + port:      listen,
		"[fe80::1%25eth0]:" + port:      listen,
		"[::1]:" + port:                 listen, // the listener is on 127.0.0.1 only
		"localhost":                     listen, // no port: not how it reached the listener
		"LOCALHOST:" + port:             "localhost:" + port,
		"localhost.:" + port:            "localhost:" + port,
		listen:                          listen,
		"sidecar.internal:8080":         "sidecar.internal:8080",
		"SIDECAR.internal.:8080":        "sidecar.internal:8080",
		"sidecar.internal:8081":         listen,
		"conversations.twilio.com.evil": listen,
	} {
		s, _, body := readResp(t, h.do("GET", path, basic(acctA, tokenA), "Host", host))
		var page struct {
			Meta map[string]any `json:"meta"`
		}
		if s != 200 || json.Unmarshal([]byte(body), &page) != nil {
			t.Fatalf("Host %q: %d %s", host, s, body)
		}
		for _, k := range []string{"url", "first_page_url", "previous_page_url", "next_page_url"} {
			if u, _ := page.Meta[k].(string); u != "" && !strings.HasPrefix(u, "http://"+want+"/v1/") {
				t.Errorf("Host %q: %s %q, want it under http://%s", host, k, u, want)
			}
		}
	}
	for _, tc := range []struct{ listen, host, want string }{
		{"0.0.0.0:8080", "evil.example.com", "127.0.0.1:8080"},
		{"[::]:8080", "[::1]:8080", "[::1]:8080"},
		{"[::]:8080", "LocalHost:8080", "localhost:8080"},
		{"10.1.2.3:8080", "localhost:8080", "10.1.2.3:8080"},
		{"10.1.2.3:8080", "10.1.2.3:8080", "10.1.2.3:8080"},
	} {
		h.p.AnswerOn(tc.listen, nil)
		if got := h.p.hosts.Load().pick(tc.host); got != tc.want {
			t.Errorf("listen %s, Host %q: page URLs on %q, want %q", tc.listen, tc.host, got, tc.want)
		}
	}
}
