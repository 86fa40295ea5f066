package main

import (
	"os"
	"strings"
	"testing"
)

func TestIsLoopback(t *testing.T) {
	for addr, want := range map[string]bool{"127.0.0.1:9090": true, "[::1]:9090": true, "localhost:9090": true,
		"0.0.0.0:9090": false, ":9090": false, "10.0.0.1:9090": false, "nonsense": false} {
		if isLoopback(addr) != want {
			t.Errorf("isLoopback(%q) != %v", addr, want)
		}
	}
}

// TestDockerContextLeavesOutHistoryAndTestPackages: docker build must not
// send .git or the npm packages the tests install, and must still send
// what the Dockerfile copies and builds.
func TestDockerContextLeavesOutHistoryAndTestPackages(t *testing.T) {
	b, err := os.ReadFile("../../.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	ignored := map[string]bool{}
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			ignored[l] = true
		}
	}
	for _, p := range []string{".git", "clients/node/node_modules"} {
		if !ignored[p] {
			t.Errorf(".dockerignore does not leave out %s", p)
		}
	}
	for p := range ignored {
		for _, needed := range []string{"go.mod", "go.sum", "cmd", "internal", "scripts", "deploy"} {
			if p == needed || strings.HasPrefix(p, needed+"/") || p == "*" || p == "**" {
				t.Errorf(".dockerignore leaves out %s, which the build needs", p)
			}
		}
	}
}
