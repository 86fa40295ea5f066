package main

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// rapidReset opens one h2c connection to addr and sends n streams, each a
// GET of a distinct cold participant (from from on) cancelled
// (RST_STREAM) right after its HEADERS, as fast as the connection takes
// them. It returns how many it sent before the server closed the
// connection (n if it never did).
func rapidReset(t *testing.T, addr, auth string, from, n int) int {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(c, c)
	var writing sync.Mutex // the framer's writes, from here and the reader
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	go func() { // read and drop the server's frames; ack its settings
		rd := http2.NewFramer(nil, c)
		for {
			f, err := rd.ReadFrame()
			if err != nil {
				return
			}
			if s, ok := f.(*http2.SettingsFrame); ok && !s.IsAck() {
				writing.Lock()
				_ = fr.WriteSettingsAck()
				writing.Unlock()
			}
		}
	}()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for i := range n {
		hb.Reset()
		for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", addr},
			{":path", fmt.Sprintf("/v1/Conversations/%s/Participants/MB%032d", conv, from+i)}, {"authorization", auth}} {
			_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		id := uint32(2*i + 1)
		c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		writing.Lock()
		err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndStream: true, EndHeaders: true})
		if err == nil {
			err = fr.WriteRSTStream(id, http2.ErrCodeCancel)
		}
		writing.Unlock()
		if err != nil {
			return i
		}
	}
	return n
}

// Hostile input, round three, point 5: HTTP/2 rapid reset. h2c
// connections opening and cancelling 50,000 streams of distinct cold reads
// in all (a new connection each time the sidecar closes one, for 10 s at
// most) cost a bounded amount of work and memory: resident memory stays
// inside max_bytes + 32 MiB, and another client is served meanwhile.
func TestRapidResetStaysSmall(t *testing.T) {
	_, up := newFake(t)
	p := start(t, upstreamConfig(up.URL)+"[cache]\nmax_bytes = \"8MiB\"\n")
	before := peakRSS(t, p.cmd.Process.Pid)
	sent, conns := 0, 0
	for end := time.Now().Add(10 * time.Second); sent < 50_000 && time.Now().Before(end); conns++ {
		sent += rapidReset(t, p.addr, auth(), 1000+sent, 50_000-sent)
	}
	req, _ := http.NewRequest("GET", "http://"+p.addr+path, nil)
	req.Header.Set("Authorization", auth())
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("another client during the reset flood: %d, want 200", resp.StatusCode)
	}
	rss := peakRSS(t, p.cmd.Process.Pid)
	t.Logf("%d streams sent on %d connections; peak resident memory %d MiB (%d before)", sent, conns, rss, before)
	if rss > 8+32 {
		t.Fatalf("peak resident memory %d MiB, want within max_bytes + 32 MiB (40)", rss)
	}
}
