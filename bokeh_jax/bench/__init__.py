"""Benchmarks of bokeh_jax (`launch.py --mode=bench`), one module per job.

`harness` runs what `config.bench` asks for (`run(config, workdir)`); `suite` holds the benchmarks,
`programs` the JAX programs they time, `timing` the timing primitives, `report` the tables and
JSON, `breakdown` the per-part profile of a train step. `peers` drives the same network in other
frameworks, `tf_peer` (CPU) and `torch_peer` (GPU), wired by `structure`, each in a worker process
(`peer_worker`). Peers are benchmark code, not library code: each imports its framework, and only
its worker (or an in-process peer) imports it, when that framework is installed.
"""
