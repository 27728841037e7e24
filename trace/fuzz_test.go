package trace

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"testing"
)

// fuzzSeeds are the inputs of the committed corpus (testdata/fuzz/FuzzReader):
// valid traces, hand-made damaged ones, cuts and flips.
func fuzzSeeds(t testing.TB) [][]byte {
	small, _, _ := smallTrace(t)
	random, _ := write(t, randRecords(7, 12), func(i int) bool { return i%5 == 0 })
	seeds := [][]byte{small, random, small[:HeaderSize], small[:len(small)-3], small[:HeaderSize+7], {}}
	flip := bytes.Clone(small)
	flip[HeaderSize+30] ^= 4
	seeds = append(seeds, flip)
	ev := rec(KindEvent, 4, 1, 8, 0x10, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE, 0xFF, 0x11, 0x22)
	seeds = append(seeds,
		cat(header(), block(3, cat(rec(40, 20, 9, 9, 9), ev, endRec(2)))),
		cat(header(), block(2, cat(rec(KindPage, append([]byte{0, 1, 1, 3}, make([]byte, 63)...)...), endRec(1)))),
		cat(header(), block(2, cat(rec(KindRootStart, 0, 1, 0, 3, 0, 0, 0, 2, 'a', 'b'), endRec(1)))),
		cat(header(), []byte{0xFF, 0xFF, 0x0F, 0x00, 1, 0, 0, 0, 0, 0, 0, 0}),
	)
	return seeds
}

// TestFuzzSeeds keeps the committed corpus in step with fuzzSeeds; set
// VASENGINE_WRITE_SEEDS=1 to rewrite it.
func TestFuzzSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzReader")
	seeds := fuzzSeeds(t)
	if os.Getenv("VASENGINE_WRITE_SEEDS") != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for i, s := range seeds {
			body := "go test fuzz v1\n[]byte(" + strconv.Quote(string(s)) + ")\n"
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed%02d", i)), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	files, err := filepath.Glob(filepath.Join(dir, "seed*"))
	if err != nil || len(files) != len(seeds) {
		t.Fatalf("%d seed files in %s, want %d (rewrite with VASENGINE_WRITE_SEEDS=1): %v", len(files), dir, len(seeds), err)
	}
}

func FuzzReader(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, salvage := range []bool{false, true} {
			recs, r, err := readAll(data, salvage)
			if err != nil {
				var te *Error
				if !errors.As(err, &te) || te.Offset < 0 || te.Offset > int64(len(data)) {
					t.Fatalf("salvage=%v: error %v (%T) without a valid offset", salvage, err, err)
				}
				if salvage && r != nil {
					t.Fatalf("salvage: damage returned as an error: %v", err)
				}
			}
			if r != nil && r.Damage() != nil {
				var te *Error
				if !errors.As(r.Damage(), &te) || te.Offset < 0 || te.Offset > int64(len(data)) {
					t.Fatalf("damage %v without a valid offset", r.Damage())
				}
			}
			// Whatever was read is a valid record: it can be written.
			var buf bytes.Buffer
			w, _ := NewWriter(&buf, Header{})
			for i := range recs {
				if err := w.Write(&recs[i]); err != nil {
					t.Fatalf("record %d read but not writable: %v: %v", i, &recs[i], err)
				}
			}
			w.Close()
			again, _, err := readAll(buf.Bytes(), false)
			if err != nil {
				t.Fatalf("rewritten trace: %v", err)
			}
			sameRecords(t, recs, again)
		}
	})
}

// TestReaderEqualsSalvage checks, on the seeds, that salvage returns the
// same records as a plain read up to its error.
func TestReaderEqualsSalvage(t *testing.T) {
	for i, s := range fuzzSeeds(t) {
		a, _, errA := readAll(s, false)
		b, r, errB := readAll(s, true)
		if errB != nil && r != nil {
			t.Fatalf("seed %d: salvage error %v", i, errB)
		}
		if !reflect.DeepEqual(a, b) {
			t.Fatalf("seed %d: %d records plain, %d salvaged", i, len(a), len(b))
		}
		if r != nil && (errA == nil) != (r.Damage() == nil) {
			t.Fatalf("seed %d: plain error %v, damage %v", i, errA, r.Damage())
		}
	}
}
