package faultrun

import (
	"testing"
	"time"
)

// The checker finds a read older than a write that ended before it, and
// only that: a read concurrent with the write may return either version;
// only a replica that had lost its stream excuses it (and the oldest such
// read is measured); a read of what only a refused write wrote is a
// violation; non-200 answers and another account's data count.
func TestCheck(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	write := func(replica, from, to, v int) Op {
		return Op{Replica: replica, Key: "k", Write: true, Start: at(from), End: at(to), Version: v, Status: 200}
	}
	refused := Op{Replica: 0, Key: "k", Write: true, Start: at(2), End: at(3), Version: 1, Status: 503, Refused: true}
	read := func(replica, from, to, v int) Op {
		return Op{Replica: replica, Key: "k", Start: at(from), End: at(to), Version: v, Status: 200}
	}
	cases := []struct {
		name                      string
		ops                       []Op
		replicas                  map[int]Replica
		violations, lost, refused int
		lostAge                   time.Duration
		clientErrors, foreign     int
	}{
		{name: "fresh", ops: []Op{read(1, 0, 1, 0), write(0, 2, 5, 1), read(1, 6, 7, 1)}},
		{name: "concurrent", ops: []Op{write(0, 2, 5, 1), read(1, 3, 7, 0)}},
		{name: "stale", ops: []Op{write(0, 2, 5, 1), read(1, 6, 7, 0)}, violations: 1},
		{name: "older of two", ops: []Op{write(0, 0, 1, 1), write(0, 2, 3, 2), read(2, 4, 5, 1)}, violations: 1},
		{name: "reader lost its stream", ops: []Op{write(0, 2, 5, 1), read(1, 6, 7, 0)},
			replicas: map[int]Replica{1: {Lost: []Window{{at(4), at(20)}}}}, lost: 1, lostAge: time.Millisecond},
		{name: "reader lost its stream, two writes behind", ops: []Op{write(0, 2, 5, 1), write(0, 6, 8, 2), read(1, 15, 16, 0)},
			replicas: map[int]Replica{1: {Lost: []Window{{at(7), at(20)}}}}, lost: 1, lostAge: 10 * time.Millisecond},
		{name: "another replica lost its stream", ops: []Op{write(0, 2, 5, 1), read(1, 6, 7, 0)},
			replicas: map[int]Replica{2: {Lost: []Window{{at(4), at(20)}}}}, violations: 1},
		{name: "refused write, then its successor", ops: []Op{refused, write(0, 4, 5, 2), read(1, 6, 7, 2)}, refused: 1},
		{name: "refused write read", ops: []Op{refused, read(1, 6, 7, 1)}, refused: 1, violations: 1},
		{name: "refused write", ops: []Op{{Replica: 0, Key: "k", Write: true, Start: at(0), End: at(1), Version: 1, Status: 502}, read(1, 2, 3, 0)},
			clientErrors: 1},
		{name: "foreign", ops: []Op{{Key: "k", Start: at(0), End: at(1), Status: 200, Foreign: true}}, foreign: 1},
	}
	for _, tc := range cases {
		r := Check(tc.ops, tc.replicas)
		if len(r.Violations) != tc.violations || r.ExcusedLost != tc.lost || r.LostAge != tc.lostAge || r.Refused != tc.refused || r.ClientErrors != tc.clientErrors || r.Foreign != tc.foreign {
			t.Errorf("%s: %d violations %v, %d excused (%s), %d refused, %d client errors, %d foreign; want %d, %d (%s), %d, %d, %d", tc.name,
				len(r.Violations), r.Violations, r.ExcusedLost, r.LostAge, r.Refused, r.ClientErrors, r.Foreign, tc.violations, tc.lost, tc.lostAge, tc.refused, tc.clientErrors, tc.foreign)
		}
	}
}
