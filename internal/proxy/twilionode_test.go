package proxy

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"cacheproxy/internal/twiliofake"
)

// TestTwilioNodeThroughTheProxy runs clients/node/check.js: twilio-node with
// replaced base URLs and a custom httpClient. .ci/run installs its packages
// (npm ci); a missing node or package fails the test, never skips it.
func TestTwilioNodeThroughTheProxy(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatal("node is not installed (Node 20 and npm are required: .ci/run installs them)")
	}
	if _, err := os.Stat("../../clients/node/node_modules/twilio"); err != nil {
		t.Fatal("twilio-node is not installed: run npm ci --prefix clients/node (.ci/run does)")
	}
	h := newHarness(t)
	for i := range 4 { // five in all: a list of three pages of two
		h.conv.AddParticipant(conv1, twiliofake.Participant{Sid: twiliofake.SID("MB", 500+i), Identity: fmt.Sprint("lister", i)})
	}
	cmd := exec.Command(node, "check.js")
	cmd.Dir = "../../clients/node"
	cmd.Env = append(os.Environ(),
		"CACHEPROXY_URL="+h.srv.URL, "ACCOUNT_SID="+acctA, "AUTH_TOKEN="+tokenA,
		"CONV="+conv1, "MEMBER="+member1, "ISVC="+isvc, "CONV2="+conv2, "MEMBER2="+member2,
		"KSVC="+ksvc, "SESSION="+sess1, "KP="+kp1, "LIST_COUNT=5")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), `"ok":true`) {
		t.Fatalf("twilio-node check failed: %v\n%s", err, out)
	}
	// The proxy, not the script, is the judge of caching: one upstream
	// fetch per participant read twice, plus the update and the refetch.
	for path, want := range map[string]int{pathConv: 2, pathSvc: 1} {
		if got := h.conv.Calls("GET", path); got != want {
			t.Errorf("upstream GETs of %s = %d, want %d", path, got, want)
		}
	}
	// The list's three pages all reached Twilio through the sidecar
	// (before: page 2 on went to https://conversations.twilio.com); the
	// second pass came from the cache, the third (after an update) from
	// Twilio again.
	if got := h.conv.Calls("GET", "/v1/Conversations/"+conv1+"/Participants"); got != 6 {
		t.Errorf("upstream GETs of the participant list = %d, want 6 (its pages, twice)", got)
	}
	if got := h.prox.Calls("GET", pathProxy); got != 1 {
		t.Errorf("upstream GETs of the proxy participant = %d, want 1", got)
	}
}
