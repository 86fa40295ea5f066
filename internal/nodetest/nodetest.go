// Package nodetest is for the test packages that run code from
// clients/node (twilio-node, Prism): their TestMain refuses to run without
// node and those npm packages, in one line that says how to get them,
// rather than failing test by test.
package nodetest

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
)

// Main runs m if node and the npm packages of clients/node (two levels up
// from the test's package) are there; otherwise it says, for pkg, to run
// `bash .ci/run`, which installs them, and exits 1.
func Main(m *testing.M, pkg string) {
	_, errNode := exec.LookPath("node")
	_, errPkgs := os.Stat("../../clients/node/node_modules/.package-lock.json")
	if errNode != nil || errPkgs != nil {
		fmt.Fprintln(os.Stderr, pkg+": node or the npm packages of clients/node are missing: run `bash .ci/run`, which installs them (npm ci) and runs every test")
		os.Exit(1)
	}
	os.Exit(m.Run())
}
