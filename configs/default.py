"""The paper's recipe (Ignatov et al., CVPR-W 2020; ../shared/SPEC.md "Training recipe") as data.

Every number of the recipe is a field here; variants derive from this file. Pick a variant with
`--config=configs/default.py:ARG` and override any field with `--config.a.b=value`, e.g.
`--config.train.level3.steps=100` or `--config.model.channels=16`.

Variants (ARG): none = the paper on EBB!; `tiny` = a seconds-long smoke run on the synthetic set.
"""

import ml_collections

# Paper levels, coarsest first: level 7 is 1/32 of the input resolution, level 1 the full photo.
PAPER_LEVEL_ORDER = (7, 6, 5, 4, 3, 2, 1)
# Iterations and batch sizes per level on one 16 GB V100 (SPEC "Training recipe").
PAPER_STEPS = {7: 5_000, 6: 5_000, 5: 20_000, 4: 20_000, 3: 30_000, 2: 80_000, 1: 100_000}
PAPER_BATCH = {7: 50, 6: 50, 5: 40, 4: 14, 3: 9, 2: 9, 1: 5}


def level_config(level: int, steps: int, batch_size: int) -> ml_collections.ConfigDict:
    """Hyper-parameters of one pyramid level."""
    fine = level == 1
    return ml_collections.ConfigDict(
        {
            'steps': steps,
            'batch_size': batch_size,  # global, split over all devices of all processes
            'learning_rate': 5e-5,  # Adam, constant
            # Loss = mae * MAE + vgg * VGG19-relu5_4 MSE + ssim * (1 - SSIM), on the unclipped output.
            'loss': {
                'mae': 10.0 if fine else 100.0,
                'vgg': 0.1 if fine else 0.0,
                'ssim': 10.0 if fine else 0.0,
            },
        }
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.channels = 32  # base width; the paper's model is 32
    config.model.dtype = 'float32'  # computation dtype; parameters are always float32

    config.data = ml_collections.ConfigDict()
    config.data.name = 'ebb'  # TFDS builder: 'ebb' (manual download) or 'synthetic_bokeh'
    config.data.builder_config = 'rgbd'  # 'rgbd' (photo + depth, the paper) or 'rgb' (no depth)
    config.data.data_dir = ''  # TFDS data dir; '' = TFDS default (~/tensorflow_datasets)
    config.data.manual_dir = ''  # where the EBB! download lives (only needed to build 'ebb')
    config.data.train_split = 'train'
    config.data.eval_split = 'val294'
    config.data.crop_size = 512  # side of the half-resolution input patch; target patch is 2x
    config.data.num_workers = 2  # grain worker processes for decoding/cropping (0 = in-process)
    config.data.prefetch = 2  # batches prepared ahead of the train step

    config.train = ml_collections.ConfigDict()
    config.train.order = PAPER_LEVEL_ORDER  # levels trained one after another
    for level in PAPER_LEVEL_ORDER:
        config.train[f'level{level}'] = level_config(level, PAPER_STEPS[level], PAPER_BATCH[level])
    config.train.adam_b1 = 0.9
    config.train.adam_b2 = 0.999
    config.train.adam_eps = 1e-8
    config.train.trainable = (
        'path'  # 'path': all of the level's output path (paper); 'level': its own group only
    )
    config.train.fresh_optimizer_per_level = True  # the paper restarts Adam at every level
    config.train.vgg_weights = (
        ''  # imagenet-vgg-verydeep-19.mat or .npz; needed when a loss.vgg > 0
    )
    config.train.log_every = 100
    config.train.checkpoint_every = 1000
    config.train.eval_every = 0  # 0 = evaluate at the end of each level only
    config.train.image_every = 1000  # TensorBoard image summaries
    config.train.distributed = 'auto'  # 'auto' (on a TPU VM/cluster env), 'yes', 'no'

    config.eval = ml_collections.ConfigDict()
    config.eval.protocol = 'pynet'  # 'pynet' (cut a 32-pixel border, as the original) or 'full'
    config.eval.batch_size = 1  # per device; whole images
    config.eval.lpips_weights = ''  # .npz with LPIPS weights; '' = LPIPS not reported
    config.eval.max_images = 0  # 0 = the whole split

    config.render = ml_collections.ConfigDict()
    config.render.max_tile = 1024  # tile side (input pixels) for the fine levels 1-3; 0 = untiled
    config.render.pad_mode = (
        'reflect'  # pad to a multiple of 32 ('reflect'), or 'crop' as the original
    )

    if arg:
        for variant in arg.split(','):
            if variant not in VARIANTS:
                raise ValueError(
                    f'Unknown config variant {variant!r}; expected one of {sorted(VARIANTS)}'
                )
            VARIANTS[variant](config)
    return config


def _tiny(config: ml_collections.ConfigDict) -> None:
    """A smoke run: tiny width, small crops, a handful of steps per level, synthetic data."""
    config.model.channels = 4
    config.data.name = 'synthetic_bokeh'
    config.data.crop_size = 64
    config.data.num_workers = 0
    for level in PAPER_LEVEL_ORDER:
        cfg = config.train[f'level{level}']
        cfg.steps = 2
        cfg.batch_size = 2
        cfg.loss.vgg = 0.0
    config.train.log_every = 1
    config.train.checkpoint_every = 1
    config.train.image_every = 0
    config.eval.max_images = 4
    config.render.max_tile = 256


VARIANTS = {'tiny': _tiny}
