package main

import (
	"context"
	"flag"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/vasengine/vasengine/events/natsink"
)

// cmdTail reads the fleet's events from NATS JetStream as JSON lines.
func cmdTail(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("tail", flag.ContinueOnError)
	url := fs.String("nats", "", "NATS server URL (required), e.g. nats://127.0.0.1:4222")
	subject := fs.String("subject", "", "subject filter (default vasengine.>; vasengine.HOST.VM.RULE, * and > as wildcards)")
	rule := fs.String("rule", "", "only this rule's events (the subject vasengine.*.*.RULE)")
	durable := fs.String("durable", "vasengine-tail", "durable consumer name: a restarted tail resumes after the last event it printed")
	max := fs.Int("n", 0, "stop after N events (0: until SIGINT or SIGTERM)")
	if err := parse(fs, args, stdout); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("tail: unexpected argument %q", fs.Arg(0))
	}
	if *url == "" {
		return usagef("tail: -nats URL is required")
	}
	if *subject != "" && *rule != "" {
		return usagef("tail: give -subject or -rule, not both")
	}
	if *durable == "" || strings.ContainsAny(*durable, ".*> \t") {
		return usagef("tail: -durable %q: want a name without dots, wildcards or spaces", *durable)
	}
	if *rule != "" {
		*subject = natsink.SubjectPrefix + ".*.*." + *rule
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	_, err := natsink.Tail(ctx, natsink.TailConfig{URL: *url, Durable: *durable, Subject: *subject, Max: *max}, stdout)
	return err
}
