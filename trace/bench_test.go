package trace

import (
	"bytes"
	"io"
	"testing"

	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// benchEvents is how many events a benchmark iteration writes or reads, a
// realistic mix (those of eventSource: 8-byte writes, half with old values,
// kernel RIPs, 4 VMs).
const benchEvents = 100_000

// benchTrace returns the events of eventSource and their trace.
func benchTrace(b *testing.B) ([]Record, []byte) {
	var buf bytes.Buffer
	if err := eventSource(&buf, benchEvents); err != nil {
		b.Fatal(err)
	}
	recs, _, err := readAll(buf.Bytes(), false)
	if err != nil {
		b.Fatal(err)
	}
	return recs, buf.Bytes()
}

func BenchmarkWrite(b *testing.B) {
	recs, _ := benchTrace(b)
	var cw countWriter
	b.ReportAllocs()
	for b.Loop() {
		w, err := NewWriter(&cw, Header{})
		if err != nil {
			b.Fatal(err)
		}
		for i := range recs {
			if err := w.Write(&recs[i]); err != nil {
				b.Fatal(err)
			}
		}
		if err := w.Close(); err != nil {
			b.Fatal(err)
		}
	}
	report(b, cw.n)
}

func BenchmarkRead(b *testing.B) {
	_, data := benchTrace(b)
	b.ReportAllocs()
	var total int64
	for b.Loop() {
		r, err := NewReader(bytes.NewReader(data), ReaderOptions{})
		if err != nil {
			b.Fatal(err)
		}
		n := 0
		for {
			_, err := r.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				b.Fatal(err)
			}
			n++
		}
		if n != benchEvents {
			b.Fatalf("%d events", n)
		}
		total += int64(len(data))
	}
	report(b, total)
}

func report(b *testing.B, bytes int64) {
	s := b.Elapsed().Seconds()
	events := float64(b.N) * benchEvents
	b.ReportMetric(float64(bytes)/1e6/s, "MB/s")
	b.ReportMetric(events/s, "events/s")
	b.ReportMetric(s*1e9/events, "ns/event")
	b.ReportMetric(float64(bytes)/events, "B/event")
}

// acceptHost accepts every event.
type acceptHost struct{ fakeHost }

func (*acceptHost) Submit(vm vasmon.VMID, evs []shard.Event) (int, error) { return len(evs), nil }

// BenchmarkRecorderSubmit is the recorder's cost per event on Submit (a host
// that does nothing, batches of 64, one producer per CPU).
func BenchmarkRecorderSubmit(b *testing.B) {
	var cw countWriter
	rec := NewRecorder(&cw, &acceptHost{})
	evs := make([]shard.Event, 64)
	for i := range evs {
		evs[i] = shard.Event{GPA: 0x1000 + 8*uint64(i), Size: 8, Data: 0x5007, Old: 0x4007, HasOld: true,
			RIP: 0xFFFFFFFF81001234, Trap: shard.Now()}
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := rec.Submit(1, evs); err != nil {
				b.Error(err)
			}
		}
	})
	if err := rec.Close(); err != nil {
		b.Fatal(err)
	}
	s := b.Elapsed().Seconds()
	b.ReportMetric(float64(b.N*len(evs))/s, "events/s")
	b.ReportMetric(s*1e9/float64(b.N*len(evs)), "ns/event")
}
