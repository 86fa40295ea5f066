package clock

import (
	"testing"
	"time"
)

func TestFakeFiresTimersWhenAdvancedPastThem(t *testing.T) {
	c := NewFake(time.Unix(1_700_000_000, 0))
	registered := c.Expect(2)
	early, late := c.After(time.Second), c.After(3*time.Second)
	registered()
	c.Advance(time.Second)
	select {
	case at := <-early:
		if !at.Equal(time.Unix(1_700_000_001, 0)) {
			t.Fatalf("fired at %v", at)
		}
	default:
		t.Fatal("a due timer did not fire")
	}
	select {
	case <-late:
		t.Fatal("a timer fired early")
	default:
	}
	c.Advance(2 * time.Second)
	<-late
	if d := c.Since(time.Unix(1_700_000_000, 0)); d != 3*time.Second {
		t.Fatalf("Since = %s", d)
	}
}

func TestFakeReportsWhatWasAsked(t *testing.T) {
	c := NewFake(time.Unix(0, 0))
	<-c.After(0) // fires at once
	go c.Sleep(2 * time.Second)
	got := c.WaitAsked(2)
	if len(got) != 2 || got[0] != 0 || got[1] != 2*time.Second {
		t.Fatalf("asked %v", got)
	}
	asked := c.ExpectAsked(time.Second)
	go c.Sleep(time.Second)
	asked()
	c.Advance(2 * time.Second)
}
