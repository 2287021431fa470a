"""Where a mode may write: never over one of its own inputs, never below a file.

render, depth and export check each output path with `output_problem` before anything is
written: an output that is an input file (the photo, its depth map), that lies inside what the
workdir's modes read (parameters, training checkpoints, MegaDepth weights, config.json), that
would replace a folder holding them, or whose parent "folder" is a file, is refused with a
message naming both paths. Symbolic links are resolved, so a link to an input counts as it.
"""

from collections.abc import Iterable
import os

# What the workdir's modes read (and train / convert / import_depth write): never an output.
WORKDIR_INPUTS = ('params', 'checkpoints', 'depth', 'config.json')


def workdir_inputs(workdir: str) -> list[str]:
    """The paths in `workdir` that no output may overwrite or lie in."""
    return [os.path.join(workdir, name) for name in WORKDIR_INPUTS]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def output_problem(output: str, *, inputs: Iterable[str | None] = (),
                   protected: Iterable[str] = (), replaces_folder: bool = False) -> str | None:
    """Why `output` may not be written (a message naming the paths), or None when it may.

    inputs: files the run reads (None entries are ignored). protected: files or folders no output
    may be or lie in. replaces_folder: `output` is a folder that will be replaced as a whole, so
    it may not contain a protected path either.
    """
    target = os.path.realpath(output)
    for path in inputs:
        if path and os.path.exists(path) and os.path.realpath(path) == target:
            return f'{output} is an input of this run ({path}); choose another output'
    for path in protected:
        real = os.path.realpath(path)
        if _inside(target, real):
            return (f'{output} is inside {path}, which this workdir\'s modes read; choose an '
                    f'output outside it')
        if replaces_folder and os.path.exists(path) and _inside(real, target):
            return (f'{output} holds {path}, which replacing the folder would delete; choose '
                    f'another output folder')
    parent = os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f'{output}: {parent} is a file, not a folder, so nothing can be written below it'
    return None
