package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestOutFile: an output appears under its name only when complete; a
// name taken meanwhile is never replaced without -force (the data stays
// in the temporary file, named in the error); a device is written in
// place and its write errors are reported.
func TestOutFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "out.trace")
	o, err := createOutput("-o", path, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := o.Write([]byte("data")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("the final name exists before Commit: %v", err)
	}
	if err := o.Commit(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); string(b) != "data" {
		t.Fatalf("content %q", b)
	}
	if m, _ := filepath.Glob(filepath.Join(dir, ".*.tmp")); len(m) != 0 {
		t.Fatalf("temporary files left: %v", m)
	}

	// The name is taken while writing: no clobbering, the data is kept.
	o, err = createOutput("-o", path, true)
	if err != nil {
		t.Fatal(err)
	}
	o.Write([]byte("new"))
	err = o.Commit()
	if err == nil || !strings.Contains(err.Error(), "kept in") {
		t.Fatalf("commit over an existing file: %v", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "data" {
		t.Fatalf("the existing file changed: %q", b)
	}
	if b, _ := os.ReadFile(o.tmp); string(b) != "new" {
		t.Fatalf("the data was not kept: %q", b)
	}

	// Replacing (profiles, -force) is a rename.
	o, _ = createOutput("-cpuprofile", path, false)
	o.Write([]byte("newer"))
	if err := o.Commit(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); string(b) != "newer" {
		t.Fatalf("content %q", b)
	}

	// Abort leaves nothing.
	o, _ = createOutput("-o", filepath.Join(dir, "aborted"), true)
	o.Write([]byte("x"))
	o.Abort()
	if _, err := os.Stat(filepath.Join(dir, "aborted")); !os.IsNotExist(err) {
		t.Fatal("an aborted output exists")
	}

	if _, err := os.Stat("/dev/full"); err == nil {
		o, err := createOutput("-o", "/dev/full", true)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := o.Write(make([]byte, 1<<16)); err == nil {
			t.Fatal("a write to /dev/full succeeded")
		}
		if err := o.Commit(); err == nil || !strings.Contains(err.Error(), "-o /dev/full") {
			t.Fatalf("commit after a failed write: %v", err)
		}
	}
}
