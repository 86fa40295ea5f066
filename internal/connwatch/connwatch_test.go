package connwatch

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cacheproxy/internal/clock"
)

// rig serves a handler over loopback with a Watch on a fake clock (which
// starts at the real time: net/http's read deadlines are the real time's).
// Its connections record every deadline set on them (what the Watch arms;
// net/http only ever clears a write deadline, the server having no
// WriteTimeout), and have a small send buffer, so that what a client does
// not read backs up in the handler at once.
type rig struct {
	t      *testing.T
	clk    *clock.Fake
	w      *Watch
	srv    *http.Server
	addr   string
	armed  chan time.Duration // time.Until of each write deadline set
	reads  chan time.Duration // time.Until of each read deadline set (not cleared)
	closed chan struct{}      // a connection closed
	idle   chan struct{}      // a connection went idle
	// onClear, if set, runs (once) when a deadline is cleared.
	onClear atomic.Pointer[func()]

	mu   sync.Mutex
	last time.Time // the last deadline set on any connection (zero: cleared)
}

func newRig(t *testing.T, timeout time.Duration, run bool, h http.HandlerFunc) *rig {
	t.Helper()
	return newServerRig(t, timeout, run, h, &http.Server{})
}

// newServerRig is newRig with srv's timeouts (its Handler and ConnState
// are the rig's).
func newServerRig(t *testing.T, timeout time.Duration, run bool, h http.HandlerFunc, srv *http.Server) *rig {
	t.Helper()
	r := &rig{t: t, clk: clock.NewFake(time.Now()), armed: make(chan time.Duration, 16),
		reads: make(chan time.Duration, 64), closed: make(chan struct{}, 16), idle: make(chan struct{}, 16)}
	r.w = New(timeout, r.clk)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.addr = ln.Addr().String()
	r.srv = srv
	srv.Handler = h
	srv.ConnState = func(_ net.Conn, s http.ConnState) {
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
	}
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

func (c recConn) SetReadDeadline(t time.Time) error {
	if !t.IsZero() {
		select {
		case c.r.reads <- time.Until(t):
		default:
		}
	}
	return c.Conn.SetReadDeadline(t)
}

// futureReads returns the read deadlines set on connections so far that
// were still to come when set (net/http sets one long past to end each
// request's background read).
func (r *rig) futureReads() []time.Duration {
	var ds []time.Duration
	for {
		select {
		case d := <-r.reads:
			if d > 0 {
				ds = append(ds, d)
			}
		default:
			return ds
		}
	}
}

// conn returns the one connection the Watch watches, once a read deadline
// has been asked for on it.
func (r *rig) conn() *Conn {
	r.t.Helper()
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); runtime.Gosched() {
		r.w.mu.Lock()
		for c := range r.w.conns {
			if c.rd.Load() != 0 {
				r.w.mu.Unlock()
				return c
			}
		}
		r.w.mu.Unlock()
	}
	r.t.Fatal("no watched connection with a read deadline asked for")
	return nil
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
	c := r.connect()
	send(r.t, c)
	return c
}

// connect opens a connection with a small receive buffer.
func (r *rig) connect() net.Conn {
	r.t.Helper()
	c, err := net.Dial("tcp", r.addr)
	if err != nil {
		r.t.Fatal(err)
	}
	_ = c.(*net.TCPConn).SetReadBuffer(4 << 10)
	_ = c.SetDeadline(time.Now().Add(10 * time.Second)) // a hung server fails the test
	r.t.Cleanup(func() { c.Close() })
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
	within(t, r.closed, "the connection closed") // net/http closes the connection
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
	within(t, r.idle, "the connection went idle") // the response has ended
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
	within(t, r.idle, "the connection went idle")
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

// within receives from ch, failing t if nothing comes for long: what
// should have happened did not (a bound on a hang, not a measure of time).
func within[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("not seen in 10 s: %s", what)
		panic("unreachable")
	}
}

// timeouts is a server with every read bound net/http has.
func timeouts() *http.Server {
	return &http.Server{ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 20 * time.Second, IdleTimeout: 40 * time.Second}
}

// TestReadDeadlinesAreNotSetPerRequest: the idle, header and request
// deadlines net/http sets for each request on a keep-alive connection
// arm no timer: none reaches the connection.
func TestReadDeadlinesAreNotSetPerRequest(t *testing.T) {
	r := newServerRig(t, 8*time.Second, true, func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok")
	}, timeouts())
	c := r.dial()
	br := bufio.NewReader(c)
	for i := range 5 {
		if i > 0 {
			send(t, c)
		}
		if b := readAnswer(t, br); b != "ok" {
			t.Fatalf("response %d: %q", i, b)
		}
	}
	if ds := r.futureReads(); len(ds) != 0 {
		t.Fatalf("5 requests set %d read deadlines on their connection (%v away), want none", len(ds), ds)
	}
}

// TestAnIdleConnectionIsClosedAtItsIdleTimeout: the idle deadline the
// sweep arms closes a keep-alive connection at IdleTimeout, not before.
func TestAnIdleConnectionIsClosedAtItsIdleTimeout(t *testing.T) {
	r := newServerRig(t, 8*time.Second, true, func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok")
	}, timeouts())
	c := r.dial()
	if b := readAnswer(t, bufio.NewReader(c)); b != "ok" {
		t.Fatalf("body %q", b)
	}
	within(t, r.idle, "the connection went idle")
	r.conn() // the idle deadline is asked for
	r.advance(38 * time.Second)
	if ds := r.futureReads(); len(ds) != 0 {
		t.Fatalf("38 s into a 40 s idle timeout, sweeps every second: read deadlines %v armed", ds)
	}
	r.advance(3 * time.Second)
	within(t, r.closed, "a connection past its idle timeout closed")
	if _, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("past its idle timeout the connection reads %v, want EOF", err)
	}
}

// TestTrickledHeadersAreCutAtReadHeaderTimeout: a request whose headers do
// not end loses its connection at ReadHeaderTimeout.
func TestTrickledHeadersAreCutAtReadHeaderTimeout(t *testing.T) {
	r := newServerRig(t, 8*time.Second, true, func(http.ResponseWriter, *http.Request) {
		t.Error("a request without the end of its headers was served")
	}, timeouts())
	c := r.connect()
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n"); err != nil {
		t.Fatal(err)
	}
	r.conn()
	r.advance(7 * time.Second)
	if ds := r.futureReads(); len(ds) != 0 {
		t.Fatalf("7 s into a 10 s header timeout: read deadlines %v armed", ds)
	}
	r.advance(4 * time.Second)
	within(t, r.closed, "a connection past its header timeout closed")
}

// TestATrickledBodyIsCutAtReadTimeout: a body that stops coming fails its
// handler's read with a timeout at ReadTimeout from the request's start.
func TestATrickledBodyIsCutAtReadTimeout(t *testing.T) {
	reading, done := make(chan struct{}), make(chan error, 1)
	r := newServerRig(t, 8*time.Second, true, func(_ http.ResponseWriter, req *http.Request) {
		close(reading)
		_, err := io.ReadAll(req.Body)
		done <- err
	}, timeouts())
	c := r.connect()
	if _, err := io.WriteString(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf."); err != nil {
		t.Fatal(err)
	}
	<-reading
	r.advance(15 * time.Second)
	select {
	case err := <-done:
		t.Fatalf("15 s into a 20 s read timeout the body's read ended: %v", err)
	default:
	}
	r.advance(6 * time.Second)
	if err := within(t, done, "the body's read past its read timeout ended"); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the body's read ended with %v, want a deadline exceeded", err)
	}
}

// TestANearOrPastReadDeadlineIsSetAtOnce: a read deadline nearer than the
// sweeps can arm (by the Watch's clock, as of its last sweep; none runs
// after it here) reaches the connection when it is set, and a past one
// cuts the pending read.
func TestANearOrPastReadDeadlineIsSetAtOnce(t *testing.T) {
	done := make(chan error, 1)
	r := newRig(t, 8*time.Second, false, func(w http.ResponseWriter, req *http.Request) {
		rc := http.NewResponseController(w)
		_ = rc.SetReadDeadline(Of(req).w.clock.Now().Add(time.Second))
		_ = rc.SetReadDeadline(time.Unix(1, 0))
		_, err := io.ReadAll(req.Body)
		done <- err
	})
	r.clk.Advance(50 * time.Second)
	r.w.sweep()
	c := r.connect()
	if _, err := io.WriteString(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if err := within(t, done, "a read deadline set in the past cut the pending read"); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the body's read ended with %v, want a deadline exceeded", err)
	}
	// The deadline 1 s after the Watch's now is 51 s after the real now
	// the clock started at.
	if ds := r.futureReads(); len(ds) != 1 || ds[0] <= 50*time.Second || ds[0] > 51*time.Second {
		t.Fatalf("a read deadline 1 s away reached the connection as %v, want once, 1 s away", ds)
	}
}

// TestAReadDeadlineAskedForSinceTheSweepLookedIsNotArmed: a sweep arms
// only the read deadline still asked for; one armed is cleared when a far
// one replaces it (the sweep arms that in its turn) or none does, and a
// far one asked for with none armed reaches nothing.
func TestAReadDeadlineAskedForSinceTheSweepLookedIsNotArmed(t *testing.T) {
	r := &rig{t: t, reads: make(chan time.Duration, 16)}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	var last atomic.Pointer[time.Time]
	c := &Conn{Conn: lastRead{recConn{a, r}, &last}, w: New(8*time.Second, clock.NewFake(time.Now()))}
	_ = c.SetReadDeadline(time.Now().Add(time.Hour))
	first := c.rd.Load()
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Hour))
	c.armRead(first, time.Second) // looked before the second was asked for
	if ds := r.futureReads(); len(ds) != 0 || last.Load() != nil {
		t.Fatalf("a sweep armed a read deadline replaced since: %v", ds)
	}
	c.armRead(c.rd.Load(), time.Second)
	if ds := r.futureReads(); len(ds) != 1 || ds[0] > time.Second {
		t.Fatalf("the read deadline asked for: armed %v, want once, 1 s away", ds)
	}
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Hour))
	if l := last.Load(); l == nil || !l.IsZero() || c.rd.Load() == 0 {
		t.Fatalf("a far deadline replacing an armed one: last set %v, recorded %d; want cleared and recorded", l, c.rd.Load())
	}
	c.armRead(c.rd.Load(), time.Second)
	_ = c.SetReadDeadline(time.Time{})
	if l := last.Load(); !l.IsZero() || c.rd.Load() != 0 {
		t.Fatalf("cleared: last set %v, recorded %d", l, c.rd.Load())
	}
	last.Store(nil)
	_ = c.SetReadDeadline(time.Time{})
	_ = c.SetReadDeadline(time.Now().Add(time.Hour))
	if l := last.Load(); l != nil {
		t.Fatalf("with none armed, clearing and a far deadline set %v on the connection", l)
	}
}

// lastRead records the last read deadline set.
type lastRead struct {
	net.Conn
	last *atomic.Pointer[time.Time]
}

func (c lastRead) SetReadDeadline(t time.Time) error {
	c.last.Store(&t)
	return c.Conn.SetReadDeadline(t)
}

// TestAHijackedConnectionKeepsItsReadBounds: a connection its handler has
// taken over (as a protocol upgrade is) is watched until it is closed: a
// read deadline its new owner sets still cuts.
func TestAHijackedConnectionKeepsItsReadBounds(t *testing.T) {
	done := make(chan error, 1)
	r := newRig(t, 8*time.Second, true, func(w http.ResponseWriter, _ *http.Request) {
		c, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			done <- err
			return
		}
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1))
		c.Close()
		done <- err
	})
	r.dial()
	r.conn() // the hijacker's deadline is asked for
	r.advance(11 * time.Second)
	if err := within(t, done, "the hijacked connection's read past its deadline ended"); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the hijacked connection's read ended with %v, want a deadline exceeded", err)
	}
	r.w.mu.Lock()
	n := len(r.w.conns)
	r.w.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d closed connections still watched", n)
	}
}
