package shard

import (
	"math"
	"math/bits"
	"sync/atomic"
)

// Bucket layout. Values below 2*subBuckets have a bucket each. Above that,
// each range [2^k, 2^(k+1)) is split into subBuckets linear buckets of width
// 2^(k-subBits), so a bucket is at most 1/subBuckets of its lower bound wide.
// The buckets cover all non-negative int64 values.
const (
	subBits    = 4
	subBuckets = 1 << subBits
	numBuckets = (63-subBits)*subBuckets + subBuckets // 960
)

// bucketOf returns the index of the bucket holding v >= 0.
func bucketOf(v uint64) int {
	if v < 2*subBuckets {
		return int(v)
	}
	k := bits.Len64(v) - 1 // v is in [2^k, 2^(k+1)), k > subBits
	sub := (v >> (k - subBits)) & (subBuckets - 1)
	return (k-subBits+1)*subBuckets + int(sub)
}

// bucketLow returns the smallest value in bucket i.
func bucketLow(i int) uint64 {
	if i < 2*subBuckets {
		return uint64(i)
	}
	k := i/subBuckets + subBits - 1
	return uint64(subBuckets+i%subBuckets) << (k - subBits)
}

// bucketHigh returns the largest value in bucket i.
func bucketHigh(i int) uint64 {
	if i == numBuckets-1 {
		return math.MaxInt64
	}
	return bucketLow(i+1) - 1
}

// A Histogram records nanosecond durations in log-linear buckets. A value v
// is known to within its bucket, whose width is at most v/16, so quantiles
// are reported with a relative error of at most 1/16. Values of any size
// are accepted; negative values are recorded as 0.
//
// Record may be called by any number of goroutines at once (the
// synchronous submitters' stall histogram); a shard records through a
// LocalHist and publishes. The other methods may be called concurrently
// with Record and with each other from any goroutine. Each counter is read atomically, but while
// Record runs, counters read one after another (Count and Sum, or a
// snapshot's buckets and Sum) may disagree by the values being recorded.
// Histogram does not allocate.
//
// The zero Histogram is empty and ready to use. A Histogram must not be
// copied after first use; use Snapshot to take a copy.
type Histogram struct {
	max    atomic.Int64
	sum    atomic.Int64
	count  atomic.Uint64
	counts [numBuckets]atomic.Uint64
}

// Record adds the duration ns, in nanoseconds, to h.
func (h *Histogram) Record(ns int64) {
	ns = max(ns, 0)
	// Max first, so a reader that sees the bucket count also sees the max.
	for m := h.max.Load(); ns > m && !h.max.CompareAndSwap(m, ns); m = h.max.Load() {
	}
	h.counts[bucketOf(uint64(ns))].Add(1)
	h.sum.Add(ns)
	h.count.Add(1)
}

// Count returns the number of values recorded.
func (h *Histogram) Count() uint64 { return h.count.Load() }

// Sum returns the total of the values recorded, in nanoseconds. It wraps
// around after about 292 years of total duration.
func (h *Histogram) Sum() int64 { return h.sum.Load() }

// Max returns the largest value recorded, or 0 if there is none.
func (h *Histogram) Max() int64 { return h.max.Load() }

// Quantile returns an upper bound of the q-quantile of the values recorded;
// see HistSnapshot.Quantile.
func (h *Histogram) Quantile(q float64) int64 {
	var s HistSnapshot
	h.Snapshot(&s)
	return s.Quantile(q)
}

// Snapshot copies the current state of h into dst, overwriting it. The copy
// is consistent in that its Count is the total of its buckets.
func (h *Histogram) Snapshot(dst *HistSnapshot) {
	dst.count = 0
	for i := range h.counts {
		c := h.counts[i].Load()
		dst.counts[i] = c
		dst.count += c
	}
	// Record stores max before the bucket count, so this max covers every
	// value counted above.
	dst.max = h.max.Load()
	dst.sum = h.sum.Load()
}

// A HistSnapshot is a copy of a Histogram's state taken by
// Histogram.Snapshot. Snapshots of several histograms can be combined with
// Merge. The zero HistSnapshot is empty. A HistSnapshot is a plain value
// (about 7.7 KB) that may be copied; it is not safe for concurrent use while
// it is being written.
type HistSnapshot struct {
	max, sum int64
	count    uint64
	counts   [numBuckets]uint64
}

// Count returns the number of values in s.
func (s *HistSnapshot) Count() uint64 { return s.count }

// Sum returns the total of the values in s, in nanoseconds.
func (s *HistSnapshot) Sum() int64 { return s.sum }

// Max returns the largest value in s, or 0 if s is empty.
func (s *HistSnapshot) Max() int64 { return s.max }

// Merge adds the values in other to s.
func (s *HistSnapshot) Merge(other *HistSnapshot) {
	s.max = max(s.max, other.max)
	s.sum += other.sum
	s.count += other.count
	for i, c := range &other.counts {
		s.counts[i] += c
	}
}

// Quantile returns the upper bound of the bucket holding the q-quantile of
// the values in s, capped at Max. If x is the q-quantile, the value of rank
// ceil(q*Count) (at least 1) in ascending order, the result lies in
// [x, x+x/16]. q is clamped to [0, 1]. Quantile returns 0 if s is empty.
func (s *HistSnapshot) Quantile(q float64) int64 {
	if s.count == 0 {
		return 0
	}
	q = min(q, 1)
	if !(q > 0) { // q <= 0 or NaN
		q = 0
	}
	// rank is the 1-based position of the quantile in sorted order.
	rank := uint64(math.Ceil(q * float64(s.count)))
	rank = min(max(rank, 1), s.count)
	var seen uint64
	for i, c := range &s.counts {
		if seen += c; seen >= rank {
			return min(int64(bucketHigh(i)), s.max)
		}
	}
	return s.max // not reached: the counts add up to s.count
}

// Cumulative sets dst[j] to the number of values in s that are at most
// boundsNs[j], the cumulative bucket counts of a Prometheus histogram with
// those upper bounds (in nanoseconds; see BoundsNs). boundsNs must be
// ascending and dst at least as long as boundsNs. A value is only known to
// within its bucket, so values at most bound/16 below a bound may be counted
// as above it; bounds that are upper bounds of this histogram's buckets,
// such as 1<<k - 1, are exact.
func (s *HistSnapshot) Cumulative(boundsNs []int64, dst []uint64) {
	dst = dst[:len(boundsNs)]
	var seen uint64
	i := 0 // buckets before i are counted in seen
	for j, b := range boundsNs {
		if j > 0 && b < boundsNs[j-1] {
			panic("shard: HistSnapshot.Cumulative: bounds not ascending")
		}
		for i < numBuckets && b >= 0 && bucketHigh(i) <= uint64(b) {
			seen += s.counts[i]
			i++
		}
		dst[j] = seen
	}
}

// BoundsNs converts histogram upper bounds in seconds, as Prometheus uses,
// to nanoseconds for Cumulative, rounding to the nearest nanosecond and
// saturating at the int64 range. It allocates; call it once at setup.
func BoundsNs(secs []float64) []int64 {
	ns := make([]int64, len(secs))
	for i, s := range secs {
		switch v := math.Round(s * 1e9); {
		case v >= math.MaxInt64:
			ns[i] = math.MaxInt64
		case v <= math.MinInt64:
			ns[i] = math.MinInt64
		default:
			ns[i] = int64(v)
		}
	}
	return ns
}

// LocalHist is the single writer's side of a Histogram: Record is plain
// arithmetic (no atomic operation), and PublishTo copies what changed into
// a Histogram that readers snapshot concurrently. A shard worker records
// every callback's latency here and publishes after each batch. It does not
// allocate after construction.
type LocalHist struct {
	counts  [numBuckets]uint64
	sum     int64
	count   uint64
	max     int64
	dirty   []uint16
	isDirty [numBuckets]bool
}

// NewLocalHist returns an empty LocalHist.
func NewLocalHist() *LocalHist { return &LocalHist{dirty: make([]uint16, 0, numBuckets)} }

// Record adds ns (negative counts as 0).
func (l *LocalHist) Record(ns int64) {
	ns = max(ns, 0)
	b := bucketOf(uint64(ns))
	l.counts[b]++
	if !l.isDirty[b] {
		l.isDirty[b] = true
		l.dirty = append(l.dirty, uint16(b))
	}
	l.sum += ns
	l.count++
	l.max = max(l.max, ns)
}

// PublishTo makes h equal to l. h must have no other writer.
func (l *LocalHist) PublishTo(h *Histogram) {
	if len(l.dirty) == 0 {
		return
	}
	h.max.Store(l.max)
	for _, b := range l.dirty {
		h.counts[b].Store(l.counts[b])
		l.isDirty[b] = false
	}
	l.dirty = l.dirty[:0]
	h.sum.Store(l.sum)
	h.count.Store(l.count)
}

// Sub removes from s the values of an earlier snapshot of the same
// Histogram, leaving the values recorded between the two. Max stays the
// larger of the two maxima, an upper bound.
func (s *HistSnapshot) Sub(earlier *HistSnapshot) {
	for i := range s.counts {
		s.counts[i] -= earlier.counts[i]
	}
	s.count -= earlier.count
	s.sum -= earlier.sum
}
