package faultrun

import (
	"testing"
	"time"
)

// The short run of .ci/run: three replicas, each through its own Toxiproxy
// link to one redis-server, reads and writes for 20 s with a fault every
// second (each kind in turn); the history has no violation, no client
// error and no answer of another credential's data.
func TestFleetHistoryUnderFaults(t *testing.T) {
	res, err := Run(Config{Duration: 20 * time.Second, Every: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d reads and %d writes checked; faults %v; excused: %d on a replica that lost its stream, %d after a write Redis had not taken; hit ratio %.2f; read p99 %s",
		res.Reads, res.Writes, res.Faults, res.ExcusedLost, res.ExcusedQueued, float64(res.Hits)/float64(max(1, res.Reads)), res.P99)
	for _, v := range res.Violations {
		t.Error(v)
	}
	for _, e := range res.Errors {
		t.Log(e)
	}
	if res.ClientErrors != 0 || res.Foreign != 0 {
		t.Errorf("%d client errors, %d answers of another account's data", res.ClientErrors, res.Foreign)
	}
	for _, k := range kinds {
		if res.Faults[k] == 0 {
			t.Errorf("no %q fault injected", k)
		}
	}
	if res.Reads < 500 || res.Writes < 100 {
		t.Errorf("only %d reads and %d writes", res.Reads, res.Writes)
	}
}
