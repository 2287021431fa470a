"""The paper's recipe (Ignatov et al., CVPR-W 2020; ../shared/SPEC.md "Training recipe") as data.

Every number of the recipe is a field here; variants derive from this file. Pick a variant with
`--config=configs/default.py:ARG` and override any field with `--config.a.b=value`, e.g.
`--config.train.level3.steps=100` or `--config.model.channels=16`.

Variants (ARG): none = the paper on EBB!; `demo` = `make demo`, all levels on the synthetic set
in minutes on a CPU; `control` = the demo's recipe for a model conditioned on aperture and focus
(config.model.condition 'aperture_focus'), trained on synthetic pairs at the full stops f/2 to
f/16 whose focal plane is the subject in half the scenes and a random pixel's depth in the others,
with the demo's steps per level (the control maps add two input channels to the first
convolution only, so the same CPU budget, about 13 minutes, stays under 20), and 70 validation
scenes, about 10 per f-number, for the per-f-number metrics; `tiny` = a seconds-long smoke run
for tests. Variants combine left to right: `control,tiny` is a conditioned smoke run.
"""

import ml_collections

from bokeh_jax import control

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
            'learning_rate': 5e-5,  # Adam
            # 'constant' (the paper); 'cosine': a cosine decay to 0 at the level's last step;
            # 'linear_decay': constant, then linear to 0 over the last decay_steps. Each starts
            # with a linear warm-up from 0 over warmup_steps.
            'lr_schedule': 'constant',
            'warmup_steps': 0,
            'decay_steps': 0,
            # Which parameters train: 'path' (the level's output path, the paper) or 'level' (its
            # own group only); '' = config.train.trainable.
            'trainable': '',
            # Loss = mae * MAE + vgg * VGG19-relu5_4 MSE + ssim * (1 - SSIM), on the unclipped
            # output.
            'loss': {
                'mae': 10.0 if fine else 100.0,
                'vgg': 0.1 if fine else 0.0,
                'ssim': 10.0 if fine else 0.0,
            },
            # Data steps (first, last), inclusive, whose batches this level never trains on (level
            # step s trains on the s-th data step outside them); rollbacks add theirs (below).
            'skip_windows': (),
            # A second stage of the level (not in the paper): `steps` more steps (0 = none) with
            # these trainable parameters and learning rate, from fresh Adam state. E.g. a level
            # trained alone ('level') at a high rate, then with its whole path at a low one.
            'finetune': {
                'steps': 0,
                'learning_rate': 5e-5,
                'lr_schedule': 'constant',
                'warmup_steps': 0,
                'decay_steps': 0,
                'trainable': 'path',
            },
        }
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.channels = 32  # base width; the paper's model is 32
    # Initial parameters: 'pynet' (the original release: kernels N(0, 0.01) truncated at 2 std,
    # conv biases 0.01) or 'he' (He's init for leaky ReLU, biases 0; a deviation).
    config.model.init = 'pynet'
    config.model.dtype = 'float32'  # computation dtype; parameters are always float32
    # What runs the multi-blocks' convolutions: 'xla', or 'onednn' (CPU, float32: oneDNN's kernels
    # through jax.ffi, 3-4x faster kernel gradients; needs `make onednn`). Same parameters.
    config.model.conv_impl = 'xla'
    # Aperture / focus control (bokeh_jax/control.py): 'none' (the paper: one fixed look),
    # 'aperture' (the input gains one channel after the photo (+ depth): s = 2/N, N the f-number)
    # or 'aperture_focus' (and the signed defocus map s * (disparity - focus); needs
    # data.builder_config 'rgbd'). 'none' keeps the paper's parameter tree exactly.
    config.model.condition = 'none'
    # How a conditioned model reads the maps (bokeh_jax/conditioning.py): 'input' (extra input
    # channels of the first conv), 'levels' (also, pooled, of every level's first conv) or 'film'
    # (a per-block scale and shift from an MLP on Fourier features of s; the defocus map as an
    # input channel). Ignored when condition is 'none'.
    config.model.condition_method = 'input'
    # False: every level's image is tanh(z)*0.58 + 0.5 of its logits z (the paper). True (a
    # deviation): the model input's RGB resized to the level's size + tanh(z)*0.58, so the
    # network starts at the identity and learns only the change (PyNET.residual). Same
    # parameters; a trained workdir keeps its value.
    config.model.residual = False
    # True (conditioned residual models only): the change is scaled by the aperture s = 2/N
    # (bokeh_jax/residual.py), so that near f/16 the heads change little. Same parameters.
    config.model.residual_gain = False

    config.data = ml_collections.ConfigDict()
    # TFDS builder: 'ebb' (manual download), 'synthetic_bokeh' or 'realbokeh' (manual download;
    # its splits are train, validation, test: set eval_split)
    config.data.name = 'ebb'
    config.data.builder_config = 'rgbd'  # 'rgbd' (photo + depth, the paper) or 'rgb' (no depth)
    config.data.data_dir = ''  # TFDS data dir; '' = TFDS default (~/tensorflow_datasets)
    config.data.manual_dir = ''  # where the EBB! / RealBokeh download lives (to build them)
    config.data.train_split = 'train'
    config.data.eval_split = 'val294'
    config.data.crop_size = 512  # side of the half-resolution input patch; target patch is 2x
    config.data.num_workers = 2  # grain worker processes for decoding/cropping (0 = in-process)
    config.data.prefetch = 2  # batches prepared ahead of the train step
    # Decoded and resized records kept per process (per grain worker), in MiB; 0 = none. Each
    # record is then decoded once instead of at every visit. Batches are bit-identical either way.
    # An EBB! pair takes ~11 MiB, a synthetic one 0.7 MiB.
    config.data.cache_mb = 0
    config.data.depth_dir = ''  # ebb: folder of <id>.png depth maps; '' = <layout>/original_depth
    config.data.skip_bad = False  # ebb: skip (and list) unusable pairs instead of stopping
    # realbokeh, config rgbd: MegaDepth's best_generalization_net_G.pth; the release has no depth,
    # so the builder estimates it (bokeh_jax/depth_maps.py) while building.
    config.data.megadepth_weights = ''
    # synthetic_bokeh: what is generated (scene i of a split is a function of seed, split, i);
    # photo sides must be multiples of 64. A copy on disk made with other values is regenerated.
    config.data.synthetic = ml_collections.ConfigDict(
        {'num_train': 300, 'num_validation': 40, 'height': 256, 'width': 384, 'seed': 0,
         'strength': 0.06,  # blur disc diameter / height per unit of |disparity - focus|
         # objects and ground nearer than the subject: the depth in focus varies per scene
         'foreground': False,
         # f-numbers a scene's is drawn from; the blur at N is control.blur_strength(strength, N)
         # (strength is the blur at f/2). (2.0,) = one fixed look, that of the demo.
         'fnumbers': (2.0,),
         # focal plane: 'subject' (the central subject) or 'random' (the subject in half the
         # scenes, the depth under a random pixel in the others)
         'focus': 'subject'}
    )

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
    # Level 1's two layers at the start of its training: 'random' (the paper) or 'upsample' (set
    # to reproduce level 2's image upsampled; model.upsampling_start).
    config.train.level1_start = 'random'
    config.train.vgg_weights = (
        ''  # imagenet-vgg-verydeep-19.mat or .npz; needed when a loss.vgg > 0
    )
    config.train.log_every = 100
    config.train.checkpoint_every = 1000
    config.train.eval_every = 0  # 0 = evaluate at the end of each level only
    config.train.image_every = 1000  # TensorBoard images of a training batch
    # Height in pixels of one image in the TensorBoard grid of each level's validation (its
    # config.eval.grid_images worst and best held-out images); 0 = no grid.
    config.train.val_grid_tile = 128
    # The eval mode on the finest trained level at the end (files in WORKDIR/eval/); it is also
    # that level's validation record.
    config.train.final_eval = True
    config.train.keep_checkpoints = 3  # resumable checkpoints kept in WORKDIR/checkpoints
    # A workdir whose finest params/level_K start training (fine-tuning); '' = fresh parameters.
    # An unconditioned workdir (e.g. the released PyNET imported by --mode=convert) may start a
    # conditioned config (model.condition): the weights that read the control maps start at zero,
    # so training begins from exactly that model (model.condition_params).
    config.train.init_from = ''
    # A diverged step: a NaN / Inf loss, or (spike_factor > 0) a loss over spike_factor times the
    # median of the last spike_window losses. 'stop' ends the run with an error; 'rollback'
    # restores the last good checkpoint, skips the batches from it to the diverged step
    # (stored in the checkpoints: exact on resuming), multiplies the level's learning rate by
    # rollback_lr_factor for the rest of its stage, and goes on; more than max_rollbacks at one
    # level end the run with an error listing them. Each rollback is logged (metrics.jsonl,
    # TensorBoard levelK/rollback*, console).
    config.train.on_divergence = 'stop'
    config.train.spike_factor = 0.0  # 0 = only non-finite losses count; e.g. 5.0
    config.train.spike_window = 100  # losses in the running median (checked from 10 on)
    config.train.rollback_lr_factor = 1.0  # e.g. 0.5 halves the rate at every rollback
    config.train.max_rollbacks = 3  # per level
    config.train.distributed = 'auto'  # jax.distributed: 'auto' (TPU VM / cluster env), 'yes', 'no'

    # jax.distributed.initialize arguments; empty coordinator = detect from the environment.
    config.dist = ml_collections.ConfigDict()
    config.dist.coordinator_address = ''  # e.g. '10.0.0.1:1234'
    config.dist.num_processes = 1
    config.dist.process_id = 0
    config.dist.cpu_collectives = ''  # 'gloo' for multi-process CPU runs (tests)
    config.dist.initialization_timeout = 300  # seconds
    config.dist.heartbeat_timeout = 100  # seconds

    config.eval = ml_collections.ConfigDict()
    config.eval.protocol = 'pynet'  # 'pynet' (cut a 32-pixel border, as the original) or 'full'
    config.eval.level = 1  # paper level whose output is scored (1 = finest, full resolution)
    config.eval.params_level = 0  # WORKDIR/params/level_K to load; 0 = the finest one saved
    config.eval.lpips_weights = ''  # .npz with LPIPS weights; '' = LPIPS not reported
    config.eval.max_images = 0  # 0 = the whole split
    # Scored like the model: 'identity' (the sharp photo) and 'classical' (thin-lens renderer,
    # about 1-3 s per EBB! photo on a CPU core; needs depth maps).
    config.eval.baselines = ('identity', 'classical')
    config.eval.grid_images = 4  # grid.png shows this many worst and best images (by PSNR)
    config.eval.grid_tile = 256  # height in pixels of one image in grid.png

    # `--mode=render` (bokeh_jax/render.py): full-resolution photos, any size.
    config.render = ml_collections.ConfigDict()
    # Largest side, in model-input (half-resolution) pixels and halo included, of the tiles levels
    # 1-3 run on; bounds their memory. >= 224 (the halo takes 222); 0 = one untiled pass. At 2048 a
    # 24-megapixel photo takes 2 tiles and peaks at about 3.5 GB on CPU (2.4 GB in the global pass).
    config.render.max_tile = 2048
    config.render.pad_mode = (
        'reflect'  # pad to a multiple of 32 ('reflect'), or 'crop' as the original
    )
    # Depth maps are stretched to 0..255 near = bright (the paper's convention); set this for
    # metric depth, where large values are far.
    config.render.depth_far_is_bright = False
    config.render.jpeg_quality = 95  # for .jpg/.jpeg outputs
    # A model conditioned on aperture and focus: put the photo's detail above half resolution (which
    # PyNET never sees) back where the blur disc is under 1-2 px (control.focus_detail). Render,
    # the page, the sweep and eval all apply it; False = the network's output alone.
    config.render.focus_detail = True

    # Depth for photos without a map (`--mode=depth`, `--mode=render` without --depth;
    # bokeh_jax/depth_maps.py), with weights imported by `--mode=import_depth`.
    config.depth = ml_collections.ConfigDict()
    config.depth.model = 'megadepth'  # the network EBB!'s maps came from (the only one so far)
    # Network input HxW (multiples of 16) for landscape photos; portrait photos use it turned
    # (512x384). 384x512 is the MegaDepth demo's, which made EBB!'s maps.
    config.depth.working_size = '384x512'
    # Photos per forward pass in folder mode (photos of one orientation share a batch). 1 on CPU:
    # XLA:CPU gains nothing from batches here (4 ran slower per photo); raise it on a GPU.
    config.depth.batch_size = 1

    # `--mode=serve` (bokeh_jax/serve.py): a local web page; tiles, pad mode and JPEG quality are
    # config.render's.
    config.serve = ml_collections.ConfigDict()
    config.serve.host = '127.0.0.1'  # this machine only; '0.0.0.0' would open it to the network
    config.serve.port = 8000  # --port overrides; 0 = any free port (the URL is printed)
    config.serve.max_pixels = 25_000_000  # largest photo (and depth map) accepted
    config.serve.max_upload_mb = 100.0  # largest upload, photo and depth map together (MiB)
    config.serve.preview_side = 1280  # longest side of the images on the page; downloads are full
    # Uploads kept in memory (the oldest is dropped first); each takes ~10 bytes per pixel.
    config.serve.max_sessions = 8

    # `--mode=bench` (bokeh_jax/bench/harness.py): speed against the TF / PyTorch peers.
    config.bench = ml_collections.ConfigDict()
    config.bench.forward_size = '512x768'  # model input HxW of the forward pass (output is 2x)
    # 'bfloat16': on GPU/TPU the whole model; on CPU bf16 convolutions in oneDNN (model.dtype)
    config.bench.forward_dtypes = ('float32',)
    config.bench.train_levels = (1, 3)  # train steps to time (paper levels)
    config.bench.train_batches = (1,)  # batch sizes of each train step; the paper's L1 batch is 5
    config.bench.patch = 512  # input patch side of the train steps (the paper's crop)
    config.bench.render = True  # time render.render_full_resolution when render.py exists
    config.bench.render_size = '1024x1536'  # photo size (full resolution) for the render row
    config.bench.per_level = True  # forward time spent in each level, against the peers
    config.bench.profile = False  # time every distinct conv shape of the forward pass
    config.bench.profile_top = 20  # rows of that profile to print
    config.bench.repeats = 3  # timed calls per figure (after warm-up), JAX and peers alternating
    config.bench.warmup = 1
    config.bench.peers = ('tf', 'torch')  # those installed run beside JAX
    config.bench.peer_process = True  # each peer in a worker process of its own (False: in ours)
    config.bench.breakdown = False  # train step of each train_level split into parts (profilers)
    config.bench.output = 'bench.json'  # written in the workdir

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
    config.data.eval_split = 'validation'  # synthetic_bokeh has train and validation
    config.data.synthetic.update({'num_train': 8, 'num_validation': 4, 'height': 128, 'width': 192})
    for level in PAPER_LEVEL_ORDER:
        cfg = config.train[f'level{level}']
        cfg.steps = 2
        cfg.batch_size = 2
        cfg.warmup_steps = cfg.decay_steps = cfg.finetune.steps = 0  # after :demo or :control
        cfg.loss.vgg = 0.0
    config.train.log_every = 1
    config.train.checkpoint_every = 1
    config.train.image_every = 0
    config.eval.max_images = 4
    config.render.max_tile = 256


# Demo schedule: (steps, global batch) per level. Most steps go to level 3, the last level whose
# output reads the network's trunk directly. docs/experiments.md says how it was chosen.
DEMO_SCHEDULE = {7: (100, 8), 6: (100, 8), 5: (150, 8), 4: (200, 8), 3: (3400, 4), 2: (500, 4),
                 1: (150, 4)}
# Level 2's finetune stage: its whole path, after its own layers have learned to read level 3.
DEMO_LEVEL2_FINETUNE = {'steps': 1200, 'learning_rate': 1e-3, 'lr_schedule': 'linear_decay',
                        'decay_steps': 600, 'trainable': 'path'}


def _demo(config: ml_collections.ConfigDict) -> None:
    """`make demo`: all seven levels on the synthetic set, on a laptop CPU in minutes.

    Deviations from the paper, all for time (docs/experiments.md has the measurements behind
    each): width 8, 64-pixel crops, a few hundred steps per level, a 20x higher learning rate
    (200x for the new layers of levels 2 and 1) that decays linearly to zero over the last third
    of each level, Adam's b2 at 0.95, level 3 training only its own layers, levels 2 and 1 their
    own layers first (level 2 then its whole path in a finetune stage), He's init, level 1
    starting as level 2's image upsampled, and no VGG term (its ImageNet weights are a download).
    """
    config.model.channels = 8
    config.model.init = 'he'  # the original's std 0.01 shrinks the signal at width 8
    config.model.conv_impl = 'auto'  # oneDNN where `make onednn` installed it, else XLA
    # A gradient spike raises the second moment it is divided by within a few steps, which bounds
    # the update at the demo's high rate.
    config.train.adam_b2 = 0.95
    config.data.name = 'synthetic_bokeh'
    config.data.crop_size = 64
    config.data.num_workers = 0
    config.data.eval_split = 'validation'
    config.data.data_dir = 'workdir/tensorflow_datasets'  # inside the checkout
    for level, (steps, batch) in DEMO_SCHEDULE.items():
        cfg = config.train[f'level{level}']
        cfg.steps, cfg.batch_size = steps, batch
        cfg.learning_rate = 1e-3
        cfg.lr_schedule, cfg.decay_steps = 'linear_decay', steps // 3
        cfg.loss.vgg = 0.0
    # The new upsampling layers of levels 2 and 1 train alone first, at a 10x higher rate: joined
    # with the whole path from their random start they degrade level 3's features.
    for level in (2, 1):
        config.train[f'level{level}'].trainable = 'level'
        config.train[f'level{level}'].learning_rate = 1e-2
    config.train.level3.trainable = 'level'  # the trunk stays as level 4 left it
    config.train.level2.finetune.update(DEMO_LEVEL2_FINETUNE)
    config.train.level1_start = 'upsample'  # level 1 starts as level 2's image upsampled
    config.train.log_every = 25
    config.train.checkpoint_every = 1000
    config.train.image_every = 0  # only the validation grid at the end of each level
    config.data.cache_mb = 512  # every synthetic record (300 x 0.7 MiB) decoded once
    config.eval.max_images = 0
    config.render.max_tile = 512


def _control(config: ml_collections.ConfigDict) -> None:
    """The demo, conditioned on aperture and focus (module docstring)."""
    _demo(config)
    config.model.condition = 'aperture_focus'  # s = 2/N and the signed defocus map
    config.model.residual = True  # near f/16 the target is almost the input
    config.data.synthetic.fnumbers = control.FULL_STOPS
    config.data.synthetic.focus = 'random'
    config.data.synthetic.num_validation = 70  # about 10 scenes per f-number


VARIANTS = {'tiny': _tiny, 'demo': _demo, 'control': _control}
