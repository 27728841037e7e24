package main

import (
	"context"
	"flag"
	"io"
	"os"
	"path/filepath"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/events"
	"github.com/vasengine/vasengine/events/jsonl"
	"github.com/vasengine/vasengine/events/natsink"
	"github.com/vasengine/vasengine/events/rules"
)

// eventFlags are the event pipeline's flags (run, record, replay): the
// pipeline runs when any output is given.
type eventFlags struct {
	out      string
	rules    string
	onFull   string
	host     string
	nats     string
	spool    string
	spoolMax int64
	set      *rules.Set
	policy   events.Policy
}

func (f *eventFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.out, "events-out", "", "write the changes that match a rule as JSON lines (schema vasengine-event, version 1: see README) to this file (appended), or - for standard output (the summary then goes to standard error)")
	fs.StringVar(&f.rules, "rules", "", "event rules (YAML) added to the built-in ones (see README); needs -events-out")
	fs.StringVar(&f.onFull, "on-full", "block", "when the event pipeline or an event output cannot keep up: block (hold back the engine) or drop (count and drop)")
	fs.StringVar(&f.nats, "nats", "", "publish the changes that match a rule to NATS JetStream at this URL (stream VASENGINE, subjects vasengine.HOST.VM.RULE)")
	fs.StringVar(&f.spool, "nats-spool", "", "folder of the on-disk spool of events not yet acknowledged by NATS (default: the user cache folder's vasengine/spool)")
	fs.Int64Var(&f.spoolMax, "nats-spool-max", 256<<20, "bytes the NATS spool may hold; events past it are dropped and counted")
	fs.StringVar(&f.host, "event-host", "", "host name in the events (default: the system's)")
}

func (f *eventFlags) enabled() bool { return f.out != "" || f.nats != "" }

// check validates the flags and compiles the rules (usage errors).
func (f *eventFlags) check(inputs ...string) error {
	var err error
	if f.policy, err = events.ParsePolicy(f.onFull); err != nil {
		return usagef("-on-full: %v", err)
	}
	if !f.enabled() {
		if f.rules != "" {
			return usagef("-rules: needs an event output (-events-out or -nats)")
		}
		return nil
	}
	if f.nats != "" {
		if f.spoolMax <= 0 {
			return usagef("-nats-spool-max %d: must be positive", f.spoolMax)
		}
		if f.spool == "" {
			dir, err := os.UserCacheDir()
			if err != nil {
				return usagef("-nats-spool: no default folder (%v): give one", err)
			}
			f.spool = filepath.Join(dir, "vasengine", "spool")
		}
	}
	if f.out != "" && f.out != "-" {
		if err := checkOutput("-events-out", f.out, false, inputs...); err != nil {
			return err
		}
	}
	if f.rules == "" {
		f.set = rules.Default()
		return nil
	}
	if f.set, err = rules.Load(f.rules); err != nil {
		return usagef("-rules: %v", err)
	}
	return nil
}

// start opens the outputs and starts the pipeline, its metrics on reg.
func (f *eventFlags) start(reg prometheus.Registerer, stdout io.Writer) (*events.Pipeline, error) {
	var sinks []events.Sink
	if f.out != "" {
		s, err := jsonl.Open(f.out, stdout)
		if err != nil {
			return nil, err
		}
		sinks = append(sinks, s)
	}
	if f.nats != "" {
		s, err := natsink.New(natsink.Config{URL: f.nats, Spool: f.spool, SpoolMax: f.spoolMax})
		if err != nil {
			return nil, err
		}
		sinks = append(sinks, s)
	}
	p, err := events.New(events.Config{Host: f.host, OnFull: f.policy, Rules: f.set, Sinks: sinks})
	if err != nil {
		return nil, err
	}
	if err := p.Register(reg); err != nil {
		p.Close(context.Background())
		return nil, err
	}
	return p, nil
}

// withEvents returns h with the pipeline's callbacks, if there is one.
func withEvents(p *events.Pipeline, h engine.Host) engine.Host {
	if p == nil {
		return h
	}
	return p.Wrap(h)
}
