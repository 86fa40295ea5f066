package proxy

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"cacheproxy/internal/twiliofake"
)

// TestTwilioPythonThroughTheProxy runs clients/python/check.py with the
// system python3 (/usr/bin/python3) and Debian's python3-twilio (7.7.1), which .ci/run
// installs: twilio-python lists a conversation's participants (three
// pages of two) twice through the sidecar, the second pass from the
// cache, and sees an update made between passes. A missing python3 or
// package fails the test, never skips it.
func TestTwilioPythonThroughTheProxy(t *testing.T) {
	const py = "/usr/bin/python3" // Debian's, which python3-twilio is for (not a pyenv shim earlier in PATH)
	if _, err := os.Stat(py); err != nil {
		t.Fatal("/usr/bin/python3 is not installed (.ci/run installs python3-twilio with apt-get)")
	}
	if out, err := exec.Command(py, "-c", "import twilio").CombinedOutput(); err != nil {
		t.Fatalf("twilio-python is not installed: apt-get install python3-twilio (.ci/run does): %v %s", err, out)
	}
	h := newHarness(t)
	for i := range 5 { // six in all: three pages of two
		h.conv.AddParticipant(conv1, twiliofake.Participant{Sid: twiliofake.SID("MB", 500+i), Identity: fmt.Sprint("lister", i)})
	}
	cmd := exec.Command(py, "check.py")
	cmd.Dir = "../../clients/python"
	cmd.Env = append(os.Environ(), "CACHEPROXY_URL="+h.srv.URL, "ACCOUNT_SID="+acctA, "AUTH_TOKEN="+tokenA,
		"CONV="+conv1, "MEMBER="+member1, "LIST_COUNT=6", "PYTHONDONTWRITEBYTECODE=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), `"ok": true`) {
		t.Fatalf("twilio-python check failed: %v\n%s", err, out)
	}
	// The proxy, not the script, is the judge: three pages, then none
	// (the cache), then three again after the update.
	if got := h.conv.Calls("GET", "/v1/Conversations/"+conv1+"/Participants"); got != 6 {
		t.Errorf("upstream GETs of the participant list = %d, want 6 (its pages, twice)", got)
	}
}
