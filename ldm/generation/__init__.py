"""What scripts/txt2img.py and scripts/img2img.py share: flags and input checks (options),
model files and setup (model), image files (images), and the timed run with ``main`` (run).

The interface is the original SD2 scripts' plus benchmark flags. Bad input ends the run before
anything is written, with one ``error:`` line and exit status 2 (a flag's value) or 1 (a file,
the model, the platform). See docs/txt2img.md.
"""

from ldm.generation.run import main

__all__ = ["main"]
