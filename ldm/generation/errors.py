"""The two errors a generation run ends with, shared by every module of the package."""


class UsageError(Exception):
    """A flag's value that cannot work: exit status 2, like argparse's own errors."""


class GenerationError(Exception):
    """A file, model or platform problem: exit status 1."""
