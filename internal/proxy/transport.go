package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"cacheproxy/internal/clock"
	"cacheproxy/internal/ratelimit"
)

// NewTransport returns the upstream transport: no proxy from the
// environment (only configured upstreams are ever contacted), bounded dials
// and handshakes, and keep-alive pools sized for a busy sidecar.
func NewTransport() *http.Transport {
	return &http.Transport{
		Proxy:                 nil,
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          256,
		MaxIdleConnsPerHost:   128,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}

// timeoutTransport bounds each pass-through call by the upstream's timeout.
type timeoutTransport struct {
	rt      http.RoundTripper
	timeout time.Duration
}

func (t timeoutTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	ctx, cancel := context.WithTimeout(r.Context(), t.timeout)
	resp, err := t.rt.RoundTrip(r.WithContext(ctx))
	if err != nil {
		cancel()
		return nil, err
	}
	resp.Body = cancelBody{resp.Body, cancel}
	return resp, nil
}

type cancelBody struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (b cancelBody) Close() error { err := b.ReadCloser.Close(); b.cancel(); return err }

// callStats is what the paced transport did for one request (or one
// shared fetch): time queued for a turn, retries, upstream 429s.
type callStats struct {
	// arrival is when the request arrived (for a fill, the request that
	// started it), on the proxy's clock: its turns, the waits after an
	// upstream 429 included, end within max_wait of it. Zero: the call's
	// first attempt.
	arrival   time.Time
	queueWait time.Duration
	retries   int
	tooMany   int
}

type statsKey struct{}

// pacedTransport makes every upstream call (cached fetch or pass-through,
// read or write) wait for its account's turn, and retries upstream 429s
// (Twilio: "never processed and always safe to retry") with exponential
// backoff and full jitter, or after the upstream's Retry-After, within the
// request's deadline. Bodies are retried only when they can be replayed.
type pacedTransport struct {
	next     http.RoundTripper
	budget   Budget
	retry    Retry
	clock    clock.Clock
	c        *counters
	m        *metrics
	upstream string
	fp       *fingerprinter
	refused  *refusals
	tracer   *tracer // nil: tracing off
}

func (t *pacedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	stats, _ := ctx.Value(statsKey{}).(*callStats)
	if stats == nil {
		stats = &callStats{}
	}
	auth := req.Header.Get("Authorization")
	var user, fingerprint string
	var cred *credential
	if auth != "" {
		cred = t.fp.lookup(auth)
		user, fingerprint = string(cred.Account()), string(cred.hex[:])
	}
	replay, err := t.replayable(req)
	if err != nil {
		return nil, err
	}
	if isWrite(req.Method) {
		ctx = ratelimit.WithPriority(ctx, ratelimit.Write) // writes go first
	}
	if stats.arrival.IsZero() {
		stats.arrival = t.clock.Now()
	}
	for attempt := 0; ; attempt++ {
		turn, err := t.tracer.acquire(ratelimit.WithWaited(ctx, t.clock.Since(stats.arrival)), t.budget, user, fingerprint)
		if turn != nil {
			stats.queueWait += turn.Waited()
			t.c.queueWaitNanos.Add(int64(turn.Waited()))
			t.m.queueWait.Observe(turn.Waited().Seconds())
		}
		if err != nil {
			var rej *ratelimit.RejectedError
			if errors.As(err, &rej) {
				t.c.rejections.Add(1)
			}
			return nil, err
		}
		// The upstream may have refused this credential while it waited:
		// the turn goes back unused and the refusal is answered here.
		if ref := t.refused.lookup(cred, t.clock.Now()); ref != nil {
			turn.Done(ratelimit.Unused)
			return ref.response(req), nil
		}
		t.c.upstreamCalls.Add(1)
		start := t.clock.Now()
		resp, err := t.next.RoundTrip(req)
		if err != nil {
			t.m.observeUpstream(t.upstream, 0, 0)
			turn.Done(ratelimit.Failed)
			return nil, err
		}
		t.m.observeUpstream(t.upstream, resp.StatusCode, t.clock.Since(start))
		if n, err := strconv.Atoi(resp.Header.Get("Twilio-Concurrent-Requests")); err == nil && n > 0 {
			turn.Saw(n)
		}
		if resp.StatusCode != http.StatusTooManyRequests {
			return t.answered(resp, turn, cred, user, fingerprint), nil
		}
		stats.tooMany++
		t.c.upstream429.Add(1)
		turn.Done(t.tooMany(resp))
		delay := t.backoff(attempt, resp.Header.Get("Retry-After"))
		if attempt >= t.retry.Max || (req.Body != nil && req.Body != http.NoBody && replay == nil) || !t.fits(ctx, stats, delay) {
			return resp, nil // the client gets Twilio's 429 (or a stale answer)
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		select {
		case <-t.clock.After(delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		stats.retries++
		t.c.retries.Add(1)
		if replay != nil {
			req = req.Clone(ctx)
			req.Body = replay()
		}
	}
}

// fits reports whether a retry after delay ends within the request's
// deadline and what is left of its own max_wait, counted from its arrival
// (each retry's turn had a max_wait of its own: a client waited 1.9 s for
// an answer where 1.25 s was the bound).
func (t *pacedTransport) fits(ctx context.Context, stats *callStats, delay time.Duration) bool {
	if deadline, ok := ctx.Deadline(); ok && !t.clock.Now().Add(delay).Before(deadline) {
		return false
	}
	return t.retry.MaxWait <= 0 || t.clock.Since(stats.arrival)+delay < t.retry.MaxWait
}

// answered is an answer other than a 429: a 2xx verifies the credential,
// a 401 is remembered, and the turn goes back when the body is closed.
func (t *pacedTransport) answered(resp *http.Response, turn ratelimit.Turn, cred *credential, user, fingerprint string) *http.Response {
	if resp.StatusCode >= 200 && resp.StatusCode < 300 && user != "" {
		t.budget.Verify(user, fingerprint)
	}
	if resp.StatusCode == http.StatusUnauthorized {
		t.rememberRefusal(cred, resp)
	}
	resp.Body = &releasingBody{ReadCloser: resp.Body, turn: turn}
	return resp
}

// tooMany reads a 429's Twilio code: 20429 (too many concurrent requests)
// is Throttled, and cuts the account's cap; another code (a per-service or
// per-endpoint rate limit) is Limited: the call backs off, the cap stays.
// The body read stays readable in resp.
func (t *pacedTransport) tooMany(resp *http.Response) ratelimit.Outcome {
	head, err := io.ReadAll(io.LimitReader(resp.Body, refusalBytes+1))
	resp.Body = readCloser{io.MultiReader(bytes.NewReader(head), errReader(err), resp.Body), resp.Body}
	var e struct {
		Code int `json:"code"`
	}
	if json.Unmarshal(head, &e) == nil && e.Code != 0 && e.Code != tooManyConcurrent {
		return ratelimit.Limited
	}
	return ratelimit.Throttled
}

// tooManyConcurrent is Twilio's error code for an account over its
// concurrency limit.
const tooManyConcurrent = 20429

// refusalBytes bounds the 401 body read to remember it; Twilio's is
// about 150 bytes.
const refusalBytes = 4 << 10

// rememberRefusal remembers a 401 for cred while the call still holds its
// turn (for every path, cached fill or pass-through): the credential's
// next call, granted that turn, is answered from the memory, not sent.
// The body read stays readable in resp.
func (t *pacedTransport) rememberRefusal(cred *credential, resp *http.Response) {
	head, err := io.ReadAll(io.LimitReader(resp.Body, refusalBytes+1))
	if err == nil && len(head) <= refusalBytes {
		t.refused.remember(cred, t.clock.Now(), resp.Header, head)
	}
	resp.Body = readCloser{io.MultiReader(bytes.NewReader(head), errReader(err), resp.Body), resp.Body}
}

// replayable buffers a request body of at most replayBytes so a retry can
// send it again; a larger body streams once and is not retried.
func (t *pacedTransport) replayable(req *http.Request) (func() io.ReadCloser, error) {
	if req.Body == nil || req.Body == http.NoBody {
		return nil, nil
	}
	if req.ContentLength > t.retry.ReplayBytes {
		return nil, nil
	}
	head, err := io.ReadAll(io.LimitReader(req.Body, t.retry.ReplayBytes+1))
	if err != nil {
		return nil, err
	}
	if int64(len(head)) > t.retry.ReplayBytes {
		req.Body = readCloser{io.MultiReader(bytes.NewReader(head), req.Body), req.Body}
		return nil, nil
	}
	req.Body.Close()
	replay := func() io.ReadCloser { return io.NopCloser(bytes.NewReader(head)) }
	req.Body = replay()
	return replay, nil
}

// backoff is the wait before retry attempt+1: the upstream's Retry-After
// (seconds) when given, else full jitter over base·2^attempt, capped.
func (t *pacedTransport) backoff(attempt int, retryAfter string) time.Duration {
	if s, err := strconv.Atoi(retryAfter); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	if at, err := http.ParseTime(retryAfter); err == nil {
		return max(at.Sub(t.clock.Now()), 0)
	}
	ceiling := min(t.retry.Cap, t.retry.Base<<min(attempt, 20))
	return rand.N(ceiling + 1)
}

// releasingBody gives the account's turn back when the response body is
// closed: a call is in flight until its body is read.
type releasingBody struct {
	io.ReadCloser
	turn ratelimit.Turn
}

func (b *releasingBody) Close() error {
	err := b.ReadCloser.Close()
	b.turn.Done(ratelimit.Served) // idempotent
	return err
}

// withStats attaches s to ctx for the paced transport.
func withStats(ctx context.Context, s *callStats) context.Context {
	return context.WithValue(ctx, statsKey{}, s)
}

type readCloser struct {
	io.Reader
	io.Closer
}

// errReader returns err (if not nil) once the bytes before it are read.
func errReader(err error) io.Reader {
	if err == nil {
		return strings.NewReader("")
	}
	return &failReader{err}
}

type failReader struct{ err error }

func (f *failReader) Read([]byte) (int, error) { return 0, f.err }
