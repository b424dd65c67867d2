"""The tcmalloc launcher: ``imbssl`` re-executes itself once with tcmalloc preloaded where it is installed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from imbssl import launcher


@pytest.fixture
def execs(monkeypatch, tmp_path):
    """Record os.execve instead of running it; a fake library file stands in for tcmalloc."""
    calls = []
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")
    monkeypatch.setattr(launcher.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(launcher, "CANDIDATES", (str(tmp_path / "absent.so"), str(library)))
    monkeypatch.setattr(launcher.sys, "platform", "linux")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(launcher.SWITCH, raising=False)
    monkeypatch.delenv(launcher.RELAUNCHED, raising=False)
    return calls, str(library)


def test_relaunch_preloads_the_installed_library_before_any_other(execs, monkeypatch):
    calls, library = execs
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    launcher.relaunch_with_tcmalloc()
    [(path, argv, env)] = calls
    assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["LD_PRELOAD"] == f"{library} libother.so"


@pytest.mark.parametrize("switch", [None, "1"])
def test_unset_or_1_looks_for_the_installed_library(execs, monkeypatch, switch):
    calls, library = execs
    if switch is not None:
        monkeypatch.setenv(launcher.SWITCH, switch)
    launcher.relaunch_with_tcmalloc()
    [(_, _, env)] = calls
    assert env["LD_PRELOAD"] == library


@pytest.mark.parametrize("environ", [{"LD_PRELOAD": "/opt/libtcmalloc.so"}, {launcher.SWITCH: "0"},
                                     {launcher.RELAUNCHED: "1"},
                                     {launcher.SWITCH: "/nowhere/libtcmalloc.so"}])
def test_no_relaunch_when_preloaded_switched_off_or_missing(execs, monkeypatch, environ):
    calls, _ = execs
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    launcher.relaunch_with_tcmalloc()
    assert calls == []


@pytest.mark.skipif(launcher.tcmalloc_library() is None or not sys.platform.startswith("linux"),
                    reason="tcmalloc is not installed here")
def test_the_relaunched_process_has_tcmalloc_mapped():
    assert not launcher.loaded() or "tcmalloc" in os.environ.get("LD_PRELOAD", "")  # pytest itself: as started
    code = "from imbssl.launcher import loaded, relaunch_with_tcmalloc; relaunch_with_tcmalloc(); print(loaded())"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", launcher.SWITCH, launcher.RELAUNCHED)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "True"
