package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/replay"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/trace"
)

type replayFlags struct {
	file    string
	speed   string
	salvage bool
	out     io.Writer
}

func (f *replayFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.file, "trace", "", "replay: trace file to replay")
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
	if err != nil || v <= 0 {
		return 0, usagef("-speed %q: want max, recorded or a positive factor", s)
	}
	return v, nil
}

func (f *replayFlags) backend() (backendRun, error) {
	if f.file == "" {
		return nil, usagef("-backend replay needs -trace FILE")
	}
	speed, err := parseSpeed(f.speed)
	if err != nil {
		return nil, err
	}
	file, err := os.Open(f.file)
	if err != nil {
		return nil, usagef("%v", err)
	}
	// Check the header now, so that a wrong file is a usage error.
	if _, err := trace.NewReader(file, trace.ReaderOptions{}); err != nil {
		file.Close()
		return nil, usagef("%v", err)
	}
	if _, err := file.Seek(0, io.SeekStart); err != nil {
		file.Close()
		return nil, err
	}
	out := f.out
	return func(ctx context.Context, host engine.Host, req backends.Request) error {
		defer file.Close()
		sum, err := replay.Run(ctx, host, bufio.NewReaderSize(file, 1<<20), replay.Options{Speed: speed, Salvage: f.salvage, Request: req})
		if out != nil && sum != nil {
			fmt.Fprintf(out, "replay: %d records, %d events, %d pages, %d VMs, %d roots, %s read, recorded span %v\n",
				sum.Records, sum.Events, sum.Pages, sum.VMs, sum.Roots, bytesStr(sum.Bytes), sum.Span.Round(time.Millisecond))
			if sum.Damage != nil {
				fmt.Fprintf(out, "replay: stopped at damage (salvaged the events before it): %v\n", sum.Damage)
			}
		}
		for _, vm := range sum.Live { // VMs the trace left registered
			_ = host.RemoveVM(context.Background(), vm.ID)
		}
		return err
	}, nil
}

// cmdReplay is "vasengine replay [flags] FILE": run with -backend replay.
func cmdReplay(args []string, stdout, stderr io.Writer) error {
	var f runFlags
	fs := flag.NewFlagSet("replay", flag.ContinueOnError)
	f.engineFlags.register(fs)
	f.replay.register(fs)
	fs.DurationVar(&f.duration, "duration", 24*time.Hour, "stop after this long")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("replay: want exactly one trace file argument (got %d)", fs.NArg())
	}
	f.replay.file = fs.Arg(0)
	f.replay.out = stderr
	cfg, err := f.engineFlags.config()
	if err != nil {
		return err
	}
	b, err := f.replay.backend()
	if err != nil {
		return err
	}
	return runEngine(cfg, &f.engineFlags, f.duration, "", b, stdout, stderr)
}

// newTraceRecorder wraps e in a trace recorder writing to path.
func newTraceRecorder(path string, e *engine.Engine) (engine.Host, func() error, error) {
	file, err := os.Create(path)
	if err != nil {
		return nil, nil, usagef("record: %v", err)
	}
	bw := bufio.NewWriterSize(file, 1<<20)
	rec := trace.NewRecorder(bw, e)
	return rec, func() error {
		err := rec.Close()
		if ferr := bw.Flush(); err == nil {
			err = ferr
		}
		if cerr := file.Close(); err == nil {
			err = cerr
		}
		return err
	}, nil
}
