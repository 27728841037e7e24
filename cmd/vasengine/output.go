package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// outFile is one output file of a command (a trace, a profile, the final
// metrics, a plot). A regular file is written under a temporary name in the
// folder of its final name (".NAME.*.tmp") and moved into place by Commit,
// after its data reached the disk (fsync), so a run that crashes or is
// killed never leaves a partial file under the final name. A path that
// exists and is not a regular file (a device such as /dev/null or
// /dev/full, a named pipe) is written in place. Every write, sync, close
// and rename error is returned by Commit (write errors are sticky: the
// first one is kept).
type outFile struct {
	flag      string // the flag that named it, for messages
	path, tmp string // tmp "" when written in place
	f         *os.File
	noClobber bool
	err       error
	done      bool
}

// checkOutput checks, before anything runs, that path can be an output of
// flag: its folder exists, it is not a folder, it is none of inputs (the
// same file, through a hard link or a symbolic link too), and, with
// noClobber, it is not an existing regular file.
func checkOutput(flag, path string, noClobber bool, inputs ...string) error {
	if path == "" {
		return usagef("%s: empty file name", flag)
	}
	st, err := os.Stat(path)
	switch {
	case err == nil && st.IsDir():
		return usagef("%s %s: is a folder", flag, path)
	case err == nil:
		for _, in := range inputs {
			if in == "" || in == "-" {
				continue
			}
			if ist, ierr := os.Stat(in); ierr == nil && os.SameFile(st, ist) {
				return usagef("%s %s: is the input %s: refusing to overwrite what is being read", flag, path, in)
			}
		}
		if noClobber && st.Mode().IsRegular() {
			return usagef("%s %s: the file exists (give -force to replace it)", flag, path)
		}
		return nil
	case !errors.Is(err, os.ErrNotExist):
		return usagef("%s %s: %v", flag, path, err)
	}
	dir := filepath.Dir(path)
	if dst, err := os.Stat(dir); err != nil || !dst.IsDir() {
		return usagef("%s %s: no folder %s", flag, path, dir)
	}
	return nil
}

// createOutput opens the output path (see outFile). With noClobber, Commit
// fails rather than replace a file that appeared at path meanwhile.
func createOutput(flag, path string, noClobber bool) (*outFile, error) {
	o := &outFile{flag: flag, path: path, noClobber: noClobber}
	if st, err := os.Stat(path); err == nil && !st.Mode().IsRegular() {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", flag, err)
		}
		o.f = f
		return o, nil
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	o.f, o.tmp = f, f.Name()
	return o, nil
}

// Write implements io.Writer; the first error is kept for Commit.
func (o *outFile) Write(p []byte) (int, error) {
	if o.err != nil {
		return 0, o.err
	}
	n, err := o.f.Write(p)
	if err != nil {
		o.err = fmt.Errorf("%s %s: %w", o.flag, o.path, err)
	}
	return n, o.err
}

// Commit syncs and closes the file and moves it into place. After an
// error the temporary file is removed and nothing is left under the final
// name.
func (o *outFile) Commit() error {
	if o.done {
		return o.err
	}
	o.done = true
	err := o.err
	if o.tmp == "" { // a device or a pipe: written in place
		if cerr := o.f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("%s %s: %w", o.flag, o.path, cerr)
		}
		o.err = err
		return err
	}
	if err == nil {
		if serr := o.f.Sync(); serr != nil {
			err = fmt.Errorf("%s %s: %w", o.flag, o.path, serr)
		}
	}
	if cerr := o.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("%s %s: %w", o.flag, o.path, cerr)
	}
	if err != nil {
		os.Remove(o.tmp) // the data is incomplete
		o.err = err
		return err
	}
	if o.noClobber {
		// link fails if the name was taken meanwhile, where rename would
		// replace it; a file system without hard links gets a rename after
		// a check (racy, but only there).
		if lerr := os.Link(o.tmp, o.path); lerr == nil {
			os.Remove(o.tmp)
		} else if os.IsExist(lerr) || fileExists(o.path) {
			err = fmt.Errorf("%s %s: the file appeared meanwhile; the data is kept in %s", o.flag, o.path, o.tmp)
		} else if rerr := os.Rename(o.tmp, o.path); rerr != nil {
			err = fmt.Errorf("%s: %w; the data is kept in %s", o.flag, rerr, o.tmp)
		}
	} else if rerr := os.Rename(o.tmp, o.path); rerr != nil {
		err = fmt.Errorf("%s: %w; the data is kept in %s", o.flag, rerr, o.tmp)
	}
	if err == nil {
		err = syncDir(filepath.Dir(o.path))
	}
	o.err = err
	return err
}

func fileExists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// Abort closes and removes the temporary file.
func (o *outFile) Abort() {
	if o.done {
		return
	}
	o.done = true
	o.f.Close()
	if o.tmp != "" {
		os.Remove(o.tmp)
	}
}

// Name returns the final path.
func (o *outFile) Name() string { return o.path }

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, os.ErrInvalid) {
		return fmt.Errorf("sync of folder %s: %w", dir, err)
	}
	return nil
}

// writeOutput writes data to path through an outFile.
func writeOutput(flag, path string, data []byte) error {
	o, err := createOutput(flag, path, false)
	if err != nil {
		return err
	}
	if _, err := o.Write(data); err != nil {
		o.Abort()
		return err
	}
	return o.Commit()
}

// errWriter remembers the first error of the writer it wraps (stdout: the
// summary must not be lost silently either).
type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) Write(p []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	n, err := e.w.Write(p)
	if err != nil {
		e.err = err
	}
	return n, err
}
