package proxy

import (
	"bufio"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"cacheproxy/internal/twiliofake"
)

// TestAnEscapedSlashNeverSharesAnEntryWithTheRealPath: the upstream sees
// "CH…%2FParticipants%2FMB…" as one segment (not the participant), and
// the proxy keys and routes it the same way: the real participant read
// afterwards is a miss that gets the participant, and the escaped read
// never gets the participant's entry.
func TestAnEscapedSlashNeverSharesAnEntryWithTheRealPath(t *testing.T) {
	h := newHarness(t)
	escaped := "/v1/Conversations/" + conv1 + "%2FParticipants%2F" + member1
	if _, _, body := h.get(escaped); strings.Contains(body, `"identity"`) {
		t.Fatalf("the escaped path reached the participant: %s", body)
	}
	h.settle()
	s, cs, body := h.get(pathConv)
	if s != 200 || !strings.HasPrefix(cs, "cacheproxy; fwd=uri-miss") || !strings.Contains(body, member1) {
		t.Fatalf("the real read after the escaped one: %d %q", s, cs)
	}
	h.settle()
	if _, cs, body := h.get(escaped); strings.Contains(body, `"identity"`) || strings.HasPrefix(cs, "cacheproxy; hit") {
		t.Fatalf("the escaped path was served the real entry: %q %s", cs, body)
	}
}

// TestAnEscapedQuestionMarkIsPartOfThePath: ".../q%3Fx=1" (a participant
// whose identity is "q?x=1") and ".../q?x=1" (identity "q", query x=1) are
// different resources and different entries.
func TestAnEscapedQuestionMarkIsPartOfThePath(t *testing.T) {
	h := newHarness(t)
	base := "/v1/Conversations/" + conv1 + "/Participants/"
	if s, cs, _ := h.get(base + "q%3Fx=1"); s != 404 || cs != "cacheproxy; fwd=uri-miss; stored" {
		t.Fatalf("q%%3Fx=1: %d %q", s, cs)
	}
	h.settle()
	if _, cs, _ := h.get(base + "q?x=1"); !strings.HasPrefix(cs, "cacheproxy; fwd=uri-miss") {
		t.Fatalf("q?x=1 was served q%%3Fx=1's entry: %q", cs)
	}
}

// TestUserWritesInvalidateReadsOfTheirIdentity: a participant read by
// identity and one by SID (whose body names the identity) are both
// refetched after the user is deleted by identity, and after an update of
// a user addressed by SID (which names no identity, so every identity's
// reads go).
func TestUserWritesInvalidateReadsOfTheirIdentity(t *testing.T) {
	for _, user := range []string{"alice@example.com", "US00000000000000000000000000000001"} {
		t.Run(user, func(t *testing.T) {
			h := newHarness(t)
			byIdentity := "/v1/Conversations/" + conv1 + "/Participants/alice@example.com"
			for _, p := range []string{byIdentity, pathConv} {
				h.get(p)
				h.settle()
				if _, cs, _ := h.get(p); !strings.HasPrefix(cs, "cacheproxy; hit") {
					t.Fatalf("%s not cached: %q", p, cs)
				}
			}
			h.update("POST", "/v1/Users/"+user, "x")
			for _, p := range []string{byIdentity, pathConv} {
				if _, cs, _ := h.get(p); !strings.HasPrefix(cs, "cacheproxy; fwd=uri-miss") {
					t.Fatalf("%s after the user's update: %q", p, cs)
				}
			}
		})
	}
	// Another identity's reads stay.
	h := newHarness(t)
	h.get(pathSvc) // bob
	h.settle()
	h.update("DELETE", "/v1/Users/alice@example.com", "")
	if _, cs, _ := h.get(pathSvc); !strings.HasPrefix(cs, "cacheproxy; hit") {
		t.Fatalf("bob's read after alice's delete: %q", cs)
	}
}

// TestDuplicateAuthorizationHeadersAreRefused: 400 in Twilio's shape,
// nothing forwarded, nothing stored.
func TestDuplicateAuthorizationHeadersAreRefused(t *testing.T) {
	h := newHarness(t)
	for _, path := range []string{pathConv, "/v1/Conversations"} {
		raw := "GET " + path + " HTTP/1.1\r\nHost: localhost\r\nAuthorization: " + basic(acctA, tokenA) +
			"\r\nAuthorization: " + basic(acctB, tokenB) + "\r\nConnection: close\r\n\r\n"
		status, body := rawRequest(t, h.srv.Listener.Addr().String(), raw)
		checkTwilioError(t, status, body, 400)
	}
	if n := h.conv.Total(); n != 0 {
		t.Fatalf("forwarded %d requests", n)
	}
	if st := h.store.Stats(); st.Entries != 0 {
		t.Fatalf("stored %d entries", st.Entries)
	}
}

// TestEveryErrorBodyIsJSON: paths with control bytes and bad UTF-8 get
// error bodies SDKs can decode.
func TestEveryErrorBodyIsJSON(t *testing.T) {
	h := newHarness(t)
	for _, path := range []string{"/nope%00", "/nope%FF", "/v1/Services/%01x", "/v1/Services/%22%5C"} {
		status, body := rawRequest(t, h.srv.Listener.Addr().String(), "GET "+path+" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
		checkTwilioError(t, status, body, 404)
	}
}

// TestTheValidityMemoNeverHidesAnInvalidation: a hit after an unrelated
// write memoises the entry as valid at that epoch; a later write to its
// conversation must still hide it.
func TestTheValidityMemoNeverHidesAnInvalidation(t *testing.T) {
	h := newHarness(t)
	h.get(pathConv)
	h.settle()
	h.update("POST", "/v1/Conversations/"+conv2, "x") // unrelated: the epoch moves
	if _, cs, _ := h.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") {
		t.Fatalf("after an unrelated write: %q", cs)
	}
	if _, cs, _ := h.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") { // from the memo
		t.Fatalf("again: %q", cs)
	}
	h.update("POST", "/v1/Conversations/"+conv1, "x")
	if _, cs, _ := h.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; fwd=uri-miss") {
		t.Fatalf("after a write to its conversation: %q", cs)
	}
}

// TestEscapedPathIsASpellingOfThePath: for every byte a request line may
// carry, the path the hit path routes on decodes to the path net/http
// parsed (it is a spelling of the same resource).
func TestEscapedPathIsASpellingOfThePath(t *testing.T) {
	for c := 0x21; c < 0x100; c++ {
		for _, target := range []string{"/v1/a" + string([]byte{byte(c)}) + "b", "/v1/%2F" + string([]byte{byte(c)}) + "?q=1"} {
			req, err := http.ReadRequest(bufio.NewReader(strings.NewReader("GET " + target + " HTTP/1.1\r\nHost: x\r\n\r\n")))
			if err != nil {
				continue // net/http refuses it: never reaches the proxy
			}
			got := escapedPath(req)
			if dec, err := url.PathUnescape(got); err != nil || dec != req.URL.Path {
				t.Fatalf("byte %#x: %q decodes to %q, net/http parsed %q", c, got, dec, req.URL.Path)
			}
		}
	}
	if got := escapedPath(&http.Request{URL: &url.URL{Path: "/a b"}}); got != "/a%20b" {
		t.Fatalf("a request built in process: %q", got)
	}
}

// TestAWrongTokenIsAnsweredLocally: the upstream's 401 for a credential is
// answered locally for ratelimit.unauthorized_ttl (no upstream call, no
// budget), for cached reads and pass-through alike; the account's right
// token is unaffected; after the TTL the upstream is asked again.
func TestAWrongTokenIsAnsweredLocally(t *testing.T) {
	h := newHarness(t)
	wrong := basic(acctA, "wrongtokenxxxxxxxxxxxxxxxxxxxxxx")
	for _, path := range []string{pathConv, "/v1/Conversations"} {
		for i := 0; i < 3; i++ {
			status, _, body := readResp(t, h.do("GET", path, wrong))
			if status != 401 || !strings.Contains(body, "20003") {
				t.Fatalf("%s wrong token %d: %d %s", path, i, status, body)
			}
		}
	}
	if n := h.conv.Total(); n != 1 {
		t.Fatalf("upstream calls for a wrong token = %d, want 1", n)
	}
	if s, _, _ := h.get(pathConv); s != 200 {
		t.Fatalf("the right token: %d", s)
	}
	var local int
	for _, l := range h.logs.lines(t) {
		if e, _ := l["error"].(string); strings.Contains(e, "answered locally") {
			local++
		}
	}
	if local != 5 {
		t.Fatalf("%d lines say the 401 was answered locally, want 5", local)
	}
	h.clk.Advance(11 * time.Second) // past unauthorized_ttl (10s)
	before := h.conv.Total()
	if s, _, _ := readResp(t, h.do("GET", pathV2, wrong)); s != 401 || h.conv.Total() != before+1 {
		t.Fatalf("after the TTL: %d, upstream calls %d", s, h.conv.Total()-before)
	}
}

// TestOnlyAuthenticationFailuresAreRemembered: a 401 that is not Twilio's
// 20003 (the credential itself) is passed on and not remembered.
func TestOnlyAuthenticationFailuresAreRemembered(t *testing.T) {
	h := newHarness(t)
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path == "/v1/Conversations" {
			twiliofake.Error(w, 401, 20401, "not for this path")
			return true
		}
		return false
	}
	for i := 0; i < 2; i++ {
		if s, _, _ := readResp(t, h.do("GET", "/v1/Conversations", basic(acctA, tokenA))); s != 401 {
			t.Fatalf("read %d: %d", i, s)
		}
	}
	if n := h.conv.Calls("GET", "/v1/Conversations"); n != 2 {
		t.Fatalf("upstream calls = %d, want 2", n)
	}
	if s, _, _ := h.get(pathConv); s != 200 {
		t.Fatalf("the credential elsewhere: %d", s)
	}
}
