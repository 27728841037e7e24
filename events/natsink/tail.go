package natsink

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TailConfig configures Tail.
type TailConfig struct {
	URL     string
	Durable string // the durable consumer's name: a restarted tail resumes after what it acknowledged
	Subject string // filter subject; "": every subject of the stream
	Max     int    // stop after this many matches; 0: until ctx ends
}

// Tail writes the stream's matches, as JSON lines, to w as they come,
// acknowledging each once written, until ctx ends (nil error) or Max were
// written. It waits for the server and the stream to exist.
func Tail(ctx context.Context, cfg TailConfig, w io.Writer) (int, error) {
	if cfg.Subject == "" {
		cfg.Subject = SubjectPrefix + ".>"
	}
	nc, err := nats.Connect(cfg.URL, nats.RetryOnFailedConnect(true), nats.MaxReconnects(-1),
		nats.ReconnectWait(100*time.Millisecond), nats.Name("vasengine tail"))
	if err != nil {
		return 0, err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return 0, err
	}
	var cons jetstream.Consumer
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		cons, err = js.CreateOrUpdateConsumer(cctx, Stream, jetstream.ConsumerConfig{Durable: cfg.Durable,
			FilterSubject: cfg.Subject, AckPolicy: jetstream.AckExplicitPolicy, DeliverPolicy: jetstream.DeliverAllPolicy})
		cancel()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return 0, nil
		}
		if !errors.Is(err, jetstream.ErrStreamNotFound) && !errors.Is(err, context.DeadlineExceeded) &&
			!errors.Is(err, nats.ErrNoResponders) && !errors.Is(err, nats.ErrTimeout) {
			return 0, fmt.Errorf("consumer %s: %w", cfg.Durable, err)
		}
		select { // the server or the stream is not there yet
		case <-ctx.Done():
			return 0, nil
		case <-time.After(200 * time.Millisecond):
		}
	}
	it, err := cons.Messages()
	if err != nil {
		return 0, err
	}
	defer it.Stop()
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	n := 0
	for cfg.Max == 0 || n < cfg.Max {
		m, err := it.Next()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				return n, nil
			}
			return n, err
		}
		if _, err := w.Write(append(m.Data(), '\n')); err != nil {
			return n, err
		}
		if err := m.Ack(); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}
