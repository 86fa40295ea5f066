// Package logbuf batches log lines into few writes, as nginx's
// "access_log ... buffer= flush=" does: a write(2) per access-log line
// costs a cache hit more than everything else it does.
package logbuf

import (
	"bytes"
	"io"
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// Writer buffers lines up to size bytes and writes them when the buffer
// fills, when Flush is called (Run calls it every interval), and at once
// for warnings and errors, which are never delayed.
type Writer struct {
	mu   sync.Mutex
	out  io.Writer
	buf  []byte
	size int
}

// New returns a Writer over out. size <= 0 writes every line at once.
func New(out io.Writer, size int) *Writer {
	return &Writer{out: out, size: size, buf: make([]byte, 0, max(size, 0))}
}

// Write buffers one line.
func (w *Writer) Write(p []byte) (int, error) {
	return w.WriteLevel(zerolog.InfoLevel, p)
}

// WriteLevel implements zerolog.LevelWriter.
func (w *Writer) WriteLevel(l zerolog.Level, p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.size <= 0 || (l >= zerolog.WarnLevel && l != zerolog.NoLevel) {
		if err := w.flushLocked(); err != nil {
			return 0, err
		}
		return w.out.Write(p)
	}
	if len(w.buf)+len(p) > w.size {
		if err := w.flushLocked(); err != nil {
			return 0, err
		}
	}
	w.buf = append(w.buf, p...)
	return len(p), nil
}

// Flush writes what is buffered.
func (w *Writer) Flush() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.flushLocked()
}

func (w *Writer) flushLocked() error {
	if len(w.buf) == 0 {
		return nil
	}
	_, err := w.out.Write(w.buf)
	w.buf = w.buf[:0]
	return err
}

// Run flushes every interval until stop is closed, then flushes once more.
func (w *Writer) Run(interval time.Duration, stop <-chan struct{}) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			_ = w.Flush()
		case <-stop:
			_ = w.Flush()
			return
		}
	}
}

// EachLine is a writer that hands out each line of what it is given in a
// Write of its own. A Writer's flush is a batch of lines, and zerolog's
// ConsoleWriter decodes one JSON value per Write: without this, a batch
// would print as its first line only.
func EachLine(out io.Writer) io.Writer { return eachLine{out} }

type eachLine struct{ out io.Writer }

func (w eachLine) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		line := p
		if i := bytes.IndexByte(p, '\n'); i >= 0 {
			line = p[:i+1]
		}
		if _, err := w.out.Write(line); err != nil {
			return n, err
		}
		n += len(line)
		p = p[len(line):]
	}
	return n, nil
}
