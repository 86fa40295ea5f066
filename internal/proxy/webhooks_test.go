package proxy

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os/exec"
	"strings"
	"testing"

	"cacheproxy/internal/redistest"
	"cacheproxy/internal/webhooks"

	"github.com/rs/zerolog"
)

const hookURL, hookToken = "https://hooks.example.com", "hooktokenhooktokenhooktokenhookt"

// signedWebhook posts a Conversations v1 webhook, signed by twilio-node, to
// a webhooks handler that invalidates through inv.
func signedWebhook(t *testing.T, inv Invalidator, params map[string]string) int {
	t.Helper()
	h, err := webhooks.New(webhooks.Config{PublicURL: hookURL, AuthTokens: []string{hookToken}, Invalidator: inv, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	in, _ := json.Marshal(map[string]any{"token": hookToken, "url": hookURL + "/webhooks/conversations", "params": params})
	cmd := exec.Command("node", "../../clients/node/sign.js")
	cmd.Stdin = bytes.NewReader(in)
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	var signed struct{ Signature string }
	_ = json.Unmarshal(out, &signed)
	form := url.Values{}
	for k, v := range params {
		form.Set(k, v)
	}
	req := httptest.NewRequest("POST", "/webhooks/conversations", strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("X-Twilio-Signature", signed.Signature)
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	return w.Code
}

// A participant changed elsewhere (the fake's data changes behind the
// proxy's back): Twilio's onParticipantUpdated drops that participant's
// cached reads, by SID and by identity, for every credential (each entry
// carries its participant's scope from its body, whatever path it was read
// by); other participants' reads stay.
func TestAParticipantWebhookInvalidatesItsReads(t *testing.T) {
	h := newHarness(t)
	byIdentity := "/v1/Conversations/" + conv1 + "/Participants/" + url.PathEscape("alice@example.com")
	reads := []string{pathConv, byIdentity}
	for _, p := range reads {
		h.warm(p)
	}
	h.warm(pathSvc) // another participant
	h.conv.SetAttributes(conv1, member1, "changed in the Console")
	if s := signedWebhook(t, h.invalidator, map[string]string{"EventType": "onParticipantUpdated", "AccountSid": acctA,
		"ConversationSid": conv1, "ParticipantSid": member1, "Identity": "alice@example.com", "Source": "API"}); s != http.StatusNoContent {
		t.Fatalf("webhook: %d", s)
	}
	for _, p := range reads {
		for _, auth := range []string{basic(acctA, tokenA), basic(acctB, tokenB)} {
			s, cs, body := readResp(t, h.do("GET", p, auth))
			if s != 200 || !strings.HasPrefix(cs, "cacheproxy; fwd=uri-miss") || !strings.Contains(body, "changed in the Console") {
				t.Fatalf("%s after the webhook: %d %q", p, s, cs)
			}
		}
	}
	if !h.cachedFor(pathSvc, basic(acctA, tokenA)) {
		t.Fatal("another participant's read was dropped")
	}
	// The service form of the path goes too (the event names no service).
	h.conv.SetAttributes(conv2, member2, "changed too")
	if s := signedWebhook(t, h.invalidator, map[string]string{"EventType": "onParticipantUpdated", "ConversationSid": conv2,
		"ParticipantSid": member2, "Identity": "bob"}); s != http.StatusNoContent {
		t.Fatalf("webhook: %d", s)
	}
	if s, cs, body := h.get(pathSvc); s != 200 || strings.HasPrefix(cs, "cacheproxy; hit") || !strings.Contains(body, "changed too") {
		t.Fatalf("service form after the webhook: %d %q", s, cs)
	}
}

// An event through one replica's webhook listener reaches every replica.
func TestAWebhookInvalidatesTheWholeFleet(t *testing.T) {
	r := replicas(t, 2, redistest.Start(t))
	a, b := r[0], r[1]
	b.warm(pathConv)
	a.conv.SetAttributes(conv1, member1, "changed by an SDK client")
	if s := signedWebhook(t, a.invalidator, map[string]string{"EventType": "onParticipantUpdated", "ConversationSid": conv1,
		"ParticipantSid": member1, "Identity": "alice@example.com"}); s != http.StatusNoContent {
		t.Fatalf("webhook: %d", s)
	}
	if s, cs, body := b.get(pathConv); s != 200 || strings.HasPrefix(cs, "cacheproxy; hit") || !strings.Contains(body, "changed by an SDK client") {
		t.Fatalf("B after A's webhook: %d %q", s, cs)
	}
}
