package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/replay"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/trace"
)

// stdin is what "replay -" reads (a variable for tests).
var stdin io.Reader = os.Stdin

type replayFlags struct {
	file    string
	speed   string
	salvage bool
}

func (f *replayFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.file, "trace", "", "replay: trace file to replay (- for standard input; a pipe works too)")
	fs.StringVar(&f.speed, "speed", "max", "replay: max, recorded, or a factor of the recorded pace (e.g. 2)")
	fs.BoolVar(&f.salvage, "salvage", false, "replay: replay the events before a damaged block, then stop cleanly")
}

func parseSpeed(s string) (float64, error) {
	switch s {
	case "max":
		return replay.Max, nil
	case "recorded":
		return replay.Recorded, nil
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || !(v > 0) || v > 1e6 || v < 1e-6 {
		return 0, usagef("-speed %q: want max, recorded or a factor of the recorded pace within 1e-6..1e6", s)
	}
	return v, nil
}

func (f *replayFlags) backend() (backend, error) {
	if f.file == "" {
		return nil, usagef("-backend replay needs -trace FILE (or - for standard input)")
	}
	speed, err := parseSpeed(f.speed)
	if err != nil {
		return nil, err
	}
	b := &replayBackend{path: f.file, speed: speed, salvage: f.salvage}
	if f.file != "-" {
		// A missing or unreadable file is a usage error before anything
		// starts; its header is read by prepare (a pipe may be slow to
		// give it).
		file, err := os.Open(f.file)
		if err != nil {
			return nil, usagef("%v", err)
		}
		st, err := file.Stat()
		if err == nil && st.IsDir() {
			file.Close()
			return nil, usagef("%s: is a folder, not a trace", f.file)
		}
		b.file = file
		if err == nil && st.Mode().IsRegular() {
			// A regular file's header is checked now, before anything
			// starts; a pipe's when the run has started (it may be slow
			// to speak, and SIGINT must end the wait).
			if err := b.prepare(context.Background()); err != nil {
				return nil, err
			}
		}
	}
	return b, nil
}

// replayBackend replays a trace from a file, a pipe or standard input.
type replayBackend struct {
	sync    bool // -sync
	path    string
	speed   float64
	salvage bool
	file    *os.File // nil: stdin
	tr      *trace.Reader

	mu      sync.Mutex
	sum     *replay.Summary
	started time.Time
	took    time.Duration
}

func (b *replayBackend) setSync() error {
	b.sync = true
	return nil
}

func (b *replayBackend) describe() string {
	name := b.path
	if b.path == "-" {
		name = "standard input"
	}
	speed := "as fast as possible"
	switch {
	case b.speed == replay.Recorded:
		speed = "at the recorded pace"
	case b.speed > 0:
		speed = fmt.Sprintf("at %g times the recorded pace", b.speed)
	}
	return fmt.Sprintf("replay of %s %s", name, speed)
}

// prepare reads and checks the trace's header: a file that is not a trace
// is a usage error.
func (b *replayBackend) prepare(context.Context) error {
	if b.tr != nil {
		return nil
	}
	var r io.Reader = stdin
	if b.file != nil {
		r = b.file
	}
	tr, err := trace.NewReader(bufio.NewReaderSize(r, 1<<20), trace.ReaderOptions{Salvage: b.salvage})
	if err != nil {
		if b.file != nil {
			b.file.Close()
		}
		return usagef("%s: %v", b.path, err)
	}
	b.tr = tr
	return nil
}

func (b *replayBackend) run(ctx context.Context, host engine.Host, req backends.Request) error {
	if b.file != nil {
		defer b.file.Close()
	}
	b.mu.Lock()
	b.started = time.Now()
	b.mu.Unlock()
	sum, err := replay.RunReader(ctx, host, b.tr, replay.Options{Speed: b.speed, Request: req, Sync: b.sync})
	b.mu.Lock()
	b.sum, b.took = sum, time.Since(b.started)
	b.mu.Unlock()
	// A trace that ended: its events still queued are processed while
	// their roots are monitored (RemoveVM would leave them untracked, and a
	// short trace's kinds would be mostly "untracked").
	if s, ok := host.(interface{ Sync(context.Context) error }); ok && err == nil {
		if serr := s.Sync(ctx); serr != nil && !isInterrupt(serr) {
			err = fmt.Errorf("replay: waiting for the engine: %w", serr)
		}
	}
	// The VMs the trace left registered are removed (their roots stopped,
	// their mappings reported removed), also after an interrupt: the host
	// cancels these calls if the stop takes too long.
	rctx := context.WithoutCancel(ctx)
	for _, vm := range sum.Live {
		if rerr := host.RemoveVM(rctx, vm.ID); rerr != nil && err == nil {
			err = fmt.Errorf("replay: removing VM %d: %w", vm.ID, rerr)
		}
	}
	return err
}

var kindNames = [replay.NumKinds]string{trace.KindVMAdd: "VM adds", trace.KindVMRemove: "VM removes", trace.KindPage: "pages",
	trace.KindRootStart: "root starts", trace.KindRootStop: "root stops", trace.KindEvent: "events"}

func kindList(counts [replay.NumKinds]int64) string {
	var parts []string
	for _, k := range []trace.Kind{trace.KindEvent, trace.KindPage, trace.KindVMAdd, trace.KindVMRemove, trace.KindRootStart, trace.KindRootStop} {
		if counts[k] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", counts[k], kindNames[k]))
		}
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

func (b *replayBackend) report(time.Duration) backendReport {
	b.mu.Lock()
	sum, took := b.sum, b.took
	b.mu.Unlock()
	if sum == nil {
		return backendReport{Lines: []string{"replay: the replay had not returned: no account of the trace's records"}}
	}
	var r backendReport
	whole := fmt.Sprintf("the trace holds %d records (its End record agrees)", sum.TraceRecords)
	if !sum.Complete {
		whole = fmt.Sprintf("read %d records, up to byte %d: the rest was not read (no End record reached)", sum.Records+sum.Unknown, sum.Bytes)
		if sum.Damage != nil {
			whole = fmt.Sprintf("read %d records, then stopped at damage (salvaged the records before it): %v", sum.Records+sum.Unknown, sum.Damage)
		}
	}
	r.Lines = append(r.Lines, fmt.Sprintf("replay: %s, %s, recorded span %v: %s; %d of kinds this reader does not know (skipped)",
		whole, bytesStr(sum.Bytes), sum.Span.Round(time.Millisecond), kindList(sum.Read), sum.Unknown))
	if sum.Skipped > 0 {
		r.Lines = append(r.Lines, fmt.Sprintf("replay: skipped %d records: %s of VMs not registered at that point (e.g. events that raced a RemoveVM while recording); %d stops of roots not started",
			sum.Skipped, kindList(sum.SkippedNoVM), sum.SkippedNoRoot))
	}
	line := fmt.Sprintf("replay: submitted %d events of the trace + %d synthetic = %d", sum.Events, sum.Synthetic, sum.Events+sum.Synthetic)
	if sum.Retried > 0 {
		line += fmt.Sprintf(" (+ %d submitted again after the engine refused them)", sum.Retried)
	}
	r.Lines = append(r.Lines, line)
	if sum.Synthetic > 0 {
		r.Lines = append(r.Lines, fmt.Sprintf("replay: the synthetic events are 8-byte writes, one per changed word of %d Page records whose page this engine had hooked before the record was reached; their number depends on how far the hooks ran ahead of the trace, so it changes from run to run", sum.SyntheticPages))
	}
	r.Stats = map[string]any{"trace_records": sum.TraceRecords, "complete": sum.Complete, "records_read": sum.Records,
		"read_by_kind": byKind(sum.Read), "applied": sum.Applied, "skipped": sum.Skipped, "skipped_no_vm_by_kind": byKind(sum.SkippedNoVM),
		"skipped_no_root": sum.SkippedNoRoot, "unknown_kinds": sum.Unknown, "events_submitted": sum.Events, "synthetic_events": sum.Synthetic,
		"synthetic_pages": sum.SyntheticPages, "retried": sum.Retried, "vms": sum.VMs, "roots": sum.Roots, "bytes": sum.Bytes,
		"span_ns": sum.Span, "replay_ns": took}
	if sum.Damage != nil {
		r.Stats.(map[string]any)["damage"] = sum.Damage.Error()
	}
	if b.speed > 0 && sum.Complete {
		want := time.Duration(float64(sum.Span) / b.speed)
		if took > want+want*15/100+100*time.Millisecond {
			r.Warnings = append(r.Warnings, fmt.Sprintf("the replay took %v for a recorded span of %v at -speed %g: this host and engine could not keep the pace asked",
				took.Round(time.Millisecond), sum.Span.Round(time.Millisecond), b.speed))
		}
	}
	return r
}

func byKind(c [replay.NumKinds]int64) map[string]int64 {
	m := map[string]int64{}
	for k := trace.KindVMAdd; int(k) < replay.NumKinds; k++ {
		m[strings.ToLower(k.String())] = c[k]
	}
	return m
}

// cmdReplay is "vasengine replay [flags] FILE|-": run with -backend replay.
func cmdReplay(args []string, stdout, stderr io.Writer) error {
	var f runFlags
	fs := flag.NewFlagSet("replay", flag.ContinueOnError)
	f.engineFlags.register(fs)
	fs.StringVar(&f.replay.speed, "speed", "max", "max, recorded, or a factor of the recorded pace (e.g. 2)")
	fs.BoolVar(&f.replay.salvage, "salvage", false, "replay the events before a damaged block, then stop cleanly")
	fs.DurationVar(&f.duration, "duration", 24*time.Hour, "stop after this long; SIGINT, SIGTERM or this end the replay within one second, with a summary")
	if err := parse(fs, args, stdout); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("replay: want exactly one trace file argument, or - for standard input (got %d)", fs.NArg())
	}
	if f.duration <= 0 {
		return usagef("-duration %v: must be positive", f.duration)
	}
	f.replay.file = fs.Arg(0)
	cfg, err := f.engineFlags.config()
	if err != nil {
		return err
	}
	if err := f.engineFlags.checkOutputs(f.replay.file); err != nil {
		return err
	}
	b, err := f.replay.backend()
	if err != nil {
		return err
	}
	if f.sync {
		if err := setSync(b, "replay"); err != nil {
			return err
		}
	}
	return runSession(&session{command: "replay", cfg: cfg, flags: &f.engineFlags, duration: f.duration, b: b, stdout: stdout, stderr: stderr})
}
