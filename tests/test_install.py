"""Installing the project keeps a torch that is already there (pyproject.toml takes a range).

On these machines pip's index offers a newer torch (a CUDA build) than the CPU build installed
here; an exact pin on either would make pip swap one for the other."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).parents[1]


def torch_requirement() -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")


def test_torch_is_a_range_that_holds_the_tested_version():
    specifier = torch_requirement().specifier
    tested = torch.__version__.split("+")[0]
    assert specifier.contains(tested)
    assert not any(spec.operator in ("==", "===") for spec in specifier), specifier
    assert specifier.contains("2.99") and not specifier.contains("3.0")


def pip_would_install(python: str, *arguments: str) -> list[str]:
    """Names of the distributions ``pip install --dry-run`` would install, by ``python``."""
    result = subprocess.run([python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-",
                             "--no-build-isolation", *arguments], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    return [item["metadata"]["name"].lower() for item in json.loads(result.stdout)["install"]]


def test_installing_the_project_keeps_the_installed_torch():
    """The torch in this environment stays; nothing else is needed (--no-index: no network)."""
    assert pip_would_install(sys.executable, "--no-index", "-e", ".") == ["atedm-compile"]


@pytest.mark.slow
def test_fresh_venv_with_another_torch_keeps_it(tmp_path):
    """A fresh venv holding the CPU build of torch, with pip's index offering a newer release:
    ``pip install -e .`` keeps the torch it found (about 20 s and 1 GB of disk)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "torch==2.13.0", "setuptools"], check=True)
    newest = subprocess.run([python, "-m", "pip", "index", "versions", "torch"], capture_output=True, text=True)
    installed = pip_would_install(python, "-e", ".")
    assert "torch" not in installed, (newest.stdout, installed)
    assert "atedm-compile" in installed and "diffusers" in installed


def test_missing_cuda_provider_names_the_gpu_extra():
    pytest.importorskip("onnxruntime")
    from atedm_compile.export.onnxruntime import resolve_providers

    if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers():
        pytest.skip("this onnxruntime build has the CUDA provider")
    with pytest.raises(ValueError, match=r"atedm-compile\[gpu\]"):
        resolve_providers(["cuda"])
