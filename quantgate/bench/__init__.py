"""The benchmark's parts, one concern a module: the decode engine (decode), sibling projections as one matmul
(fusion), latency and the bandwidth floor (latency), the measurement a fresh process makes (worker) and the
launcher that runs it (launcher). Memory is sampled by quantgate.measure."""
