"""What code runs, as whom: the Slurm node's boot, the pyz launcher, and the
programs a configuration names, attacked by a second real user (the second
audit's N2, N3, N5 and its note on parent directories).

The victim is sshjob-alice (or root), the attacker sshjob-bob."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile

import pytest
from conftest import ALICE, BOB, ROOT, USER_PYTHON, as_user, home_of, run

sys.path.insert(0, ROOT)
import sshjob  # the product's own boot, exactly what srun runs

RENAMER = r"""
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
a, b = sys.argv[1].encode(), sys.argv[2].encode()
end = time.time() + float(sys.argv[3])
swaps = 0
while time.time() < end:
    swaps += libc.renameat2(-100, a, -100, b, 2) == 0  # AT_FDCWD, RENAME_EXCHANGE
print(swaps)
"""

PLANTED = """import os
open(%r, "a").write("ran bob's code as uid %%d\\n" %% os.getuid())
def main(argv=None):
    return 0
"""

pytestmark = pytest.mark.xdist_group("slurm")  # one worker runs what shares Slurm and ~alice/.cache


def module_digest():
    with open(os.path.join(ROOT, "sshjob.py"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def boot(user, program, digest):
    """The node's side of a session's step, as srun starts it, with nothing on stdin."""
    code = sshjob.source_of(sshjob.slurm_boot) + "slurm_boot()\n"
    return as_user(user, [USER_PYTHON, "-I", "-S", "-c", code, program, digest], stdin=subprocess.DEVNULL)


@pytest.fixture
def scratch(base):
    """A directory both test users can reach, for markers the attacker's code would leave."""
    path = os.path.join(base, "trust-scratch")
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def alice_cache(users):
    cache = os.path.join(home_of(ALICE), ".cache")
    shutil.rmtree(cache, ignore_errors=True)
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


def test_the_slurm_boot_runs_only_the_bytes_it_hashed_while_another_user_swaps_the_cache(base, alice_cache, scratch):
    program, digest = os.path.join(base, "sshjob.pyz"), module_digest()
    first = boot(ALICE, program, digest)
    assert first.stdout.startswith("have read from %s\n" % program), first.stderr
    again = boot(ALICE, program, digest)
    assert again.stdout.startswith("have cached in %s/sshjob/%s\n" % (alice_cache, digest)), again.stderr
    os.chmod(alice_cache, 0o777)  # the misconfiguration: ~/.cache writable by others
    marker = os.path.join(scratch, "boot-pwned")
    evil = os.path.join(alice_cache, "evil")
    as_user(BOB, ["mkdir", "-p", os.path.join(evil, digest)])
    as_user(BOB, ["sh", "-c", "cat > %s" % os.path.join(evil, digest, "sshjob.py")], input=PLANTED % marker)
    racer = subprocess.Popen(["runuser", "-u", BOB, "--", USER_PYTHON, "-c", RENAMER,
                              os.path.join(alice_cache, "sshjob"), evil, "60"], stdout=subprocess.PIPE,
                             start_new_session=True)
    try:
        said = [boot(ALICE, program, digest).stdout.split("\n")[0] for _ in range(60)]
    finally:
        os.killpg(racer.pid, signal.SIGKILL)
        racer.wait()
    assert not os.path.exists(marker)
    assert set(said) == {"have read from %s, run from memory (no private cache directory)" % program}


def test_compiled_code_in_the_cache_runs_only_if_its_owner_wrote_it(base, alice_cache, scratch):
    program, digest = os.path.join(base, "sshjob.pyz"), module_digest()
    boot(ALICE, program, digest)
    directory = os.path.join(alice_cache, "sshjob", digest)
    (name,) = [name for name in os.listdir(directory) if name.startswith("code-")]
    # For a while alice's directory was open to others: bob put his compiled code there, keyed as the
    # boot keys it (the key is no secret), for the very interpreter alice's boot runs.
    marker = os.path.join(scratch, "code-pwned")
    opened = (alice_cache, os.path.dirname(directory), directory)
    for path in opened:
        os.chmod(path, 0o777)
    packed = subprocess.run([USER_PYTHON, "-c", "import marshal, sys; sys.stdout.buffer.write(marshal.dumps("
                             "compile(sys.stdin.read(), 'evil', 'exec')))"], input=(PLANTED % marker).encode(),
                            stdout=subprocess.PIPE, check=True).stdout
    key = hashlib.sha256(digest.encode() + name.encode() + packed).hexdigest().encode()
    os.unlink(os.path.join(directory, name))
    subprocess.run(["runuser", "-u", BOB, "--", "sh", "-c", "cat > %s/%s" % (directory, name)],
                   input=key + b"\n" + packed, check=True)
    for path in opened:
        os.chmod(path, 0o700)  # and alice closed it again
    result = boot(ALICE, program, digest)
    assert not os.path.exists(marker)
    assert result.stdout.startswith("have cached in %s\n" % directory), result.stderr


def pyz_build_id(pyz):
    with zipfile.ZipFile(pyz) as archive:
        return json.loads(archive.read("environment.json"))["build_id"]


def test_root_never_runs_a_module_planted_in_a_users_shiv_directory(base, users, scratch):
    pyz = os.path.join(base, "sshjob.pyz")
    site = os.path.join(home_of(BOB), ".shiv", "sshjob.pyz_" + pyz_build_id(pyz), "site-packages")
    marker = os.path.join(scratch, "launcher-pwned")
    as_user(BOB, ["mkdir", "-p", site])
    as_user(BOB, ["sh", "-c", "cat > %s/sshjob.py" % site], input=PLANTED % marker)
    try:
        clean = {"PATH": os.environ["PATH"]}
        for env in ({"HOME": home_of(BOB)},  # sudo -E, or a sudo that keeps HOME
                    {"HOME": home_of(BOB), "SHIV_ROOT": os.path.join(home_of(BOB), ".shiv")},
                    {"SHIV_ENTRY_POINT": "os:getcwd", "SHIV_PREPEND_PYTHONPATH": site}):
            result = run(["env", "-i"] + ["%s=%s" % item for item in dict(clean, **env).items()]
                         + [sys.executable, pyz, "--version"])
            assert (result.returncode, result.stdout) == (0, "sshjob %s\n" % sshjob.__version__), result.stderr
        assert not os.path.exists(marker)
        # Bob's own copy, not this build's bytes: his pyz unpacks a true copy over it, and runs that.
        mine = as_user(BOB, [USER_PYTHON, pyz, "--version"])
        assert mine.stdout == "sshjob %s\n" % sshjob.__version__, mine.stderr
        assert not os.path.exists(marker)
        with open(os.path.join(site, "sshjob.py"), "rb") as f, open(os.path.join(ROOT, "sshjob.py"), "rb") as g:
            assert f.read() == g.read()
    finally:
        shutil.rmtree(os.path.join(home_of(BOB), ".shiv"), ignore_errors=True)


def test_a_configuration_that_another_user_may_change_names_no_program(pool, users, scratch):
    bobs = os.path.join(home_of(BOB), "p")
    marker = os.path.join(scratch, "config-pwned")
    as_user(BOB, ["mkdir", "-p", bobs])
    as_user(BOB, ["sh", "-c", "cat > %s/sshjob.conf" % bobs], input="[sshjob]\nssh_keygen = %s/evil\n"
            "schedd_address = %s/none.sock\n" % (bobs, bobs))
    as_user(BOB, ["sh", "-c", "cat > %s/evil; chmod 755 %s/evil" % (bobs, bobs)],
            input="#!/bin/sh\nid -un >> %s\nexec ssh-keygen \"$@\"\n" % marker)
    try:
        refusal = "sshjob: %s/sshjob.conf is not a file that only %s or root may change" % (bobs, ALICE)
        for args, env in ((["client", "-pool", bobs, "1.0", "true"], {}),
                          (["--config", bobs + "/sshjob.conf", "client", "1.0", "true"], {}),
                          (["client", "1.0", "true"], {"SSHJOB_CONFIG": bobs + "/sshjob.conf"}),
                          (["cp", "1.0:x", "/tmp"], {"SSHJOB_CONFIG": bobs + "/sshjob.conf"})):
            result = as_user(ALICE, [USER_PYTHON, pool.pyz] + args, env=env)
            assert result.returncode == 1 and result.stderr.startswith(refusal), result.stderr
            assert result.stderr.count("\n") == 1
        os.chmod(bobs, 0o777)  # even bob's own use stops once others may change his directory
        loose = as_user(BOB, [USER_PYTHON, pool.pyz, "client", "-pool", bobs, "1.0", "true"])
        assert loose.stderr.startswith("sshjob: %s/sshjob.conf is not a file that only %s or root may change (%s "
                                       "is not)" % (bobs, BOB, bobs)), loose.stderr
        assert not os.path.exists(marker)
    finally:
        shutil.rmtree(bobs, ignore_errors=True)


def test_a_root_pool_under_a_directory_that_another_user_owns_is_refused(base, users, tmp_path):
    bobs = os.path.join(base, "bobs-place")
    os.mkdir(bobs)
    shutil.chown(bobs, BOB, BOB)
    os.mkdir(os.path.join(bobs, "pool"), 0o755)  # root's own, but bob may rename it away and put his own there
    try:
        result = run([sys.executable, os.path.join(base, "sshjob.pyz"), "pool", "start", "--dir",
                      os.path.join(bobs, "pool")])
        assert result.returncode == 1
        assert result.stderr == ("sshjob: %s/pool is not a directory that only root may change (%s is not): make a "
                                 "new one, or fix its owner and mode\n" % (bobs, bobs))
    finally:
        shutil.rmtree(bobs, ignore_errors=True)
