"""What the training loop (bokeh_jax/train.py) uses: config checks, the optimizer and trainable
subsets, checkpoints and resumption, multi-host helpers and the metrics writer."""
