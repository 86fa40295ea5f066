package proxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"cacheproxy/internal/config"
)

const messagesPath = "/v1/Conversations/CH00000000000000000000000000000001/Messages"

// bigAnswer makes the fake answer GET messagesPath with n bytes of JSON-ish
// body.
func bigAnswer(h *harness, n int) {
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != messagesPath {
			return false
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(n))
		_, _ = io.Copy(w, io.LimitReader(zeros{}, int64(n)))
		return true
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 'x'
	}
	return len(p), nil
}

// smallBuffers is a listener whose connections have a small send buffer,
// so that what a client does not read backs up in the proxy at once
// instead of in the kernel.
type smallBuffers struct{ net.Listener }

func (l smallBuffers) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		_ = c.(*net.TCPConn).SetWriteBuffer(4 << 10)
	}
	return c, err
}

// stalledReader sends a GET to a server of h's proxy with small socket
// buffers and never reads the answer.
func stalledReader(t *testing.T, h *harness, path string) net.Conn {
	t.Helper()
	srv := h.server(func(ln net.Listener) net.Listener { return smallBuffers{ln} })
	c, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	_ = c.(*net.TCPConn).SetReadBuffer(4 << 10)
	t.Cleanup(func() { c.Close() })
	if _, err := io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: localhost\r\nAuthorization: "+basic(acctA, tokenA)+"\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	// Wait for the status line: the proxy has its answer and is writing.
	if _, err := bufio.NewReaderSize(c, 16).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	return c
}

// oneSlot gives account A a single upstream call in flight and a short
// wait bound: a second call gets 429 unless the first gave its slot back.
func oneSlot(s *setup) {
	s.cfg.RateLimit.MaxConcurrent = 1
	s.cfg.RateLimit.MaxWait = config.Duration(time.Second)
}

// TestASlowReaderOfASmallAnswerHoldsNoSlot: a pass-through answer under
// the buffering bound is read from the upstream in full before the client
// gets a byte; a client that never reads it does not keep its account's
// only upstream slot, even with a write deadline an hour away.
func TestASlowReaderOfASmallAnswerHoldsNoSlot(t *testing.T) {
	h := newHarness(t, oneSlot, func(s *setup) { s.cfg.Server.WriteTimeout = config.Duration(time.Hour) })
	bigAnswer(h, bufferedResponseBytes-1)
	stalledReader(t, h, messagesPath)
	resp := h.do("GET", pathV2, basic(acctA, tokenA))
	if s, _, body := readResp(t, resp); s != 200 {
		t.Fatalf("the account's next call while a client stalls: %d %s", s, body)
	}
}

// TestASlowReaderOfALargeAnswerIsCutAtTheWriteDeadline: a larger answer
// streams; the client that stops reading loses its connection at
// server.write_timeout, the slot comes back (the next call of the account
// is served), and the access line is a warning with the bytes sent.
// Both ways of bounding the write are tried: an HTTP/1 connection's
// connwatch.Watch, and the deadline each response sets where no watch is
// (HTTP/2).
func TestASlowReaderOfALargeAnswerIsCutAtTheWriteDeadline(t *testing.T) {
	for _, unwatched := range []bool{false, true} {
		t.Run(fmt.Sprintf("unwatched=%v", unwatched), func(t *testing.T) { testSlowReaderCut(t, unwatched) })
	}
}

func testSlowReaderCut(t *testing.T, unwatched bool) {
	h := newHarness(t, func(s *setup) {
		s.cfg.RateLimit.MaxConcurrent = 1
		s.cfg.RateLimit.MaxWait = config.Duration(10 * time.Second)
		s.cfg.Server.WriteTimeout = config.Duration(200 * time.Millisecond)
		s.unwatched = unwatched
	})
	const size = 16 << 20
	bigAnswer(h, size)
	stalled := stalledReader(t, h, messagesPath)
	if s, _, body := readResp(t, h.do("GET", pathV2, basic(acctA, tokenA))); s != 200 {
		t.Fatalf("the account's next call: %d %s", s, body)
	}
	// The slot came back when the upstream exchange ended; the line is
	// written once the handler returns, before net/http closes the
	// connection: read what it sent until then (a bound, should it not).
	_ = stalled.SetReadDeadline(time.Now().Add(30 * time.Second))
	_, _ = io.Copy(io.Discard, stalled)
	var cut map[string]any
	for _, l := range h.logs.lines(t) {
		if l["message"] == "request" && l["route"] == "conversations.v1.messages" {
			cut = l
		}
	}
	sent, _ := cut["bytes"].(float64)
	if cut["level"] != "warn" || cut["status"] != float64(200) || sent >= size || !strings.Contains(cut["error"].(string), "interrupted") {
		t.Fatalf("the stalled transfer's line: %v", cut)
	}
}

// TestAnUpstreamCutMidBody: before the client got a byte (a buffered
// answer) it is a 502 in Twilio's shape; while streaming a large answer
// the connection is cut and the line is an error that says what happened.
func TestAnUpstreamCutMidBody(t *testing.T) {
	for _, tc := range []struct {
		name      string
		size      int
		streaming bool
	}{
		{"buffered", 1000, false},
		{"streaming", 3 << 20, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
				w.Header().Set("Content-Length", strconv.Itoa(tc.size))
				_, _ = io.Copy(w, io.LimitReader(zeros{}, int64(tc.size/2)))
				_ = http.NewResponseController(w).Flush() // headers and half the body are out
				panic(http.ErrAbortHandler)               // then the upstream dies
			}
			resp := h.do("GET", messagesPath, basic(acctA, tokenA))
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if !tc.streaming {
				checkTwilioError(t, resp.StatusCode, string(b), http.StatusBadGateway)
				if !strings.Contains(string(b), "cut off") {
					t.Fatalf("message: %s", b)
				}
				return
			}
			if err == nil || len(b) >= tc.size {
				t.Fatalf("a cut stream read whole: %d bytes, %v", len(b), err)
			}
			var line map[string]any
			for _, l := range h.logs.lines(t) {
				if l["message"] == "request" {
					line = l
				}
			}
			if line["level"] != "error" || !strings.Contains(line["error"].(string), "upstream response cut off mid-body") {
				t.Fatalf("access line: %v", line)
			}
			var rp map[string]any // the reverse proxy's own line: complete too (checkLogLines)
			for _, l := range h.logs.lines(t) {
				if l["component"] == "reverseproxy" {
					rp = l
				}
			}
			if rp["level"] != "warn" || rp["time"] == nil {
				t.Fatalf("reverse proxy line: %v", rp)
			}
		})
	}
}

// TestACachedFetchCutMidBody: the answer had begun, so it is "cut off",
// not "unreachable"; the line says the read was a miss.
func TestACachedFetchCutMidBody(t *testing.T) {
	h := newHarness(t)
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("Content-Length", "1000")
		_, _ = io.WriteString(w, `{"sid":`)
		_ = http.NewResponseController(w).Flush()
		panic(http.ErrAbortHandler)
	}
	status, _, body := h.get(pathConv)
	checkTwilioError(t, status, body, http.StatusBadGateway)
	if !strings.Contains(body, "cut off") {
		t.Fatalf("message: %s", body)
	}
	var line map[string]any
	for _, l := range h.logs.lines(t) {
		if l["message"] == "request" {
			line = l
		}
	}
	if line["cache"] != "miss" || line["level"] != "error" || !strings.Contains(line["error"].(string), "cut off") {
		t.Fatalf("access line: %v", line)
	}
}
