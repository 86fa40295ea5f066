package proxy

import (
	"os"
	"os/exec"
	"strings"
	"testing"
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
	cmd := exec.Command(node, "check.js")
	cmd.Dir = "../../clients/node"
	cmd.Env = append(os.Environ(),
		"CACHEPROXY_URL="+h.srv.URL, "ACCOUNT_SID="+acctA, "AUTH_TOKEN="+tokenA,
		"CONV="+conv1, "MEMBER="+member1, "ISVC="+isvc, "CONV2="+conv2, "MEMBER2="+member2,
		"KSVC="+ksvc, "SESSION="+sess1, "KP="+kp1)
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
	if got := h.prox.Calls("GET", pathProxy); got != 1 {
		t.Errorf("upstream GETs of the proxy participant = %d, want 1", got)
	}
}
