// Command fleetscale measures what a fleet costs as it grows, as an
// operator would: N real cacheproxy binaries on one redis-server in front
// of a fake Twilio (20 ms), idle, then ten writes through the first with
// every replica holding the participant. For each N it prints the whole
// fleet's CPU while idle and per replica, Redis's CPU and commands per
// second (the commands its scripts run counted too), resident memory per
// replica, and a write's median and worst time.
//
// Usage: go run ./bench/fleetscale [-n 3,12,48] [-idle 10s] [-bin path]
// (-bin: a cacheproxy built elsewhere, such as at an older revision).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"cacheproxy/bench/internal/run"
)

func main() {
	ns := flag.String("n", "3,12,48", "fleet sizes, comma-separated")
	idle := flag.Duration("idle", 10*time.Second, "how long the idle fleet is measured")
	settle := flag.Duration("settle", 12*time.Second, "how long the fleet idles before it is measured (replicas rest after 10 s without a read)")
	bin := flag.String("bin", "", "a cacheproxy binary to run (default: built from this checkout)")
	flag.Parse()
	if err := measure(*ns, *bin, *idle, *settle); err != nil {
		fmt.Fprintln(os.Stderr, "fleetscale:", err)
		os.Exit(1)
	}
}

func measure(ns, bin string, idle, settle time.Duration) error {
	if bin == "" {
		dir, err := os.MkdirTemp("", "fleetscale")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		bin = filepath.Join(dir, "cacheproxy")
		if out, err := exec.Command("go", "build", "-o", bin, "./cmd/cacheproxy").CombinedOutput(); err != nil {
			return fmt.Errorf("go build: %v\n%s", err, out)
		}
	}
	up, err := run.StartUpstream(20 * time.Millisecond)
	if err != nil {
		return err
	}
	defer up.Stop()
	fmt.Println("replicas\tfleet CPU idle (cores)\tper replica\tRedis CPU\tRedis commands/s\tper replica\twrite median / worst\tresident per replica")
	for _, f := range strings.Split(ns, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return fmt.Errorf("-n: %q", f)
		}
		row, err := fleet(bin, up.URL, n, idle, settle)
		if err != nil {
			return err
		}
		fmt.Println(row)
	}
	return nil
}

// replica is one cacheproxy process.
type replica struct {
	cmd         *exec.Cmd
	addr, admin string
}

// fleet starts n replicas on a Redis of their own and measures them.
func fleet(bin, upURL string, n int, idle, settle time.Duration) (string, error) {
	redisURL, stopRedis, err := run.StartRedis("--maxclients", "10000")
	if err != nil {
		return "", err
	}
	defer stopRedis()
	redis := strings.TrimPrefix(redisURL, "redis://")
	var rs []*replica
	defer func() {
		for _, r := range rs {
			_ = r.cmd.Process.Kill()
			_ = r.cmd.Wait()
		}
	}()
	for range n {
		r, err := start(bin, "CACHEPROXY_REDIS_URL=redis://"+redis, "CACHEPROXY_CACHE_KEY_SECRET=fleetscale-secret",
			"CACHEPROXY_UPSTREAMS_CONVERSATIONS_URL="+upURL, "CACHEPROXY_UPSTREAMS_PROXY_URL="+upURL)
		if err != nil {
			return "", err
		}
		rs = append(rs, r)
	}
	for _, r := range rs {
		if err := ready(r); err != nil {
			return "", err
		}
	}
	time.Sleep(settle) // the measurement's own window: the fleet idles, as an operator's does
	cpu0, rcpu0, cmds0 := cpuOf(rs), redisCPU(redis), redisCommands(redis)
	time.Sleep(idle)
	cpu, rcpu, cmds := cpuOf(rs)-cpu0, redisCPU(redis)-rcpu0, redisCommands(redis)-cmds0
	secs := idle.Seconds()
	rss := 0.0
	for _, r := range rs {
		rss += residentMB(r.cmd.Process.Pid)
	}
	median, worst, err := writes(rs)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%d\t%.3f\t%.4f\t%.3f\t%.0f\t%.1f\t%d / %d ms\t%.1f MB", n, cpu/secs, cpu/secs/float64(n), rcpu/secs,
		float64(cmds)/secs, float64(cmds)/secs/float64(n), median.Milliseconds(), worst.Milliseconds(), rss/float64(n)), nil
}

const (
	path  = "/v1/Conversations/CH00000000000000000000000000000001/Participants/MB00000000000000000000000000000000"
	cred  = "AC00000000000000000000000000000001:benchtoken"
	nRuns = 10
)

// writes reads the participant through every replica (each holds it),
// then times ten writes through the first.
func writes(rs []*replica) (median, worst time.Duration, err error) {
	var took []time.Duration
	for w := range nRuns {
		for _, r := range rs {
			for range 2 {
				if err := call("GET", r, ""); err != nil {
					return 0, 0, err
				}
			}
		}
		start := time.Now()
		if err := call("POST", rs[0], fmt.Sprintf(`Attributes={"w":%d}`, w)); err != nil {
			return 0, 0, err
		}
		took = append(took, time.Since(start))
	}
	slices.Sort(took)
	return took[len(took)/2], took[len(took)-1], nil
}

var client = &http.Client{Timeout: 30 * time.Second}

func call(method string, r *replica, body string) error {
	req, _ := http.NewRequest(method, "http://"+r.addr+path, strings.NewReader(body))
	user, pass, _ := strings.Cut(cred, ":")
	req.SetBasicAuth(user, pass)
	if body != "" {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("%s: %d", method, resp.StatusCode)
	}
	return nil
}

// start runs bin on free loopback ports and reads its start line.
func start(bin string, env ...string) (*replica, error) {
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), append([]string{"CACHEPROXY_LISTEN=127.0.0.1:0", "CACHEPROXY_ADMIN_LISTEN=127.0.0.1:0"}, env...)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		var m struct {
			Listen      string `json:"listen"`
			AdminListen string `json:"admin_listen"`
		}
		if json.Unmarshal(sc.Bytes(), &m) == nil && m.Listen != "" {
			go func() { _, _ = io.Copy(io.Discard, stdout) }()
			return &replica{cmd: cmd, addr: m.Listen, admin: m.AdminListen}, nil
		}
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	return nil, fmt.Errorf("cacheproxy did not start")
}

// ready waits until r hears the fleet (/readyz).
func ready(r *replica) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for ctx.Err() == nil {
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+r.admin+"/readyz", nil)
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond) // another process's progress
	}
	return fmt.Errorf("a replica never became ready")
}

// cpuOf is the replicas' CPU time so far, in seconds (/proc/PID/stat's
// utime and stime, in clock ticks of 1/100 s).
func cpuOf(rs []*replica) float64 {
	total := 0.0
	for _, r := range rs {
		total += procCPU(r.cmd.Process.Pid)
	}
	return total
}

func procCPU(pid int) float64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseFloat(fields[11], 64)
	st, _ := strconv.ParseFloat(fields[12], 64)
	return (ut + st) / 100
}

func residentMB(pid int) float64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

// info is a section of Redis's INFO at addr.
func info(addr, section string) string {
	out, _ := exec.Command("redis-cli", "-h", strings.Split(addr, ":")[0], "-p", strings.Split(addr, ":")[1], "INFO", section).Output()
	return string(out)
}

func redisCPU(addr string) float64 {
	total := 0.0
	for _, l := range strings.Split(info(addr, "cpu"), "\n") {
		k, v, _ := strings.Cut(strings.TrimSpace(l), ":")
		if k == "used_cpu_sys" || k == "used_cpu_user" {
			f, _ := strconv.ParseFloat(v, 64)
			total += f
		}
	}
	return total
}

// redisCommands is every command Redis ran, those scripts ran included
// (INFO commandstats counts a script's calls under their own commands).
func redisCommands(addr string) int64 {
	var total int64
	for _, l := range strings.Split(info(addr, "commandstats"), "\n") {
		if !strings.HasPrefix(l, "cmdstat_") || strings.HasPrefix(l, "cmdstat_info:") {
			continue
		}
		_, rest, _ := strings.Cut(l, "calls=")
		n, _ := strconv.ParseInt(strings.SplitN(rest, ",", 2)[0], 10, 64)
		total += n
	}
	return total
}
