"""The benchmark's parts, one concern a module: the decode engine (decode), sibling projections as one matmul
(fusion), latency and the bandwidth floor (latency), the measurement a process of its own makes (worker), the
launcher that runs it (launcher), the zygote that forks it on a host without CUDA (zygote) and the standby that
starts its interpreter before it is needed on a host with CUDA (standby). Memory is sampled
by quantgate.measure."""
