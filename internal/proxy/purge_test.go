package proxy

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func purge(t *testing.T, h http.Handler, query, bearer string) (int, string) {
	t.Helper()
	req := httptest.NewRequest("POST", "/purge?"+query, nil)
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	return w.Code, w.Body.String()
}

// warm reads path as A and B and checks both are then cached.
func (h *harness) warm(path string) {
	h.t.Helper()
	for _, auth := range []string{basic(acctA, tokenA), basic(acctB, tokenB)} {
		readResp(h.t.(*testing.T), h.do("GET", path, auth))
	}
	h.settle()
}

func (h *harness) cachedFor(path, auth string) bool {
	h.t.Helper()
	_, cs, _ := readResp(h.t.(*testing.T), h.do("GET", path, auth))
	return strings.HasPrefix(cs, "cacheproxy; hit")
}

func TestPurgePathForEveryCredential(t *testing.T) {
	h := newHarness(t)
	ph := h.p.PurgeHandler("", true)
	h.warm(pathConv)
	h.warm(pathConv + "?x=1")
	h.warm(pathSvc)
	if s, body := purge(t, ph, "path="+pathConv, ""); s != 200 || !strings.Contains(body, "purged") {
		t.Fatalf("purge: %d %s", s, body)
	}
	for _, p := range []string{pathConv, pathConv + "?x=1"} {
		for _, auth := range []string{basic(acctA, tokenA), basic(acctB, tokenB)} {
			if h.cachedFor(p, auth) {
				t.Fatalf("%s still cached after purge", p)
			}
		}
	}
	if !h.cachedFor(pathSvc, basic(acctA, tokenA)) {
		t.Fatal("purge of one path dropped another")
	}
	// The /proxy/ prefix routes like a client request.
	h.warm(pathProxy)
	if s, _ := purge(t, ph, "path=/proxy"+pathProxy, ""); s != 200 || h.cachedFor(pathProxy, basic(acctB, tokenB)) {
		t.Fatalf("purge by prefixed path: %d", s)
	}
}

func TestPurgeScopes(t *testing.T) {
	h := newHarness(t)
	ph := h.p.PurgeHandler("", true)
	h.warm(pathConv)
	h.warm("/v1/Conversations/" + conv1 + "/Participants/alice@example.com")
	h.warm(pathV2)
	if s, _ := purge(t, ph, "conversation="+conv1, ""); s != 200 {
		t.Fatal(s)
	}
	if h.cachedFor(pathConv, basic(acctA, tokenA)) || h.cachedFor("/v1/Conversations/"+conv1+"/Participants/alice@example.com", basic(acctB, tokenB)) {
		t.Fatal("conversation purge left reads of it")
	}
	if !h.cachedFor(pathV2, basic(acctA, tokenA)) {
		t.Fatal("conversation purge dropped another conversation")
	}
	h.warm(pathProxy)
	if s, _ := purge(t, ph, "session="+sess1, ""); s != 200 || h.cachedFor(pathProxy, basic(acctA, tokenA)) {
		t.Fatal("session purge")
	}
}

func TestPurgeRefusals(t *testing.T) {
	h := newHarness(t)
	for name, tc := range map[string]struct {
		token    string
		loopback bool
		query    string
		bearer   string
		want     int
	}{
		"not loopback, no token": {"", false, "conversation=" + conv1, "", 403},
		"token missing":          {"s3cret", false, "conversation=" + conv1, "", 401},
		"token wrong":            {"s3cret", true, "conversation=" + conv1, "nope", 401},
		"token right":            {"s3cret", false, "conversation=" + conv1, "s3cret", 200},
		"nothing named":          {"", true, "", "", 400},
		"not cached route":       {"", true, "path=/v1/Conversations", "", 400},
		"unknown route":          {"", true, "path=/v9/x", "", 404},
	} {
		t.Run(name, func(t *testing.T) {
			s, body := purge(t, h.p.PurgeHandler(tc.token, tc.loopback), tc.query, tc.bearer)
			if s != tc.want {
				t.Fatalf("status %d, want %d: %s", s, tc.want, body)
			}
			if strings.Contains(body, "s3cret") {
				t.Fatal("the token was echoed")
			}
		})
	}
	req := httptest.NewRequest("GET", "/purge?conversation=x", nil)
	w := httptest.NewRecorder()
	h.p.PurgeHandler("", true).ServeHTTP(w, req)
	if w.Code != 405 {
		t.Fatalf("GET purge: %d", w.Code)
	}
}
