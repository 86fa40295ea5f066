// Package connwatch bounds how long an HTTP/1 response may take to
// write, as a write deadline set when each response starts does, without
// arming a runtime timer for every response.
//
// A deadline per response costs a hit more than anything else the proxy
// does for it: net/http clears a connection's write deadline after every
// response, so each response arms a timer in the runtime (and may wake
// its network poller to do so) and disarms it again, for a bound that
// almost never fires. A Watch instead records when each response began,
// one atomic store, and a sweep that runs a few times per timeout arms
// the connection's real deadline, at the same instant the per-response
// one would have had, only for a response still being written close to
// its bound.
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

// Watch bounds the writing of responses on the connections of the
// listeners it wraps: a response not written within the timeout from its
// start fails with a timeout, as with net.Conn.SetWriteDeadline, and
// net/http closes its connection.
type Watch struct {
	timeout  time.Duration
	interval time.Duration // between sweeps
	clock    clock.Clock
	epoch    time.Time

	mu    sync.Mutex
	conns map[*Conn]struct{}
}

// New returns a Watch with the given bound (0: none). A nil clock is the
// real one. The sweeps run in Run.
func New(timeout time.Duration, clk clock.Clock) *Watch {
	clk = clock.Or(clk)
	return &Watch{
		timeout:  timeout,
		interval: min(max(timeout/8, time.Millisecond), time.Second),
		clock:    clk,
		epoch:    clk.Now(),
		conns:    make(map[*Conn]struct{}),
	}
}

// Wrap makes srv's connections from ln watched: it returns the listener
// to serve (its connections are *Conn), and sets srv's ConnContext (the
// connection in each request's context, for Of) and ConnState (a
// response ends when its connection goes idle or closes), keeping the
// hooks srv had.
func (w *Watch) Wrap(srv *http.Server, ln net.Listener) net.Listener {
	prevCtx, prevState := srv.ConnContext, srv.ConnState
	srv.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		if prevCtx != nil {
			ctx = prevCtx(ctx, c)
		}
		if wc, ok := c.(*Conn); ok && wc.w == w {
			w.mu.Lock()
			w.conns[wc] = struct{}{}
			w.mu.Unlock()
			ctx = context.WithValue(ctx, connKey{}, wc)
		}
		return ctx
	}
	srv.ConnState = func(c net.Conn, s http.ConnState) {
		if wc, ok := c.(*Conn); ok && wc.w == w {
			switch s {
			case http.StateIdle:
				wc.ended()
			case http.StateClosed, http.StateHijacked:
				wc.ended()
				w.mu.Lock()
				delete(w.conns, wc)
				w.mu.Unlock()
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
	if w.timeout <= 0 {
		<-stop
		return
	}
	for {
		select {
		case <-w.clock.After(w.interval):
			w.sweep()
		case <-stop:
			return
		}
	}
}

// sweep arms the deadline of every response that will reach its bound
// before the sweep after next: a sweep that comes late by up to one
// interval still arms it in time.
func (w *Watch) sweep() {
	if w.timeout <= 0 {
		return
	}
	now := w.since()
	w.mu.Lock()
	defer w.mu.Unlock()
	for c := range w.conns {
		if b := c.began.Load(); b != 0 && now-b >= int64(w.timeout-2*w.interval) {
			c.arm(b, time.Duration(b+int64(w.timeout)-now))
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

	mu    sync.Mutex // orders arming against the response's end
	armed bool       // a deadline is set on Conn
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
	return &Conn{Conn: c, w: l.w}, nil
}
