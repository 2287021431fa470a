"""The `ebb` TFDS builder (EBB! from a manual download)."""

from .ebb_dataset_builder import Builder
