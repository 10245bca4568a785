"""Fetch transformers' own model tests (``tests/`` of the sdist of the INSTALLED transformers) and make them importable.

transformers does not ship its test mixins in the wheel, so the first test process downloads the sdist of exactly the
installed version with pip (``pip download transformers==X --no-binary :all: --no-deps``), extracts its top-level
``tests/*.py`` into ``tests/.cache/transformers-X/transformers_tests/`` (git-ignored) and later runs reuse it.

The extracted folder is imported as the package ``transformers_tests`` (our own test package is already called
``tests``), with the cache folder put on ``sys.path``. ``test_modeling_common`` and ``test_configuration_common``
import three modules the sdist lacks (``.generation.test_utils``, ``.exporters.test_export`` and
``.utils.test_configuration_utils``); our stand-ins for them (``stand_in_*.py`` here) are registered under those
names.

Safe under ``pytest -n 2``: one process downloads while the other waits on a file lock, and the extracted folder
appears by an atomic rename, so a killed run never leaves a half-extracted cache behind.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import urllib.request
from pathlib import Path

import transformers
from filelock import FileLock

CACHE_ROOT = Path(__file__).resolve().parent.parent / ".cache"
PACKAGE = "transformers_tests"
# the sdist's test modules the suite imports; present in every transformers 5.x sdist
REQUIRED = ("test_modeling_common.py", "test_configuration_common.py")
# module the sdist lacks (relative to its tests/) -> our stand-in module (relative to this package)
STAND_INS = {
    "generation.test_utils": ".stand_in_generation_test_utils",
    "exporters.test_export": ".stand_in_export",
    "utils.test_configuration_utils": ".stand_in_configuration_utils",
}


class PyPIUnreachable(RuntimeError):
    """pip could not download the sdist and PyPI does not answer: the only reason the suite may be skipped."""


def cache_dir(version: str | None = None) -> Path:
    """``tests/.cache/transformers-<version>``: the folder that goes on ``sys.path``."""
    return CACHE_ROOT / f"transformers-{version or transformers.__version__}"


def _pypi_reachable(timeout: float = 15.0) -> bool:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        with urllib.request.urlopen(f"{index}/transformers/", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _download_sdist(version: str, into: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", f"transformers=={version}",
        "--no-binary", ":all:", "--no-deps", "--quiet", "-d", str(into),
    ]  # fmt: skip
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900)
    archives = sorted(into.glob("transformers-*.tar.gz"))
    if result.returncode == 0 and archives:
        return archives[0]
    output = (result.stdout + result.stderr)[-3000:]
    if not _pypi_reachable():
        raise PyPIUnreachable(
            f"transformers' test suite needs the sdist of transformers=={version} from PyPI, and PyPI cannot be "
            f"reached from here; pip said:\n{output}"
        )
    raise RuntimeError(
        f"`{' '.join(command)}` failed although PyPI is reachable (is transformers=={version} a release with an "
        f"sdist? A source checkout or dev version has none):\n{output}"
    )


def _extract_tests(archive: Path, version: str, package_dir: Path) -> None:
    """Copy the top-level ``tests/*.py`` of the sdist into ``package_dir`` (file by file: no paths from the archive
    are trusted)."""
    package_dir.mkdir(parents=True)
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
            if not member.isfile() or not name.endswith(".py") or "/" in name:
                continue
            (package_dir / name).write_bytes(tar.extractfile(member).read())
    missing = [name for name in REQUIRED if not (package_dir / name).exists()]
    if missing:
        raise RuntimeError(f"the sdist {archive.name} has no tests/{missing}: cannot run transformers' model tests")
    # `direct_transformers_import(<this folder>)` in test_configuration_common executes this file as a module; the
    # upstream tests/__init__.py is empty too
    (package_dir / "__init__.py").write_text("")


def ensure_transformers_tests(version: str | None = None) -> Path:
    """Return the folder holding the ``transformers_tests`` package for ``version`` (default: installed), fetching
    and extracting the sdist first if needed. Raises ``PyPIUnreachable`` when it cannot be fetched for that reason."""
    version = version or transformers.__version__
    target = cache_dir(version)
    if (target / PACKAGE / "__init__.py").exists():
        return target
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE_ROOT / f"transformers-{version}.lock"), timeout=1200):
        if (target / PACKAGE / "__init__.py").exists():  # another worker finished while we waited
            return target
        with tempfile.TemporaryDirectory(dir=CACHE_ROOT, prefix=f".partial-{version}-") as scratch:
            scratch = Path(scratch)
            archive = _download_sdist(version, scratch / "download")
            _extract_tests(archive, version, scratch / "tree" / PACKAGE)
            if target.exists():  # a stale, incomplete folder from an older layout
                shutil.rmtree(target)
            os.replace(scratch / "tree", target)
    return target


def _stand_in_package(name: str) -> types.ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    package = types.ModuleType(name)
    package.__path__ = []  # a package with no files: its only submodule is the stand-in registered below
    sys.modules[name] = package
    return package


def import_transformers_tests() -> types.ModuleType:
    """Fetch (once) and import the ``transformers_tests`` package with our stand-ins for the modules the sdist lacks.

    Returns the package; import ``transformers_tests.test_modeling_common`` etc. after calling this."""
    folder = str(ensure_transformers_tests())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    package = importlib.import_module(PACKAGE)
    for missing, stand_in in STAND_INS.items():
        provider = importlib.import_module(stand_in, __package__)
        parent_name, _, leaf = f"{PACKAGE}.{missing}".rpartition(".")
        parent = _stand_in_package(parent_name)
        setattr(package, parent_name.rpartition(".")[2], parent)
        sys.modules[f"{parent_name}.{leaf}"] = provider
        setattr(parent, leaf, provider)
    return package
