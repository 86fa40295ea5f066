// Package codeshape holds no code: its tests keep the code's shape. The
// functions of internal/ are small (at most MaxLines lines each;
// cyclomatic complexity is checked by gocyclo in .ci/run; configuration
// validation and the fake Twilio are long lists by nature and are left
// out), cmd/cacheproxy's at most MainMaxLines, and docs/architecture.md
// is true to the code: every package in its table, every word of its
// glossary used, no retired word naming an identifier.
package codeshape

// MaxLines is the longest a function in internal/ may be.
const MaxLines = 90

// MainMaxLines is the longest a function of cmd/cacheproxy may be: main
// only wires, and each of its functions fits on a screen.
const MainMaxLines = 60
