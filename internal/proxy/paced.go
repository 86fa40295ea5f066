package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"cacheproxy/internal/ratelimit"
)

// callStats is what the paced transport did for one request (or one
// shared fetch): time queued for a turn, retries, upstream 429s.
type callStats struct {
	queueWait time.Duration
	retries   int
	tooMany   int
}

type statsKey struct{}

// counters are the process-wide totals behind the summary line.
type counters struct {
	hits, misses, collapsed, stale, passthrough     atomic.Int64
	upstreamCalls, upstream429, rejections, retries atomic.Int64
	queueWaitNanos                                  atomic.Int64
}

// pacedTransport makes every upstream call (cached fetch or pass-through,
// read or write) wait for its account's turn, and retries upstream 429s
// (Twilio: "never processed and always safe to retry") with exponential
// backoff and full jitter, or after the upstream's Retry-After, within the
// request's deadline. Bodies are retried only when they can be replayed.
type pacedTransport struct {
	next        http.RoundTripper
	lim         *ratelimit.Limiter
	maxRetries  int
	base, cap   time.Duration
	replayBytes int64
	after       func(time.Duration) <-chan time.Time
	now         func() time.Time
	c           *counters
	m           *metrics
	upstream    string
}

func (t *pacedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	stats, _ := ctx.Value(statsKey{}).(*callStats)
	if stats == nil {
		stats = &callStats{}
	}
	var acct [34]byte
	account := string(acct[:accountOf(req.Header.Get("Authorization"), &acct)])
	replay, err := t.replayable(req)
	if err != nil {
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		release, waited, err := t.lim.Acquire(ctx, account)
		stats.queueWait += waited
		t.c.queueWaitNanos.Add(int64(waited))
		t.m.queueWait.Observe(waited.Seconds())
		if err != nil {
			var rej *ratelimit.RejectedError
			if errors.As(err, &rej) {
				t.c.rejections.Add(1)
			}
			return nil, err
		}
		t.c.upstreamCalls.Add(1)
		start := t.now()
		resp, err := t.next.RoundTrip(req)
		if err != nil {
			t.m.observeUpstream(t.upstream, 0, 0)
			release()
			return nil, err
		}
		t.m.observeUpstream(t.upstream, resp.StatusCode, t.now().Sub(start))
		if resp.StatusCode != http.StatusTooManyRequests {
			resp.Body = &releasingBody{ReadCloser: resp.Body, release: release}
			return resp, nil
		}
		stats.tooMany++
		t.c.upstream429.Add(1)
		t.lim.Penalize(account)
		delay := t.backoff(attempt, resp.Header.Get("Retry-After"))
		deadline, hasDeadline := ctx.Deadline()
		if attempt >= t.maxRetries || (req.Body != nil && req.Body != http.NoBody && replay == nil) ||
			(hasDeadline && !t.now().Add(delay).Before(deadline)) {
			resp.Body = &releasingBody{ReadCloser: resp.Body, release: release}
			return resp, nil // the client gets Twilio's 429 (or a stale answer)
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		release()
		select {
		case <-t.after(delay):
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

// replayable buffers a request body of at most replayBytes so a retry can
// send it again; a larger body streams once and is not retried.
func (t *pacedTransport) replayable(req *http.Request) (func() io.ReadCloser, error) {
	if req.Body == nil || req.Body == http.NoBody {
		return nil, nil
	}
	if req.ContentLength > t.replayBytes {
		return nil, nil
	}
	head, err := io.ReadAll(io.LimitReader(req.Body, t.replayBytes+1))
	if err != nil {
		return nil, err
	}
	if int64(len(head)) > t.replayBytes {
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
		return max(at.Sub(t.now()), 0)
	}
	ceiling := min(t.cap, t.base<<min(attempt, 20))
	return rand.N(ceiling + 1)
}

// releasingBody gives the account's call slot back when the response body
// is closed: a call is in flight until its body is read.
type releasingBody struct {
	io.ReadCloser
	release func()
	once    sync.Once
}

func (b *releasingBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.release)
	return err
}

// withStats attaches s to ctx for the paced transport.
func withStats(ctx context.Context, s *callStats) context.Context {
	return context.WithValue(ctx, statsKey{}, s)
}
