package shard

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"unsafe"

	"github.com/puzpuzpuz/xsync/v3"
)

// event is the size and shape of a page-table write record: 56 bytes, no
// pointers.
type event struct {
	GPA, Old, New, RIP, TS uint64
	VM, VCPU               uint32
	Producer, Seq          uint32
}

func TestEventSize(t *testing.T) {
	if s := unsafe.Sizeof(event{}); s != 56 {
		t.Fatalf("sizeof(event) = %d, want 56", s)
	}
}

func TestRingCap(t *testing.T) {
	for _, c := range []struct{ in, want int }{
		{1, 2}, {2, 2}, {3, 4}, {4, 4}, {5, 8}, {1000, 1024}, {1024, 1024},
	} {
		if got := NewRing[int](c.in).Cap(); got != c.want {
			t.Errorf("NewRing(%d).Cap() = %d, want %d", c.in, got, c.want)
		}
	}
	for _, bad := range []int{0, -1} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("NewRing(%d) did not panic", bad)
				}
			}()
			NewRing[int](bad)
		}()
	}
}

func TestRingFIFO(t *testing.T) {
	r := NewRing[int](16)
	for i := range 10 {
		if !r.TryEnqueue(i) {
			t.Fatalf("TryEnqueue(%d) failed", i)
		}
	}
	if r.Len() != 10 {
		t.Fatalf("Len = %d, want 10", r.Len())
	}
	for i := range 10 {
		v, ok := r.TryDequeue()
		if !ok || v != i {
			t.Fatalf("TryDequeue = %d, %v; want %d, true", v, ok, i)
		}
	}
}

func TestRingFullEmpty(t *testing.T) {
	for _, capacity := range []int{1, 2, 5, 8} {
		r := NewRing[int](capacity)
		if v, ok := r.TryDequeue(); ok {
			t.Fatalf("cap %d: TryDequeue on empty ring = %d, true", capacity, v)
		}
		if n := r.DequeueBatch(make([]int, 4)); n != 0 {
			t.Fatalf("cap %d: DequeueBatch on empty ring = %d", capacity, n)
		}
		for round := range 3 {
			for i := range r.Cap() {
				if !r.TryEnqueue(i) {
					t.Fatalf("cap %d round %d: TryEnqueue(%d) failed", capacity, round, i)
				}
			}
			if r.TryEnqueue(-1) {
				t.Fatalf("cap %d round %d: TryEnqueue on full ring succeeded", capacity, round)
			}
			if r.Len() != r.Cap() {
				t.Fatalf("cap %d: Len = %d on full ring", capacity, r.Len())
			}
			for i := range r.Cap() {
				if v, ok := r.TryDequeue(); !ok || v != i {
					t.Fatalf("cap %d round %d: TryDequeue = %d, %v; want %d", capacity, round, v, ok, i)
				}
			}
			if _, ok := r.TryDequeue(); ok {
				t.Fatalf("cap %d round %d: TryDequeue on drained ring succeeded", capacity, round)
			}
			if r.Len() != 0 {
				t.Fatalf("cap %d: Len = %d on empty ring", capacity, r.Len())
			}
		}
	}
}

// TestRingWrap cycles the positions around a small ring many times with
// varying fill levels, using both dequeue methods.
func TestRingWrap(t *testing.T) {
	r := NewRing[uint64](4)
	buf := make([]uint64, 3)
	var next, want uint64
	for i := range 100000 {
		k := i%r.Cap() + 1
		for range k {
			if !r.TryEnqueue(next) {
				t.Fatalf("iteration %d: TryEnqueue(%d) failed", i, next)
			}
			next++
		}
		for want < next {
			if i%2 == 0 {
				v, ok := r.TryDequeue()
				if !ok || v != want {
					t.Fatalf("iteration %d: TryDequeue = %d, %v; want %d", i, v, ok, want)
				}
				want++
				continue
			}
			n := r.DequeueBatch(buf)
			if n == 0 || n > len(buf) {
				t.Fatalf("iteration %d: DequeueBatch = %d", i, n)
			}
			for _, v := range buf[:n] {
				if v != want {
					t.Fatalf("iteration %d: batch value %d, want %d", i, v, want)
				}
				want++
			}
		}
	}
}

// TestRingConcurrent checks that every value is delivered exactly once with
// several producers and consumers, and that each producer's values arrive in
// order when there is one consumer.
func TestRingConcurrent(t *testing.T) {
	const producers = 4
	perProducer := 20000
	if testing.Short() {
		perProducer = 2000
	}
	for _, consumers := range []int{1, 3} {
		for _, capacity := range []int{2, 64} {
			r := NewRing[event](capacity)
			var wg sync.WaitGroup
			for p := range producers {
				wg.Go(func() {
					for i := range perProducer {
						for !r.TryEnqueue(event{Producer: uint32(p), Seq: uint32(i)}) {
							runtime.Gosched()
						}
					}
				})
			}
			got := make([][]event, consumers)
			var received atomic.Int64
			total := int64(producers * perProducer)
			var cwg sync.WaitGroup
			for c := range consumers {
				cwg.Go(func() {
					buf := make([]event, 5)
					for {
						var n int
						if c%2 == 0 {
							n = r.DequeueBatch(buf)
						} else if v, ok := r.TryDequeue(); ok {
							buf[0], n = v, 1
						}
						if n == 0 {
							if received.Load() == total {
								return
							}
							runtime.Gosched()
							continue
						}
						got[c] = append(got[c], buf[:n]...)
						received.Add(int64(n))
					}
				})
			}
			wg.Wait()
			cwg.Wait()

			seen := make([][]bool, producers)
			for p := range seen {
				seen[p] = make([]bool, perProducer)
			}
			for c := range got {
				last := make([]int, producers)
				for p := range last {
					last[p] = -1
				}
				for _, e := range got[c] {
					if seen[e.Producer][e.Seq] {
						t.Fatalf("consumers=%d cap=%d: value %d/%d delivered twice", consumers, capacity, e.Producer, e.Seq)
					}
					seen[e.Producer][e.Seq] = true
					// Each consumer sees each producer's values in order.
					if int(e.Seq) <= last[e.Producer] {
						t.Fatalf("consumers=%d cap=%d: producer %d: %d after %d", consumers, capacity, e.Producer, e.Seq, last[e.Producer])
					}
					if consumers == 1 && int(e.Seq) != last[e.Producer]+1 {
						t.Fatalf("cap=%d: producer %d: got %d after %d", capacity, e.Producer, e.Seq, last[e.Producer])
					}
					last[e.Producer] = int(e.Seq)
				}
			}
			for p := range seen {
				for i, ok := range seen[p] {
					if !ok {
						t.Fatalf("consumers=%d cap=%d: value %d/%d lost", consumers, capacity, p, i)
					}
				}
			}
			if r.Len() != 0 {
				t.Fatalf("Len = %d after drain", r.Len())
			}
		}
	}
}

func TestRingAllocs(t *testing.T) {
	r := NewRing[event](8)
	buf := make([]event, 4)
	var e event
	allocs := testing.AllocsPerRun(1000, func() {
		r.TryEnqueue(e)
		r.TryEnqueue(e)
		r.TryDequeue()
		r.DequeueBatch(buf)
	})
	if allocs != 0 {
		t.Fatalf("allocs per enqueue+dequeue = %v, want 0", allocs)
	}
}

// BenchmarkQueue moves b.N 56-byte events from 2 producers to 1 consumer.
// Full and empty queues are handled by yielding the processor.
func BenchmarkQueue(b *testing.B) {
	const capacity = 1024
	b.Run("ring", func(b *testing.B) {
		r := NewRing[event](capacity)
		benchQueue(b, r.TryEnqueue, func(dst []event) int {
			v, ok := r.TryDequeue()
			if !ok {
				return 0
			}
			dst[0] = v
			return 1
		})
	})
	b.Run("ring-batch", func(b *testing.B) {
		r := NewRing[event](capacity)
		benchQueue(b, r.TryEnqueue, r.DequeueBatch)
	})
	b.Run("xsync", func(b *testing.B) {
		q := xsync.NewMPMCQueueOf[event](capacity)
		benchQueue(b, q.TryEnqueue, func(dst []event) int {
			v, ok := q.TryDequeue()
			if !ok {
				return 0
			}
			dst[0] = v
			return 1
		})
	})
}

func benchQueue(b *testing.B, enqueue func(event) bool, dequeue func([]event) int) {
	const producers = 2
	b.ReportAllocs()
	var wg sync.WaitGroup
	start := make(chan struct{})
	for p := range producers {
		n := b.N / producers
		if p == 0 {
			n += b.N % producers
		}
		wg.Go(func() {
			<-start
			e := event{Producer: uint32(p)}
			for i := range n {
				e.Seq = uint32(i)
				for !enqueue(e) {
					runtime.Gosched()
				}
			}
		})
	}
	buf := make([]event, 64)
	b.ResetTimer()
	close(start)
	var sink uint64
	for got := 0; got < b.N; {
		n := dequeue(buf)
		if n == 0 {
			runtime.Gosched()
			continue
		}
		for _, e := range buf[:n] {
			sink += uint64(e.Seq)
		}
		got += n
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	_ = sink
}

func TestEnqueueBatch(t *testing.T) {
	r := NewRing[int](8)
	vs := []int{1, 2, 3, 4, 5}
	if n := r.TryEnqueueBatch(vs); n != 5 {
		t.Fatalf("first batch: %d", n)
	}
	if n := r.TryEnqueueBatch(vs); n != 3 {
		t.Fatalf("second batch into 3 free slots: %d", n)
	}
	if n := r.TryEnqueueBatch(vs); n != 0 {
		t.Fatalf("batch into a full ring: %d", n)
	}
	dst := make([]int, 16)
	if n := r.DequeueBatch(dst); n != 8 || fmt.Sprint(dst[:8]) != "[1 2 3 4 5 1 2 3]" {
		t.Fatalf("dequeued %d: %v", n, dst[:n])
	}
}

// TestEnqueueBatchConcurrent: several producers enqueue batches while a
// consumer drains; every value arrives once and each producer's values in
// order.
func TestEnqueueBatchConcurrent(t *testing.T) {
	const producers, per = 4, 20000
	r := NewRing[[2]int](64)
	wg := produceBatches(r, producers, per)
	next := make([]int, producers)
	got := 0
	dst := make([][2]int, 32)
	for got < producers*per {
		n := r.DequeueBatch(dst)
		if n == 0 {
			runtime.Gosched()
		}
		for _, v := range dst[:n] {
			if v[1] != next[v[0]] {
				t.Fatalf("producer %d: got %d, want %d", v[0], v[1], next[v[0]])
			}
			next[v[0]]++
		}
		got += n
	}
	wg.Wait()
}

// TestClaimConcurrent: values claimed and read in place arrive in each
// producer's order, none lost or repeated, and released slots are reused.
func TestClaimConcurrent(t *testing.T) {
	const producers, per = 4, 20000
	r := NewRing[[2]int](64)
	wg := produceBatches(r, producers, per)
	next := make([]int, producers)
	for got := 0; got < producers*per; {
		pos, n := r.Claim(32)
		if n == 0 {
			runtime.Gosched()
			continue
		}
		for i := range uint64(n) {
			v := r.At(pos + i)
			if v[1] != next[v[0]] {
				t.Fatalf("producer %d: got %d, want %d", v[0], v[1], next[v[0]])
			}
			next[v[0]]++
		}
		r.Release(pos, n)
		got += n
	}
	wg.Wait()
	if pos, n := r.Claim(8); n != 0 {
		t.Fatalf("claimed %d values at %d from a drained ring", n, pos)
	}
}

// TestClaimHoldsSlots: claimed slots are not reused before Release.
func TestClaimHoldsSlots(t *testing.T) {
	r := NewRing[int](4)
	for i := 0; i < 4; i++ {
		if !r.TryEnqueue(i) {
			t.Fatal("enqueue into an empty ring failed")
		}
	}
	pos, n := r.Claim(3)
	if n != 3 || *r.At(pos) != 0 || *r.At(pos + 2) != 2 {
		t.Fatalf("Claim: %d values from %d", n, pos)
	}
	if r.TryEnqueue(9) {
		t.Fatal("a claimed slot was reused before Release")
	}
	r.Release(pos, n)
	for i := 0; i < 3; i++ {
		if !r.TryEnqueue(10 + i) {
			t.Fatalf("released slot %d not reused", i)
		}
	}
	if v, ok := r.TryDequeue(); !ok || v != 3 {
		t.Fatalf("after release: %d %v, want 3", v, ok)
	}
}

// produceBatches starts producers goroutines that enqueue [producer, i] for
// i < per in batches of up to 7.
func produceBatches(r *Ring[[2]int], producers, per int) *sync.WaitGroup {
	var wg sync.WaitGroup
	for p := 0; p < producers; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var buf [7][2]int
			for i := 0; i < per; {
				k := 0
				for ; k < len(buf) && i+k < per; k++ {
					buf[k] = [2]int{p, i + k}
				}
				n := r.TryEnqueueBatch(buf[:k])
				if n == 0 {
					runtime.Gosched()
				}
				i += n
			}
		}()
	}
	return &wg
}
