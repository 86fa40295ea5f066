// Package codeshape holds no code: its test keeps the functions of
// internal/ small (at most MaxLines lines each; cyclomatic complexity is
// checked by gocyclo in .ci/run). Configuration validation and the fake
// Twilio are long lists by nature and are left out.
package codeshape

// MaxLines is the longest a function in internal/ may be.
const MaxLines = 90
