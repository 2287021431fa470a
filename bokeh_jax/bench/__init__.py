"""Benchmarks of bokeh_jax (`launch.py --mode=bench`): the harness and its peers.

`harness` times the forward pass, train steps and rendering of PyNET in JAX; `tf_peer` (CPU) and
`torch_peer` (GPU) define the same network in TensorFlow and PyTorch, wired by `structure`, to run
beside it. Peers are benchmark code, not library code: each imports its framework, and only the
harness imports them, when that framework is installed.
"""
