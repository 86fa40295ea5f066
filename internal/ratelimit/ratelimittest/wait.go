// Package ratelimittest helps tests wait for a budget's state.
package ratelimittest

import (
	"testing"
	"time"

	"cacheproxy/internal/ratelimit"
)

// WaitUntil blocks until cond, which reads l's state, holds; it is checked
// again at each change of l (Changed), so a test waits without polling. A
// cond that never holds fails the test after a minute rather than hang.
func WaitUntil(t testing.TB, l *ratelimit.Limiter, cond func() bool) {
	t.Helper()
	timeout := time.After(time.Minute)
	for {
		changed := l.Changed()
		if cond() {
			return
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("budget never reached the state the test waits for: %+v", l.Accounts())
		}
	}
}
