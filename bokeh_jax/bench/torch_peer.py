"""The GPU benchmark peer: PyNET in PyTorch (channels-last, optional bfloat16 autocast).

The same layers as bokeh_jax's PyNET through `torch.nn.functional`, wired by `structure`. Weights
come from a bokeh_jax parameter tree: conv kernels [k, k, in, out] become [out, in, k, k]; the
transposed convs' TF kernels [3, 3, out, in] become [in, out, 3, 3]. TF's 'SAME' transposed conv
pads the dilated input by (2, 1); PyTorch's padding=1, output_padding=1 would pad (1, 2), so the
full (2H + 1) output is computed and its last row and column dropped instead. The train step is
100 * MAE at one level plus `torch.optim.Adam` (fused on CUDA) over the level's output path.

A benchmark peer, not library code: torch is not a bokeh_jax dependency; only the benchmark harness
imports this module, when torch is installed.
"""

import contextlib
from typing import Any, Callable, Sequence

import jax
import numpy as np
import torch
import torch.nn.functional as F

from bokeh_jax import model as model_lib
from bokeh_jax.bench import structure


def _leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class TorchPyNET(structure.Ops):
    """PyNET forward pass and train step in PyTorch, on weights copied from a bokeh_jax tree.

    Args:
      params: a full bokeh_jax PyNET parameter tree (float32).
      device: torch device; default CUDA when available, else CPU.
      dtype: 'float32', or 'bfloat16' for bfloat16 autocast (parameters stay float32).
    """

    def __init__(self, params: Any, device: str | None = None, dtype: str = 'float32'):
        if dtype not in ('float32', 'bfloat16'):
            raise ValueError(f"TorchPyNET dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        self.device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        self.dtype = dtype
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        self._paths = [tuple(k.key for k in path) for path, _ in flat]
        self._params = {}
        for path, (_, value) in zip(self._paths, flat):
            value = np.asarray(value, np.float32)
            if path[-1] == 'kernel':
                # conv [k, k, in, out] -> [out, in, k, k];
                # transposed [3, 3, out, in] -> [in, out, 3, 3]
                value = value.transpose(3, 2, 0, 1)
            tensor = torch.tensor(np.ascontiguousarray(value), device=self.device)
            if value.ndim == 4:
                tensor = tensor.contiguous(memory_format=torch.channels_last)
            self._params['/'.join(path)] = tensor.requires_grad_(True)

    def _p(self, *path: str) -> torch.Tensor:
        return self._params['/'.join(path)]

    # ---- structure.Ops: SPEC "Primitives", NCHW logical layout ----
    def space_to_depth(self, x):
        # Channel order (dy*2 + dx)*C + c, as TF's space_to_depth (pixel_unshuffle orders c first).
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
        return x.reshape(n, 4 * c, h // 2, w // 2).contiguous(memory_format=torch.channels_last)

    def max_pool(self, x):
        return F.max_pool2d(x, 2, 2)

    def concat(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(xs), 1)

    def _conv(self, x, path, instance_norm: bool):
        kernel = self._p(*path, 'conv', 'kernel')
        x = F.conv2d(x, kernel, self._p(*path, 'conv', 'bias'), padding=kernel.shape[-1] // 2)
        if instance_norm:
            scale, shift = self._p(*path, 'norm', 'scale'), self._p(*path, 'norm', 'bias')
            x = F.instance_norm(x, weight=scale, bias=shift, eps=1e-3)
        return _leaky_relu(x)

    def multi_block(self, x, path, kmax, instance_norm):
        outputs = []
        for k in range(3, kmax + 1, 2):
            y = self._conv(x, (*path, f'k{k}a'), instance_norm)
            outputs.append(self._conv(y, (*path, f'k{k}b'), instance_norm))
        return torch.cat(outputs, 1)

    def up(self, x, path):
        h, w = x.shape[-2:]
        y = F.conv_transpose2d(x, self._p(*path, 'conv', 'kernel'), stride=2)
        return _leaky_relu(y[:, :, : 2 * h, : 2 * w])

    def conv3x3(self, x, path):
        kernel, bias = self._p(*path, 'conv', 'kernel'), self._p(*path, 'conv', 'bias')
        return F.conv2d(x, kernel, bias, padding=1)

    # ---- the model ----
    def _autocast(self):
        if self.dtype == 'bfloat16':
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def outputs(self, x: torch.Tensor, level: int) -> dict[int, torch.Tensor]:
        """Images of levels 7..`level`, float32 NCHW; x is float32 [N, C, H, W] (NCHW)."""
        with self._autocast():
            logits = structure.pynet_logits(self, x, level)
        return {k: torch.tanh(z.float()) * 0.58 + 0.5 for k, z in logits.items()}

    def to_input(self, x: Any) -> torch.Tensor:
        """NHWC numpy -> NCHW channels-last tensor on the peer's device."""
        x = torch.tensor(np.asarray(x, np.float32), device=self.device).permute(0, 3, 1, 2)
        return x.contiguous(memory_format=torch.channels_last)

    def trainable(self, level: int) -> list[torch.Tensor]:
        on_path = [p for p in self._paths if model_lib.on_output_path(p, level)]
        return [self._params['/'.join(p)] for p in on_path]

    # ---- benchmark entry points ----
    def forward_fn(self, level: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
        """Forward pass without autograd: x from `to_input` -> the image of `level` (NCHW)."""

        @torch.inference_mode()
        def forward(x):
            return self.outputs(x, level)[level]

        return forward

    def train_step_fn(self, level: int, learning_rate: float = 5e-5) -> Callable:
        """Train step: (x, target NCHW) -> 100 * MAE (before the update), Adam over the path."""
        params = self.trainable(level)
        fused = self.device.type == 'cuda'
        optimizer = torch.optim.Adam(
            params, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=fused
        )

        def train_step(x, target):
            optimizer.zero_grad(set_to_none=True)
            loss = 100.0 * torch.mean(torch.abs(self.outputs(x, level)[level] - target))
            loss.backward()
            optimizer.step()
            return loss.detach()

        return train_step

    def sync(self, _: Any = None) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)


def version() -> str:
    cuda = torch.version.cuda or 'none'
    return f'torch {torch.__version__} (cuda {cuda})'
