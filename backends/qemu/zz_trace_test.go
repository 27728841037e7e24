package qemu_test

import (
	"fmt"
	"os"
	"strings"
	"sync"

	"github.com/vasengine/vasengine/backends/qemu"
	"github.com/vasengine/vasengine/vasmon"
)

type traceRing struct {
	mu    sync.Mutex
	lines []string
	n     int
}

var tr = &traceRing{lines: make([]string, 4<<20)}

func init() {
	if os.Getenv("VASQ_TRACE") == "" {
		return
	}
	qemu.DebugRecord = func(gpa, val uint64, ver, size uint32, sgpa uint64) {
		s := fmt.Sprintf("rec gpa=%#x val=%#x ver=%d size=%d store=%#x", gpa, val, ver, size, sgpa)
		tr.mu.Lock()
		tr.lines[tr.n%len(tr.lines)] = s
		tr.n++
		tr.mu.Unlock()
	}
	qemu.DebugLife = func(format string, args ...any) {
		s := "life " + fmt.Sprintf(format, args...)
		tr.mu.Lock()
		tr.lines[tr.n%len(tr.lines)] = s
		tr.n++
		tr.mu.Unlock()
	}
	vasmon.DebugTrace = func(format string, args ...any) {
		s := fmt.Sprintf(format, args...)
		tr.mu.Lock()
		tr.lines[tr.n%len(tr.lines)] = s
		tr.n++
		tr.mu.Unlock()
	}
}

func traceGrep(subs ...string) string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	var b strings.Builder
	start := max(0, tr.n-len(tr.lines))
	for i := start; i < tr.n; i++ {
		l := tr.lines[i%len(tr.lines)]
		for _, s := range subs {
			if strings.Contains(l, s) {
				fmt.Fprintf(&b, "  #%d %s\n", i, l)
				break
			}
		}
	}
	return b.String()
}

func traceDump(path string) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	f, _ := os.Create(path)
	defer f.Close()
	start := max(0, tr.n-len(tr.lines))
	for i := start; i < tr.n; i++ {
		fmt.Fprintf(f, "#%d %s\n", i, tr.lines[i%len(tr.lines)])
	}
}
