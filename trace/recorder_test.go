package trace

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/guestmem"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// fakeHost accepts everything; every third Submit accepts only half the
// events (as a non-blocking engine with a full queue).
type fakeHost struct {
	mu    sync.Mutex
	prots map[vasmon.VMID]vasmon.Protector
	calls int
}

func (h *fakeHost) AddVM(id vasmon.VMID, mem vasmon.Memory, prot vasmon.Protector, maxTables int64) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.prots[id] != nil {
		return vasmon.ErrVMExists
	}
	h.prots[id] = prot
	return nil
}

func (h *fakeHost) RemoveVM(ctx context.Context, id vasmon.VMID) error { return nil }

func (h *fakeHost) Start(ctx context.Context, vm vasmon.VMID, cr3 uint64, mode vasmon.Mode, monitored uint64,
	cb vasmon.Callback, cbctx any, opts engine.RootOptions) (*vasmon.Root, error) {
	return vasmon.NewRoot(1, vasmon.NewVM(vm, nil, nil, 0), cr3, mode, monitored, cb, cbctx, opts.Options)
}

func (h *fakeHost) Stop(ctx context.Context, r *vasmon.Root) error { return nil }

func (h *fakeHost) Submit(vm vasmon.VMID, evs []shard.Event) (int, error) {
	h.mu.Lock()
	h.calls++
	partial := h.calls%3 == 0
	h.mu.Unlock()
	if partial {
		return len(evs) / 2, engine.ErrOverload
	}
	return len(evs), nil
}

type nopProt struct{}

func (nopProt) Protect(uint64) error   { return nil }
func (nopProt) Unprotect(uint64) error { return nil }

// TestRecorderConcurrent submits from many goroutines while "workers"
// protect pages, and checks the trace holds exactly the accepted events, in
// each producer's order, and the content of each protected page.
func TestRecorderConcurrent(t *testing.T) {
	host := &fakeHost{prots: make(map[vasmon.VMID]vasmon.Protector)}
	var buf bytes.Buffer
	rec := NewRecorder(&buf, host)
	const producers, batches = 6, 300
	mems := make([]*guestmem.Memory, producers)
	for i := range mems {
		mems[i] = guestmem.New(1 << 24)
		_ = mems[i].Write(0x5000, []byte{byte(i + 1)})
		if err := rec.AddVM(vasmon.VMID(i), mems[i], nopProt{}, 7); err != nil {
			t.Fatal(err)
		}
	}
	if err := rec.AddVM(0, mems[0], nopProt{}, 0); !errors.Is(err, vasmon.ErrVMExists) {
		t.Fatalf("second AddVM: %v", err)
	}
	root, err := rec.Start(context.Background(), 2, 0x5000, vasmon.Mode4, 6, func(any, uint64, uint64, uint64, uint64) {},
		&backends.RootInfo{Name: "init"}, engine.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	accepted := make([]int, producers)
	for p := 0; p < producers; p++ {
		wg.Add(2)
		go func() {
			defer wg.Done()
			seq := uint64(0)
			for b := 0; b < batches; b++ {
				evs := make([]shard.Event, 1+b%40)
				for i := range evs {
					evs[i] = shard.Event{GPA: 0x5000 + 8*uint64(i), Data: seq + uint64(i), Size: 8, Trap: shard.Now()}
				}
				n, _ := rec.Submit(vasmon.VMID(p), evs)
				seq += uint64(n)
				accepted[p] += n
			}
		}()
		go func() {
			defer wg.Done()
			host.mu.Lock()
			prot := host.prots[vasmon.VMID(p)]
			host.mu.Unlock()
			for k := 0; k < 50; k++ {
				if err := prot.Protect(0x5000); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	if err := rec.Flush(); err != nil {
		t.Fatal(err)
	}
	if n := rec.Bytes(); n != int64(buf.Len()) || n <= HeaderSize {
		t.Fatalf("flushed %d bytes, buffer holds %d", n, buf.Len())
	}
	if err := rec.Stop(context.Background(), root); err != nil {
		t.Fatal(err)
	}
	if err := rec.RemoveVM(context.Background(), 5); err != nil {
		t.Fatal(err)
	}
	if err := rec.Page(5, 0x5000); err == nil {
		t.Fatal("Page of a removed VM")
	}
	if err := rec.Page(4, 0x5123); err != nil {
		t.Fatal(err)
	}
	if err := rec.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := rec.Submit(1, make([]shard.Event, 3)); err != nil { // delegated, not recorded
		t.Fatal(err)
	}

	recs, _, err := readAll(buf.Bytes(), false)
	if err != nil {
		t.Fatal(err)
	}
	next := make([]uint64, producers)
	pages := make([]int, producers)
	kinds := map[Kind]int{}
	for _, r := range recs {
		kinds[r.Kind]++
		switch r.Kind {
		case KindEvent:
			if r.Data != next[r.VM] {
				t.Fatalf("VM %d: event %d recorded where %d was due", r.VM, r.Data, next[r.VM])
			}
			next[r.VM]++
		case KindPage:
			if r.GPA != 0x5000 || r.Page[0] != byte(r.VM+1) {
				t.Fatalf("page %v holds %d", &r, r.Page[0])
			}
			pages[r.VM]++
		case KindVMAdd:
			if r.RAM != 1<<24 || r.MaxTables != 7 {
				t.Fatalf("%v", &r)
			}
		case KindRootStart:
			if r.Name != "init" || r.CR3 != 0x5000 || r.Mode != vasmon.Mode4 || r.Monitored != 6 {
				t.Fatalf("%v", &r)
			}
		}
	}
	for p := range next {
		if int(next[p]) != accepted[p] {
			t.Fatalf("VM %d: %d events recorded, %d accepted", p, next[p], accepted[p])
		}
		if want := 50 + map[bool]int{true: 1}[p == 4]; pages[p] != want {
			t.Fatalf("VM %d: %d pages, want %d", p, pages[p], want)
		}
	}
	if kinds[KindVMAdd] != producers || kinds[KindRootStart] != 1 || kinds[KindRootStop] != 1 || kinds[KindVMRemove] != 1 {
		t.Fatalf("records by kind: %v", kinds)
	}
}

type failWriter struct{ n int }

func (f *failWriter) Write(b []byte) (int, error) {
	if f.n--; f.n < 0 {
		return 0, errors.New("disk full")
	}
	return len(b), nil
}

// TestRecorderWriteError checks a failing writer stops the recording, not
// the delegation, and Close reports it.
func TestRecorderWriteError(t *testing.T) {
	host := &fakeHost{prots: make(map[vasmon.VMID]vasmon.Protector)}
	rec := NewRecorder(&failWriter{n: 1}, host)
	if err := rec.AddVM(1, guestmem.New(1<<20), nopProt{}, 0); err != nil {
		t.Fatal(err)
	}
	evs := make([]shard.Event, 100)
	for i := range evs {
		evs[i] = shard.Event{GPA: 8, Size: 8, RIP: 0xFFFFFFFF81000000}
	}
	for k := 0; k < 100; k++ {
		if _, err := rec.Submit(1, evs); err != nil && !errors.Is(err, engine.ErrOverload) {
			t.Fatal(err)
		}
	}
	if err := rec.Close(); err == nil || rec.Err() == nil {
		t.Fatal("no error from a failing writer")
	}
	t.Log(rec.Err())
	if rec := NewRecorder(&failWriter{}, host); rec.Close() == nil {
		t.Fatal("no error from a failing header write")
	}
}
