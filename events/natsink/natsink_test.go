package natsink

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vasengine/vasengine/events"
	"github.com/vasengine/vasengine/events/rules"
	"github.com/vasengine/vasengine/vasmon"
)

var nRecords = flag.Int("natsink.records", 100_000, "records through the server in TestKillRestart (the issue's full size: 1000000)")

// server is a nats-server child process run by scripts/nats.sh.
type server struct {
	port, dir string
	cmd       *exec.Cmd
}

func script(t testing.TB) string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "scripts", "nats.sh")
}

// needServer installs nats-server, or skips loudly.
func needServer(t testing.TB) {
	if out, err := exec.Command("bash", script(t), "install").CombinedOutput(); err != nil {
		if os.Getenv("VASENGINE_REQUIRE_NATS") == "1" {
			t.Fatalf("nats-server cannot be installed: %v: %s", err, out)
		}
		t.Skipf("*** SKIPPED: nats-server cannot be installed (%v: %s); VASENGINE_REQUIRE_NATS=1 makes this a failure", err, strings.TrimSpace(string(out)))
	}
}

func freePort(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

func startServer(t testing.TB, port, dir string) *server {
	s := &server{port: port, dir: dir}
	s.start(t)
	t.Cleanup(s.kill)
	return s
}

func (s *server) url() string { return "nats://127.0.0.1:" + s.port }

func (s *server) start(t testing.TB) {
	s.cmd = exec.Command("bash", script(t), "run", s.port, s.dir)
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Ready when a client gets JetStream's account info.
	deadline := time.Now().Add(20 * time.Second)
	for {
		nc, err := nats.Connect(s.url(), nats.Timeout(200*time.Millisecond))
		if err == nil {
			js, _ := jetstream.New(nc)
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err = js.AccountInfo(ctx)
			cancel()
			nc.Close()
			if err == nil {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("nats-server on %s not ready: %v", s.port, err)
		}
		waitTick()
	}
}

// waitTick waits for the next poll of a condition.
func waitTick() { <-time.After(10 * time.Millisecond) }

func (s *server) kill() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
		s.cmd = nil
	}
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		waitTick()
	}
}

func allRules(t testing.TB) *rules.Set {
	s, err := rules.Parse("all.yaml", []byte("defaults: false\nrules:\n  - {name: all, condition: 'true', priority: info, output: '%va'}\n"))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

const vms = 4

type pusher struct {
	cbs  []vasmon.Callback
	ctxs []any
	next uint64
}

func newPusher(p *events.Pipeline) *pusher {
	pu := &pusher{}
	for vm := 1; vm <= vms; vm++ {
		cb, ctx := p.AddRoot(vasmon.VMID(vm), 0x1000, vasmon.Mode4, false, nil, nil)
		pu.cbs, pu.ctxs = append(pu.cbs, cb), append(pu.ctxs, ctx)
	}
	return pu
}

func (pu *pusher) push(n int) {
	for range n {
		i := pu.next % vms
		pu.cbs[i](pu.ctxs[i], pu.next<<12, 0, 0x1000|vasmon.BitP, 4096)
		pu.next++
	}
}

// TestKillRestart: records through a real server that is killed and
// restarted mid-run reach a durable consumer exactly once, in order per VM.
func TestKillRestart(t *testing.T) {
	needServer(t)
	n := *nRecords
	if testing.Short() {
		n = 20_000
	}
	n -= n % 8
	srv := startServer(t, freePort(t), t.TempDir())
	// A quarter of the records is spooled while the server is down (about
	// 1 KB each with its subject and id).
	sink, err := New(Config{URL: srv.url(), Spool: t.TempDir(), SpoolMax: int64(n) * 2048, AckWait: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	p, err := events.New(events.Config{Host: "h1", Lanes: 2, Rules: allRules(t), Sinks: []events.Sink{sink}})
	if err != nil {
		t.Fatal(err)
	}
	st := func() events.SinkStats { return p.Stats().Sinks[0] }
	pu := newPusher(p)
	start := time.Now()
	// Phase 1: half the records; the server is killed once an eighth are
	// acknowledged.
	var wg sync.WaitGroup
	wg.Go(func() { pu.push(n / 2) })
	waitFor(t, "an eighth acknowledged", func() bool { return st().Acked >= uint64(n/8) })
	srv.kill()
	wg.Wait()
	// Phase 2: a quarter while the server is down: spooled.
	pu.push(n / 4)
	waitFor(t, "three quarters taken by the sink", func() bool { return st().Emitted == uint64(3*n/4) })
	if st().Spooled == 0 {
		t.Fatal("nothing spooled while the server was down")
	}
	spooled := st().Spooled
	srv.start(t)
	// Phase 3: the last quarter, behind the spool's replay.
	pu.push(n / 4)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	final := st()
	t.Logf("%d records in %v (%.0f/s) with a kill and restart; %d spooled, %d acknowledged (duplicates included), %d dropped",
		n, elapsed.Round(time.Millisecond), float64(n)/elapsed.Seconds(), spooled, final.Acked, final.Dropped)
	if final.Dropped != 0 || final.Emitted != uint64(n) {
		t.Fatalf("stats %+v", final)
	}
	checkStream(t, srv.url(), n)
}

// checkStream reads the stream with a durable consumer: n records, each
// once, in order per VM.
func checkStream(t *testing.T, url string, n int) {
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	cons, err := js.CreateOrUpdateConsumer(ctx, Stream, jetstream.ConsumerConfig{Durable: "check", AckPolicy: jetstream.AckAllPolicy})
	if err != nil {
		t.Fatal(err)
	}
	next := map[int]uint64{}
	got := 0
	for got < n {
		batch, err := cons.Fetch(1000, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		k := 0
		var last jetstream.Msg
		for m := range batch.Messages() {
			var v struct {
				VM  int
				Seq uint64
				ID  string
			}
			if err := json.Unmarshal(m.Data(), &v); err != nil {
				t.Fatal(err)
			}
			if v.Seq != next[v.VM]+1 {
				t.Fatalf("VM %d: record %d after %d (message %d)", v.VM, v.Seq, next[v.VM], got+1)
			}
			if want := fmt.Sprintf("vasengine.h1.%d.all", v.VM); m.Subject() != want || m.Headers().Get(jetstream.MsgIDHeader) != v.ID {
				t.Fatalf("subject %s, id %q (record id %q)", m.Subject(), m.Headers().Get(jetstream.MsgIDHeader), v.ID)
			}
			next[v.VM] = v.Seq
			got++
			k++
			last = m
		}
		if batch.Error() != nil && !errors.Is(batch.Error(), nats.ErrTimeout) {
			t.Fatal(batch.Error())
		}
		if k == 0 {
			t.Fatalf("%d records of %d in the stream", got, n)
		}
		last.Ack()
	}
	info, err := js.Stream(ctx, Stream)
	if err != nil {
		t.Fatal(err)
	}
	if msgs := info.CachedInfo().State.Msgs; msgs != uint64(n) {
		t.Fatalf("stream holds %d messages, want %d", msgs, n)
	}
}

// TestSpoolFull: with the server unreachable the spool fills, the rest is
// dropped and counted, and Close reports it; the spool is replayed in
// order by the next sink once a server is there.
func TestSpoolFull(t *testing.T) {
	needServer(t)
	port := freePort(t) // nothing listens there yet
	spoolDir := t.TempDir()
	sink, err := New(Config{URL: "nats://127.0.0.1:" + port, Spool: spoolDir, SpoolMax: 64 << 10, AckWait: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	p, err := events.New(events.Config{Host: "h1", Lanes: 1, Rules: allRules(t), Sinks: []events.Sink{sink}})
	if err != nil {
		t.Fatal(err)
	}
	newPusher(p).push(1000)
	err = p.Close(context.Background())
	if err == nil || !strings.Contains(err.Error(), "spool full (65536 bytes)") || !strings.Contains(err.Error(), "left in the spool") {
		t.Fatalf("close: %v", err)
	}
	s := p.Stats().Sinks[0]
	if s.Dropped == 0 || s.Spooled == 0 || s.Spooled+s.Dropped != 1000 || sink.SpoolFull() != s.Dropped {
		t.Fatalf("stats %+v, %d full", s, sink.SpoolFull())
	}
	// The next run, with a server: the spool goes first.
	srv := startServer(t, port, t.TempDir())
	sink2, err := New(Config{URL: srv.url(), Spool: spoolDir})
	if err != nil {
		t.Fatal(err)
	}
	p2, err := events.New(events.Config{Host: "h1", Lanes: 1, Rules: allRules(t), Sinks: []events.Sink{sink2}})
	if err != nil {
		t.Fatal(err)
	}
	if err := p2.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	checkStream(t, srv.url(), int(s.Spooled))
}

// BenchmarkPublish is records/s through the sink to a local server.
func BenchmarkPublish(b *testing.B) {
	needServer(b)
	srv := startServer(b, freePort(b), b.TempDir())
	sink, err := New(Config{URL: srv.url(), Spool: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	p, err := events.New(events.Config{Host: "h1", Lanes: 2, Rules: allRules(b), Sinks: []events.Sink{sink}})
	if err != nil {
		b.Fatal(err)
	}
	pu := newPusher(p)
	b.ResetTimer()
	pu.push(b.N)
	if err := p.Close(context.Background()); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "records/s")
	if s := p.Stats().Sinks[0]; s.Acked < uint64(b.N) {
		b.Fatalf("%d acked of %d", s.Acked, b.N)
	}
}
