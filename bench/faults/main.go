// Command faults runs the fleet under faults (internal/faultrun): three
// replicas, each reaching one redis-server (AOF, appendfsync always)
// through its own Toxiproxy link, a fake Twilio, reads of three
// participants by two accounts through every replica and a writer per
// participant, with a fault every second: latency, connections reset, a
// link down, Redis paused (SIGSTOP), Redis killed (SIGKILL) and restarted
// from its AOF, garbage in the fleet's epoch, in turn. Every operation is
// recorded and the history checked; then the same load runs without
// faults, for comparison.
//
//	go run ./bench/faults [-d 5m] [-every 1s] [-baseline 1m]
package main

import (
	"flag"
	"fmt"
	"os"
	"sort"
	"text/tabwriter"
	"time"

	"cacheproxy/internal/faultrun"
)

func main() {
	d := flag.Duration("d", 5*time.Minute, "how long the load runs with faults")
	every := flag.Duration("every", time.Second, "how often a fault is injected")
	baseline := flag.Duration("baseline", time.Minute, "how long the same load runs without faults")
	flag.Parse()
	faulty, err := faultrun.Run(faultrun.Config{Duration: *d, Every: *every})
	if err != nil {
		fmt.Fprintln(os.Stderr, "faults:", err)
		os.Exit(1)
	}
	quiet, err := faultrun.Run(faultrun.Config{Duration: *baseline})
	if err != nil {
		fmt.Fprintln(os.Stderr, "faults:", err)
		os.Exit(1)
	}
	kinds := make([]string, 0, len(faulty.Faults))
	total := 0
	for k, n := range faulty.Faults {
		kinds = append(kinds, k)
		total += n
	}
	sort.Strings(kinds)
	fmt.Printf("faults injected: %d in %s\n", total, *d)
	for _, k := range kinds {
		fmt.Printf("  %-50s %d\n", k, faulty.Faults[k])
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "run\treads\twrites\trefused writes\tviolations\texcused (reader lost its stream)\toldest excused ms\tclient errors\tforeign data\thit ratio\tread p99 ms\t")
	for _, r := range []struct {
		name string
		res  faultrun.Result
	}{{"with faults", faulty}, {"without faults", quiet}} {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%.3f\t%.1f\t\n", r.name, r.res.Reads, r.res.Writes, r.res.Refused, len(r.res.Violations),
			r.res.ExcusedLost, r.res.LostAge.Milliseconds(), r.res.ClientErrors, r.res.Foreign, float64(r.res.Hits)/float64(max(1, r.res.Reads)),
			float64(r.res.P99.Microseconds())/1000)
	}
	tw.Flush()
	for _, r := range []struct {
		name string
		res  faultrun.Result
	}{{"with faults", faulty}, {"without faults", quiet}} {
		fmt.Printf("reads %s, by how they were answered:\n", r.name)
		forms := make([]string, 0, len(r.res.Answered))
		for k := range r.res.Answered {
			forms = append(forms, k)
		}
		sort.Slice(forms, func(a, b int) bool { return r.res.Answered[forms[a]] > r.res.Answered[forms[b]] })
		for _, k := range forms {
			fmt.Printf("  %7d  %s\n", r.res.Answered[k], k)
		}
	}
	for _, v := range append(faulty.Violations, quiet.Violations...) {
		fmt.Println("VIOLATION", v)
	}
	if len(faulty.Violations) > 0 {
		fmt.Println("faults, in order:")
		for _, f := range faulty.Timeline {
			fmt.Println("  ", f)
		}
	}
	for _, e := range append(faulty.Errors, quiet.Errors...) {
		fmt.Println("CLIENT ERROR", e)
	}
	bad := len(faulty.Violations) + len(quiet.Violations) + faulty.ClientErrors + quiet.ClientErrors + faulty.Foreign + quiet.Foreign
	fmt.Printf("RESULT\tfaults: violations, client errors and foreign answers\t%d\t0\t%v\n", bad, bad == 0)
	if bad != 0 {
		os.Exit(1)
	}
}
