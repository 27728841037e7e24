// Package pprof is the project's one way to capture profiles: files for a
// command's whole run (Start), files around a region of work in a test or a
// benchmark (Capture), and the live /debug/pprof/ endpoints on a caller's
// mux (Register). It wraps runtime/pprof and net/http/pprof; nothing here
// touches http.DefaultServeMux or other global state beyond the runtime's
// mutex and block profile rates, which Start and Capture restore.
package pprof

import (
	"errors"
	"fmt"
	"net/http"
	httppprof "net/http/pprof"
	"os"
	"path/filepath"
	"runtime"
	rtpprof "runtime/pprof"
)

// Files names the profiles to write; an empty name skips that profile.
type Files struct {
	CPU, Mem, Mutex, Block string
}

// Start begins the profiles of f and returns a function that stops them
// and writes the files. The heap profile is taken at stop time, after a GC.
func Start(f Files) (stop func() error, err error) {
	var cpu *os.File
	if f.CPU != "" {
		if cpu, err = os.Create(f.CPU); err != nil {
			return nil, fmt.Errorf("pprof: %w", err)
		}
		if err = rtpprof.StartCPUProfile(cpu); err != nil {
			cpu.Close()
			return nil, fmt.Errorf("pprof: cpu profile: %w", err)
		}
	}
	prevMutex := -1
	if f.Mutex != "" {
		prevMutex = runtime.SetMutexProfileFraction(5)
	}
	if f.Block != "" {
		runtime.SetBlockProfileRate(10000) // one event per 10 us blocked
	}
	return func() error {
		var errs []error
		if cpu != nil {
			rtpprof.StopCPUProfile()
			errs = append(errs, cpu.Close())
		}
		if f.Mem != "" {
			runtime.GC()
			errs = append(errs, write("heap", f.Mem))
		}
		if f.Mutex != "" {
			errs = append(errs, write("mutex", f.Mutex))
			runtime.SetMutexProfileFraction(prevMutex)
		}
		if f.Block != "" {
			errs = append(errs, write("block", f.Block))
			runtime.SetBlockProfileRate(0)
		}
		return errors.Join(errs...)
	}, nil
}

func write(name, path string) error {
	out, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("pprof: %w", err)
	}
	if err := rtpprof.Lookup(name).WriteTo(out, 0); err != nil {
		out.Close()
		return fmt.Errorf("pprof: %s profile: %w", name, err)
	}
	return out.Close()
}

// Capture runs fn with CPU, heap, mutex and block profiling and writes
// dir/name.{cpu,mem,mutex,block}.pprof. Use it in tests and benchmarks
// around the region of interest.
func Capture(dir, name string, fn func()) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("pprof: %w", err)
	}
	p := func(kind string) string { return filepath.Join(dir, name+"."+kind+".pprof") }
	stop, err := Start(Files{CPU: p("cpu"), Mem: p("mem"), Mutex: p("mutex"), Block: p("block")})
	if err != nil {
		return err
	}
	fn()
	return stop()
}

// Register serves the live profiles under /debug/pprof/ on mux.
func Register(mux *http.ServeMux) {
	mux.HandleFunc("/debug/pprof/", httppprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", httppprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", httppprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", httppprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", httppprof.Trace)
}
