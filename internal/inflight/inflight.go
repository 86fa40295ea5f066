// Package inflight counts running work that may start while someone waits
// for it all to end: unlike sync.WaitGroup, Add may race with Wait (a new
// fetch can start while shutdown waits for fetches).
package inflight

import (
	"context"
	"sync"
)

// Tracker counts work in flight. The zero value is ready.
type Tracker struct {
	mu   sync.Mutex
	n    int
	zero chan struct{} // closed when n drops to 0; nil while idle
}

// Add records one more piece of work.
func (t *Tracker) Add() {
	t.mu.Lock()
	if t.n == 0 {
		t.zero = make(chan struct{})
	}
	t.n++
	t.mu.Unlock()
}

// Done records that one piece of work ended.
func (t *Tracker) Done() {
	t.mu.Lock()
	t.n--
	if t.n == 0 {
		close(t.zero)
		t.zero = nil
	}
	t.mu.Unlock()
}

// Wait blocks until no work is in flight or ctx ends.
func (t *Tracker) Wait(ctx context.Context) error {
	t.mu.Lock()
	zero := t.zero
	t.mu.Unlock()
	if zero == nil {
		return nil
	}
	select {
	case <-zero:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
