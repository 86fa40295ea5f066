package proxy

import (
	"math"
	"strconv"
	"testing"
)

func TestAppendIntIsStrconvs(t *testing.T) {
	vals := []int64{math.MinInt64, -1000, -999, -1, 1000, 1001, 123456, math.MaxInt64}
	for v := range int64(1000) {
		vals = append(vals, v)
	}
	for _, v := range vals {
		if got, want := string(appendInt([]byte("x"), v)), "x"+strconv.FormatInt(v, 10); got != want {
			t.Errorf("appendInt(%d) = %q, want %q", v, got, want)
		}
	}
}
