"""The shell scripts pass shellcheck (installed by scripts/bootstrap) with no warnings."""

import subprocess

import pytest

from conftest import ROOT


def shell_scripts():
    found = [ROOT / ".ci" / "run", *sorted((ROOT / "jobs").glob("*.sbatch"))]
    for path in sorted((ROOT / "scripts").iterdir()):
        if path.is_file() and path.read_bytes()[:64].split(b"\n")[0] in (b"#!/usr/bin/env bash",
                                                                          b"#!/bin/bash", b"#!/bin/sh"):
            found.append(path)
    return found


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_finds_nothing(script):
    done = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
