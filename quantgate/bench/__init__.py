"""The benchmark's parts, one concern a module: the decode engine (decode), sibling projections as one matmul
(fusion), latency and the bandwidth floor (latency), the measurement a process of its own makes (worker), the
launcher that runs it (launcher) and the zygote that forks it on a host without CUDA (zygote). Memory is sampled
by quantgate.measure."""
