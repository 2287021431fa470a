"""Speed of the MegaDepth forward pass in JAX against the same network in PyTorch (CPU).

  python -m bokeh_jax.depth_bench [--size=384x512] [--batch=1] [--repeats=10]

Both run the seed-0 weights of tests/data/megadepth_reference (or WORKDIR's imported weights
with --workdir). PyTorch is an optional peer, not a dependency: without it only JAX is timed.
The two are called alternately (JAX, PyTorch, JAX, ...) so that both see the same machine load;
the figure is the median of the per-pair ratios JAX / PyTorch (< 1: JAX is faster). Before
timing, the PyTorch output is checked against JAX's (max |log depth difference|).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bokeh_jax import megadepth


def torch_forward(state_dict: dict[str, np.ndarray]):
    """The PyTorch network as a function of an NHWC numpy batch -> log depth NHWC (or None
    when torch is not importable). Written from the same layout, with torch's own ops."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    sd = {k.removeprefix(megadepth.DATA_PARALLEL_PREFIX): torch.from_numpy(np.asarray(v))
          for k, v in state_dict.items()}

    def conv(x, path):
        w = sd[f'{path}.weight']
        return F.conv2d(x, w, sd[f'{path}.bias'], padding=w.shape[-1] // 2)

    def bn(x, path):
        return F.batch_norm(x, sd[f'{path}.running_mean'], sd[f'{path}.running_var'],
                            sd.get(f'{path}.weight'), sd.get(f'{path}.bias'), False, 0.0,
                            megadepth.BN_EPSILON)

    def inception(x, path, letter):
        outs = [F.relu(bn(conv(x, f'{path}.0.0'), f'{path}.0.1'))]
        for j in range(1, 4):
            y = F.relu(bn(conv(x, f'{path}.{j}.0'), f'{path}.{j}.1'))
            outs.append(F.relu(bn(conv(y, f'{path}.{j}.3'), f'{path}.{j}.4')))
        return torch.cat(outs, 1)

    def hourglass(x, path, level):
        total = 0
        for b, items in enumerate(level):
            y = x
            for i, item in enumerate(items):
                if item == 'max':
                    y = F.max_pool2d(y, 2)
                elif item == 'avg':
                    y = F.avg_pool2d(y, 2)
                elif item == 'up':
                    y = F.interpolate(y, scale_factor=2, mode='nearest')
                elif isinstance(item, tuple):
                    y = hourglass(y, f'{path}.0.{b}.{i}', item)
                else:
                    y = inception(y, f'{path}.0.{b}.{i}', item)
            total = total + y
        return total

    @torch.no_grad()
    def forward(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        t = F.relu(bn(conv(t, '0'), '1'))
        t = conv(hourglass(t, '3', megadepth.H1), '4')
        return t.numpy().transpose(0, 2, 3, 1)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', default='384x512', help='input HxW (multiples of 16)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=10, help='timed calls of each')
    parser.add_argument('--workdir', default='', help='use the weights imported there')
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.lower().split('x'))

    if args.workdir:
        params, _ = megadepth.load_params(args.workdir)
        state_dict = megadepth.state_dict_from_params(params)
    else:
        state_dict = megadepth.seeded_state_dict(0, num_batches_tracked=False)
        params = megadepth.params_from_state_dict(state_dict)
    folded = jax.device_put(megadepth.fold_batch_norm(params))
    net = megadepth.MegaDepth(folded=True)
    jax_fn = jax.jit(lambda p, x: net.apply({'params': p}, x))
    x = np.random.default_rng(1).random((args.batch, h, w, 3), dtype=np.float32)

    def run_jax():
        return np.asarray(jax_fn(folded, x))

    start = time.perf_counter()
    y_jax = run_jax()
    print(f'JAX ({jax.default_backend()}): first call (compile + run) '
          f'{time.perf_counter() - start:.1f} s')
    torch_fn = torch_forward(state_dict)
    if torch_fn is None:
        print('PyTorch is not importable: timing JAX only')
    else:
        import torch

        y_torch = torch_fn(x)
        print(f'PyTorch {torch.__version__} ({torch.get_num_threads()} threads): max |log depth '
              f'JAX - PyTorch| = {np.abs(y_jax - y_torch).max():.2e}')
    times_jax, times_torch = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run_jax()
        times_jax.append(time.perf_counter() - start)
        if torch_fn is not None:
            start = time.perf_counter()
            torch_fn(x)
            times_torch.append(time.perf_counter() - start)
    n = args.batch
    print(f'MegaDepth forward, batch {n} x {h}x{w}, median of {args.repeats}:')
    print(f'  JAX      {statistics.median(times_jax):7.3f} s  '
          f'({n / statistics.median(times_jax):.2f} images/s)')
    if times_torch:
        ratios = [a / b for a, b in zip(times_jax, times_torch)]
        print(f'  PyTorch  {statistics.median(times_torch):7.3f} s  '
              f'({n / statistics.median(times_torch):.2f} images/s)')
        print(f'  JAX / PyTorch time: median ratio {statistics.median(ratios):.2f}x')


if __name__ == '__main__':
    main()
