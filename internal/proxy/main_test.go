package proxy

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
)

// TestMain refuses to run without what the real-client tests need (node
// and the npm packages of clients/node), in one line that says how to get
// them, rather than failing test by test: `bash .ci/run` installs them.
func TestMain(m *testing.M) {
	_, errNode := exec.LookPath("node")
	_, errPkgs := os.Stat("../../clients/node/node_modules/.package-lock.json")
	if errNode != nil || errPkgs != nil {
		fmt.Fprintln(os.Stderr, "internal/proxy: node or the npm packages of clients/node are missing: run `bash .ci/run`, which installs them (npm ci) and runs every test")
		os.Exit(1)
	}
	os.Exit(m.Run())
}
