package natsink

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
)

// spool is the bounded on-disk queue of messages not yet acknowledged: one
// append-only file of frames (u32 length, subject, 0, message id, 0, data)
// and the offset of the first frame not yet acknowledged, in a file of its
// own. It survives restarts: a sink replays it first.
type spool struct {
	dir  string
	f    *os.File
	size int64 // bytes in the file
	off  int64 // first frame not acknowledged
	max  int64
	w    *bufio.Writer
}

type frame struct {
	subject, id string
	data        []byte
}

func openSpool(dir string, max int64) (*spool, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, "spool.bin"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	s := &spool{dir: dir, f: f, size: st.Size(), max: max}
	if b, err := os.ReadFile(filepath.Join(dir, "spool.off")); err == nil {
		s.off, _ = strconv.ParseInt(string(b), 10, 64)
	}
	if s.off > s.size || s.off < 0 {
		s.off = 0
	}
	if _, err := f.Seek(s.size, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	s.w = bufio.NewWriterSize(f, 1<<16)
	return s, nil
}

// empty reports whether every frame was acknowledged.
func (s *spool) empty() bool { return s.off >= s.size }

// bytes returns the bytes of the frames not acknowledged.
func (s *spool) bytes() int64 { return s.size - s.off }

var errFull = errors.New("spool full")

// add appends a frame, or returns errFull.
func (s *spool) add(subject, id string, data []byte) error {
	n := int64(4 + len(subject) + 1 + len(id) + 1 + len(data))
	if s.size-s.off+n > s.max {
		return errFull
	}
	var hdr [4]byte
	binary.LittleEndian.PutUint32(hdr[:], uint32(n-4))
	s.w.Write(hdr[:])
	s.w.WriteString(subject)
	s.w.WriteByte(0)
	s.w.WriteString(id)
	s.w.WriteByte(0)
	if _, err := s.w.Write(data); err != nil {
		return err
	}
	s.size += n
	return nil
}

// flush writes the buffered frames to the file.
func (s *spool) flush() error { return s.w.Flush() }

// read returns up to max frames from the first not acknowledged, and the
// offset after them.
func (s *spool) read(max int) ([]frame, int64, error) {
	if err := s.flush(); err != nil {
		return nil, 0, err
	}
	r := bufio.NewReaderSize(io.NewSectionReader(s.f, s.off, s.size-s.off), 1<<16)
	var fs []frame
	off := s.off
	for len(fs) < max && off < s.size {
		var hdr [4]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return nil, 0, fmt.Errorf("spool at %d: %w", off, err)
		}
		b := make([]byte, binary.LittleEndian.Uint32(hdr[:]))
		if _, err := io.ReadFull(r, b); err != nil {
			return nil, 0, fmt.Errorf("spool at %d: %w", off, err)
		}
		i := indexByte(b, 0)
		j := i + 1 + indexByte(b[i+1:], 0)
		if i < 0 || j <= i {
			return nil, 0, fmt.Errorf("spool at %d: damaged frame", off)
		}
		fs = append(fs, frame{subject: string(b[:i]), id: string(b[i+1 : j]), data: b[j+1:]})
		off += int64(4 + len(b))
	}
	return fs, off, nil
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

// ack marks the frames before off acknowledged; an empty spool is
// truncated.
func (s *spool) ack(off int64) error {
	s.off = off
	if s.off >= s.size {
		if err := s.flush(); err != nil {
			return err
		}
		if err := s.f.Truncate(0); err != nil {
			return err
		}
		if _, err := s.f.Seek(0, io.SeekStart); err != nil {
			return err
		}
		s.off, s.size = 0, 0
	}
	return os.WriteFile(filepath.Join(s.dir, "spool.off"), strconv.AppendInt(nil, s.off, 10), 0o644)
}

func (s *spool) close() error {
	err := s.flush()
	if serr := s.f.Sync(); err == nil {
		err = serr
	}
	if cerr := s.f.Close(); err == nil {
		err = cerr
	}
	return err
}
