"""environment.yaml, the conda environment for GPUs, agrees with setup.py: conda-forge alone
(the pytorch and nvidia channels stopped publishing PyTorch after 2.5), a CUDA build of
PyTorch, and every package setup.py requires with a version range that setup.py accepts."""

from __future__ import annotations

import ast
import re

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

# pip's names of setup.py's requirements whose conda-forge package is named otherwise.
CONDA_NAME = {"torch": "pytorch", "matplotlib": "matplotlib-base"}


def setup_arguments() -> dict:
    """The literal keyword arguments of setup.py's setup() call (without running it)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if isinstance(k.value, (ast.List, ast.Constant, ast.Dict))}


def conda_dependencies() -> tuple[dict, dict[str, str]]:
    """environment.yaml, and its conda dependencies: name -> version constraint ("" for none)."""
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    specs = {}
    for dependency in env["dependencies"]:
        if isinstance(dependency, str):
            name, constraint = re.fullmatch(r"([A-Za-z0-9_.\-:]+)\s*(.*)", dependency).groups()
            specs[name] = constraint.replace(" ", "")
    return env, specs


def lowest_version(constraint: str) -> Version | None:
    """The lowest version a conda constraint admits (``>=X``, ``=X`` or ``==X``, alone or in a list)."""
    bounds = [Version(m.group(1)) for m in re.finditer(r"(?:>=|==|(?<![<>!=])=)([0-9][0-9.]*)", constraint)]
    return max(bounds, default=None)


def test_conda_forge_alone():
    env, specs = conda_dependencies()
    assert env["channels"][0] == "conda-forge"
    assert not {"pytorch", "nvidia", "defaults"} & set(env["channels"])
    assert not [name for name in specs if "::" in name], "a package pinned to another channel"
    assert "pytorch-cuda" not in specs, "pytorch-cuda comes from the pytorch channel"


def test_pytorch_is_a_cuda_build():
    _, specs = conda_dependencies()
    assert "pytorch-gpu" in specs and "cuda-version" in specs


def test_every_requirement_of_setup_py_with_a_range_it_accepts():
    arguments = setup_arguments()
    _, specs = conda_dependencies()
    assert lowest_version(specs["python"]) in SpecifierSet(arguments["python_requires"])
    for line in arguments["install_requires"]:
        requirement = Requirement(line)
        name = CONDA_NAME.get(canonicalize_name(requirement.name), canonicalize_name(requirement.name))
        assert name in specs, f"{requirement.name} (setup.py) is not in environment.yaml (as {name})"
        if requirement.specifier:
            lowest = lowest_version(specs[name])
            assert lowest is not None and lowest in requirement.specifier, (
                f"environment.yaml's {name}{specs[name]} admits versions that setup.py's {line} refuses"
            )


def test_the_package_itself_comes_from_pip():
    env, _ = conda_dependencies()
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert any(re.fullmatch(r"-e \.(\[.*\])?", line) for line in pip)
