package shard

import (
	"testing"
	"unsafe"
)

// TestEventLayout: an Event and its queue slot's sequence number fill one
// cache line.
func TestEventLayout(t *testing.T) {
	if n := unsafe.Sizeof(ringSlot[Event]{}); n != 64 {
		t.Fatalf("a queue slot of Event is %d bytes, want 64", n)
	}
}
