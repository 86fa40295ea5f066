package redistest

import (
	"bufio"
	"net"
	"strings"
	"sync"
)

// Monitor counts the commands clients send to a server, as its MONITOR
// stream shows them: a script counts once (the commands it runs inside,
// shown as from "lua", are not counted), and connection upkeep (PING,
// HELLO, CLIENT, INFO, SELECT, AUTH) is left out.
type Monitor struct {
	conn net.Conn
	mu   sync.Mutex
	n    map[string]int // by command name
	sent []string       // each counted command's line, up to maxSent
	done chan struct{}
}

// Monitor starts counting; Stop ends it.
func (s *Server) Monitor(t T) *Monitor {
	t.Helper()
	conn, err := net.Dial("tcp", s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	m := &Monitor{conn: conn, n: map[string]int{}, done: make(chan struct{})}
	if _, err := conn.Write([]byte("MONITOR\r\n")); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(conn)
	if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, "+OK") {
		t.Fatalf("MONITOR: %q %v", line, err)
	}
	go func() {
		defer close(m.done)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			m.count(line)
		}
	}()
	t.Cleanup(func() { m.Stop() })
	return m
}

// count reads one MONITOR line: +time [db addr] "CMD" "arg"…
func (m *Monitor) count(line string) {
	_, rest, ok := strings.Cut(line, "[")
	if !ok {
		return
	}
	who, rest, ok := strings.Cut(rest, "] \"")
	if !ok || strings.HasSuffix(who, " lua") {
		return
	}
	name, _, _ := strings.Cut(rest, "\"")
	switch name = strings.ToUpper(name); name {
	case "PING", "HELLO", "CLIENT", "INFO", "SELECT", "AUTH":
		return
	}
	m.mu.Lock()
	m.n[name]++
	if len(m.sent) < maxSent {
		m.sent = append(m.sent, rest)
	}
	m.mu.Unlock()
}

// maxSent bounds the lines a Monitor keeps for Naming.
const maxSent = 1 << 16

// Naming returns the counted commands (of the first maxSent) with an
// argument that contains one of parts, each with its arguments: a test
// tells the commands of a request's keys from the replicas' periodic
// upkeep that runs beside it.
func (m *Monitor) Naming(parts ...string) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for _, l := range m.sent {
		for _, p := range parts {
			if strings.Contains(l, p) {
				out = append(out, l)
				break
			}
		}
	}
	return out
}

// Stop ends the count and returns it: the total and the count by command.
func (m *Monitor) Stop() (int, map[string]int) {
	m.conn.Close()
	<-m.done
	m.mu.Lock()
	defer m.mu.Unlock()
	total := 0
	for _, c := range m.n {
		total += c
	}
	return total, m.n
}
