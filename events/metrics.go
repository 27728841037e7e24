package events

import (
	"os"

	"github.com/prometheus/client_golang/prometheus"
)

// Hostname returns the host's name, or "unknown".
func Hostname() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "unknown"
	}
	return h
}

// Register exports the pipeline's metrics on reg. They are read from the
// pipeline's counters when reg is scraped, so they cost the records
// nothing.
func (p *Pipeline) Register(reg prometheus.Registerer) error {
	return reg.Register(collector{p})
}

type collector struct{ p *Pipeline }

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("vasengine_events_"+name, help, labels, nil)
}

var (
	dRecords = desc("records_total", "Change records the pipeline took from the engine's callbacks.")
	dMatched = desc("matched_total", "Records that matched a rule, by rule.", "rule")
	dEmitted = desc("emitted_total", "Matches a sink took (written, published or spooled), by sink and rule.", "sink", "rule")
	dDropped = desc("dropped_total", "Records or matches dropped, by sink and rule (sink \"handoff\", rule \"\": a full lane, before the rules).", "sink", "rule")
	dSpooled = desc("spooled_total", "Matches a sink wrote to its on-disk spool while its destination was unreachable.", "sink")
	dAcked   = desc("acked_total", "Matches a sink's destination acknowledged.", "sink")
	dErrors  = desc("sink_errors_total", "Failed sink writes (their matches are counted dropped).", "sink")
	dLane    = desc("lane_depth", "Records queued in the pipeline's lanes.")
)

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{dRecords, dMatched, dEmitted, dDropped, dSpooled, dAcked, dErrors, dLane} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	p := c.p
	var in uint64
	depth := 0
	matched := make([]uint64, len(p.names))
	for _, l := range p.lanes {
		in += l.in.Load()
		depth += l.ring.Len()
		for i := range l.matched {
			matched[i] += l.matched[i].Load()
		}
	}
	ch <- prometheus.MustNewConstMetric(dRecords, prometheus.CounterValue, float64(in))
	ch <- prometheus.MustNewConstMetric(dLane, prometheus.GaugeValue, float64(depth))
	ch <- prometheus.MustNewConstMetric(dDropped, prometheus.CounterValue, float64(p.handoffDrops.Load()), "handoff", "")
	for i, n := range p.names {
		ch <- prometheus.MustNewConstMetric(dMatched, prometheus.CounterValue, float64(matched[i]), n)
	}
	for _, sr := range p.sinks {
		name := sr.s.Name()
		for i, n := range p.names {
			ch <- prometheus.MustNewConstMetric(dEmitted, prometheus.CounterValue, float64(sr.c.emitted[i].Load()), name, n)
			ch <- prometheus.MustNewConstMetric(dDropped, prometheus.CounterValue, float64(sr.c.dropped[i].Load()), name, n)
		}
		ch <- prometheus.MustNewConstMetric(dSpooled, prometheus.CounterValue, float64(sr.c.spooled.Load()), name)
		ch <- prometheus.MustNewConstMetric(dAcked, prometheus.CounterValue, float64(sr.c.acked.Load()), name)
		ch <- prometheus.MustNewConstMetric(dErrors, prometheus.CounterValue, float64(sr.c.errors.Load()), name)
	}
}
