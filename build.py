#!/usr/bin/env python3
"""Build dist/sshjob.pyz with shiv and print its sha256.

The build is reproducible: the same tree gives the same bytes.  The pyz
starts with a short launcher ahead of shiv's bootstrap, because shiv unpacks
into ~/.shiv, and jobs often run with HOME unset, missing or read-only; then
the launcher points SHIV_ROOT at a private directory of the user's own.
"""

import hashlib
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(HERE, "dist", "sshjob.pyz")

LAUNCHER = '''\
# -*- coding: utf-8 -*-
def _choose_shiv_root():
    """Unpack under ~/.shiv when the home directory allows it, else in a
    private directory of this user's under the temporary directory."""
    import os, stat, tempfile
    if os.environ.get("SHIV_ROOT"):
        return
    home = os.path.expanduser("~")
    shiv = os.path.join(home, ".shiv")
    usable = shiv if os.path.isdir(shiv) else home
    if home != "~" and os.path.isdir(usable) and os.access(usable, os.W_OK | os.X_OK):
        return
    root = os.path.join(tempfile.gettempdir(), "sshjob-shiv-%d" % os.getuid())
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        root = tempfile.mkdtemp(prefix="sshjob-shiv-")
    os.environ["SHIV_ROOT"] = root


_choose_shiv_root()
'''


def build():
    import shiv.builder
    import shiv.cli

    shiv.builder.MAIN_TEMPLATE = LAUNCHER.replace("{", "{{").replace("}", "}}") + shiv.builder.MAIN_TEMPLATE
    os.makedirs(os.path.dirname(TARGET), exist_ok=True)
    with tempfile.TemporaryDirectory() as stage:
        module = os.path.join(stage, "sshjob.py")
        shutil.copyfile(os.path.join(HERE, "sshjob.py"), module)
        os.chmod(module, 0o644)  # the archive records modes: fix them for reproducibility
        shiv.cli.main(
            ["--reproducible", "--compile-pyc", "--site-packages", stage, "--entry-point", "sshjob:main",
             "--python", "/usr/bin/env python3", "--output-file", TARGET],
            standalone_mode=False,
        )
    with open(TARGET, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print("%s  %s" % (digest, os.path.relpath(TARGET)))


if __name__ == "__main__":
    sys.exit(build())
