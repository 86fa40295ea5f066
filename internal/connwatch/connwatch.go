// Package connwatch bounds the reads and writes of a server's HTTP/1
// connections as deadlines do, without arming a runtime timer for every
// request.
//
// A deadline per request costs a hit more than anything else the proxy
// does for it: each one set arms, moves or disarms a timer in the runtime
// (and may wake its network poller to do so), for a bound that almost
// never fires. net/http sets three read deadlines per request on a
// keep-alive connection (idle, headers, whole request), and clears the
// write deadline after every response, so a per-response write deadline
// would be a fourth. A Watch instead records each bound, one atomic store,
// and a sweep that runs a few times per interval arms the connection's
// real deadline, at the instant it was asked for, only for a bound close
// to passing: for a write, when each response began (Begin); for a read,
// the deadline net/http (or anyone) sets on the Conn.
package connwatch

import (
	"context"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"cacheproxy/internal/clock"
)

// Watch bounds the reads and writes of the connections of the listeners
// it wraps: a response not written within the timeout from its start
// fails with a timeout, as with net.Conn.SetWriteDeadline, and net/http
// closes its connection; a read deadline set on a connection applies at
// its instant, as set on the connection itself.
type Watch struct {
	timeout  time.Duration
	interval time.Duration // between sweeps
	clock    clock.Clock
	epoch    time.Time
	coarse   atomic.Int64 // since at the last sweep (or New): at most now

	mu    sync.Mutex
	conns map[*Conn]struct{}

	closed atomic.Int64 // connections closed for their resets (Guard)
}

// New returns a Watch with the given bound on writes (0: none). A nil
// clock is the real one. The sweeps run in Run, which must run: a read
// deadline more than a few intervals away is set only by a sweep.
func New(timeout time.Duration, clk clock.Clock) *Watch {
	clk = clock.Or(clk)
	interval := time.Second
	if timeout > 0 {
		interval = min(max(timeout/8, time.Millisecond), time.Second)
	}
	w := &Watch{
		timeout:  timeout,
		interval: interval,
		clock:    clk,
		epoch:    clk.Now(),
		conns:    make(map[*Conn]struct{}),
	}
	w.coarse.Store(w.since())
	return w
}

// Wrap makes srv's connections from ln watched: it returns the listener
// to serve (its connections are *Conn, watched from their accepting to
// their closing, hijacked or not), and sets srv's ConnContext (the
// connection in each request's context, for Of) and ConnState (a
// response ends when its connection goes idle, closes or is hijacked),
// keeping the hooks srv had.
func (w *Watch) Wrap(srv *http.Server, ln net.Listener) net.Listener {
	prevCtx, prevState := srv.ConnContext, srv.ConnState
	srv.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		if prevCtx != nil {
			ctx = prevCtx(ctx, c)
		}
		if wc, ok := c.(*Conn); ok && wc.w == w {
			ctx = context.WithValue(ctx, connKey{}, wc)
		}
		return ctx
	}
	srv.ConnState = func(c net.Conn, s http.ConnState) {
		if wc, ok := c.(*Conn); ok && wc.w == w {
			switch s {
			case http.StateIdle, http.StateClosed, http.StateHijacked:
				wc.ended()
			}
		}
		if prevState != nil {
			prevState(c, s)
		}
	}
	return listener{ln, w}
}

// Run sweeps until stop is closed.
func (w *Watch) Run(stop <-chan struct{}) {
	for {
		select {
		case <-w.clock.After(w.interval):
			w.sweep()
		case <-stop:
			return
		}
	}
}

// sweep arms the deadline of every response that will reach its bound,
// and every read deadline that will pass, before the sweep after next: a
// sweep that comes late by up to one interval still arms it in time.
func (w *Watch) sweep() {
	now := w.since()
	w.coarse.Store(now)
	soon := int64(2 * w.interval)
	w.mu.Lock()
	defer w.mu.Unlock()
	for c := range w.conns {
		if b := c.began.Load(); w.timeout > 0 && b != 0 && now-b >= int64(w.timeout)-soon {
			c.arm(b, time.Duration(b+int64(w.timeout)-now))
		}
		if d := c.rd.Load(); d != 0 && d-now < soon {
			c.armRead(d, time.Duration(d-now))
		}
	}
}

// since is the time since the Watch began, never 0.
func (w *Watch) since() int64 { return int64(w.clock.Since(w.epoch)) | 1 }

// Conn is a watched connection.
type Conn struct {
	net.Conn
	w     *Watch
	began atomic.Int64 // Watch.since when the current response began; 0 between responses

	mu    sync.Mutex // orders arming against the response's end and new read deadlines
	armed bool       // a write deadline is set on Conn

	rd     atomic.Int64 // the read deadline asked for and not yet set on Conn (Watch.since); 0: none
	rArmed atomic.Bool  // a read deadline may be set on Conn

	rmu      sync.Mutex // guards the requests its client cancelled (Guard)
	resetSec int64
	resets   int
}

// Close closes the connection and stops watching it.
func (c *Conn) Close() error {
	c.w.mu.Lock()
	delete(c.w.conns, c)
	c.w.mu.Unlock()
	return c.Conn.Close()
}

type connKey struct{}

// Of returns r's watched connection, or nil when r's connection is not
// watched or r is not HTTP/1 (an HTTP/2 connection carries many responses
// at once: each sets a deadline of its own stream).
func Of(r *http.Request) *Conn {
	if r.ProtoMajor != 1 {
		return nil
	}
	c, _ := r.Context().Value(connKey{}).(*Conn)
	return c
}

// Begin marks the start of a response on c: it must be written within the
// Watch's timeout from now.
func (c *Conn) Begin() { c.began.Store(c.w.since()) }

// arm sets the write deadline of the response that began at b, in d from
// now (at once if d <= 0), unless that response has ended.
func (c *Conn) arm(b int64, d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.armed || c.began.Load() != b {
		return
	}
	c.armed = true
	_ = c.Conn.SetWriteDeadline(time.Now().Add(d))
}

// ended marks the end of c's response and clears a deadline armed for it,
// so that it never applies to the next response.
func (c *Conn) ended() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.began.Store(0)
	if c.armed {
		c.armed = false
		_ = c.Conn.SetWriteDeadline(time.Time{})
	}
}

// SetReadDeadline sets the connection's read deadline as
// net.Conn.SetReadDeadline does. A deadline more than a few sweep
// intervals away is only recorded (the sweep arms it when it nears); one
// nearer or past, such as net/http's to cut a pending read, is set at
// once. Clearing one that was never set costs nothing.
func (c *Conn) SetReadDeadline(t time.Time) error {
	// Recorded, a deadline is armed by the sweep two intervals before it,
	// and coarse may be an interval old.
	if t.IsZero() {
		c.rd.Store(0)
	} else if d := int64(t.Sub(c.w.epoch)) | 1; d > c.w.coarse.Load()+int64(3*c.w.interval) {
		c.rd.Store(d)
	} else {
		return c.setRead(t)
	}
	// A deadline set on the connection (by setRead or a sweep's armRead,
	// which mark rArmed before they look at rd) is no longer the one
	// asked for: clear it.
	if c.rArmed.Load() {
		return c.clearRead()
	}
	return nil
}

// SetDeadline sets both deadlines: the read one as SetReadDeadline does.
func (c *Conn) SetDeadline(t time.Time) error {
	rerr := c.SetReadDeadline(t)
	if err := c.Conn.SetWriteDeadline(t); err != nil {
		return err
	}
	return rerr
}

// setRead sets the read deadline t on the connection at once.
func (c *Conn) setRead(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.rd.Store(0)
	c.rArmed.Store(true)
	return c.Conn.SetReadDeadline(t)
}

// clearRead clears the read deadline set on the connection: a later one
// is recorded in its place, or none.
func (c *Conn) clearRead() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.rArmed.Load() {
		return nil
	}
	c.rArmed.Store(false)
	return c.Conn.SetReadDeadline(time.Time{})
}

// armRead sets the recorded read deadline d on the connection, in dur
// from now (at once if dur <= 0), unless another was asked for since.
func (c *Conn) armRead(d int64, dur time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	// rArmed first: a SetReadDeadline that stores its deadline after the
	// swap below sees it, and clears or replaces this one.
	c.rArmed.Store(true)
	if !c.rd.CompareAndSwap(d, 0) {
		return
	}
	_ = c.Conn.SetReadDeadline(time.Now().Add(dur))
}

// ReadFrom and CloseWrite pass through to the connection (net/http uses
// them: sendfile or splice for a body that allows it, and a half-close
// before closing).
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c.Conn}, r)
}

// CloseWrite half-closes the connection when it can.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

type listener struct {
	net.Listener
	w *Watch
}

func (l listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	wc := &Conn{Conn: c, w: l.w}
	l.w.mu.Lock()
	l.w.conns[wc] = struct{}{}
	l.w.mu.Unlock()
	return wc, nil
}
