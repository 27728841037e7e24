// Command vasengine runs the sharded page-table monitor on a host: on
// simulated guests (the default), real KVM guests, real Linux guests under
// QEMU, or a recorded trace; it plans capacity from measurements and records
// and replays event traces. Run "vasengine help" for the commands.
//
// Exit status: 0 when the command did its work (a run stopped by SIGINT,
// SIGTERM or its -duration included, once everything was drained and
// written), 1 when the work failed or was left undone (an output that could
// not be written, a backend error, a stop that had to abandon work to end
// within one second), 2 for a usage error (a bad flag, an impossible
// configuration, an unreadable input), found before anything runs.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
)

const usage = `usage: vasengine <command> [flags]

commands:
  run      monitor guests (default backend: the simulator) and print a summary
  record   like run, and write every event to a trace file (-o FILE)
  replay   replay a trace file into the engine (vasengine replay [flags] FILE|-)
  tail     print the fleet's events from NATS JetStream as JSON lines (-nats URL)
  plan     how many VMs this host can monitor within a latency budget
  version  the program's version, revision and Go version
  help     this text; "vasengine <command> -h" lists a command's flags

exit status: 0 done (also when stopped by SIGINT, SIGTERM or -duration),
1 the work failed or was left undone, 2 usage error
`

func main() {
	os.Exit(Main(os.Args[1:], os.Stdout, os.Stderr))
}

// Main runs the command line args and returns the exit status: 0 on
// success, 1 when the work failed, 2 for a usage error.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	out := &errWriter{w: stdout}
	var err error
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "run":
		err = cmdRun(rest, out, stderr, false)
	case "record":
		err = cmdRun(rest, out, stderr, true)
	case "replay":
		err = cmdReplay(rest, out, stderr)
	case "plan":
		err = cmdPlan(rest, out, stderr)
	case "tail":
		err = cmdTail(rest, out, stderr)
	case "version", "-version", "--version":
		fmt.Fprintln(out, versionString())
	case "help", "-h", "-help", "--help":
		fmt.Fprint(out, usage)
	default:
		fmt.Fprintf(stderr, "vasengine: unknown command %q\nrun 'vasengine help' for the commands\n", cmd)
		return 2
	}
	if errors.Is(err, errHelp) {
		err = nil
	}
	if err == nil && out.err != nil {
		err = fmt.Errorf("writing the output: %w", out.err)
	}
	if err == nil {
		return 0
	}
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(stderr, "vasengine: %s\nrun 'vasengine %s -h' for usage\n", oneLine(ue.msg), cmd)
		return 2
	}
	fmt.Fprintf(stderr, "vasengine: %s\n", oneLine(err.Error()))
	return 1
}

// oneLine joins the lines of a message (errors.Join separates with new
// lines): an error is one line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", "; ")), " ")
}

// usageError is a bad flag or an impossible configuration.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

// errHelp: -h was given; the flags were printed.
var errHelp = errors.New("help")

// parse parses a command's flags. Errors are one line (the flag package's
// usage dump is not printed); -h prints the flags to stdout.
func parse(fs *flag.FlagSet, args []string, stdout io.Writer) error {
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fs.SetOutput(stdout)
		fmt.Fprintf(stdout, "usage of vasengine %s:\n", fs.Name())
		fs.PrintDefaults()
		return errHelp
	}
	if err != nil {
		return usagef("%v", err)
	}
	return nil
}

// buildRevision and buildTime are set by `make build` (-ldflags -X) for
// builds without VCS stamping (GOFLAGS=-buildvcs=false, a copy without
// .git): debug.ReadBuildInfo's vcs.* settings are preferred when present.
var buildRevision, buildTime string

// buildInfo is what the binary knows of its build.
type buildInfo struct {
	Version  string `json:"version"`            // the module version, "(devel)" for a build in the repository
	Revision string `json:"revision,omitempty"` // VCS revision
	Time     string `json:"time,omitempty"`     // VCS commit time
	Modified bool   `json:"modified,omitempty"` // built with uncommitted changes
	Go       string `json:"go"`
}

func readBuildInfo() buildInfo {
	b := buildInfo{Version: "unknown", Go: runtime.Version()}
	if r, dirty := strings.CutSuffix(buildRevision, "-dirty"); r != "" {
		b.Revision, b.Modified, b.Time = r, dirty, buildTime
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return b
	}
	b.Version, b.Go = bi.Main.Version, bi.GoVersion
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			b.Revision = s.Value
		case "vcs.time":
			b.Time = s.Value
		case "vcs.modified":
			b.Modified = s.Value == "true"
		}
	}
	return b
}

func versionString() string {
	b := readBuildInfo()
	s := "vasengine " + b.Version
	if b.Revision == "" {
		s += " (revision unknown: built without VCS stamping; `make build` stamps it)"
	} else {
		s += " revision " + b.Revision
		if b.Modified {
			s += " (modified)"
		}
		if b.Time != "" {
			s += " of " + b.Time
		}
	}
	return s + ", " + b.Go + " " + runtime.GOOS + "/" + runtime.GOARCH
}
