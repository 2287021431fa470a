"""The `synthetic_bokeh` TFDS builder (generated scenes, no download)."""

from .synthetic_bokeh_dataset_builder import Builder
