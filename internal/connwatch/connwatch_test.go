package connwatch

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cacheproxy/internal/clock"
)

// rig serves a handler over loopback with a Watch on a fake clock. Its
// connections record every write deadline set on them (what the Watch
// arms; net/http only ever clears one, the server having no
// WriteTimeout), and have a small send buffer, so that what a client does
// not read backs up in the handler at once.
type rig struct {
	t      *testing.T
	clk    *clock.Fake
	w      *Watch
	srv    *http.Server
	addr   string
	armed  chan time.Duration // time.Until of each deadline set
	closed chan struct{}      // a connection closed
	idle   chan struct{}      // a connection went idle
	// onClear, if set, runs (once) when a deadline is cleared.
	onClear atomic.Pointer[func()]

	mu   sync.Mutex
	last time.Time // the last deadline set on any connection (zero: cleared)
}

func newRig(t *testing.T, timeout time.Duration, run bool, h http.HandlerFunc) *rig {
	t.Helper()
	r := &rig{t: t, clk: clock.NewFake(time.Unix(1_700_000_000, 0)), armed: make(chan time.Duration, 16),
		closed: make(chan struct{}, 16), idle: make(chan struct{}, 16)}
	r.w = New(timeout, r.clk)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.addr = ln.Addr().String()
	r.srv = &http.Server{Handler: h, ConnState: func(_ net.Conn, s http.ConnState) {
		var ch chan struct{}
		switch s {
		case http.StateClosed:
			ch = r.closed
		case http.StateIdle:
			ch = r.idle
		}
		select {
		case ch <- struct{}{}:
		default: // nil, or nobody asks
		}
	}}
	watched := r.w.Wrap(r.srv, recording{ln, r})
	go func() { _ = r.srv.Serve(watched) }()
	t.Cleanup(func() { r.srv.Close() })
	if run {
		stop := make(chan struct{})
		go r.w.Run(stop)
		t.Cleanup(func() { close(stop) })
	}
	return r
}

type recording struct {
	net.Listener
	r *rig
}

func (l recording) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	_ = c.(*net.TCPConn).SetWriteBuffer(4 << 10)
	return recConn{c, l.r}, nil
}

type recConn struct {
	net.Conn
	r *rig
}

func (c recConn) SetWriteDeadline(t time.Time) error {
	c.r.mu.Lock()
	c.r.last = t
	c.r.mu.Unlock()
	if t.IsZero() {
		if f := c.r.onClear.Swap(nil); f != nil {
			(*f)()
		}
	} else {
		c.r.armed <- time.Until(t)
	}
	return c.Conn.SetWriteDeadline(t)
}

func (r *rig) lastDeadline() time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last
}

// advance moves the fake clock on by d and waits for the sweep it causes.
func (r *rig) advance(d time.Duration) {
	wait := r.clk.Expect(1) // the sweep's next wait: this one is done
	r.clk.Advance(d)
	wait()
}

func (r *rig) noDeadline(when string) {
	r.t.Helper()
	select {
	case d := <-r.armed:
		r.t.Fatalf("%s: a deadline was armed (%v away)", when, d)
	default:
	}
}

// dial opens a connection with a small receive buffer and sends a GET.
func (r *rig) dial() net.Conn {
	r.t.Helper()
	c, err := net.Dial("tcp", r.addr)
	if err != nil {
		r.t.Fatal(err)
	}
	_ = c.(*net.TCPConn).SetReadBuffer(4 << 10)
	r.t.Cleanup(func() { c.Close() })
	send(r.t, c)
	return c
}

func send(t *testing.T, c net.Conn) {
	t.Helper()
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
}

// readAnswer reads one response from c and returns its body.
func readAnswer(t *testing.T, br *bufio.Reader) string {
	t.Helper()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// stalling is a handler that begins its response, says so, and writes
// 16 MiB (to a client that does not read them), then sends Write's error.
func stalling(t *testing.T, begun chan<- struct{}, done chan<- error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		c := Of(r)
		if c == nil {
			t.Error("an HTTP/1 request on a watched connection has no Conn")
			return
		}
		c.Begin()
		begun <- struct{}{}
		_, err := w.Write(make([]byte, 16<<20))
		done <- err
	}
}

// TestAStalledResponseIsArmedAtItsBound: a response still being written
// gets its connection's write deadline from the sweep two intervals before
// its bound, set at the bound itself (as a deadline set at its start
// would have been), and none before.
func TestAStalledResponseIsArmedAtItsBound(t *testing.T) {
	begun, done := make(chan struct{}), make(chan error, 1)
	r := newRig(t, 8*time.Second, true, stalling(t, begun, done)) // sweeps every second
	c := r.dial()
	<-begun
	for i := 1; i <= 5; i++ {
		r.advance(time.Second)
		r.noDeadline("5 s into an 8 s bound")
	}
	r.advance(time.Second)
	select {
	case d := <-r.armed:
		if d <= time.Second || d > 2*time.Second {
			t.Fatalf("6 s into an 8 s bound, the deadline is %v away, want 2 s", d)
		}
	default:
		t.Fatal("6 s into an 8 s bound, with sweeps every second: no deadline armed")
	}
	r.advance(time.Second)
	r.noDeadline("armed once already")
	c.Close()
	if err := <-done; err == nil {
		t.Fatal("a write to a closed client succeeded")
	}
}

// TestAnEndedResponseIsNotArmed: a sweep that read a response's start
// before it ended arms nothing once it has.
func TestAnEndedResponseIsNotArmed(t *testing.T) {
	r := &rig{t: t, armed: make(chan time.Duration, 1)}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	c := &Conn{Conn: recConn{a, r}, w: New(time.Second, clock.NewFake(time.Unix(0, 0)))}
	c.Begin()
	began := c.began.Load()
	c.ended()
	c.arm(began, time.Second)
	r.noDeadline("a sweep of a response that ended")
	c.Begin()
	c.arm(began, time.Second)
	if d := <-r.armed; d <= 0 || d > time.Second {
		t.Fatalf("the response that began: deadline %v away, want 1 s", d)
	}
}

// TestALateSweepCutsAtOnce: a response found past its bound is cut at
// once with a timeout, as a deadline that had expired would cut it.
func TestALateSweepCutsAtOnce(t *testing.T) {
	begun, done := make(chan struct{}), make(chan error, 1)
	r := newRig(t, 8*time.Second, true, stalling(t, begun, done))
	r.dial()
	<-begun
	r.advance(9 * time.Second)
	if err := <-done; !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the stalled write ended with %v, want a deadline exceeded", err)
	}
	<-r.closed // net/http closes the connection
	r.w.mu.Lock()
	n := len(r.w.conns)
	r.w.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d closed connections still watched", n)
	}
}

// TestAFinishedResponseIsNeverArmed: once a response is written and its
// connection idle, no sweep arms a deadline for it, and the connection
// serves the next request.
func TestAFinishedResponseIsNeverArmed(t *testing.T) {
	r := newRig(t, 8*time.Second, true, func(w http.ResponseWriter, req *http.Request) {
		Of(req).Begin()
		_, _ = io.WriteString(w, "ok")
	})
	c := r.dial()
	br := bufio.NewReader(c)
	if b := readAnswer(t, br); b != "ok" {
		t.Fatalf("body %q", b)
	}
	<-r.idle // the response has ended
	for range 20 {
		r.advance(time.Second)
	}
	r.noDeadline("20 s after a response that was written")
	send(t, c)
	if b := readAnswer(t, br); b != "ok" {
		t.Fatalf("the next response on the connection: %q", b)
	}
}

// TestADeadlineArmedAsTheResponseEndsIsCleared: a sweep that arms a
// deadline after net/http cleared the connection's own (the response was
// done, its connection not yet idle) must not leave it to cut the next
// response: the deadline is cleared when the connection goes idle.
func TestADeadlineArmedAsTheResponseEndsIsCleared(t *testing.T) {
	begun, release := make(chan struct{}), make(chan struct{})
	var calls atomic.Int32
	r := newRig(t, 8*time.Second, false, func(w http.ResponseWriter, req *http.Request) {
		Of(req).Begin()
		if calls.Add(1) == 1 {
			begun <- struct{}{}
			<-release
		}
		_, _ = io.WriteString(w, "ok")
	})
	c := r.dial()
	br := bufio.NewReader(c)
	<-begun
	r.clk.Advance(7 * time.Second) // Run is not running: the one sweep is this test's
	sweep := r.w.sweep
	r.onClear.Store(&sweep) // net/http clears the deadline after the response: sweep then
	close(release)
	if b := readAnswer(t, br); b != "ok" {
		t.Fatalf("body %q", b)
	}
	<-r.idle
	select {
	case <-r.armed: // the sweep's, between the response's end and idle
	default:
		t.Fatal("the sweep between the response's end and idle armed nothing: the test does not test")
	}
	if d := r.lastDeadline(); !d.IsZero() {
		t.Fatalf("an idle connection keeps a deadline (%v away) armed for its last response", time.Until(d))
	}
	send(t, c)
	if b := readAnswer(t, br); b != "ok" {
		t.Fatalf("the next response: %q", b)
	}
}

// TestOfIsHTTP1OnWatchedConnections: an HTTP/2 request (many responses
// share its connection) and a request of an unwatched server have no
// Conn: they set deadlines of their own.
func TestOfIsHTTP1OnWatchedConnections(t *testing.T) {
	c := &Conn{}
	r, _ := http.NewRequestWithContext(context.WithValue(context.Background(), connKey{}, c), "GET", "/", nil)
	if Of(r) != c {
		t.Fatal("an HTTP/1.1 request on a watched connection")
	}
	r.ProtoMajor, r.ProtoMinor = 2, 0
	if Of(r) != nil {
		t.Fatal("an HTTP/2 request")
	}
	if Of(httptestRequest()) != nil {
		t.Fatal("a request of an unwatched server")
	}
}

func httptestRequest() *http.Request {
	r, _ := http.ReadRequest(bufio.NewReader(strings.NewReader("GET / HTTP/1.1\r\nHost: x\r\n\r\n")))
	return r
}

// TestNoBound: a Watch of 0 never cuts.
func TestNoBound(t *testing.T) {
	begun, done := make(chan struct{}), make(chan error, 1)
	r := newRig(t, 0, true, stalling(t, begun, done))
	c := r.dial()
	<-begun
	r.clk.Advance(time.Hour)
	r.w.sweep()
	r.noDeadline("without a bound")
	c.Close()
	if err := <-done; err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the write ended with %v, want the client's close", err)
	}
}
