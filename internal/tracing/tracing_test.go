package tracing

import (
	"context"
	"testing"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

// Tracing is off unless an OTLP endpoint is named, and off whenever
// OTEL_SDK_DISABLED is true.
func TestEnabledFollowsTheStandardVariables(t *testing.T) {
	for _, tc := range []struct {
		env  map[string]string
		want bool
	}{
		{map[string]string{}, false},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, true},
		{map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, true},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, false},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "TRUE"}, false},
		{map[string]string{"OTEL_SERVICE_NAME": "x"}, false},
	} {
		if got := Enabled(env(tc.env)); got != tc.want {
			t.Errorf("%v: enabled %v, want %v", tc.env, got, tc.want)
		}
		tr, err := Setup(context.Background(), env(tc.env), "test")
		if err != nil || (tr != nil) != tc.want {
			t.Errorf("%v: Setup %v %v, want tracing %v", tc.env, tr, err, tc.want)
		}
		if err := tr.Shutdown(context.Background()); err != nil {
			t.Error(err)
		}
	}
}
