"""What a job hands back: `sshjob cp` from a job whose owner means harm, by a
queue super user (root), over each transport and with an scp that speaks the
legacy SCP protocol (the second audit's N1, and its note on put_in_place).

The job's owner is sshjob-alice; bob plants links in a sticky directory."""

import os
import stat

import pytest
from conftest import ALICE, BOB, USER_PYTHON, as_user, listing


def modes(root):
    """{relative path: (mode bits, owner)} of `root` (".") and what is under it."""
    return {path: (mode, uid) for path, (mode, uid, _) in listing(root, with_root=True).items()}


@pytest.fixture
def legacy_scp(tmp_path):
    """A PATH whose scp speaks the legacy protocol: OpenSSH before 9.0 (RHEL 7 and 8), or any scp -O."""
    directory = tmp_path / "oldssh"
    directory.mkdir()
    (directory / "scp").write_text('#!/bin/sh\nexec /usr/bin/scp -O "$@"\n')
    os.chmod(str(directory / "scp"), 0o755)
    return "%s:%s" % (directory, os.environ["PATH"])


@pytest.mark.parametrize("transport", ["openssh", "builtin"])
def test_a_super_users_copy_brings_no_set_id_sticky_or_shared_write_bits(pool, users, tmp_path, legacy_scp,
                                                                         transport):
    workdir = pool.workdir(ALICE)
    as_user(ALICE, ["sh", "-c", "cd %s && cp /bin/id suid.bin && chmod 4755 suid.bin && mkdir tree && "
                                "cp /bin/id tree/s2 && chmod 6755 tree/s2 && chmod 1777 tree && "
                                "echo data > tree/shared.txt && chmod 666 tree/shared.txt" % workdir])
    job = pool.running_job(user=ALICE, workdir=workdir)
    downloads = tmp_path / "dl"
    downloads.mkdir()
    env = {"PATH": legacy_scp}
    one = pool.sshjob("cp", "--debug", "--transport", transport, job + ":suid.bin", str(downloads / "cp.bin"),
                      env=env)
    assert one.returncode == 0, one.stderr
    assert "transport: %s" % transport in one.stderr
    tree = pool.sshjob("cp", "--transport", transport, job + ":tree", str(downloads), env=env)
    assert tree.returncode == 0, tree.stderr
    assert modes(str(downloads)) == {
        ".": (0o755, 0), "cp.bin": (0o755, 0), "tree": (0o755, 0), "tree/s2": (0o755, 0),
        "tree/shared.txt": (0o644, 0)}
    assert (downloads / "tree" / "shared.txt").read_text() == "data\n"


def test_the_owners_own_copy_keeps_its_modes_but_no_set_id_bits(pool, users, tmp_path):
    workdir = pool.workdir(ALICE)
    as_user(ALICE, ["sh", "-c", "cd %s && mkdir tree && cp /bin/id tree/s && chmod 4775 tree/s && chmod 2775 tree"
                    % workdir])
    job = pool.running_job(user=ALICE, workdir=workdir)
    place = pool.workdir(ALICE)
    copied = as_user(ALICE, [USER_PYTHON, pool.pyz, "cp", job + ":tree", place], env={"SSHJOB_CONFIG": pool.config})
    assert copied.returncode == 0, copied.stderr
    uid = os.stat(place).st_uid
    assert modes(os.path.join(place, "tree")) == {".": (0o775, uid), "s": (0o775, uid)}


def test_a_link_that_another_user_planted_does_not_steer_a_copy(pool, users, tmp_path):
    workdir = pool.workdir(ALICE)
    as_user(ALICE, ["sh", "-c", "mkdir %s/tree && echo payload > %s/tree/f" % (workdir, workdir)])
    job = pool.running_job(user=ALICE, workdir=workdir)
    sticky = os.path.join(pool.dir, "shared-tmp")
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)
    victim = tmp_path / "root-only"
    victim.mkdir()
    as_user(BOB, ["ln", "-s", str(victim), os.path.join(sticky, "results")])
    result = pool.sshjob("cp", job + ":tree", os.path.join(sticky, "results"))
    assert result.returncode == 1
    assert result.stderr == ("sshjob: %s/results is a link that %s made: sshjob cp does not follow it\n"
                             % (sticky, BOB))
    assert os.listdir(str(victim)) == []
    mine = os.path.join(sticky, "mine")
    os.symlink(str(victim), mine)  # root's own link is followed, as the caller meant it
    followed = pool.sshjob("cp", job + ":tree", mine)
    assert followed.returncode == 0, followed.stderr
    assert (victim / "tree" / "f").read_text() == "payload\n"


# -- a job whose owner means harm, and a tar of its own that says what it likes ---------------

EVIL_TAR = r"""#!%s
# A job owner's "tar": whatever is asked for comes back setuid root, with a
# file planted beside it.
import io, sys, tarfile
name = sys.argv[-1]
out = tarfile.open(fileobj=sys.stdout.buffer, mode="w|")
def add(member_name, data, mode):
    info = tarfile.TarInfo(member_name)
    info.size, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), mode, 0, 0, "root", "root"
    out.addfile(info, io.BytesIO(data))
def link(member_name, target):
    info = tarfile.TarInfo(member_name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    out.addfile(info)
mode = open("mode").read()
if mode == "chain":  # links that lead out only on disk: a -> ., then a/a/esc -> ../../..
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    out.addfile(info)
    link(name + "/a", ".")
    link(name + "/a/a/esc", "../../..")
    add(name + "/esc/PWNED", b"gotcha\n", 0o644)
else:
    add(name, b"#!/bin/sh\nid\n", 0o4755)
if mode == "plant":
    add("planted-by-job-owner.txt", b"gotcha\n", 0o644)
    add(name + "/../../escaped.txt", b"gotcha\n", 0o644)
out.close()
"""


@pytest.mark.parametrize("transport", ["builtin", "openssh"])
@pytest.mark.parametrize("plant", ["plain", "plant", "chain"], ids=["setuid", "planted", "link-chain"])
def test_cp_from_a_malicious_job_brings_no_setuid_file_and_nothing_unasked(pool, users, tmp_path, plant, transport):
    workdir = pool.workdir(ALICE)
    bindir = os.path.join(workdir, "bin")
    os.mkdir(bindir)
    with open(os.path.join(bindir, "tar"), "w") as f:
        f.write(EVIL_TAR % USER_PYTHON)
    with open(os.path.join(workdir, "mode"), "w") as f:
        f.write(plant)
    os.chmod(os.path.join(bindir, "tar"), 0o755)
    job = pool.running_job("sleep", "600", user=ALICE, workdir=workdir,
                           options=["--env", "PATH=%s:/usr/bin:/bin" % bindir])
    downloads = tmp_path / "dl"
    downloads.mkdir()
    into_file = pool.sshjob("cp", "--transport", transport, job + ":job.log", str(downloads / "job.log"))
    into_dir = pool.sshjob("cp", "--transport", transport, job + ":job.log", str(downloads))
    if plant != "plain":
        refused = "planted-by-job-owner.txt" if plant == "plant" else "job.log/a/a/esc"
        for result in (into_file, into_dir):
            assert result.returncode == 1
            assert result.stderr.startswith("sshjob: the job sent %s, which is not a plain" % refused)
            assert result.stderr.count("\n") == 1
        assert os.listdir(str(downloads)) == []
        assert not os.path.exists(str(tmp_path / "escaped.txt"))
        assert not os.path.exists(str(tmp_path / "PWNED"))
    else:
        assert into_file.returncode == 0, into_file.stderr
        assert into_dir.returncode == 0, into_dir.stderr
        for path in (downloads / "job.log",):
            info = os.lstat(str(path))
            assert stat.S_IMODE(info.st_mode) == 0o755  # the set-uid bit is gone
            assert info.st_uid == 0  # the copier's own, not what the archive said
        assert sorted(os.listdir(str(downloads))) == ["job.log"]
