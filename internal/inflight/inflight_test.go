package inflight

import (
	"context"
	"testing"
)

func TestWaitEndsWhenWorkEnds(t *testing.T) {
	var tr Tracker
	if err := tr.Wait(context.Background()); err != nil {
		t.Fatal("idle tracker must not block")
	}
	tr.Add()
	tr.Add()
	done := make(chan error)
	go func() { done <- tr.Wait(context.Background()) }()
	tr.Done()
	select {
	case <-done:
		t.Fatal("Wait returned with work in flight")
	default:
	}
	tr.Done()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tr.Add()
	cancel()
	if err := tr.Wait(ctx); err == nil {
		t.Fatal("Wait ignored its context")
	}
	tr.Done()
}

func TestAddWhileWaiting(t *testing.T) {
	var tr Tracker
	tr.Add()
	done := make(chan error)
	go func() { done <- tr.Wait(context.Background()) }()
	go func() { tr.Add(); tr.Done() }() // may race with Wait: allowed
	tr.Done()
	<-done
}
