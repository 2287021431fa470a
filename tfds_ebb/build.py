"""`tfds build` for machines without apache-beam: same flags, e.g.

    python tfds_ebb/build.py tfds_ebb/ebb --manual_dir=DIR --config=rgbd

The `tfds` command of tensorflow-datasets 4.9 imports apache-beam at start-up even to build a
plain dataset (tensorflow/datasets#5463), and apache-beam would pull in other protobuf/pyarrow
versions than TensorFlow's. This runs TFDS's own `build` command without that import. Run it as
a script (not `-m`), so that a builder given by path is imported exactly once. A problem with
the manual folder (the builder's BadInput, e.g. a stale data set) ends with one line `error: ...`
and exit status 2.
"""

import sys

from absl import app
from tensorflow_datasets.scripts.cli import build
from tensorflow_datasets.scripts.cli import cli_utils


def main(args: build.Args) -> None:
    try:
        args.execute()
    except ValueError as e:
        # The builder's BadInput / StaleDataset (by name: the builder module is imported by
        # path inside execute(), so its classes are not importable here): one line, no traceback.
        if not any(c.__name__ == 'BadInput' for c in type(e).__mro__):
            raise
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    app.run(main, flags_parser=cli_utils.make_flags_parser(
        build.Args, description='tfds build (see tensorflow.org/datasets/cli)'))
