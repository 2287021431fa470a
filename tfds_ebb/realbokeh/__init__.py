"""The `realbokeh` TFDS builder (RealBokeh from a manual download)."""

from .realbokeh_dataset_builder import Builder
