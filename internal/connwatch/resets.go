package connwatch

import (
	"net/http"
	"time"
)

// ResetLimit is how many of an HTTP/2 connection's requests may end
// cancelled by its client (RST_STREAM) within a second before the
// connection is closed. A client that opens and cancels streams as fast
// as it can (HTTP/2 rapid reset) made the proxy start a handler for each,
// and each a fill: one connection sending 145,000 in 10 s held 135,000
// handlers and 125 MiB. Browsers and SDKs cancel a few at most.
const ResetLimit = 100

// Guard serves h, for the Watch's connections, but not a request its
// client cancelled before its handler began (nothing of it runs), and
// closes an HTTP/2 connection once more than ResetLimit of its requests
// ended cancelled by the client within a second.
func (w *Watch) Guard(h http.Handler) http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		c, _ := r.Context().Value(connKey{}).(*Conn)
		if c == nil || c.w != w || r.ProtoMajor < 2 {
			h.ServeHTTP(rw, r)
			return
		}
		if r.Context().Err() == nil {
			h.ServeHTTP(rw, r)
		}
		if r.Context().Err() != nil && c.reset() {
			w.closed.Add(1)
			_ = c.Close()
		}
	})
}

// reset counts a request of c cancelled by its client; true when c has
// had more than ResetLimit within the current second.
func (c *Conn) reset() bool {
	sec := c.w.since() / int64(time.Second)
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if c.resetSec != sec {
		c.resetSec, c.resets = sec, 0
	}
	c.resets++
	return c.resets > ResetLimit
}

// ClosedForResets counts the connections Guard closed.
func (w *Watch) ClosedForResets() int64 { return w.closed.Load() }
