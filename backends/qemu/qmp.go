package qemu

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// qmp is a minimal QEMU Machine Protocol client: one command at a time,
// asynchronous events skipped.
type qmp struct {
	mu   sync.Mutex
	conn net.Conn
	rd   *bufio.Reader
}

func dialQMP(path string, timeout time.Duration) (*qmp, error) {
	deadline := time.Now().Add(timeout)
	for {
		conn, err := net.Dial("unix", path)
		if err == nil {
			q := &qmp{conn: conn, rd: bufio.NewReaderSize(conn, 1<<16)}
			if _, err := q.read(); err != nil { // greeting
				conn.Close()
				return nil, err
			}
			if _, err := q.do("qmp_capabilities", nil); err != nil {
				conn.Close()
				return nil, err
			}
			return q, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("qemu: QMP %s: %w", path, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type qmpReply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event string `json:"event"`
}

func (q *qmp) read() (*qmpReply, error) {
	q.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	line, err := q.rd.ReadBytes('\n')
	if err != nil {
		return nil, fmt.Errorf("qemu: QMP read: %w", err)
	}
	var r qmpReply
	if err := json.Unmarshal(line, &r); err != nil {
		return nil, fmt.Errorf("qemu: QMP reply %q: %w", line, err)
	}
	return &r, nil
}

// do runs a command and returns its "return" value.
func (q *qmp) do(cmd string, args any) (json.RawMessage, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	m := map[string]any{"execute": cmd}
	if args != nil {
		m["arguments"] = args
	}
	b, _ := json.Marshal(m)
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("qemu: QMP %s: %w", cmd, err)
	}
	for {
		r, err := q.read()
		if err != nil {
			return nil, err
		}
		if r.Event != "" {
			continue
		}
		if r.Error != nil {
			return nil, fmt.Errorf("qemu: QMP %s: %s: %s", cmd, r.Error.Class, r.Error.Desc)
		}
		return r.Return, nil
	}
}

// hmp runs a human monitor command and returns its output.
func (q *qmp) hmp(line string) (string, error) {
	raw, err := q.do("human-monitor-command", map[string]string{"command-line": line})
	if err != nil {
		return "", err
	}
	var s string
	err = json.Unmarshal(raw, &s)
	return s, err
}

func (q *qmp) close() { q.conn.Close() }

// cpuRegs are the paging registers of one vCPU.
type cpuRegs struct {
	CPU                 int
	CR0, CR3, CR4, EFER uint64
}

// parseRegisters parses the output of "info registers -a": a "CPU#n" line
// starts each vCPU's block; CR0..CR4 and EFER appear as NAME=hex.
func parseRegisters(s string) ([]cpuRegs, error) {
	var out []cpuRegs
	cur := -1
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		if rest, ok := strings.CutPrefix(line, "CPU#"); ok {
			n, err := strconv.Atoi(strings.Fields(rest + " ")[0])
			if err != nil {
				return nil, fmt.Errorf("qemu: info registers: bad line %q", line)
			}
			out = append(out, cpuRegs{CPU: n})
			cur = len(out) - 1
			continue
		}
		if cur < 0 {
			continue
		}
		for _, f := range strings.Fields(line) {
			name, val, ok := strings.Cut(f, "=")
			if !ok {
				continue
			}
			var dst *uint64
			switch name {
			case "CR0":
				dst = &out[cur].CR0
			case "CR3":
				dst = &out[cur].CR3
			case "CR4":
				dst = &out[cur].CR4
			case "EFER":
				dst = &out[cur].EFER
			default:
				continue
			}
			v, err := strconv.ParseUint(val, 16, 64)
			if err != nil {
				return nil, fmt.Errorf("qemu: info registers: bad %s in %q", name, line)
			}
			*dst = v
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("qemu: info registers: no CPU in %q", s)
	}
	return out, nil
}
