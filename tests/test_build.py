"""The build: a reproducible shiv zipapp that runs on every interpreter."""

import hashlib
import os
import subprocess
import sys

from conftest import INTERPRETERS, ROOT, machine_lock, run


def test_build_is_reproducible_and_prints_its_sha256():
    pyz = os.path.join(ROOT, "dist", "sshjob.pyz")
    digests = []
    for _ in range(2):
        with machine_lock("build"):
            result = run([sys.executable, os.path.join(ROOT, "build.py")], timeout=300)
        assert result.returncode == 0, result.stderr
        with open(pyz, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        assert result.stdout.split() == [digest, os.path.join("dist", "sshjob.pyz")]
        digests.append(digest)
    assert digests[0] == digests[1]


def test_the_pyz_and_the_module_run_on_the_oldest_and_newest_python(base):
    for python in INTERPRETERS:
        for program in (os.path.join(base, "sshjob.pyz"), os.path.join(ROOT, "sshjob.py")):
            result = run([python, program, "--help"])
            assert result.returncode == 0, (python, result.stderr)
            assert "client [options] JOB [command]" in result.stdout


def test_the_unpacked_module_is_compiled_once_even_where_bytecode_is_not_written(base, tmp_path):
    """PYTHONDONTWRITEBYTECODE (set in many containers) would otherwise make
    every start compile the module again: some 60 ms each."""
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    for python in INTERPRETERS:
        for _ in range(2):  # the first run unpacks, the second imports from the unpacked copy
            result = run([python, os.path.join(base, "sshjob.pyz"), "--version"], env=env)
            assert (result.returncode, result.stdout) == (0, "sshjob 0.2.0\n"), result.stderr
        tag = subprocess.run([python, "-c", "import sys; print(sys.implementation.cache_tag)"],
                             stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
        compiled = [name for _, _, names in os.walk(str(tmp_path / ".shiv")) for name in names]
        assert "sshjob.%s.pyc" % tag in compiled, (python, compiled)


def test_interpreters_present():
    if len(INTERPRETERS) < 2:
        import pytest

        pytest.skip("no /root/.pyenv/versions interpreters here: the end-to-end tests ran on %s only"
                    % sys.executable)
    versions = [subprocess.run([p, "-c", "import sys; print(sys.version_info[:2])"], stdout=subprocess.PIPE,
                               universal_newlines=True).stdout.strip() for p in INTERPRETERS]
    assert versions[0] != versions[1]
