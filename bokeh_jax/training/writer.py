"""Training logs of process 0: `metrics.jsonl`, TensorBoard scalars and images, a progress bar."""

import json
import os

from absl import logging
import numpy as np


class Logger:
    """Metrics JSONL, TensorBoard scalars/images and a progress bar; silent on processes > 0."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
            try:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))
            except ImportError:
                logging.warning('tensorboardX is not installed: no TensorBoard logs')

    def scalars(self, global_step: int, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({'global_step': global_step, **record}) + '\n')
        self.jsonl.flush()
        if self.writer:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ('level', 'step'):
                    self.writer.add_scalar(f'level{record.get("level", "")}/{key}', value,
                                           global_step)

    def images(self, global_step: int, level: int, images: dict[str, np.ndarray]) -> None:
        if self.enabled and self.writer:
            for name, image in images.items():
                self.writer.add_image(f'level{level}/{name}', np.clip(image, 0, 1), global_step,
                                      dataformats='HWC')

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer:
                self.writer.close()


def progress(level: int | str, start: int, total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc=f'level {level}', disable=not enabled,
                dynamic_ncols=True, mininterval=1.0)

