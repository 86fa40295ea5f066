package proxy

import (
	"context"
	"net/http"
	"strings"

	"cacheproxy/internal/ratelimit"
	"cacheproxy/internal/route"
	"cacheproxy/internal/tier"
	"cacheproxy/internal/tracing"

	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// tracer is the proxy's tracing (docs/tracing.md): nil when it is off, and
// then nothing of it runs on any path.
type tracer struct {
	t trace.Tracer
	p propagation.TextMapPropagator
}

func newTracer(t *tracing.Tracing) *tracer {
	if t == nil {
		return nil
	}
	return &tracer{t: t.Provider.Tracer("cacheproxy"), p: t.Propagator}
}

// tracedTransport makes each upstream call a client span, child of the
// request's, and sends the span's traceparent upstream in place of the
// client's: the upstream sees the client's trace, with the sidecar's
// span as parent. Without tracing, next as it is.
func tracedTransport(next http.RoundTripper, t *tracing.Tracing) http.RoundTripper {
	if t == nil {
		return next
	}
	return otelhttp.NewTransport(next, otelhttp.WithTracerProvider(t.Provider), otelhttp.WithPropagators(t.Propagator),
		otelhttp.WithSpanNameFormatter(func(_ string, r *http.Request) string { return "upstream " + r.Method }))
}

// serverSpan starts the request's span, continuing the client's trace
// (traceparent), and returns r with it.
func (tr *tracer) serverSpan(r *http.Request) (*http.Request, trace.Span) {
	ctx := tr.p.Extract(r.Context(), propagation.HeaderCarrier(r.Header))
	ctx, span := tr.t.Start(ctx, "cacheproxy "+r.Method, trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(attribute.String("http.request.method", r.Method), attribute.String("url.path", r.URL.EscapedPath())))
	return r.WithContext(ctx), span
}

// endServerSpan ends the request's span with what the access line says:
// the route, the cache's outcome in RFC 9211's words (the Cache-Status
// answered, without its "cacheproxy; "), the status and the account SID,
// never a credential.
func endServerSpan(span trace.Span, rec *record, w *recordWriter) {
	status := w.status
	if status == 0 {
		status = 499
	}
	attrs := []attribute.KeyValue{
		attribute.String("http.route", route.Labels()[rec.routeID]),
		attribute.Int("http.response.status_code", status),
	}
	if cs := w.Header().Get("Cache-Status"); cs != "" {
		attrs = append(attrs, attribute.String("cacheproxy.cache_status", strings.TrimPrefix(cs, "cacheproxy; ")))
	}
	if acct := rec.cred.Account(); len(acct) > 0 {
		attrs = append(attrs, attribute.String("cacheproxy.account", string(acct)))
	}
	span.SetAttributes(attrs...)
	if status >= 500 {
		span.SetStatus(codes.Error, http.StatusText(status))
	}
	span.End()
}

// acquire is budget.Acquire inside a "budget.wait" span when tracing.
func (tr *tracer) acquire(ctx context.Context, b Budget, user, fingerprint string) (ratelimit.Turn, error) {
	if tr == nil {
		return b.Acquire(ctx, user, fingerprint)
	}
	ctx, span := tr.t.Start(ctx, "budget.wait", trace.WithAttributes(attribute.String("cacheproxy.account", user)))
	defer span.End()
	turn, err := b.Acquire(ctx, user, fingerprint)
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
	}
	if turn != nil {
		span.SetAttributes(attribute.Int64("cacheproxy.waited_us", turn.Waited().Microseconds()))
	}
	return turn, err
}

// claim is a fill's L2 lookup, claim and wait for a peer's fill, inside
// a "fleet.claim" span when tracing; end it with the claim's outcome.
func (tr *tracer) claim(ctx context.Context) (context.Context, func(cl tier.Claim, filled bool)) {
	if tr == nil {
		return ctx, func(tier.Claim, bool) {}
	}
	ctx, span := tr.t.Start(ctx, "fleet.claim")
	return ctx, func(cl tier.Claim, filled bool) {
		span.SetAttributes(attribute.Bool("cacheproxy.claim_won", cl != nil && cl.Won()), attribute.Bool("cacheproxy.fill_shared", filled))
		span.End()
	}
}
