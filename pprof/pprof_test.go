package pprof_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vasengine/vasengine/pprof"
)

func TestCapture(t *testing.T) {
	dir := t.TempDir()
	var mu sync.Mutex
	err := pprof.Capture(dir, "work", func() {
		var wg sync.WaitGroup
		for i := 0; i < 4; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for k := 0; k < 20000; k++ {
					mu.Lock()
					_ = make([]byte, 64)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"cpu", "mem", "mutex", "block"} {
		fi, err := os.Stat(filepath.Join(dir, "work."+kind+".pprof"))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Size() == 0 {
			t.Errorf("%s profile is empty", kind)
		}
	}
}

func TestStartBadPath(t *testing.T) {
	if _, err := pprof.Start(pprof.Files{CPU: filepath.Join(t.TempDir(), "no", "such", "dir", "x")}); err == nil {
		t.Fatal("Start with an unwritable path succeeded")
	}
}

func TestRegister(t *testing.T) {
	mux := http.NewServeMux()
	pprof.Register(mux)
	srv := httptest.NewServer(mux)
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/debug/pprof/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "goroutine") {
		t.Fatalf("index: %d %q", resp.StatusCode, body[:min(len(body), 200)])
	}
}

// TestWriteErrors: a profile that cannot be written is an error of stop,
// the CPU profile's too (runtime/pprof does not report its write errors).
func TestWriteErrors(t *testing.T) {
	if _, err := os.Stat("/dev/full"); err != nil {
		t.Skip("no /dev/full")
	}
	for _, f := range []pprof.Files{{CPU: "/dev/full"}, {Mem: "/dev/full"}, {Mutex: "/dev/full"}, {Block: "/dev/full"}} {
		stop, err := pprof.Start(f)
		if err != nil {
			t.Fatalf("%+v: Start: %v", f, err)
		}
		for i := 0; i < 1000; i++ {
			_ = make([]byte, 1<<10)
		}
		if err := stop(); err == nil {
			t.Errorf("%+v: stop reported no error writing to /dev/full", f)
		}
	}
}

// TestStartToWriters: profiles go to the caller's writers.
func TestStartToWriters(t *testing.T) {
	var cpu, mem strings.Builder
	stop, err := pprof.StartTo(pprof.Writers{CPU: &cpu, Mem: &mem})
	if err != nil {
		t.Fatal(err)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if cpu.Len() == 0 || mem.Len() == 0 {
		t.Fatalf("cpu %d bytes, heap %d bytes", cpu.Len(), mem.Len())
	}
}
