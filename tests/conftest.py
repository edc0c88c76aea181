"""Fixtures: the built pyz, real interpreters, real Unix users, real pools.

Every end-to-end test runs `python3 dist/sshjob.pyz ...` as a user would,
against a pool of real daemons that run the real OpenSSH programs."""

import contextlib
import fcntl
import glob
import os
import pty
import pwd
import re
import select
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import zlib

import pytest
import slurm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALICE, BOB = "sshjob-alice", "sshjob-bob"
USERS = (ALICE, BOB)
USER_PYTHON = "/usr/bin/python3"  # the pyenv interpreters live under /root, closed to other users


def pyenv_interpreters():
    """The oldest and the newest Python 3 under /root/.pyenv/versions."""

    def version(path):
        match = re.search(r"/(\d+)\.(\d+)\.(\d+)[^/]*/bin", path)
        return tuple(int(n) for n in match.groups()) if match else (0,)

    found = sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python3"), key=version)
    return [found[0], found[-1]] if found else []


INTERPRETERS = pyenv_interpreters() or [sys.executable]


@contextlib.contextmanager
def machine_lock(name):
    """A lock over this machine: the workers of pytest-xdist share its test
    users, its build and its Slurm."""
    with open("/tmp/.sshjob-tests-%s.lock" % name, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def x_display():
    """A virtual X display (Xvfb) for the -X tests, on a display number that
    Xvfb finds free (and says, once it is ready), stopped afterwards."""
    if not (shutil.which("Xvfb") and shutil.which("xdpyinfo")):
        pytest.fail("Xvfb and xdpyinfo are not installed (apt-get install xvfb x11-utils xauth)")
    ready, says = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(says), "-nolisten", "tcp"], pass_fds=(says,),
                            stderr=subprocess.DEVNULL)
    os.close(says)
    try:
        with os.fdopen(ready) as f:
            number = f.readline().strip()
        assert number.isdigit(), "Xvfb did not start"
        yield ":" + number
    finally:
        xvfb.terminate()
        xvfb.wait()


X11_CHECK = 'echo "$DISPLAY"; xdpyinfo | grep -c "^screen #"'  # prints the forwarded display and its screens


def drive_terminal(argv, steps, timeout=30):
    """Run argv on a new pseudo-terminal; for each (expect, send) step wait
    for `expect` in the output, then type `send`.  Returns (status, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, b"\x18\x00\x50\x00\x00\x00\x00\x00")

    def controlling_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_terminal)
    os.close(slave)
    output = b""
    deadline = time.time() + timeout
    try:
        for expect, send in steps:
            while expect.encode() not in output:
                assert time.time() < deadline, "never saw %r in %r" % (expect, output)
                if select.select([master], [], [], 0.2)[0]:
                    try:
                        output += os.read(master, 4096)
                    except OSError:
                        break
            if send:
                os.write(master, send.encode())
        status = proc.wait(timeout=max(1, deadline - time.time()))
        while select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        return status, output.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


class Terminal:
    """A program on a pseudo-terminal, driven as a person would."""

    def __init__(self, argv, rows=24, columns=80):
        self.master, self.slave = pty.openpty()
        self.resize(rows, columns)
        self.initial = termios.tcgetattr(self.slave)

        def controlling_terminal():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(argv, stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     preexec_fn=controlling_terminal)
        self.output = b""

    def resize(self, rows, columns):
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def expect(self, text, timeout=20):
        deadline = time.time() + timeout
        while text.encode() not in self.output:
            assert time.time() < deadline, "never saw %r in %r" % (text, self.output[-500:])
            if select.select([self.master], [], [], 0.1)[0]:
                self.output += os.read(self.master, 4096)
        at = self.output.index(text.encode()) + len(text)
        seen, self.output = self.output[:at], self.output[at:]
        return seen.decode(errors="replace")

    def send(self, text):
        os.write(self.master, text.encode())

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def run(argv, timeout=60, **kwargs):
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(argv, timeout=timeout, universal_newlines=True, **kwargs)


def listing(root, with_root=False):
    """{path under `root`: (mode bits, owner's uid, content of a file)}; links are not followed."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files + (["."] if with_root and directory == root else []):
            path = os.path.normpath(os.path.join(directory, name))
            info = os.lstat(path)
            content = None
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    content = f.read()
            found[os.path.relpath(path, root)] = (stat.S_IMODE(info.st_mode), info.st_uid, content)
    return found


def home_of(user):
    return pwd.getpwnam(user).pw_dir


def as_user(user, argv, env=None, **kwargs):
    """argv as `user` would type it: their HOME, their ~/.ssh/config."""
    variables = {"HOME": home_of(user), "PATH": os.environ["PATH"], "SHELL": "/bin/sh", "USER": user,
                 "LOGNAME": user, "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
    variables.update(env or {})
    kwargs.setdefault("cwd", "/")
    return run(["runuser", "-u", user, "--", "env", "-i"] + ["%s=%s" % item for item in variables.items()
                                                             if item[1] is not None] + list(argv), **kwargs)


def agent_log(run, user=ALICE):
    """What a job's agent logged on this node: its log is named by the job's
    id there (Slurm's job id; a pool job's run, JOB.NODE)."""
    path = "/tmp/sshjob-%d/agent-%s.log" % (pwd.getpwnam(user).pw_uid, run)
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait_for(predicate, timeout=20, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out waiting for " + what
        time.sleep(0.05)


def state_of(pid):
    """The process state letter from /proc/PID/stat, or None once it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between the open and the read
        return None


WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])  # which of pytest-xdist's workers this is
_ports = iter(range(20000 + 500 * WORKER, 20500 + 500 * WORKER))


def free_port():
    """A port for a program that cannot be told port 0 (ssh -L, -D, -R): one
    of this worker's own, below the kernel's range for outgoing connections,
    so that no other worker and no connection takes it meanwhile."""
    for port in _ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("this worker's ports are all taken")


class Host:
    """A network namespace with a veth link to this one: another host, on a
    /24 of its own (10.231.N.0) that no other worker's host has."""

    def __init__(self, label):
        with machine_lock("netns"):
            used = subprocess.run(["ip", "-o", "-4", "addr"], stdout=subprocess.PIPE, universal_newlines=True).stdout
            index = next(n for n in range(1, 255) if " 10.231.%d.1/" % n not in used)
            self.name = "sshjob-%s-%d" % (label, index)
            self.outer, self.inner = "10.231.%d.1" % index, "10.231.%d.2" % index
            link = "sjv%d" % index
            for argv in (["ip", "netns", "add", self.name],
                         ["ip", "link", "add", link + "a", "type", "veth", "peer", "name", link + "b"],
                         ["ip", "link", "set", link + "b", "netns", self.name],
                         ["ip", "addr", "add", self.outer + "/24", "dev", link + "a"],
                         ["ip", "link", "set", link + "a", "up"],
                         ["ip", "netns", "exec", self.name, "ip", "addr", "add", self.inner + "/24", "dev",
                          link + "b"],
                         ["ip", "netns", "exec", self.name, "ip", "link", "set", link + "b", "up"],
                         ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"]):
                subprocess.run(argv, check=True)
        self.link = link + "a"

    def remove(self):
        subprocess.run(["ip", "netns", "delete", self.name])
        subprocess.run(["ip", "link", "delete", self.link], stderr=subprocess.DEVNULL)


def build():
    """dist/sshjob.pyz, built anew unless it is newer than what it is built from."""
    target = os.path.join(ROOT, "dist", "sshjob.pyz")
    with machine_lock("build"):
        sources = max(os.path.getmtime(os.path.join(ROOT, name)) for name in ("sshjob.py", "build.py"))
        if not os.path.exists(target) or os.path.getmtime(target) < sources:
            result = run([sys.executable, os.path.join(ROOT, "build.py")], timeout=300)
            assert result.returncode == 0, result.stderr
    return target


def copies(marker):
    """How many processes run `sleep MARKER` now."""
    found = 0
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                if f.read().split(b"\0")[:2] == [b"sleep", marker.encode()]:
                    found += 1
        except OSError:
            pass
    return found


class Census(threading.Thread):
    """Counts the copies of some markers, every 50 ms, until stopped."""

    def __init__(self, markers):
        super().__init__(daemon=True)
        self.markers = list(markers)
        self.most = dict.fromkeys(self.markers, 0)
        self.done = threading.Event()
        self.start()

    def run(self):
        while not self.done.is_set():
            for marker in self.markers:
                self.most[marker] = max(self.most[marker], copies(marker))
            time.sleep(0.05)

    def stop(self):
        self.done.set()
        self.join()
        return self.most


@pytest.fixture(scope="session")
def base():
    """A world-traversable scratch directory holding a copy of the built pyz,
    so that the test users can reach both the pool and the program."""
    pyz = build()
    path = tempfile.mkdtemp(prefix="sshjob-tests-", dir="/tmp")
    os.chmod(path, 0o755)
    shutil.copy(pyz, os.path.join(path, "sshjob.pyz"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def users():
    """Two real Unix users, made for the tests (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("creating test users needs root")
    if not os.access(USER_PYTHON, os.X_OK):
        pytest.skip("the test users need a system %s" % USER_PYTHON)
    for name in USERS:
        make_user(name)
    return USERS


def make_user(name, shell="/bin/bash"):
    """A real Unix user for the tests, unless there is one."""
    with machine_lock("users"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--shell", shell, name], check=True)


def command_line(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(gone)"


class Pool:
    """A personal pool started with `sshjob pool start`, driven through the pyz."""

    def __init__(self, base, python, name, settings=None):
        self.python = python
        self.pyz = os.path.join(base, "sshjob.pyz")
        self.dir = tempfile.mkdtemp(prefix=name + "-", dir=base)
        os.chmod(self.dir, 0o755)
        self.config = os.path.join(self.dir, "sshjob.conf")
        settings = dict({"starter_slots": "64", "ticket_lifetime": "5"}, **(settings or {}))
        lines = ["[sshjob]"] + ["%s = %s" % item for item in settings.items()]
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.started = False

    def start(self):
        result = self.sshjob("pool", "start", "--dir", self.dir, config=False)
        assert result.returncode == 0, result.stderr
        assert "export SSHJOB_CONFIG=" in result.stdout
        self.started = True
        return self

    def stop(self):
        if self.started:
            self.sshjob("pool", "stop", "--dir", self.dir)
            self.started = False
            deadline = time.time() + 30  # a job's podman container gets podman stop's 5 s, and more on a busy machine
            while self.processes_inside() and time.time() < deadline:
                time.sleep(0.1)
            left = {pid: command_line(pid) for pid in self.processes_inside()}
            assert left == {}, "processes outlived the pool"

    def processes_inside(self):
        """Pids of processes whose working directory is in the pool's
        directory: the jobs' and sessions' (their work dirs live there)."""
        found = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.readlink("/proc/%s/cwd" % entry).startswith(self.dir + "/"):
                    found.append(int(entry))
            except OSError:
                pass
        return found

    def argv(self, *args, user=None, env=None, config=True):
        variables = {"PATH": os.environ["PATH"], "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
                     "SHELL": "/bin/sh", "HOME": pwd.getpwnam(user or "root").pw_dir if user else os.environ.get(
                         "HOME", "/root")}
        if config:
            variables["SSHJOB_CONFIG"] = self.config
        variables.update(env or {})
        prefix = ["runuser", "-u", user, "--"] if user else []
        assignments = ["%s=%s" % item for item in variables.items() if item[1] is not None]
        python = USER_PYTHON if user else self.python
        return prefix + ["env", "-i"] + assignments + [python, self.pyz] + list(args)

    def sshjob(self, *args, user=None, env=None, config=True, timeout=60, **kwargs):
        return run(self.argv(*args, user=user, env=env, config=config), timeout=timeout, **kwargs)

    def submit(self, *command, user=None, workdir=None, options=()):
        workdir = workdir or self.workdir(user)
        result = self.sshjob("submit", "--workdir", workdir, *options, "--", *command, user=user)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()[0]

    def workdir(self, user=None):
        path = tempfile.mkdtemp(prefix="run-", dir=self.dir)
        if user:
            record = pwd.getpwnam(user)
            os.chown(path, record.pw_uid, record.pw_gid)
        return path

    def pid(self, role):
        """The pid of the pool's schedd or starter."""
        with open(os.path.join(self.dir, role + ".pid")) as f:
            return int(f.read())

    def state(self, job):
        result = self.sshjob("q", "--all")
        for line in result.stdout.splitlines()[1:]:
            fields = line.split()
            if fields[0] == job:
                return fields[2]
        return None

    def wait_state(self, job, state, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.state(job) == state:
                return
            time.sleep(0.1)
        raise AssertionError("job %s did not reach state %s (is %s)" % (job, state, self.state(job)))

    def running_job(self, *command, **kwargs):
        job = self.submit(*(command or ("sleep", "600")), **kwargs)
        self.wait_state(job, "running")
        return job


@pytest.fixture(scope="session", params=INTERPRETERS, ids=lambda p: "py" + p.split("/")[-3] if "pyenv" in p else "py")
def pool(request, base):
    """One pool per interpreter, shared by the tests that need no special settings."""
    pool = Pool(base, request.param, "pool").start()
    yield pool
    pool.stop()


@pytest.fixture
def make_pool(base):
    """Pools with settings of their own, stopped after the test."""
    pools = []

    def make(settings=None, python=INTERPRETERS[-1], start=True):
        pool = Pool(base, python, "pool", settings)
        pools.append(pool)
        return pool.start() if start else pool

    yield make
    for pool in pools:
        pool.stop()


# -- containers: rootless and rootful podman, images made here from busybox-static ----------------------------

BUSYBOX = "/bin/busybox"  # Debian's busybox-static: one static program, so an image needs nothing else
APPLETS = ("sh", "ls", "ps", "cat", "echo", "id", "hostname", "pwd", "sleep", "env", "mkdir", "stty", "readlink",
           "grep", "head", "wc", "touch", "true", "nc", "timeout")
_VERSION = "%08x" % (zlib.crc32(" ".join(APPLETS).encode()))  # a storage made by an older make_rootfs is not reused
IMAGE, NO_SHELL_IMAGE = "localhost/sshjob-test:busybox-" + _VERSION, "localhost/sshjob-test:noshell-" + _VERSION
PODMAN_RUN = ["podman", "--runtime", "runc", "run", "--rm", "--network", "none"]  # what this machine's podman needs
ROOTFUL_LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]  # within this VM's hard limits


def make_rootfs(path, shell=True, owner=None):
    """An image's files: busybox, with a shell and its tools or without any
    shell at all; an os-release that says which; /data, /results, and /x, a
    link to /etc that must resolve inside the image."""
    for directory in ("bin", "etc", "data", "results", "proc", "dev", "sys", "tmp", "root"):
        os.makedirs(os.path.join(path, directory), exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(path, "bin", "busybox"))
    for applet in APPLETS if shell else ():
        os.symlink("busybox", os.path.join(path, "bin", applet))
    with open(os.path.join(path, "etc", "os-release"), "w") as f:
        f.write('NAME="sshjob test image"\nVARIANT=%s\n' % ("busybox" if shell else "noshell"))
    with open(os.path.join(path, "data", "input.txt"), "w") as f:
        f.write("the image's data\n")
    os.symlink("/etc", os.path.join(path, "x"))
    if owner:
        subprocess.run(["chown", "-R", "%s:%s" % (owner, owner), path], check=True)
    return path


def podman_env(user):
    """What rootless podman needs here: a private XDG_RUNTIME_DIR of the user's."""
    record = pwd.getpwnam(user)
    if record.pw_uid == 0:
        return {}
    path = "/tmp/sshjob-test-podman-%d" % record.pw_uid
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    os.chown(path, record.pw_uid, record.pw_gid)
    return {"XDG_RUNTIME_DIR": path}


def podman(user, *args, timeout=120):
    """`podman ARGS` as `user`, resetting the user's podman once if a machine restart left it stale.

    A rootless podman whose pause process is gone while its database still
    holds running containers (a machine restarted, a CI machine made from a
    used one) refuses every command until `podman system migrate`.
    """
    said = run_podman(user, list(args), timeout)
    if said.returncode != 0 and "podman system migrate" in said.stderr:
        with machine_lock("podman-migrate-" + user):
            run_podman(user, ["system", "migrate"], timeout)
        said = run_podman(user, list(args), timeout)
    return said


def run_podman(user, args, timeout):
    env = podman_env(user)
    if user == "root":
        return run(["podman"] + args, env=dict(os.environ, **env), timeout=timeout, cwd="/")
    return as_user(user, ["podman"] + args, env=env, timeout=timeout)


def podman_image(user, name, shell=True):
    """Image `name` in `user`'s podman storage, imported from local files."""
    with machine_lock("podman-" + user):
        if podman(user, "image", "exists", name).returncode == 0:
            return name
        work = tempfile.mkdtemp(prefix="sshjob-test-image-")
        try:
            make_rootfs(os.path.join(work, "rootfs"), shell)
            archive = os.path.join(work, "rootfs.tar")
            subprocess.run(["tar", "-C", os.path.join(work, "rootfs"), "-cf", archive, "."], check=True)
            os.chmod(work, 0o755)
            os.chmod(archive, 0o644)
            imported = podman(user, "import", archive, name)
            assert imported.returncode == 0, imported.stderr
        finally:
            shutil.rmtree(work)
    return name


def container_pid(user, name):
    """The node's pid of a running container's first process, or None."""
    said = podman(user, "inspect", "--format", "{{.State.Pid}}", name)
    return int(said.stdout) if said.returncode == 0 and said.stdout.strip() not in ("", "0") else None


def wait_for_container(user, name, timeout=60):
    wait_for(lambda: container_pid(user, name), timeout=timeout, what="container %s to run" % name)
    return container_pid(user, name)


def remove_containers(user, prefix="sshjob-test-"):
    names = podman(user, "ps", "--all", "--format", "{{.Names}}").stdout.split()
    mine = [name for name in names if name.startswith(prefix)]
    if mine:
        podman(user, "rm", "--force", "--time", "0", *mine)


@pytest.fixture(scope="session")
def images(users):
    """The test images in alice's rootless storage: busybox, and one without a shell."""
    return {"busybox": podman_image(ALICE, IMAGE), "noshell": podman_image(ALICE, NO_SHELL_IMAGE, shell=False)}


# -- Slurm ---------------------------------------------------------------------------------------------


class Cluster:
    """The running Slurm, and the built pyz as its users run it."""

    def __init__(self, base, host):
        self.base = base
        self.host = host
        self.pyz = os.path.join(base, "sshjob.pyz")
        self.dir = tempfile.mkdtemp(prefix="slurm-", dir=base)
        os.chmod(self.dir, 0o755)

    def env(self, user, extra=None):
        variables = {"PATH": os.environ["PATH"], "HOME": pwd.getpwnam(user).pw_dir, "SHELL": "/bin/sh",
                     "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
        variables.update(extra or {})
        return variables

    def argv(self, *args, user=ALICE, env=None, scheduler="--scheduler=slurm"):
        assignments = ["%s=%s" % item for item in self.env(user, env).items() if item[1] is not None]
        role = [args[0], scheduler] if scheduler and args[0] == "client" else [args[0]]
        return ["runuser", "-u", user, "--", "env", "-i"] + assignments + [USER_PYTHON, self.pyz] + role + list(
            args[1:])

    def sshjob(self, *args, user=ALICE, env=None, scheduler="--scheduler=slurm", timeout=60, **kwargs):
        kwargs.setdefault("cwd", "/")
        return run(self.argv(*args, user=user, env=env, scheduler=scheduler), timeout=timeout, **kwargs)

    def workdir(self, user=ALICE):
        path = tempfile.mkdtemp(prefix="work-", dir=self.dir)
        record = pwd.getpwnam(user)
        os.chown(path, record.pw_uid, record.pw_gid)
        return path

    def sbatch(self, *options, user=ALICE, workdir=None, script="sleep 600", env=None):
        workdir = workdir or self.workdir(user)
        result = run(["runuser", "-u", user, "--", "sbatch", "--parsable", "-D", workdir, "-o", "/dev/null"]
                     + list(options) + ["--wrap", script], cwd="/", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.strip().split(";")[0]

    def state(self, job):
        return run(["squeue", "-h", "-j", job, "-o", "%T"]).stdout.strip().splitlines()

    def running(self, *options, **kwargs):
        job = self.sbatch(*options, **kwargs)
        self.wait_running(job)
        return job

    def wait_running(self, job, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.state(job)
            if states and all(s == "RUNNING" for s in states):
                return
            time.sleep(0.2)
        raise AssertionError("Slurm job %s did not start (%s)" % (job, self.state(job)))


@pytest.fixture(scope="module")
def cluster(base, users):
    missing = slurm.missing_programs()
    assert not missing, "Slurm is not installed (%s): apt-get install slurmctld slurmd slurm-client munge" % missing
    host = slurm.start()
    yield Cluster(base, host)
    slurm.stop()
