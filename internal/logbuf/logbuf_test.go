package logbuf

import (
	"bytes"
	"strings"
	"sync"
	"testing"

	"github.com/rs/zerolog"
)

type countingWriter struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	writes int
}

func (c *countingWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes++
	return c.buf.Write(p)
}

func TestBatchesInfoAndFlushesErrorsAtOnce(t *testing.T) {
	out := &countingWriter{}
	w := New(out, 1024)
	log := zerolog.New(w)
	for i := 0; i < 10; i++ {
		log.Info().Int("i", i).Msg("request")
	}
	if out.writes != 0 {
		t.Fatalf("info lines written at once: %d writes", out.writes)
	}
	log.Error().Msg("upstream down")
	if out.writes != 2 || bytes.Count(out.buf.Bytes(), []byte("\n")) != 11 {
		t.Fatalf("error did not flush the batch and itself: %d writes, %q", out.writes, out.buf.String())
	}
}

func TestFlushesWhenFullAndOnStop(t *testing.T) {
	out := &countingWriter{}
	w := New(out, 100)
	line := bytes.Repeat([]byte("x"), 60)
	w.Write(line)
	w.Write(line) // does not fit: the first is written
	if out.writes != 1 {
		t.Fatalf("writes = %d, want 1", out.writes)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { w.Run(1<<62, stop); close(done) }()
	close(stop)
	<-done
	if out.buf.Len() != 120 {
		t.Fatalf("Run did not flush on stop: %d bytes", out.buf.Len())
	}
}

func TestUnbuffered(t *testing.T) {
	out := &countingWriter{}
	w := New(out, 0)
	w.Write([]byte("a\n"))
	if out.writes != 1 {
		t.Fatal("size 0 must write every line")
	}
}

// A batch flushed through EachLine to zerolog's ConsoleWriter prints
// every line (the ConsoleWriter decodes one JSON value per Write).
func TestEachLineGivesTheConsoleEveryLineOfABatch(t *testing.T) {
	var text bytes.Buffer
	w := New(EachLine(zerolog.ConsoleWriter{Out: &text, NoColor: true}), 1024)
	log := zerolog.New(w)
	for i := range 3 {
		log.Info().Int("i", i).Msg("request")
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := strings.Count(text.String(), "request"); got != 3 {
		t.Errorf("%d of 3 lines printed:\n%s", got, text.String())
	}
}

func TestEachLineWritesLinesAsTheyAre(t *testing.T) {
	out := &countingWriter{}
	n, err := EachLine(out).Write([]byte("a\nbc\n\nd"))
	if err != nil || n != 7 || out.writes != 4 || out.buf.String() != "a\nbc\n\nd" {
		t.Fatalf("wrote %d (%v) in %d writes: %q", n, err, out.writes, out.buf.String())
	}
}
