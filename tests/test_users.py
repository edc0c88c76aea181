"""Real Unix users: jobs run as their owners, only owners and queue super
users get in, and the pyz runs for a user whose HOME is unusable."""

import glob
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time

import pytest
from conftest import ALICE, BOB


@pytest.fixture
def alice_job(pool, users):
    workdir = pool.workdir(ALICE)
    job = pool.running_job("sleep", "600", user=ALICE, workdir=workdir, options=["--env", "SECRET_PLAN=alice"])
    return job, workdir


def test_owner_enters_as_the_job_user(pool, alice_job):
    job, workdir = alice_job
    result = pool.sshjob("client", job, 'id -un; pwd; echo $SECRET_PLAN; ps -o user= -p $PPID', user=ALICE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [ALICE, workdir, "alice", ALICE]


def test_other_users_are_refused_and_super_users_are_not(pool, alice_job):
    job, _ = alice_job
    refused = pool.sshjob("client", job, "id -un", user=BOB)
    assert refused.returncode == 1
    assert refused.stderr == (
        "sshjob: user %s may not enter job %s: it belongs to %s, and only its owner or a queue super user may\n"
        % (BOB, job, ALICE))
    for action, verb in (("rm", "remove"), ("suspend", "suspend"), ("vacate", "vacate")):
        result = pool.sshjob(action, job, user=BOB)
        assert result.returncode == 1
        assert "user %s may not %s job %s" % (BOB, verb, job) in result.stderr
    assert pool.state(job) == "running"
    root = pool.sshjob("client", job, "id -un")  # root is a queue super user by default
    assert root.stdout == ALICE + "\n", root.stderr
    with open(os.path.join(pool.dir, "audit.log")) as f:
        audit = [json.loads(line) for line in f]
    refusal = [e for e in audit if e["user"] == BOB and e["job"] == job]
    assert refusal and refusal[0]["granted"] is False and "may not enter" in refusal[0]["reason"]
    assert refusal[0]["command"] == "id -un"


def test_configured_super_user(make_pool, users):
    pool = make_pool({"queue_super_users": "root, " + BOB})
    job = pool.running_job("sleep", "600", user=ALICE, workdir=pool.workdir(ALICE))
    result = pool.sshjob("client", job, "id -un", user=BOB)
    assert result.stdout == ALICE + "\n", result.stderr


def test_the_users_ssh_directory_is_never_used(pool, alice_job):
    job, _ = alice_job
    home = pool.workdir(ALICE)  # a home of alice's for this test: her own is other tests' too
    ssh_dir = os.path.join(home, ".ssh")
    os.mkdir(ssh_dir)
    with open(os.path.join(ssh_dir, "config"), "w") as f:
        f.write("Host *\n    ProxyCommand false\n    User nobody\n")
    record = pwd.getpwnam(ALICE)
    os.chown(ssh_dir, record.pw_uid, record.pw_gid)
    result = pool.sshjob("client", job, "echo fine", user=ALICE, env={"HOME": home})
    assert result.stdout == "fine\n", result.stderr
    assert os.listdir(ssh_dir) == ["config"]


@pytest.mark.parametrize("home", ["unset", "missing", "read-only"])
def test_the_pyz_runs_whatever_the_home_directory(pool, alice_job, tmp_path, home):
    job, _ = alice_job
    read_only = str(tmp_path / "ro-home")
    os.mkdir(read_only, 0o555)
    os.chmod(str(tmp_path), 0o755)
    value = {"unset": None, "missing": "/nonexistent/home", "read-only": read_only}[home]
    result = pool.sshjob("client", job, "echo home-ok", user=ALICE, env={"HOME": value})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "home-ok\n"
    assert os.listdir(read_only) == []
    record = pwd.getpwnam(ALICE)
    cache = os.path.join(record.pw_dir, ".shiv") if home == "unset" else "/tmp/sshjob-shiv-%d" % record.pw_uid
    info = os.lstat(cache)
    assert info.st_uid == record.pw_uid
    if home != "unset":  # the fallback is private; ~/.shiv is shiv's own business
        assert stat.S_IMODE(info.st_mode) == 0o700


def test_a_personal_pool_of_an_ordinary_user(base, users, pool):
    """A starter running as an ordinary user runs that user's jobs only, with
    the environment tag to track them (it cannot make cgroups)."""
    record = pwd.getpwnam(ALICE)
    pool_dir = tempfile.mkdtemp(prefix="alice-pool-", dir=base)
    os.chmod(pool_dir, 0o755)
    os.chown(pool_dir, record.pw_uid, record.pw_gid)
    config = {"SSHJOB_CONFIG": os.path.join(pool_dir, "sshjob.conf")}
    started = pool.sshjob("pool", "start", "--dir", pool_dir, user=ALICE, config=False)
    assert started.returncode == 0, started.stderr
    try:
        mine = pool.sshjob("submit", "--workdir", pool_dir, "--", "sleep", "600", user=ALICE, env=config)
        # bob's own configuration names alice's schedd: hers names programs, which bob does not take from her
        bobs = tempfile.mkdtemp(prefix="bob-config-", dir=base)
        os.chmod(bobs, 0o755)
        with open(os.path.join(bobs, "sshjob.conf"), "w") as f:
            f.write("[sshjob]\nschedd_address = %s/schedd.sock\n" % pool_dir)
        shutil.chown(bobs, BOB, BOB)
        theirs = pool.sshjob("submit", "--workdir", "/tmp", "--", "sleep", "600", user=BOB,
                             env={"SSHJOB_CONFIG": os.path.join(bobs, "sshjob.conf")})
        assert pool.sshjob("q", user=BOB, env=config).stderr.startswith(
            "sshjob: %s/sshjob.conf is not a file that only %s or root may change" % (pool_dir, BOB))
        job, other = mine.stdout.strip(), theirs.stdout.strip()
        deadline = time.time() + 30
        while "running" not in pool.sshjob("q", user=ALICE, env=config).stdout:
            assert time.time() < deadline
            time.sleep(0.2)
        session = pool.sshjob("client", job, "id -un; echo $_SSHJOB_JOB_PIDS", user=ALICE, env=config)
        assert session.stdout.split()[0] == ALICE, session.stderr
        time.sleep(1)
        queue = {line.split()[0]: line.split()[2] for line in
                 pool.sshjob("q", user=ALICE, env=config).stdout.splitlines()[1:]}
        assert queue == {job: "running", other: "idle"}  # alice's starter does not run bob's job
        with open(os.path.join(pool_dir, "starter.log")) as f:
            assert "process tracking: environment tag" in f.read()
        refused = pool.sshjob("client", job, "true", user=BOB, env={"SSHJOB_CONFIG": os.path.join(bobs, "sshjob.conf")})
        assert "may not enter job %s" % job in refused.stderr
    finally:
        pool.sshjob("pool", "stop", "--dir", pool_dir, user=ALICE, config=False)


def job_directory(pool, job):
    """The starter's directory of a running job's (only) node."""
    found = glob.glob(os.path.join(pool.dir, "execute", job + ".0-*"))
    assert len(found) == 1, found
    return found[0]


def test_key_files_are_private_to_the_job_owner(pool, alice_job, tmp_path):
    """The job's files are its owner's, 0600; the directories that hold
    them stay root's, so that the owner can swap none of them for a link."""
    job, _ = alice_job
    record = pwd.getpwnam(ALICE)
    keydir = os.path.join(job_directory(pool, job), "hostkey")
    for path, mode, owner in ((keydir, 0o711, 0), (os.path.join(keydir, "ssh_host_ed25519_key"), 0o600, record.pw_uid)):
        info = os.lstat(path)
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (mode, owner), path
    session = subprocess.Popen(pool.argv("client", job, "echo open; sleep 5", user=ALICE),
                               stdout=subprocess.PIPE, universal_newlines=True)
    assert session.stdout.readline() == "open\n"
    sessions = [e.path for e in os.scandir(job_directory(pool, job)) if e.name.startswith("session-")]
    assert sessions
    for directory in sessions:
        info = os.lstat(directory)
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o711, 0)
        for name in os.listdir(directory):
            info = os.lstat(os.path.join(directory, name))
            assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, record.pw_uid), name
    log = os.lstat(os.path.join(job_directory(pool, job), "sshd.log"))
    assert (stat.S_IMODE(log.st_mode), log.st_uid) == (0o600, 0)
    session.wait(timeout=30)
