#!/usr/bin/env python3
"""Build dist/sshjob.pyz with shiv and print its sha256.

The build is reproducible: the same tree gives the same bytes.  The pyz
starts with a short launcher ahead of shiv's bootstrap, for two reasons:
shiv unpacks into ~/.shiv, and jobs often run with HOME unset, missing or
read-only, so the launcher then points SHIV_ROOT at a private directory of
the user's own; and once the build is unpacked, the launcher imports it from
there directly, which starts some 40 ms faster than shiv's bootstrap.
"""

import hashlib
import json
import os
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(HERE, "dist", "sshjob.pyz")

LAUNCHER = '''\
# -*- coding: utf-8 -*-
def _choose_shiv_root():
    """Unpack under ~/.shiv when the home directory allows it, else in a
    private directory of this user's under the temporary directory."""
    import os, stat
    if os.environ.get("SHIV_ROOT"):
        return os.environ["SHIV_ROOT"]
    home = os.path.expanduser("~")
    shiv = os.path.join(home, ".shiv")
    if home != "~" and (os.path.isfile(os.path.join(_site(shiv), "sshjob.py")) or _writable(shiv)):
        return shiv
    import tempfile  # only here: it costs a few ms to import
    root = os.path.join(tempfile.gettempdir(), "sshjob-shiv-%d" % os.getuid())
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        root = tempfile.mkdtemp(prefix="sshjob-shiv-")
    os.environ["SHIV_ROOT"] = root
    return root


def _writable(directory):
    """Whether shiv can unpack into `directory`: tried, not guessed (os.access
    says yes to root for /proc and for read-only mounts)."""
    import os, tempfile
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
        return True
    except OSError:
        return False


def _site(root):
    """Where shiv unpacks this very build under `root`."""
    import os, sys
    return os.path.join(root, "%s_%s" % (os.path.basename(os.path.realpath(sys.argv[0])), BUILD_ID), "site-packages")


def _run_unpacked(root):
    """Once this very build is unpacked, import it from there: shiv's own
    bootstrap would cost some 40 ms of imports at every start."""
    import os, sys
    site = _site(root)
    module = os.path.join(site, "sshjob.py")
    if os.path.isfile(module):
        _compile_once(module)
        sys.path.insert(0, site)
        import sshjob
        sys.exit(sshjob.main())


def _compile_once(module):
    """Compile the module into the unpacked copy, ours, even where
    PYTHONDONTWRITEBYTECODE says not to write bytecode (containers often
    set it): else every start would compile it again, some 60 ms."""
    import importlib.util, os  # importlib.util is loaded already: runpy needs it
    if not os.path.exists(importlib.util.cache_from_source(module)):
        import py_compile
        try:
            py_compile.compile(module, doraise=True)
        except (OSError, py_compile.PyCompileError):
            pass  # a read-only copy: it runs all the same, compiled at each start


_run_unpacked(_choose_shiv_root())
'''


def build():
    try:
        import shiv.builder
        import shiv.cli
    except ImportError:
        sys.exit("build.py: shiv is not installed; install it with: python3 -m pip install shiv==1.0.8 "
                 "(only building needs it; `python3 sshjob.py` runs without building)")

    with open(os.path.join(HERE, "sshjob.py"), "rb") as f:
        source = f.read()
    build_id = hashlib.sha256(source + b"sshjob.py").hexdigest()  # as shiv computes it, checked below
    launcher = LAUNCHER.replace("BUILD_ID", repr(build_id))
    shiv.builder.MAIN_TEMPLATE = launcher.replace("{", "{{").replace("}", "}}") + shiv.builder.MAIN_TEMPLATE
    os.makedirs(os.path.dirname(TARGET), exist_ok=True)
    with tempfile.TemporaryDirectory() as stage:
        module = os.path.join(stage, "sshjob.py")
        with open(module, "wb") as f:
            f.write(source)
        os.chmod(module, 0o644)  # the archive records modes: fix them for reproducibility
        shiv.cli.main(
            ["--reproducible", "--compile-pyc", "--site-packages", stage, "--entry-point", "sshjob:main",

             "--python", "/usr/bin/env python3", "--output-file", TARGET],
            standalone_mode=False,
        )
    with zipfile.ZipFile(TARGET) as archive:
        if json.loads(archive.read("environment.json"))["build_id"] != build_id:
            sys.exit("build.py: shiv computed another build id than the launcher's; update build.py")
    with open(TARGET, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print("%s  %s" % (digest, os.path.relpath(TARGET)))


if __name__ == "__main__":
    sys.exit(build())
