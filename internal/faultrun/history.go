// Package faultrun runs three replicas of cacheproxy that share one
// redis-server, each through its own Toxiproxy link, under reads and
// writes while faults are injected, records every operation and checks
// the fleet's promise against the history (docs/fleet.md, "Checked under
// faults"). go run ./bench/faults runs it for minutes; a test runs it for
// seconds.
package faultrun

import (
	"fmt"
	"slices"
	"time"
)

// Op is one operation of the history.
type Op struct {
	Replica int
	Key     string
	Write   bool
	// Start is when the request was sent, End when its answer was read.
	Start, End time.Time
	// Version is what a write wrote, or what a read returned.
	Version int
	// Status is the HTTP status; 0: no answer.
	Status int
	// Foreign: a read that returned another account's data.
	Foreign bool
	// Cache is the answer's Cache-Status.
	Cache string
	// Message is the error's message, for an answer that is not 2xx
	// (Twilio's JSON error shape: the sidecar's own words, no data).
	Message string
	// Refused: a write answered 503 because its intent could not be
	// recorded in Redis, nothing sent upstream (docs/fleet.md, "Read-your-writes across replicas").
	Refused bool
}

// Window is a time during which a replica had lost its invalidation
// stream (and so dropped its L1).
type Window struct{ From, To time.Time }

func (w Window) overlaps(from, to time.Time) bool { return w.From.Before(to) && from.Before(w.To) }

// Replica is what a replica reported meanwhile: when it had lost its
// stream.
type Replica struct {
	Lost []Window
}

// Report is what Check found.
type Report struct {
	Reads, Writes int
	// Violations are reads that returned a version older than a write to
	// their key whose answer ended before the read began, without excuse,
	// and reads of a version only a refused write wrote (it was sent
	// after all).
	Violations []string
	// ExcusedLost are such reads whose own replica had lost its stream
	// meanwhile, the only excuse; LostAge is the oldest of them: from the
	// answer of the first write they missed to the read's start.
	ExcusedLost int
	LostAge     time.Duration
	// Refused are writes answered 503 before anything was sent upstream
	// (retried by the writer with its next version).
	Refused int
	// ClientErrors are other answers than 200 (and a refused write's
	// 503); Foreign, reads that returned another credential's data.
	ClientErrors, Foreign int
	// Errors describe the first client errors.
	Errors []string
}

// Check checks the history: for each read, the latest write to its key
// that ended before it began is not newer than what it returned, unless
// the reading replica had lost its stream between that write's end and
// the read's end; and no read returns what only a refused write wrote. A
// write without a 200 (applied or not, nobody knows) is no write of the
// history.
func Check(ops []Op, replicas map[int]Replica) Report {
	var r Report
	writes := map[string][]Op{} // by key, in order of End
	refused := map[string]map[int]bool{}
	for _, op := range ops {
		switch {
		case op.Write && op.Status == 200:
			r.Writes++
			writes[op.Key] = append(writes[op.Key], op)
		case op.Write && op.Refused:
			if refused[op.Key] == nil {
				refused[op.Key] = map[int]bool{}
			}
			refused[op.Key][op.Version] = true
		}
	}
	for k := range writes {
		slices.SortFunc(writes[k], func(a, b Op) int { return a.End.Compare(b.End) })
	}
	for _, op := range ops {
		switch {
		case op.Refused:
			r.Refused++
			continue
		case op.Status != 200:
			r.ClientErrors++
			if len(r.Errors) < 10 {
				kind := "read"
				if op.Write {
					kind = "write"
				}
				r.Errors = append(r.Errors, fmt.Sprintf("%s of %s through replica %d at +%s: %d (%s) after %s: %q", kind, op.Key, op.Replica,
					op.Start.Sub(ops[0].Start).Round(time.Millisecond), op.Status, op.Cache, op.End.Sub(op.Start).Round(time.Millisecond), op.Message))
			}
			continue
		case op.Write:
			continue
		case op.Foreign:
			r.Foreign++
		}
		r.Reads++
		if refused[op.Key][op.Version] {
			r.Violations = append(r.Violations, fmt.Sprintf("replica %d read %s = v%d at +%s (%s), which only a refused write wrote",
				op.Replica, op.Key, op.Version, op.Start.Sub(ops[0].Start).Round(time.Millisecond), op.Cache))
			continue
		}
		w, ok := latestBefore(writes[op.Key], op.Start)
		if !ok || op.Version >= w.Version {
			continue
		}
		if excused(replicas[op.Replica].Lost, w.End, op.End) {
			r.ExcusedLost++
			r.LostAge = max(r.LostAge, op.Start.Sub(firstAfter(writes[op.Key], op.Version).End))
			continue
		}
		r.Violations = append(r.Violations, fmt.Sprintf("replica %d read %s = v%d at +%s (%s); v%d was written through replica %d by +%s",
			op.Replica, op.Key, op.Version, op.Start.Sub(ops[0].Start).Round(time.Millisecond), op.Cache,
			w.Version, w.Replica, w.End.Sub(ops[0].Start).Round(time.Millisecond)))
	}
	return r
}

// latestBefore is the write with the highest version among those that
// ended before t.
func latestBefore(ws []Op, t time.Time) (Op, bool) {
	var best Op
	found := false
	for _, w := range ws {
		if !w.End.Before(t) {
			break
		}
		if !found || w.Version > best.Version {
			best, found = w, true
		}
	}
	return best, found
}

// firstAfter is the first write of ws (in order of End) newer than v.
func firstAfter(ws []Op, v int) Op {
	for _, w := range ws {
		if w.Version > v {
			return w
		}
	}
	return Op{}
}

func excused(ws []Window, from, to time.Time) bool {
	for _, w := range ws {
		if w.overlaps(from, to) {
			return true
		}
	}
	return false
}
