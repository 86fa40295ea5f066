// Command upstream runs the fake Twilio upstream on loopback for the
// benchmarks, in a process of its own (as Twilio is): participants of the
// three APIs for one account, with optional latency. GET /_bench/calls
// answers the number of API requests served so far.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"time"

	"cacheproxy/bench/internal/run"
	"cacheproxy/internal/twiliofake"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address")
	latency := flag.Duration("latency", 0, "added to every request")
	n := flag.Int("participants", 1000, "participants per API")
	flag.Parse()
	f := twiliofake.Seeded(run.Account, run.Token, *n)
	f.Latency = *latency
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Fprintln(os.Stdout, ln.Addr().String()) // the scripts read the address
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/_bench/calls" {
			fmt.Fprintln(w, f.Total())
			return
		}
		f.ServeHTTP(w, r)
	})
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	log.Fatal(srv.Serve(ln))
}
