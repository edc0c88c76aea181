"""End to end: sessions inside the job's container (issue 22), on a pool.

Real containers, started by the tests: rootless podman as the job's owner
(--runtime runc: this machine's crun refuses its hybrid cgroups), rootful
podman for a job of root's own, and an Apptainer-style unprivileged user
namespace with a chroot, made with unshare.  The images are made here from
busybox-static: one with a shell and one without.  The built pyz, as users
type it; real Slurm batch jobs in containers are in test_slurm.py."""

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import uuid

import pytest
from conftest import (
    ALICE,
    BOB,
    IMAGE,
    INTERPRETERS,
    NO_SHELL_IMAGE,
    PODMAN_RUN,
    ROOT,
    ROOTFUL_LIMITS,
    USER_PYTHON,
    Pool,
    Terminal,
    as_user,
    make_rootfs,
    podman,
    podman_env,
    podman_image,
    remove_containers,
    run,
    state_of,
    wait_for,
    wait_for_container,
    x_display,
)

sys.path.insert(0, ROOT)
import sshjob

pytestmark = pytest.mark.xdist_group("containers")  # alice's podman storage is one, and so is root's

COMMAND = ("sh", "-c", "cd /data; export MARK=inside; exec sleep 600")


@pytest.fixture(scope="module")
def pools(base, images):
    made = [Pool(base, python, "containers").start() for python in INTERPRETERS]
    yield made
    for pool in made:
        pool.stop()
    remove_containers(ALICE)
    remove_containers("root")


@pytest.fixture(params=[-1, 0], ids=["newest", "oldest"])
def either_pool(request, pools):
    return pools[request.param]


@pytest.fixture
def pool(pools):
    return pools[-1]


def unique():
    return "sshjob-test-" + uuid.uuid4().hex[:8]


def podman_job(pool, image=IMAGE, command=COMMAND, user=ALICE, options=(), network="none"):
    """(job, container name, the container's first pid) of a job that runs a container."""
    name = unique()
    env = podman_env(user)
    submit = ["--env", "XDG_RUNTIME_DIR=" + env["XDG_RUNTIME_DIR"]] if env else []
    job = pool.running_job(*PODMAN_RUN[:-1], network, *options, "--name", name, image, *command,
                           user=None if user == "root" else user, options=submit)
    return job, name, wait_for_container(user, name)


def container_hostname(pid):
    """The host name that the container's processes see."""
    result = run(["nsenter", "-t", str(pid), "-u", "hostname"])
    return result.stdout.strip()


# -- where a session lands ---------------------------------------------------------------------------------


def test_a_session_lands_in_the_podman_container_of_the_job(either_pool):
    pool = either_pool
    job, name, pid = podman_job(pool)
    inside = container_hostname(pid)
    assert inside and inside != socket.gethostname()
    for transport in ("openssh", "builtin"):
        result = pool.sshjob("client", "-transport", transport, job,
                             "echo MARK=$MARK; pwd; hostname; cat /etc/os-release; ps; echo PIDS=$_SSHJOB_JOB_PIDS; "
                             "id -u; exit 4", user=ALICE)
        assert result.returncode == 4, (transport, result.stderr)
        out = result.stdout
        assert "MARK=inside\n/data\n%s\n" % inside in out, out
        assert 'NAME="sshjob test image"\nVARIANT=busybox\n' in out
        assert re.search(r"^\s*1\s+\S+\s+sleep 600$", out, re.M), out  # the payload is pid 1 of what it sees
        assert "PIDS=1\n" in out and out.endswith("0\n")  # the owner is root inside, as the container maps it
        assert result.stderr == ""
    outside = pool.sshjob("client", "-container", "none", job, "echo MARK=$MARK; hostname", user=ALICE)
    assert outside.returncode == 0 and outside.stdout == "MARK=\n%s\n" % socket.gethostname(), outside.stderr
    said = pool.sshjob("client", "-debug", "-transport", "builtin", job, "true", user=ALICE)  # OpenSSH's: via its ssh
    assert "inside its podman container %s (pid %d)" % (name, pid) in said.stderr
    for choice in (name, str(pid)):
        chosen = pool.sshjob("client", "-container", choice, job, "hostname", user=ALICE)
        assert chosen.stdout == inside + "\n", chosen.stderr
    unknown = pool.sshjob("client", "-container", "nosuch", job, "true", user=ALICE)
    assert unknown.returncode != 0 and unknown.stdout == ""
    assert unknown.stderr == "sshjob: job %s has no container nosuch: podman container %s (pid %d)\n" % (
        job, name, pid)


def test_an_interactive_terminal_in_the_container_with_resize(pool):
    job, name, pid = podman_job(pool)
    for transport in ("openssh", "builtin"):
        term = Terminal(pool.argv("client", "-transport", transport, job, user=ALICE))
        try:
            term.expect("inside its podman container %s (pid %d)" % (name, pid))
            term.expect("/data # ")
            term.send("stty size; ps\n")
            term.expect("24 80")
            term.expect("sleep 600")
            term.resize(40, 132)
            term.send("stty size\n")
            term.expect("40 132")
            term.send("exit 3\n")
            assert term.proc.wait(timeout=20) == 3
        finally:
            term.close()


def test_an_apptainer_style_user_namespace_and_chroot(pool):
    rootfs = make_rootfs(os.path.join(pool.workdir(ALICE), "rootfs"), owner=ALICE)
    script = ("cd %s; mount --rbind /proc proc; export INSIDE=yes; exec /usr/sbin/chroot . /bin/sh -c "
              "'cd /data; export DEEP=deep; exec sleep 600'" % rootfs)
    job = pool.running_job("unshare", "-Urm", "--fork", "sh", "-c", script, user=ALICE)

    def payload():
        return next((int(p) for p in os.listdir("/proc") if p.isdigit() and readlink("/proc/%s/root" % p) == rootfs),
                    None)

    wait_for(payload, what="the chroot")
    for transport in ("openssh", "builtin"):
        result = pool.sshjob("client", "-transport", transport, "-debug", job,
                             "echo $INSIDE $DEEP; pwd; cat /etc/os-release; ls /", user=ALICE)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith('yes deep\n/data\nNAME="sshjob test image"\n'), result.stdout
        assert "results\nroot\nsys\ntmp\nx\n" in result.stdout
        assert "sleep in an unprivileged user namespace (pid %d)" % payload() in result.stderr
    copied = pool.workdir(ALICE)
    got = pool.sshjob("cp", job + ":/data/input.txt", copied, user=ALICE)
    assert got.returncode == 0, got.stderr
    with open(os.path.join(copied, "input.txt")) as f:
        assert f.read() == "the image's data\n"
    outside = pool.sshjob("client", "-container", "none", job, "ls /usr/sbin/chroot", user=ALICE)
    assert outside.stdout == "/usr/sbin/chroot\n", outside.stderr


def read(path):
    with open(path) as f:
        return f.read()


def readlink(path):
    try:
        return os.readlink(path)
    except OSError:
        return None


def test_root_enters_its_own_rootful_container(pool):
    podman_image("root", IMAGE)
    job, _, pid = podman_job(pool, user="root", options=ROOTFUL_LIMITS)
    result = pool.sshjob("client", job, "hostname; id -u; cat /etc/os-release")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "%s\n0\nNAME=\"sshjob test image\"\nVARIANT=busybox\n" % container_hostname(pid)


def test_x11_reaches_a_container_on_the_node_s_network_and_one_sentence_says_why_not_elsewhere(pool):
    """X11 forwarding listens on the node's loopback: a container on the
    node's network reaches it, one with a network of its own cannot."""
    check = 'echo "$DISPLAY"; d=${DISPLAY#localhost:}; timeout 3 nc localhost $((6000 + ${d%.*})) </dev/null; ' \
            'echo "nc $?"'
    with x_display() as display:
        xauth = os.path.join(pool.workdir(ALICE), "xauth")
        env = {"DISPLAY": display, "XAUTHORITY": xauth}
        shared, _, _ = podman_job(pool, network="host")
        result = pool.sshjob("client", "-X", shared, check, user=ALICE, env=env)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        forwarded, status = result.stdout.split("\n")[:2]
        assert forwarded.startswith("localhost:") and status != "nc 1", result.stdout  # connected
        private, name, pid = podman_job(pool)
        result = pool.sshjob("client", "-X", private, check, user=ALICE, env=env)
        assert result.stdout.endswith("nc 1\n"), result.stdout  # refused: nothing listens on its own loopback
        assert result.stderr.startswith("sshjob: podman container %s (pid %d) has a network of its own, so the X11 "
                                        "display that ssh forwards (DISPLAY=localhost:" % (name, pid)), result.stderr


# -- the job's environment, container or not -----------------------------------------------------------------


def test_a_session_takes_the_environment_and_directory_of_the_job_s_program(pool):
    workdir = pool.workdir(ALICE)
    job = pool.running_job("sh", "-c", "export MARK=inscript; mkdir -p deeper; cd deeper; sleep 600; true",
                           user=ALICE, workdir=workdir)
    sleeper = next(p for p in pool_processes(pool, ALICE, "sleep 600") if readlink(
        "/proc/%d/cwd" % p) == os.path.join(workdir, "deeper"))
    wait_for(lambda: sshjob.process_age(sshjob.process_stat(sleeper)[1]) >= sshjob.LONG_LIVED, what="a long life")
    payload = pool.sshjob("client", "-debug", job, "echo MARK=$MARK; pwd", user=ALICE)
    assert payload.stdout == "MARK=inscript\n%s/deeper\n" % workdir, payload.stderr
    assert "with the environment and directory of pid %d (sleep)" % sleeper in payload.stderr
    script = pool.sshjob("client", "-job-env", "script", job, "echo MARK=$MARK; pwd", user=ALICE)
    assert script.stdout == "MARK=\n%s\n" % workdir, script.stderr
    wrong = pool.sshjob("client", "-job-env", "mine", job, "true", user=ALICE)
    assert wrong.returncode == 2 and wrong.stderr == "sshjob: -job-env is payload or script, not 'mine'\n"


def pool_processes(pool, user, command):
    uid = pwd.getpwnam(user).pw_uid
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat("/proc/" + entry).st_uid == uid:
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    if f.read().replace(b"\0", b" ").strip() == command.encode():
                        found.append(int(entry))
        except OSError:
            pass
    return found


# -- files, in images with tools and without -----------------------------------------------------------------


def test_cp_scp_sftp_and_rsync_reach_the_container_s_files(pool):
    job, _, pid = podman_job(pool)
    here = pool.workdir(ALICE)
    up = os.path.join(here, "up.txt")
    with open(up, "w") as f:
        f.write("from the laptop\n")
    shutil.chown(up, ALICE, ALICE)
    for transport in ("openssh", "builtin"):
        got = pool.sshjob("cp", "-transport", transport, job + ":/data/input.txt", here, user=ALICE)
        assert got.returncode == 0, got.stderr
        assert read(os.path.join(here, "input.txt")) == "the image's data\n"
        os.unlink(os.path.join(here, "input.txt"))
        for target in ("/results/", "/results/renamed-%s.txt" % transport):
            put = pool.sshjob("cp", "-transport", transport, up, job + ":" + target, user=ALICE)
            assert put.returncode == 0, put.stderr
    listed = pool.sshjob("client", job, "cd /results && ls -n", user=ALICE).stdout
    assert re.search(r" 0 +0 +16 .* renamed-builtin.txt\n", listed) and " up.txt\n" in listed, listed
    owner = pwd.getpwnam(ALICE).pw_uid
    assert os.stat("/proc/%d/root/results/up.txt" % pid).st_uid == owner  # the owner's, as the container maps it

    scp = pool.sshjob("client", "-ssh", "scp", job, "remote:/data/input.txt", os.path.join(here, "scp.txt"),
                      user=ALICE)
    assert scp.returncode == 0 and read(os.path.join(here, "scp.txt")) == "the image's data\n", scp.stderr
    batch = os.path.join(here, "batch")
    with open(batch, "w") as f:
        f.write("ls /results\nget /data/input.txt %s/sftp.txt\nput %s /results/sftp.txt\nmkdir /results/made\n"
                "rename /results/sftp.txt /results/made/moved.txt\n" % (here, up))
    sftp = pool.sshjob("client", "-ssh", "sftp -b %s" % batch, job, user=ALICE)
    assert sftp.returncode == 0, sftp.stderr
    assert "renamed-openssh.txt" in sftp.stdout and read(os.path.join(here, "sftp.txt")) == \
        "the image's data\n"
    assert os.path.isfile("/proc/%d/root/results/made/moved.txt" % pid)

    rsh = "%s %s client" % (USER_PYTHON, pool.pyz)
    env = {"SSHJOB_CONFIG": pool.config}
    down = as_user(ALICE, ["rsync", "-a", "-e", rsh, job + ":/results/", here + "/synced/"], env=env)
    assert down.returncode == 0, down.stderr
    assert read(os.path.join(here, "synced", "made", "moved.txt")) == "from the laptop\n"
    again = as_user(ALICE, ["rsync", "-rt", "-e", rsh + " -transport builtin", here + "/synced/made",
                            job + ":/results/back"], env=env)
    assert again.returncode == 0, again.stderr
    assert os.stat("/proc/%d/root/results/back/made/moved.txt" % pid).st_uid == owner


def test_an_image_without_a_shell_still_gives_its_files(pool):
    job, name, pid = podman_job(pool, image=NO_SHELL_IMAGE, command=("/bin/busybox", "sleep", "600"))
    for transport in ("openssh", "builtin"):
        refused = pool.sshjob("client", "-transport", transport, job, "echo hi", user=ALICE)
        assert refused.returncode == 127 and refused.stdout == ""
        assert refused.stderr.startswith("sshjob: the image of podman container %s (pid %d) has no shell" % (
            name, pid)) and refused.stderr.count("\n") == 1, refused.stderr
    here = pool.workdir(ALICE)
    got = pool.sshjob("cp", job + ":/etc/os-release", here, user=ALICE)
    assert got.returncode == 0 and "VARIANT=noshell" in read(os.path.join(here, "os-release")), got.stderr
    put = pool.sshjob("cp", os.path.join(here, "os-release"), job + ":/results/copied", user=ALICE)
    assert put.returncode == 0, put.stderr
    assert "VARIANT=noshell" in read("/proc/%d/root/results/copied" % pid)
    batch = os.path.join(here, "batch")
    with open(batch, "w") as f:
        f.write("ls /results\nput %s/os-release /results/by-sftp\n" % here)
    sftp = pool.sshjob("client", "-ssh", "sftp -b %s" % batch, job, user=ALICE)
    assert sftp.returncode == 0 and "copied" in sftp.stdout, sftp.stderr
    assert os.path.isfile("/proc/%d/root/results/by-sftp" % pid)
    env = {"SSHJOB_CONFIG": pool.config}
    rsh = "%s %s client" % (USER_PYTHON, pool.pyz)
    for source, target in ((job + ":/results/", here + "/synced/"), (here + "/synced/", job + ":/results/again/")):
        synced = as_user(ALICE, ["rsync", "-rt", "-e", rsh, source, target], env=env)
        assert synced.returncode == 0, synced.stderr
    assert os.path.isfile("/proc/%d/root/results/again/by-sftp" % pid)


def test_links_in_the_image_resolve_inside_it_never_on_the_node(pool):
    """The image's /x is a link to /etc: through it, a copy reads and
    writes the image's /etc, never this node's."""
    job, _, pid = podman_job(pool)
    here = pool.workdir(ALICE)
    got = pool.sshjob("cp", job + ":/x/os-release", here, user=ALICE)
    assert got.returncode == 0 and "VARIANT=busybox" in read(os.path.join(here, "os-release"))
    passwd = pool.sshjob("cp", job + ":/x/passwd", here, user=ALICE)
    assert passwd.returncode != 0 and not os.path.exists(os.path.join(here, "passwd"))
    assert "No such file" in passwd.stderr, passwd.stderr
    marker = "sshjob-escape-%s" % uuid.uuid4().hex[:8]
    local = os.path.join(here, marker)
    with open(local, "w") as f:
        f.write("planted\n")
    shutil.chown(local, ALICE, ALICE)
    put = pool.sshjob("cp", local, job + ":/x/", user=ALICE)
    assert put.returncode == 0, put.stderr
    assert not os.path.exists("/etc/" + marker)
    assert read("/proc/%d/root/etc/%s" % (pid, marker)) == "planted\n"
    batch = os.path.join(here, "batch")
    with open(batch, "w") as f:
        f.write("get /x/passwd %s/sftp-passwd\n" % here)
    sftp = pool.sshjob("client", "-ssh", "sftp -b %s" % batch, job, user=ALICE)
    assert sftp.returncode != 0 and not os.path.exists(os.path.join(here, "sftp-passwd"))
    rsh = "%s %s client" % (USER_PYTHON, pool.pyz)
    synced = as_user(ALICE, ["rsync", "-rt", "-e", rsh, job + ":/x/", here + "/etc/"],
                     env={"SSHJOB_CONFIG": pool.config})
    assert synced.returncode == 0, synced.stderr
    synced = set(os.listdir(os.path.join(here, "etc")))
    assert {marker, "os-release"} <= synced and "passwd" not in synced and "shadow" not in synced, synced


# -- the job's lifecycle reaches its container ---------------------------------------------------------------


def test_suspend_continue_rm_and_vacate_reach_the_container(pool):
    job, name, pid = podman_job(pool)
    assert pool.sshjob("suspend", job, user=ALICE).returncode == 0
    wait_for(lambda: state_of(pid) == "T", what="the container to stop")
    assert pool.sshjob("continue", job, user=ALICE).returncode == 0
    wait_for(lambda: state_of(pid) in ("S", "R"), what="the container to go on")
    assert pool.sshjob("vacate", job, user=ALICE).returncode == 0
    wait_for(lambda: state_of(pid) is None, what="the vacated container to end")
    pool.wait_state(job, "running")
    again = wait_for_container(ALICE, name)
    assert again != pid  # it runs again, in a new container of the same name
    assert pool.sshjob("rm", job, user=ALICE).returncode == 0
    wait_for(lambda: state_of(again) is None and name not in podman(ALICE, "ps", "-a").stdout, timeout=30,
             what="the removed job's container to go, and podman to know")


def test_a_container_that_ended_leaves_the_session_on_the_node_saying_so(pool):
    name = unique()
    env = podman_env(ALICE)
    job = pool.running_job("sh", "-c", "%s --name %s %s sleep 600; exec sleep 600" % (
        " ".join(PODMAN_RUN), name, IMAGE), user=ALICE, options=["--env", "XDG_RUNTIME_DIR=" + env["XDG_RUNTIME_DIR"]])
    pid = wait_for_container(ALICE, name)
    assert pool.sshjob("client", job, "hostname", user=ALICE).stdout == container_hostname(pid) + "\n"
    assert podman(ALICE, "stop", "--time", "0", name).returncode == 0
    wait_for(lambda: state_of(pid) is None, what="the container to end")
    wait_for(lambda: not [line for line in pool.sshjob("warm", "list", user=ALICE).stdout.splitlines()
                          if line.startswith(job + " ") and " ssh master " in line],
             what="the idle connection of the client's ssh master, whose sessions would enter it, to end")
    result = pool.sshjob("client", job, "hostname", user=ALICE)
    assert result.returncode == 0 and result.stdout == socket.gethostname() + "\n"
    assert result.stderr == "sshjob: job %s's podman container %s (pid %d) has ended, so this session runs on the " \
                            "node, outside it\n" % (job, name, pid)


# -- no new privilege ----------------------------------------------------------------------------------------


def helper(spec, user):
    """container_session, run as `user` with `spec`, as the node runs it."""
    code = sshjob.source_of(sshjob.serve_sftp) + sshjob.source_of(sshjob.container_session) + \
        "container_session()\n"
    return as_user(user, [USER_PYTHON, "-I", "-S", "-c", code, spec, "hostname"])


def spec_of(pid, started=None):
    import json
    return json.dumps({"pid": pid, "started": started or sshjob.process_stat(pid)[1], "label": "the payload",
                       "shells": ["/bin/sh"]})


def test_an_owner_enters_neither_a_root_container_nor_a_pid_taken_since(pool):
    podman_image("root", IMAGE)
    _, _, root_pid = podman_job(pool, user="root", options=ROOTFUL_LIMITS)
    refused = helper(spec_of(root_pid), ALICE)
    assert refused.returncode == 126 and refused.stdout == ""
    assert refused.stderr.startswith("sshjob: cannot enter the payload: it is not yours to enter"), refused.stderr
    _, _, mine = podman_job(pool)
    assert helper(spec_of(mine), ALICE).stdout == container_hostname(mine) + "\n"
    swapped = helper(spec_of(mine, started="1"), ALICE)  # the pid, but not the process that was found
    assert swapped.returncode == 126 and swapped.stderr == "sshjob: the payload has ended: try again, or use " \
                                                           "-container none\n"
    other = helper(spec_of(mine), BOB)
    assert other.returncode == 126 and "not yours to enter" in other.stderr


@pytest.mark.parametrize("python", INTERPRETERS, ids=lambda p: p.split("/")[-3] if "pyenv" in p else "python")
def test_the_helper_enters_on_the_oldest_and_newest_python(python, tmp_path):
    """Python 3.12 has os.setns; before it, ctypes calls setns(2)."""
    rootfs = make_rootfs(str(tmp_path / "rootfs"))
    inside = subprocess.Popen(["unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc=%s/proc" % rootfs,
                               "sh", "-c", "hostname sealed; exec chroot %s /bin/sleep 600" % rootfs])
    try:
        def payload():
            return next((int(p) for p in os.listdir("/proc") if p.isdigit() and readlink(
                "/proc/%s/root" % p) == rootfs), None)

        wait_for(payload, what="the chroot")
        code = sshjob.source_of(sshjob.serve_sftp) + sshjob.source_of(sshjob.container_session) + \
            "container_session()\n"
        result = run([python, "-I", "-S", "-c", code, spec_of(payload()), "hostname; cat /etc/os-release; ps"])
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith('sealed\nNAME="sshjob test image"\n') and "sleep" in result.stdout
    finally:
        inside.kill()
        inside.wait()
