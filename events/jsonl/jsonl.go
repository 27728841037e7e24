// Package jsonl is the JSON lines sink of the event pipeline: one match per
// line, in the pipeline's versioned schema (events.AppendJSON,
// "vasengine-event" version 1), to a file or a stream.
//
// # Contract
//
// Concurrency: the pipeline calls a Sink from one goroutine (events.Sink);
// nothing else may write to its writer meanwhile.
//
// Allocation: the lines of a batch are encoded into one reused buffer and
// written with one Write call per batch, so a reader of a pipe or a file
// sees whole lines up to the last batch written.
//
// Ownership: a Sink made by Open owns its file and closes it (after an
// fsync); one made by New leaves its writer open.
package jsonl

import (
	"context"
	"io"
	"os"

	"github.com/vasengine/vasengine/events"
)

// Sink writes matches as JSON lines.
type Sink struct {
	name string
	w    io.Writer
	f    *os.File // owned, closed by Close; nil for New
	p    *events.Pipeline
	buf  []byte
}

// New returns a sink writing to w (left open by Close).
func New(name string, w io.Writer) *Sink { return &Sink{name: name, w: w} }

// Open returns a sink appending to the file at path (created 0644 if
// missing), or writing to stdout when path is "-".
func Open(path string, stdout io.Writer) (*Sink, error) {
	if path == "-" {
		return New("stdout", stdout), nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	return &Sink{name: "jsonl", w: f, f: f}, nil
}

// Name implements events.Sink.
func (s *Sink) Name() string { return s.name }

// Open implements events.Sink.
func (s *Sink) Open(p *events.Pipeline, _ *events.Counters) error {
	s.p = p
	return nil
}

// Write implements events.Sink: one write of the batch's lines.
func (s *Sink) Write(ms []events.Match) error {
	s.buf = s.buf[:0]
	for i := range ms {
		s.buf = s.p.AppendJSON(s.buf, &ms[i])
	}
	_, err := s.w.Write(s.buf)
	return err
}

// Close implements events.Sink: the file is synced and closed.
func (s *Sink) Close(context.Context) error {
	if s.f == nil {
		return nil
	}
	var err error
	if st, serr := s.f.Stat(); serr == nil && st.Mode().IsRegular() {
		err = s.f.Sync() // (devices and pipes cannot be synced)
	}
	if cerr := s.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Discard is a sink that encodes every match as Sink does and throws the
// lines away: the pipeline's full cost without an output (benchmarks).
func Discard() *Sink { return New("discard", io.Discard) }
