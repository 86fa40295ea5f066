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
func Seed(n int) *twiliofake.Fake {
	f := twiliofake.New(map[string]string{Account: Token})
	conv, sess, v2 := twiliofake.SID("CH", 1), twiliofake.SID("KC", 1), "conv_conversation_1"
	f.AddConversation(conv, "", "")
	f.AddConversation(sess, "", twiliofake.SID("KS", 1))
	f.AddConversation(v2, "", "")
	for i := range n {
		f.AddParticipant(conv, twiliofake.Participant{Sid: twiliofake.SID("MB", i), Identity: fmt.Sprint("user", i), Attributes: "{}"})
		f.AddParticipant(sess, twiliofake.Participant{Sid: twiliofake.SID("KP", i), Identity: "+1500555" + fmt.Sprintf("%04d", i)})
		f.AddParticipant(v2, twiliofake.Participant{Sid: fmt.Sprintf("conv_participant_%d", i), Attributes: "name"})
	}
	return f
}
