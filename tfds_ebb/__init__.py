"""TFDS builders of this project; importing the package registers `ebb`, `synthetic_bokeh` and
`realbokeh`.

See tfds_ebb/README.md for the feature spec, the folder layouts and the `tfds build` commands.
"""

from tfds_ebb.ebb import ebb_dataset_builder
from tfds_ebb.realbokeh import realbokeh_dataset_builder
from tfds_ebb.synthetic_bokeh import synthetic_bokeh_dataset_builder
