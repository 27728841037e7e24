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
	"io"
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

// Writers are where the profiles go; a nil writer skips that profile. The
// caller owns them (opens, syncs and closes them).
type Writers struct {
	CPU, Mem, Mutex, Block io.Writer
}

// StartTo begins the profiles of w and returns a function that stops them
// and writes the heap (after a GC), mutex and block profiles. Every error
// writing a profile is returned, by StartTo or by stop.
func StartTo(w Writers) (stop func() error, err error) {
	if w.CPU != nil {
		if err = rtpprof.StartCPUProfile(w.CPU); err != nil {
			return nil, fmt.Errorf("pprof: cpu profile: %w", err)
		}
	}
	prevMutex := -1
	if w.Mutex != nil {
		prevMutex = runtime.SetMutexProfileFraction(5)
	}
	if w.Block != nil {
		runtime.SetBlockProfileRate(10000) // one event per 10 us blocked
	}
	return func() error {
		var errs []error
		if w.CPU != nil {
			rtpprof.StopCPUProfile() // writes the rest; write errors are not reported by runtime/pprof
		}
		if w.Mem != nil {
			runtime.GC()
			errs = append(errs, writeTo("heap", w.Mem))
		}
		if w.Mutex != nil {
			errs = append(errs, writeTo("mutex", w.Mutex))
			runtime.SetMutexProfileFraction(prevMutex)
		}
		if w.Block != nil {
			errs = append(errs, writeTo("block", w.Block))
			runtime.SetBlockProfileRate(0)
		}
		return errors.Join(errs...)
	}, nil
}

func writeTo(name string, w io.Writer) error {
	if err := rtpprof.Lookup(name).WriteTo(w, 0); err != nil {
		return fmt.Errorf("pprof: %s profile: %w", name, err)
	}
	return nil
}

// Start begins the profiles of f and returns a function that stops them
// and writes the files. The heap profile is taken at stop time, after a GC.
// Every create, write and close error is returned.
func Start(f Files) (stop func() error, err error) {
	var files []*os.File
	closeAll := func() error {
		var errs []error
		for _, fl := range files {
			if err := fl.Close(); err != nil {
				errs = append(errs, fmt.Errorf("pprof: %w", err))
			}
		}
		return errors.Join(errs...)
	}
	open := func(path string) (io.Writer, error) {
		if path == "" {
			return nil, nil
		}
		fl, err := os.Create(path)
		if err != nil {
			return nil, fmt.Errorf("pprof: %w", err)
		}
		files = append(files, fl)
		return &sticky{w: fl}, nil
	}
	var w Writers
	for _, p := range []struct {
		path string
		dst  *io.Writer
	}{{f.CPU, &w.CPU}, {f.Mem, &w.Mem}, {f.Mutex, &w.Mutex}, {f.Block, &w.Block}} {
		if *p.dst, err = open(p.path); err != nil {
			closeAll()
			return nil, err
		}
	}
	stopW, err := StartTo(w)
	if err != nil {
		closeAll()
		return nil, err
	}
	return func() error {
		errs := []error{stopW()}
		for _, x := range []io.Writer{w.CPU, w.Mem, w.Mutex, w.Block} {
			if s, ok := x.(*sticky); ok && s.err != nil {
				errs = append(errs, fmt.Errorf("pprof: %w", s.err))
			}
		}
		errs = append(errs, closeAll())
		return errors.Join(errs...)
	}, nil
}

// sticky keeps the first write error (runtime/pprof's CPU profile does not
// report them).
type sticky struct {
	w   io.Writer
	err error
}

func (s *sticky) Write(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	n, err := s.w.Write(p)
	s.err = err
	return n, err
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
