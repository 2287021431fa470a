"""A benchmark peer in a process of its own: `python -m bokeh_jax.bench.peer_worker NAME DTYPE NPZ`.

Reads the parameters (a flat {'a/b/c': array} .npz, `peers.flatten`), builds an `InProcessPeer`,
then answers one JSON command per line on stdin with one JSON line on stdout:
  {'op': 'prepare', 'key', 'kind', 'level', 'inputs': path.npz} -> {}
  {'op': 'time', 'key'} -> {'seconds': one call, from the call to its result being ready}
  {'op': 'output', 'key', 'path'} -> {} (one call's result saved to path as .npy)
  {'op': 'breakdown', 'key'} -> {'parts': {part: seconds}, 'wall_s', 'running'} (one call, TF's
  profiler; see breakdown.tf_parts)
  {'op': 'version'} -> {'version'};  {'op': 'quit'} -> {} and exit.
Errors come back as {'error': message}. The framework's own printing goes to stderr: stdout is the
protocol's.
"""

import json
import os
import sys
import time
import traceback


def main(argv: list[str]) -> int:
    name, dtype, weights = argv[1:4]
    # The protocol gets the real stdout; anything else printing to fd 1 lands on stderr.
    protocol = os.fdopen(os.dup(1), 'w', buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import numpy as np
    from flax import traverse_util

    from bokeh_jax.bench import peers

    with np.load(weights) as f:
        params = traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep='/')
    peer = peers.InProcessPeer(name, params, dtype)

    for line in sys.stdin:
        command = json.loads(line)
        op = command['op']
        try:
            if op == 'prepare':
                with np.load(command['inputs']) as f:
                    inputs = {k: f[k] for k in f.files}
                peer.prepare(command['key'], command['kind'], int(command['level']), inputs)
                reply = {}
            elif op == 'time':
                start = time.perf_counter()
                peer.call(command['key'])
                reply = {'seconds': time.perf_counter() - start}
            elif op == 'output':
                np.save(command['path'], peer.output(command['key']))
                reply = {}
            elif op == 'breakdown':
                parts, wall, busy = peer.breakdown(command['key'])
                reply = {'parts': parts, 'wall_s': wall, 'running': busy}
            elif op == 'version':
                reply = {'version': peer.version()}
            elif op == 'quit':
                protocol.write('{}\n')
                return 0
            else:
                reply = {'error': f'unknown op {op!r}'}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
            traceback.print_exc()
            reply = {'error': f'{type(e).__name__}: {e}'}
        protocol.write(json.dumps(reply) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
