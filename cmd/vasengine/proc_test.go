package main

import (
	"bufio"
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The binary the subprocess tests run, built once.
var (
	binOnce sync.Once
	binPath string
	binErr  error
)

func vasBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "vasengine-test-bin")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "vasengine")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			binErr = &buildError{err: err, out: string(out)}
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return "go build: " + e.err.Error() + "\n" + e.out }

// proc is a running vasengine: its stderr is read line by line as it
// comes, its stdout kept.
type proc struct {
	t      *testing.T
	cmd    *exec.Cmd
	lines  chan string
	mu     sync.Mutex
	stderr strings.Builder
	stdout bytes.Buffer
	done   chan struct{}
	err    error
	ended  time.Time
}

// start runs the binary with args; stdin, if not nil, is its standard input.
func start(t *testing.T, stdin io.Reader, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, cmd: exec.Command(vasBinary(t), args...), lines: make(chan string, 1024), done: make(chan struct{})}
	p.cmd.Stdout = &p.stdout
	p.cmd.Stdin = stdin
	r, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			p.mu.Lock()
			p.stderr.WriteString(sc.Text() + "\n")
			p.mu.Unlock()
			select {
			case p.lines <- sc.Text():
			default:
			}
		}
		p.err = p.cmd.Wait()
		p.ended = time.Now()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
	})
	return p
}

// waitLine waits until a stderr line contains want and returns when it came.
func (p *proc) waitLine(want string, limit time.Duration) time.Time {
	p.t.Helper()
	tm := time.NewTimer(limit)
	defer tm.Stop()
	for {
		select {
		case l := <-p.lines:
			if strings.Contains(l, want) {
				return time.Now()
			}
		case <-p.done:
			p.t.Fatalf("%v: ended before a line with %q: %v\nstderr:\n%s\nstdout:\n%s", p.cmd.Args, want, p.err, p.errText(), p.stdout.String())
		case <-tm.C:
			p.t.Fatalf("%v: no line with %q within %v\nstderr:\n%s", p.cmd.Args, want, limit, p.errText())
		}
	}
}

func (p *proc) signal(sig syscall.Signal) time.Time {
	p.t.Helper()
	at := time.Now()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatal(err)
	}
	return at
}

// wait waits for the process to end, at most limit, and returns its exit
// status and when it ended.
func (p *proc) wait(limit time.Duration) (int, time.Time) {
	p.t.Helper()
	tm := time.NewTimer(limit)
	defer tm.Stop()
	select {
	case <-p.done:
	case <-tm.C:
		p.t.Fatalf("%v: still running %v later\nstderr:\n%s", p.cmd.Args, limit, p.errText())
	}
	return p.cmd.ProcessState.ExitCode(), p.ended
}

func (p *proc) errText() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.String()
}

// maxRSS is the process's peak resident memory in bytes, once it ended.
func (p *proc) maxRSS() int64 {
	if ru, ok := p.cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		return ru.Maxrss << 10
	}
	return 0
}
