#!/usr/bin/env python3
"""Build dist/sshjob.pyz with shiv and print its sha256.

The build is reproducible: the same tree gives the same bytes.  The pyz
starts with sshjob.pyz_launcher ahead of shiv's bootstrap (its source, taken
from sshjob.py): it runs the unpacked copy of this very build directly, some
40 ms sooner than shiv's bootstrap, once it has checked that the copy is the
running user's alone and holds this build's bytes; else it points shiv at a
private place to unpack one.
"""

import hashlib
import json
import os
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(HERE, "dist", "sshjob.pyz")


def build():
    try:
        import shiv.builder
        import shiv.cli
    except ImportError:
        sys.exit("build.py: shiv is not installed; install it in a virtual environment and build with that: "
                 "python3 -m venv /tmp/shiv && /tmp/shiv/bin/pip install shiv==1.0.8 && /tmp/shiv/bin/python "
                 "build.py (only building needs it; `python3 sshjob.py` runs without building)")

    with open(os.path.join(HERE, "sshjob.py"), "rb") as f:
        source = f.read()
    build_id = hashlib.sha256(source + b"sshjob.py").hexdigest()  # as shiv computes it, checked below
    sys.path.insert(0, HERE)
    import sshjob

    launcher = "# -*- coding: utf-8 -*-\n%s\npyz_launcher(%r)\n\n" % (sshjob.source_of(sshjob.pyz_launcher), build_id)
    shiv.builder.MAIN_TEMPLATE = launcher.replace("{", "{{").replace("}", "}}") + shiv.builder.MAIN_TEMPLATE
    os.makedirs(os.path.dirname(TARGET), exist_ok=True)
    partial = "%s.partial-%d" % (TARGET, os.getpid())  # put in place whole: a reader never sees half a build
    with tempfile.TemporaryDirectory() as stage:
        module = os.path.join(stage, "sshjob.py")
        with open(module, "wb") as f:
            f.write(source)
        os.chmod(module, 0o644)  # the archive records modes: fix them for reproducibility
        shiv.cli.main(
            ["--reproducible", "--compile-pyc", "--site-packages", stage, "--entry-point", "sshjob:main",
             "--python", "/usr/bin/env python3", "--output-file", partial],
            standalone_mode=False,
        )
    with zipfile.ZipFile(partial) as archive:
        if json.loads(archive.read("environment.json"))["build_id"] != build_id:
            os.unlink(partial)
            sys.exit("build.py: shiv computed another build id than the launcher's; update build.py")
    os.replace(partial, TARGET)
    with open(TARGET, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print("%s  %s" % (digest, os.path.relpath(TARGET)))


if __name__ == "__main__":
    sys.exit(build())
