// Command upstream runs the fake Twilio upstream on loopback for the
// benchmark scripts: participants of the three APIs for one account, with
// optional latency.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"time"

	"cacheproxy/internal/twiliofake"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address")
	latency := flag.Duration("latency", 0, "added to every request")
	n := flag.Int("participants", 1000, "participants per API")
	flag.Parse()
	f := Seed(*n)
	f.Latency = *latency
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Fprintln(os.Stdout, ln.Addr().String()) // the scripts read the address
	srv := &http.Server{Handler: f, ReadHeaderTimeout: 10 * time.Second}
	log.Fatal(srv.Serve(ln))
}

// Account and Token are the benchmark's credentials.
const (
	Account = "AC00000000000000000000000000000001"
	Token   = "benchtoken"
)

// Seed makes n participants in one conversation of each API.
func Seed(n int) *twiliofake.Fake { return twiliofake.Seeded(Account, Token, n) }
