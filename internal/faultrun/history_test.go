package faultrun

import (
	"testing"
	"time"
)

// The checker finds a read older than a write that ended before it, and
// only that: a read concurrent with the write may return either version;
// a replica that had lost its stream, or a write still queued on its
// replica, excuses it; non-200 answers and another account's data count.
func TestCheck(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	write := func(replica, from, to, v int, queued bool) Op {
		return Op{Replica: replica, Key: "k", Write: true, Start: at(from), End: at(to), Version: v, Status: 200, Queued: queued}
	}
	read := func(replica, from, to, v int) Op {
		return Op{Replica: replica, Key: "k", Start: at(from), End: at(to), Version: v, Status: 200}
	}
	cases := []struct {
		name                     string
		ops                      []Op
		replicas                 map[int]Replica
		violations, lost, queued int
		clientErrors, foreign    int
	}{
		{name: "fresh", ops: []Op{read(1, 0, 1, 0), write(0, 2, 5, 1, false), read(1, 6, 7, 1)}},
		{name: "concurrent", ops: []Op{write(0, 2, 5, 1, false), read(1, 3, 7, 0)}},
		{name: "stale", ops: []Op{write(0, 2, 5, 1, false), read(1, 6, 7, 0)}, violations: 1},
		{name: "older of two", ops: []Op{write(0, 0, 1, 1, false), write(0, 2, 3, 2, false), read(2, 4, 5, 1)}, violations: 1},
		{name: "reader lost its stream", ops: []Op{write(0, 2, 5, 1, false), read(1, 6, 7, 0)},
			replicas: map[int]Replica{1: {Lost: []Window{{at(4), at(20)}}}}, lost: 1},
		{name: "another replica lost its stream", ops: []Op{write(0, 2, 5, 1, false), read(1, 6, 7, 0)},
			replicas: map[int]Replica{2: {Lost: []Window{{at(4), at(20)}}}}, violations: 1},
		{name: "write queued, not yet drained", ops: []Op{write(0, 2, 5, 1, true), read(1, 6, 7, 0)},
			replicas: map[int]Replica{0: {Drained: []time.Time{at(9)}}}, queued: 1},
		{name: "write queued, drained before the read", ops: []Op{write(0, 2, 5, 1, true), read(1, 10, 11, 0)},
			replicas: map[int]Replica{0: {Drained: []time.Time{at(9)}}}, violations: 1},
		{name: "refused write", ops: []Op{{Replica: 0, Key: "k", Write: true, Start: at(0), End: at(1), Version: 1, Status: 502}, read(1, 2, 3, 0)},
			clientErrors: 1},
		{name: "foreign", ops: []Op{{Key: "k", Start: at(0), End: at(1), Status: 200, Foreign: true}}, foreign: 1},
	}
	for _, tc := range cases {
		r := Check(tc.ops, tc.replicas)
		if len(r.Violations) != tc.violations || r.ExcusedLost != tc.lost || r.ExcusedQueued != tc.queued || r.ClientErrors != tc.clientErrors || r.Foreign != tc.foreign {
			t.Errorf("%s: %d violations %v, %d+%d excused, %d client errors, %d foreign; want %d, %d+%d, %d, %d", tc.name,
				len(r.Violations), r.Violations, r.ExcusedLost, r.ExcusedQueued, r.ClientErrors, r.Foreign, tc.violations, tc.lost, tc.queued, tc.clientErrors, tc.foreign)
		}
	}
}
