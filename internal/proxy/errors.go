package proxy

import (
	"cacheproxy/internal/load"
	"context"
	"errors"
	"log"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"cacheproxy/internal/ratelimit"
	"cacheproxy/internal/twilioerr"

	"github.com/rs/zerolog"
)

// Sentinel errors of the sidecar itself.
var (
	errResponseLarge = errors.New("upstream response larger than the fetch limit")
	errUpstreamCut   = errors.New("upstream response cut off mid-body")
)

// clientBodyError is a failure reading the client's request body.
type clientBodyError struct{ err error }

func (e *clientBodyError) Error() string { return "reading the request body: " + e.err.Error() }
func (e *clientBodyError) Unwrap() error { return e.err }

// codingError: the upstream compressed a cached read without being asked
// (the fetch asks for the plain representation), and this client did not
// ask either.
type codingError struct{ coding string }

func (e *codingError) Error() string {
	return "upstream answered with a content-coding the client did not accept"
}

// twilioError answers with Twilio's JSON error shape (see twilioerr).
func twilioError(w http.ResponseWriter, status int, msg string) {
	w.Header().Del("Cache-Status")
	twilioerr.Write(w, status, msg)
}

// statusFor decides, in one place, what an upstream failure means to the
// client: 0 when the client itself went away (nothing is written), 504 for
// a timeout, 413 for a body over the limit, 502 otherwise.
func statusFor(clientCtx context.Context, err error) (int, string) {
	var maxErr *http.MaxBytesError
	var netErr net.Error
	var rej *ratelimit.RejectedError
	var bodyErr *clientBodyError
	var coding *codingError
	switch {
	case errors.As(err, &coding):
		return http.StatusBadGateway, "upstream answered with content-coding " + coding.coding + ", which the request did not accept"
	case errors.As(err, &maxErr):
		return http.StatusRequestEntityTooLarge, "request body larger than " + strconv.FormatInt(maxErr.Limit, 10) + " bytes"
	case errors.As(err, &bodyErr) && errors.As(err, &netErr) && netErr.Timeout():
		return http.StatusRequestTimeout, "request body not received within server.read_timeout"
	case errors.As(err, &bodyErr):
		// Usually the client left mid-body; if it is still there, it is
		// told rather than sent net/http's implicit empty 200.
		return http.StatusBadRequest, "request body could not be read"
	case clientCtx.Err() != nil && errors.Is(err, context.Canceled):
		return 0, "client went away"
	case errors.As(err, &rej):
		return http.StatusTooManyRequests, "Too many requests: this account's upstream budget is spent (" + rej.Reason + ")"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &netErr) && netErr.Timeout():
		return http.StatusGatewayTimeout, "upstream did not answer in time"
	case errors.Is(err, load.ErrPanic):
		return http.StatusBadGateway, "upstream fetch failed"
	case errors.Is(err, errResponseLarge):
		return http.StatusBadGateway, "upstream response too large"
	case errors.Is(err, errUpstreamCut):
		return http.StatusBadGateway, "upstream response cut off"
	case clientCtx.Err() != nil:
		return 0, "client went away"
	}
	return http.StatusBadGateway, "upstream unreachable"
}

// fail answers an upstream failure (nothing if the client went away).
func (p *Proxy) fail(w http.ResponseWriter, r *http.Request, err error) {
	status, msg := statusFor(r.Context(), err)
	if status == 0 {
		return
	}
	var rej *ratelimit.RejectedError
	if errors.As(err, &rej) {
		w.Header().Set("Retry-After", strconv.Itoa(int(max(1, (rej.RetryAfter+time.Second-1)/time.Second))))
	}
	twilioError(w, status, msg)
}

// StdLog adapts zerolog for the standard library's *log.Logger users
// (net/http's and httputil's ErrorLog): one warn line each, with
// component. l must stamp its own time.
func StdLog(l zerolog.Logger, component string) *log.Logger {
	return log.New(stdLogWriter{l.With().Str("component", component).Logger()}, "", 0)
}

type stdLogWriter struct{ l zerolog.Logger }

func (w stdLogWriter) Write(p []byte) (int, error) {
	w.l.Warn().Msg(strings.TrimSpace(string(p)))
	return len(p), nil
}
