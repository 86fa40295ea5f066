// Command bare is the baseline of the hit benchmark: a plain net/http server
// that answers every request with the same status, headers and body that it
// fetched once from -from (a cache hit through cacheproxy).
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address")
	from := flag.String("from", "", "URL whose response to serve")
	auth := flag.String("auth", "", "Authorization header for -from")
	flag.Parse()
	req, err := http.NewRequest("GET", *from, nil)
	if err != nil {
		log.Fatal(err)
	}
	req.Header.Set("Authorization", *auth)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		log.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		log.Fatal(err)
	}
	hdr := resp.Header.Clone()
	hdr.Del("Date")
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Fprintln(os.Stdout, ln.Addr().String())
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		for k, v := range hdr {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		_, _ = w.Write(body)
	})}
	log.Fatal(srv.Serve(ln))
}
