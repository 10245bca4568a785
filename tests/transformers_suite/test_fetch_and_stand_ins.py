"""Tests of the machinery that runs transformers' model test suite: the sdist fetcher and the stand-ins.

Kept apart from ``tests/test_transformers_suite.py`` so they run even where that module skips (no PyPI)."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import socket
import threading

import pytest
from transformers import PreTrainedConfig

from . import fetch
from .stand_in_configuration_utils import NOT_COMMON_KWARGS, config_common_kwargs


def test_config_common_kwargs_cover_the_base_config():
    """Our stand-in ``config_common_kwargs`` must set every field of transformers' base config to a non-default value
    (what upstream's ``test_config_common_kwargs_is_complete`` holds), or ConfigTester would check less than upstream."""
    base = PreTrainedConfig()
    fields = {field.name for field in dataclasses.fields(PreTrainedConfig)} | {"output_attentions"}
    missing = sorted(fields - set(config_common_kwargs) - set(NOT_COMMON_KWARGS))
    assert not missing, f"base-config fields missing from config_common_kwargs: {missing}"
    defaults = [key for key, value in config_common_kwargs.items() if key != "dtype" and getattr(base, key) == value]
    assert not defaults, f"config_common_kwargs sets these to their defaults, which proves nothing: {defaults}"


@pytest.fixture
def isolated_pip(tmp_path, monkeypatch):
    """pip with no config files and no PIP_* settings but ours, and a fresh cache root for the fetcher."""
    for name in [name for name in os.environ if name.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "10")
    monkeypatch.setattr(fetch, "CACHE_ROOT", tmp_path / "cache")
    return fetch


def test_fetch_skips_only_when_pypi_cannot_be_reached(isolated_pip, tmp_path, monkeypatch):
    """An index that does not answer (a closed port): the fetcher raises PyPIUnreachable, the one reason the module
    skips. An index that answers but has no such sdist: a hard error, never a skip."""
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{closed_port}/simple")
    with pytest.raises(isolated_pip.PyPIUnreachable, match="cannot be reached"):
        isolated_pip.ensure_transformers_tests("5.0.0")

    index = tmp_path / "simple"
    (index / "transformers").mkdir(parents=True)
    (index / "transformers" / "index.html").write_text("<html><body></body></html>")  # a project with no files
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(index))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}")
        try:
            with pytest.raises(RuntimeError, match="although PyPI is reachable") as raised:
                isolated_pip.ensure_transformers_tests("5.0.0")
        finally:
            server.shutdown()
    assert not isinstance(raised.value, isolated_pip.PyPIUnreachable)
    assert not (tmp_path / "cache" / "transformers-5.0.0").exists(), "a failed fetch must leave no cache folder"
