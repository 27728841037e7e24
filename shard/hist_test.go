package shard

import (
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
)

func TestHistBuckets(t *testing.T) {
	if got := bucketOf(math.MaxInt64); got != numBuckets-1 {
		t.Fatalf("bucketOf(MaxInt64) = %d, want %d", got, numBuckets-1)
	}
	for i := range numBuckets {
		lo, hi := bucketLow(i), bucketHigh(i)
		if bucketOf(lo) != i || bucketOf(hi) != i {
			t.Fatalf("bucket %d = [%d, %d], but bucketOf gives %d and %d", i, lo, hi, bucketOf(lo), bucketOf(hi))
		}
		if i > 0 && bucketHigh(i-1)+1 != lo {
			t.Fatalf("bucket %d starts at %d, bucket %d ends at %d", i, lo, i-1, bucketHigh(i-1))
		}
		if (hi-lo)*16 > lo {
			t.Fatalf("bucket %d = [%d, %d] is wider than 1/16 of its lower bound", i, lo, hi)
		}
	}
}

// exactQuantile returns the value of rank ceil(q*n) in sorted.
func exactQuantile(sorted []int64, q float64) int64 {
	rank := max(int(math.Ceil(q*float64(len(sorted)))), 1)
	return sorted[rank-1]
}

var distributions = []struct {
	name string
	gen  func(r *rand.Rand) int64
}{
	{"constant", func(*rand.Rand) int64 { return 12345 }},
	{"small", func(r *rand.Rand) int64 { return r.Int64N(40) }},
	{"uniform", func(r *rand.Rand) int64 { return r.Int64N(1e6) }},
	{"exponential", func(r *rand.Rand) int64 { return int64(r.ExpFloat64() * 1e5) }},
	{"log-uniform", func(r *rand.Rand) int64 { return int64(math.Exp(r.Float64() * math.Log(1e11))) }},
}

func sample(gen func(*rand.Rand) int64, seed uint64, n int) []int64 {
	r := rand.New(rand.NewPCG(seed, 1))
	vs := make([]int64, n)
	for i := range vs {
		vs[i] = gen(r)
	}
	return vs
}

func TestHistQuantile(t *testing.T) {
	for _, d := range distributions {
		vs := sample(d.gen, 1, 50000)
		var h Histogram
		var sum int64
		for _, v := range vs {
			h.Record(v)
			sum += v
		}
		slices.Sort(vs)
		if h.Count() != uint64(len(vs)) || h.Sum() != sum || h.Max() != vs[len(vs)-1] {
			t.Errorf("%s: Count, Sum, Max = %d, %d, %d; want %d, %d, %d", d.name,
				h.Count(), h.Sum(), h.Max(), len(vs), sum, vs[len(vs)-1])
		}
		for _, q := range []float64{0, 0.001, 0.1, 0.25, 0.5, 0.9, 0.99, 0.999, 1} {
			x := exactQuantile(vs, q)
			if got := h.Quantile(q); got < x || got > x+x/16 {
				t.Errorf("%s: Quantile(%v) = %d, exact %d (relative error %.4f)",
					d.name, q, got, x, float64(got-x)/float64(x))
			}
		}
	}
}

func TestHistEdgeCases(t *testing.T) {
	var h Histogram
	if h.Quantile(0.5) != 0 || h.Max() != 0 || h.Count() != 0 {
		t.Fatal("empty histogram is not zero")
	}
	h.Record(-5) // recorded as 0
	h.Record(math.MaxInt64)
	if h.Count() != 2 || h.Sum() != math.MaxInt64 || h.Max() != math.MaxInt64 {
		t.Fatalf("Count, Sum, Max = %d, %d, %d", h.Count(), h.Sum(), h.Max())
	}
	for _, c := range []struct {
		q    float64
		want int64
	}{{-1, 0}, {math.NaN(), 0}, {0.5, 0}, {0.51, math.MaxInt64}, {2, math.MaxInt64}} {
		if got := h.Quantile(c.q); got != c.want {
			t.Errorf("Quantile(%v) = %d, want %d", c.q, got, c.want)
		}
	}
}

func TestHistMerge(t *testing.T) {
	var all HistSnapshot // merge of the parts
	var whole Histogram  // all values recorded in one histogram
	for i, d := range distributions {
		var part Histogram
		for _, v := range sample(d.gen, uint64(i), 10000) {
			part.Record(v)
			whole.Record(v)
		}
		var s HistSnapshot
		part.Snapshot(&s)
		all.Merge(&s)
	}
	var want HistSnapshot
	whole.Snapshot(&want)
	if all != want {
		t.Fatalf("merged snapshot differs: Count %d, Sum %d, Max %d; want %d, %d, %d",
			all.Count(), all.Sum(), all.Max(), want.Count(), want.Sum(), want.Max())
	}
	if all.Quantile(0.9) != whole.Quantile(0.9) {
		t.Fatalf("merged Quantile(0.9) = %d, want %d", all.Quantile(0.9), whole.Quantile(0.9))
	}
}

func TestHistCumulative(t *testing.T) {
	vs := sample(distributions[4].gen, 7, 20000) // log-uniform
	var h Histogram
	for _, v := range vs {
		h.Record(v)
	}
	var s HistSnapshot
	h.Snapshot(&s)
	countLE := func(b int64) uint64 {
		var n uint64
		for _, v := range vs {
			if v <= b {
				n++
			}
		}
		return n
	}

	// Bucket upper bounds are exact.
	exact := []int64{-1, 0, 31, 1<<10 - 1, 1<<20 - 1, 1<<30 - 1, math.MaxInt64}
	dst := make([]uint64, len(exact))
	s.Cumulative(exact, dst)
	for j, b := range exact {
		if dst[j] != countLE(b) {
			t.Errorf("Cumulative at %d = %d, want %d", b, dst[j], countLE(b))
		}
	}

	// Other bounds are within 1/16.
	secs := []float64{1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 1, 10}
	bounds := BoundsNs(secs)
	dst = make([]uint64, len(bounds))
	s.Cumulative(bounds, dst)
	for j, b := range bounds {
		if lo, hi := countLE(b-b/16), countLE(b); dst[j] < lo || dst[j] > hi {
			t.Errorf("Cumulative at %d = %d, want within [%d, %d]", b, dst[j], lo, hi)
		}
	}

	defer func() {
		if recover() == nil {
			t.Error("Cumulative with descending bounds did not panic")
		}
	}()
	s.Cumulative([]int64{2, 1}, dst)
}

func TestBoundsNs(t *testing.T) {
	got := BoundsNs([]float64{0.005, 1, 1e-9, 0.25e-9, 1e30, math.Inf(1), -1})
	want := []int64{5e6, 1e9, 1, 0, math.MaxInt64, math.MaxInt64, -1e9}
	if !slices.Equal(got, want) {
		t.Fatalf("BoundsNs = %v, want %v", got, want)
	}
}

// TestHistConcurrent has readers snapshot while the writer records.
func TestHistConcurrent(t *testing.T) {
	const n = 100000
	var h Histogram
	var wg sync.WaitGroup
	done := make(chan struct{})
	for range 2 {
		wg.Go(func() {
			var s, prev HistSnapshot
			for {
				select {
				case <-done:
					return
				default:
				}
				h.Snapshot(&s)
				if s.Count() < prev.Count() || s.Max() < prev.Max() {
					t.Errorf("snapshot went backwards: count %d -> %d, max %d -> %d",
						prev.Count(), s.Count(), prev.Max(), s.Max())
					return
				}
				if q := s.Quantile(1); q > s.Max() || s.Max() >= n {
					t.Errorf("Quantile(1) = %d, Max = %d", q, s.Max())
					return
				}
				prev = s
			}
		})
	}
	for i := range int64(n) {
		h.Record(i)
	}
	close(done)
	wg.Wait()
	var s HistSnapshot
	h.Snapshot(&s)
	if s.Count() != n || s.Sum() != n*(n-1)/2 || s.Max() != n-1 {
		t.Fatalf("Count, Sum, Max = %d, %d, %d", s.Count(), s.Sum(), s.Max())
	}
}

func TestHistAllocs(t *testing.T) {
	var h Histogram
	var s HistSnapshot
	bounds := BoundsNs([]float64{0.001, 0.01, 0.1})
	dst := make([]uint64, len(bounds))
	v := int64(1)
	allocs := testing.AllocsPerRun(100, func() {
		h.Record(v)
		v = v*3 + 1
		h.Snapshot(&s)
		h.Quantile(0.99)
		s.Cumulative(bounds, dst)
	})
	if allocs != 0 {
		t.Fatalf("allocs = %v, want 0", allocs)
	}
}

func BenchmarkHistRecord(b *testing.B) {
	var h Histogram
	b.ReportAllocs()
	v := int64(1)
	for b.Loop() {
		h.Record(v & (1<<34 - 1))
		v = v*6364136223846793005 + 1442695040888963407
	}
}

func TestHistSnapshotSub(t *testing.T) {
	var h Histogram
	for i := 0; i < 1000; i++ {
		h.Record(1_000_000) // 1 ms
	}
	var before HistSnapshot
	h.Snapshot(&before)
	for i := 0; i < 100; i++ {
		h.Record(1000) // 1 us
	}
	var after HistSnapshot
	h.Snapshot(&after)
	after.Sub(&before)
	if after.Count() != 100 || after.Sum() != 100*1000 {
		t.Fatalf("count %d sum %d", after.Count(), after.Sum())
	}
	if q := after.Quantile(0.99); q < 1000 || q > 1000+1000/16 {
		t.Fatalf("p99 of the difference = %d, want ~1000", q)
	}
}
