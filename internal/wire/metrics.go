package wire

import "github.com/prometheus/client_golang/prometheus"

// fleetMetrics are the fleet's state and counts (docs/metrics.md).
func fleetMetrics(g *Graph) []prometheus.Collector {
	inv, slots, f := g.FleetInvalidator, g.Slots, g.Fleet
	counter := func(name, help string, v func() int64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 { return float64(v()) })
	}
	gauge := func(name, help string, v func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, v)
	}
	return []prometheus.Collector{
		gauge("cacheproxy_redis_up", "1 while the last Redis call succeeded, the fleet's state in Redis reads right and this replica hears the fleet's invalidations, else 0.",
			func() float64 { return b2f(g.RedisUp()) }),
		counter("cacheproxy_fleet_invalidations_sent_total", "Invalidations this replica sent to the fleet.", func() int64 { return inv.Stats().Sent }),
		counter("cacheproxy_fleet_invalidations_received_total", "Other replicas' invalidations applied here.", func() int64 { return inv.Stats().Received }),
		counter("cacheproxy_fleet_invalidations_acked_total", "Acknowledgements this replica's invalidations got.", func() int64 { return inv.Stats().Acked }),
		counter("cacheproxy_fleet_invalidations_unacked_total", "Replicas that did not acknowledge within redis.invalidation_wait.", func() int64 { return inv.Stats().Unacked }),
		gauge("cacheproxy_fleet_replicas", "Replicas seen in the last five seconds.", func() float64 { return float64(slots.Replicas()) }),
		counter("cacheproxy_fleet_budget_waits_total", "Upstream calls that waited for a slot of their account's fleet-wide cap.", func() int64 { return slots.Stats().Waited }),
		counter("cacheproxy_fleet_budget_handed_total", "Fleet slots a release handed to this replica's waiting calls (no call polls).", func() int64 { return slots.Stats().Handed }),
		gauge("cacheproxy_fleet_trusted", "1 while this replica trusts its L1: it hears the fleet's invalidations and every writer counts it (also /readyz).",
			func() float64 { return b2f(inv.Trusted()) }),
		gauge("cacheproxy_fleet_invalidations_unsent", "Invalidations applied here that Redis has not taken yet (retried; 1 for 'everything' once over 1024).",
			func() float64 { return float64(inv.Unsent()) }),
		counter("cacheproxy_fleet_writes_refused_total", "Writes refused with a 503 before anything was sent upstream: their intent could not be recorded in Redis within ratelimit.max_wait.", func() int64 { return inv.Stats().Refused }),
		counter("cacheproxy_fleet_intents_lifted_total", "Writes whose completion never came here: this replica raised their marks once their hold had passed.", func() int64 { return inv.Stats().Lifted }),
		counter("cacheproxy_fleet_invalidations_unopened_total", "Invalidations this replica could not open (another cache.key_secret): each dropped its whole L1.", func() int64 { return inv.Stats().Unopened }),
		counter("cacheproxy_fleet_stream_lapses_total", "Times this replica's invalidation stream fell more than redis.invalidation_wait behind (its own heartbeat came back late): each dropped its whole L1.", func() int64 { return inv.Stats().Lapses }),
		counter("cacheproxy_fleet_state_errors_total", "Reads of the fleet's epoch, floor or marks in Redis that were not valid numbers (garbage).", f.CorruptReads),
		counter("cacheproxy_fleet_rewinds_total", "Times this replica found Redis's epoch lower than one it had seen (a restart from older data, a failover) and raised the floor.", f.Rewinds),
		counter("cacheproxy_fleet_budget_slots_regiven_total", "Fleet slots given back late: their release, or a take that timed out after Redis may have run it, failed and was retried.", func() int64 { return slots.Stats().Regiven }),
		counter("cacheproxy_fleet_budget_fallbacks_total", "Upstream calls made on this replica's share of the cap because Redis could not be asked.", func() int64 { return slots.Stats().Fallbacks }),
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
