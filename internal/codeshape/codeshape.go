// Package codeshape holds no code: its test keeps the functions of
// internal/ small (at most MaxLines lines each; cyclomatic complexity is
// checked by gocyclo in .ci/run). Configuration validation and the fake
// Twilio are long lists by nature and are left out.
package codeshape

// MaxLines is the longest a function in internal/ may be.
const MaxLines = 90

// MainMaxLines is the longest a function of cmd/cacheproxy may be: main
// only wires, and each of its functions fits on a screen.
const MainMaxLines = 60
