package main

import (
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// natsServer starts nats-server on a loopback port through
// scripts/nats.sh, or skips loudly when it cannot be installed.
func natsServer(t *testing.T) string {
	script := filepath.Join("..", "..", "scripts", "nats.sh")
	if out, err := exec.Command("bash", script, "install").CombinedOutput(); err != nil {
		if os.Getenv("VASENGINE_REQUIRE_NATS") == "1" {
			t.Fatalf("nats-server cannot be installed: %v: %s", err, out)
		}
		t.Skipf("*** SKIPPED: nats-server cannot be installed (%v: %s)", err, strings.TrimSpace(string(out)))
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	l.Close()
	cmd := exec.Command("bash", script, "run", port, t.TempDir())
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return "nats://127.0.0.1:" + port
		}
		if time.Now().After(deadline) {
			t.Fatalf("nats-server not listening: %v", err)
		}
		<-time.After(10 * time.Millisecond) // poll until the port accepts
	}
}

// TestNATSRunAndTail: run -nats publishes the matches; tail -rule reads
// them through a durable consumer, and a second tail resumes after the
// first.
func TestNATSRunAndTail(t *testing.T) {
	url := natsServer(t)
	code, _, stderr := runMain("run", "-events", "20000", "-duration", "1m", "-vms", "2", "-rate", "0",
		"-nats", url, "-nats-spool", t.TempDir(), "-event-host", "h.1")
	if code != 0 || !strings.Contains(stderr, "nats: ") {
		t.Fatalf("run: exit %d: %s", code, stderr)
	}
	seen := map[string]bool{}
	for range 2 {
		code, out, stderr := runMain("tail", "-nats", url, "-rule", "new-executable-mapping", "-n", "10", "-durable", "t1")
		if code != 0 {
			t.Fatalf("tail: exit %d: %s", code, stderr)
		}
		lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
		if len(lines) != 10 {
			t.Fatalf("tail: %d lines: %s", len(lines), out)
		}
		for _, l := range lines {
			var v struct{ ID, Rule, Host string }
			if err := json.Unmarshal([]byte(l), &v); err != nil || v.Rule != "new-executable-mapping" || v.Host != "h.1" || seen[v.ID] {
				t.Fatalf("tail line %v: %s", err, l)
			}
			seen[v.ID] = true
		}
	}
	if code, _, stderr := runMain("tail", "-nats", url, "-rule", "a", "-subject", "b"); code != 2 {
		t.Errorf("tail -rule -subject: exit %d: %s", code, stderr)
	}
}
