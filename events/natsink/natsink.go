// Package natsink is the NATS JetStream sink of the event pipeline: every
// match is published, acknowledged, to one stream (Stream) under the
// subject vasengine.<host>.<vm>.<rule>, with its message id (Nats-Msg-Id:
// events.Pipeline.AppendMsgID) so that the server stores a match published
// twice once (within the stream's duplicate window, 2 minutes). While the
// server is unreachable the matches go to a bounded on-disk spool, replayed
// in order, before any newer match, when it is back (also by the next run
// that opens the same spool folder).
//
// # Contract
//
// Concurrency: the pipeline calls a Sink from one goroutine (events.Sink).
//
// Ordering: matches are published in the order the sink gets them, in
// windows of asynchronous publishes whose acknowledgements are awaited; on
// a failure the window's unacknowledged matches and all later ones go to
// the spool, so what the stream stores is in order per VM (a match stored
// but whose acknowledgement was lost is sent again and dropped by the
// server as a duplicate).
//
// Allocation: a match costs its JSON encoding and a nats.Msg; this sink is
// off the engine's threads.
//
// Ownership: the sink owns its connection and its spool folder (one sink per
// folder at a time).
package natsink

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vasengine/vasengine/events"
)

// Stream is the name of the fleet's stream, SubjectPrefix its subjects'.
const (
	Stream        = "VASENGINE"
	SubjectPrefix = "vasengine"
)

// Config configures a Sink.
type Config struct {
	URL      string
	Spool    string        // spool folder (required)
	SpoolMax int64         // bytes; 0: 256 MiB
	AckWait  time.Duration // for a window's acknowledgements; 0: 2s
	Window   int           // publishes in flight; 0: 1024
}

// Sink publishes matches to JetStream.
type Sink struct {
	cfg  Config
	nc   *nats.Conn
	js   jetstream.JetStream
	p    *events.Pipeline
	c    *events.Counters
	sp   *spool
	ok   bool // the stream exists
	full atomic.Uint64
	buf  []byte
	subj map[[2]uint32]string
}

// New connects (in the background: an unreachable server is retried
// forever) and returns the sink.
func New(cfg Config) (*Sink, error) {
	if cfg.Spool == "" {
		return nil, errors.New("natsink: no spool folder")
	}
	if cfg.SpoolMax <= 0 {
		cfg.SpoolMax = 256 << 20
	}
	if cfg.AckWait <= 0 {
		cfg.AckWait = 2 * time.Second
	}
	if cfg.Window <= 0 {
		cfg.Window = 1024
	}
	sp, err := openSpool(cfg.Spool, cfg.SpoolMax)
	if err != nil {
		return nil, fmt.Errorf("natsink: spool: %w", err)
	}
	nc, err := nats.Connect(cfg.URL, nats.RetryOnFailedConnect(true), nats.MaxReconnects(-1),
		nats.ReconnectWait(50*time.Millisecond), nats.ReconnectBufSize(-1), nats.Name("vasengine"))
	if err != nil {
		sp.close()
		return nil, fmt.Errorf("natsink: %w", err)
	}
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(cfg.Window), jetstream.WithPublishAsyncTimeout(cfg.AckWait))
	if err != nil {
		nc.Close()
		sp.close()
		return nil, err
	}
	return &Sink{cfg: cfg, nc: nc, js: js, sp: sp, subj: map[[2]uint32]string{}}, nil
}

// Name implements events.Sink.
func (s *Sink) Name() string { return "nats" }

// Open implements events.Sink.
func (s *Sink) Open(p *events.Pipeline, c *events.Counters) error {
	s.p, s.c = p, c
	return nil
}

// SpoolFull returns the matches dropped because the spool was full.
func (s *Sink) SpoolFull() uint64 { return s.full.Load() }

// token makes s one subject token.
func token(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '.' || r == '*' || r == '>' || r <= ' ' {
			return '_'
		}
		return r
	}, s)
}

func (s *Sink) subject(m *events.Match) string {
	k := [2]uint32{uint32(m.VM), uint32(m.Rule)}
	if sub, ok := s.subj[k]; ok {
		return sub
	}
	sub := SubjectPrefix + "." + token(s.p.HostName()) + "." + strconv.FormatUint(uint64(m.VM), 10) + "." + token(s.p.RuleName(m.Rule))
	if len(s.subj) > 1<<16 {
		clear(s.subj)
	}
	s.subj[k] = sub
	return sub
}

// ensure creates or updates the stream once the server is reachable.
func (s *Sink) ensure(ctx context.Context) bool {
	if s.ok {
		return true
	}
	if !s.nc.IsConnected() {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.AckWait)
	defer cancel()
	_, err := s.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: Stream, Subjects: []string{SubjectPrefix + ".>"},
		Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute})
	s.ok = err == nil
	return s.ok
}

// publish sends frames in windows and returns how many were acknowledged,
// a prefix.
func (s *Sink) publish(ctx context.Context, fs []frame) int {
	done := 0
	for done < len(fs) {
		if !s.ensure(ctx) {
			return done
		}
		end := min(len(fs), done+s.cfg.Window)
		futs := make([]jetstream.PubAckFuture, 0, end-done)
		for _, f := range fs[done:end] {
			m := nats.NewMsg(f.subject)
			m.Header.Set(jetstream.MsgIDHeader, f.id)
			m.Data = f.data
			fut, err := s.js.PublishMsgAsync(m)
			if err != nil {
				break
			}
			futs = append(futs, fut)
		}
		t := time.NewTimer(s.cfg.AckWait)
		acked := 0
	wait:
		for _, fut := range futs {
			select {
			case <-fut.Ok():
				acked++
			case <-fut.Err():
				break wait
			case <-t.C:
				break wait
			case <-ctx.Done():
				break wait
			}
		}
		t.Stop()
		s.c.Ack(acked)
		if acked < end-done {
			// Not connected, an error or no acknowledgement in time:
			// the rest goes (back) to the spool.
			s.ok = s.ok && s.nc.IsConnected()
			return done + acked
		}
		done += acked
	}
	return done
}

// drain replays the spool; it reports whether it is empty.
func (s *Sink) drain(ctx context.Context) (bool, error) {
	for !s.sp.empty() {
		if !s.nc.IsConnected() || ctx.Err() != nil {
			return false, nil
		}
		fs, end, err := s.sp.read(s.cfg.Window)
		if err != nil {
			return false, err
		}
		n := s.publish(ctx, fs)
		off := s.sp.off
		for _, f := range fs[:n] {
			off += int64(4 + len(f.subject) + 1 + len(f.id) + 1 + len(f.data))
		}
		if n == len(fs) {
			off = end
		}
		if err := s.sp.ack(off); err != nil {
			return false, err
		}
		if n < len(fs) {
			return false, nil
		}
	}
	return true, nil
}

// Write implements events.Sink.
func (s *Sink) Write(ms []events.Match) error {
	ctx := context.Background()
	fs := make([]frame, len(ms))
	s.buf = s.buf[:0]
	offs := make([]int, len(ms)+1)
	for i := range ms {
		s.buf = s.p.AppendJSON(s.buf, &ms[i])
		offs[i+1] = len(s.buf)
	}
	for i := range ms {
		fs[i] = frame{subject: s.subject(&ms[i]), id: string(s.p.AppendMsgID(nil, &ms[i])),
			data: s.buf[offs[i] : offs[i+1]-1]} // without the newline
	}
	empty, err := s.drain(ctx)
	if err != nil {
		return err
	}
	n := 0
	if empty {
		n = s.publish(ctx, fs)
	}
	return s.spoolRest(ms[n:], fs[n:])
}

func (s *Sink) spoolRest(ms []events.Match, fs []frame) error {
	spooled := 0
	for i, f := range fs {
		if err := s.sp.add(f.subject, f.id, f.data); err != nil {
			if !errors.Is(err, errFull) {
				return err
			}
			s.full.Add(1)
			s.c.Drop(ms[i].Rule)
			continue
		}
		spooled++
	}
	s.c.Spool(spooled)
	return s.sp.flush()
}

// Close implements events.Sink: the spool is replayed within ctx while
// the replay progresses (a server unreachable for AckWait, or three
// replays without progress, end it); what is left stays in the spool
// folder for the next run and is reported as an error, as is a full spool.
func (s *Sink) Close(ctx context.Context) error {
	var errs []error
	// Replay as long as ctx allows and the replay progresses; an
	// unreachable server is waited for at most AckWait each time.
	for stalls := 0; !s.sp.empty() && ctx.Err() == nil && stalls < 3; {
		before := s.sp.bytes()
		empty, err := s.drain(ctx)
		if err != nil {
			errs = append(errs, err)
			break
		}
		if empty {
			break
		}
		if s.sp.bytes() < before {
			stalls = 0
		} else {
			stalls++
		}
		wctx, cancel := context.WithTimeout(ctx, s.cfg.AckWait)
		ok := s.waitConnected(wctx)
		cancel()
		if !ok {
			break
		}
	}
	if n := s.full.Load(); n > 0 {
		errs = append(errs, fmt.Errorf("spool full (%d bytes): %d matches dropped", s.cfg.SpoolMax, n))
	}
	if b := s.sp.bytes(); b > 0 {
		errs = append(errs, fmt.Errorf("%d bytes of matches left in the spool %s for the next run", b, s.cfg.Spool))
	}
	s.nc.Close()
	errs = append(errs, s.sp.close())
	return errors.Join(errs...)
}

// waitConnected waits until the connection is up or ctx ends.
func (s *Sink) waitConnected(ctx context.Context) bool {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for !s.nc.IsConnected() {
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
		}
	}
	return true
}
