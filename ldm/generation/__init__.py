"""Generation for every task, from the command line or from Python.

* settings: typed settings (model, sampling, output), built by the CLI or by hand;
* model: the model of a run, resolved and checked cheaply, loaded once;
* pipeline: the core a task shares (conditioning, sampling, decoding, non-finite checks);
* tasks: one pipeline module per task (txt2img, img2img, ...), ``TASKS`` by name;
* options, run: the command line (flags into settings) and the timed run with ``main``;
* images, memory: image files, and the memory estimate that refuses impossible runs early.

Bad input ends a run before anything is written, with one ``error:`` line and exit status 2 (a
flag's value) or 1 (a file, the model, the platform). See docs/pipelines.md.
"""

from ldm.generation.model import Model
from ldm.generation.run import main
from ldm.generation.settings import ModelSettings, OutputSettings, SamplingSettings
from ldm.generation.tasks import TASKS

__all__ = ["TASKS", "Model", "ModelSettings", "OutputSettings", "SamplingSettings", "main"]
