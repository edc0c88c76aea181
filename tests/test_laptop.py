"""End to end: jobs as ssh hosts from the user's own laptop (issue 23).

The laptop is a network namespace with a user of its own, whose firewall
lets it reach nothing but the login node's sshd (a real sshd that this test
starts on the link to it).  On the login node, alice runs `sshjob ssh-config
--via login --key LAPTOP.pub` and the laptop's user pastes the block into
the laptop's ~/.ssh/config.  The laptop has OpenSSH only; its private key
never leaves it; the job's host key is pinned on the laptop through
KnownHostsCommand."""

import os
import shutil
import socket
import subprocess
import tempfile

import pytest
from conftest import (
    ALICE,
    BOB,
    INTERPRETERS,
    USER_PYTHON,
    Host,
    Pool,
    as_user,
    free_port,
    home_of,
    make_user,
    run,
    wait_for,
)

LAPTOP = "sshjob-laptop"


def read(path):
    with open(path) as f:
        return f.read()


pytestmark = pytest.mark.xdist_group("slurm")  # the laptop reaches Slurm jobs too


class Laptop:
    """The laptop's namespace and user, and the login node's sshd it reaches."""

    def __init__(self, base):
        make_user(LAPTOP)
        self.dir = tempfile.mkdtemp(prefix="laptop-", dir=base)
        os.chmod(self.dir, 0o755)
        self.host = Host("laptop")
        self.port = free_port()
        self.home = home_of(LAPTOP)
        self.ssh_dir = os.path.join(self.home, ".ssh")
        shutil.rmtree(self.ssh_dir, ignore_errors=True)
        os.makedirs(self.ssh_dir, 0o700)
        shutil.chown(self.ssh_dir, LAPTOP, LAPTOP)
        self.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.ssh_dir + "/id_ed25519"], check=True)
        self.sshd = self.start_sshd()
        self.firewall()

    def start_sshd(self):
        """The login node's sshd, for alice, who logs in with the laptop's key."""
        hostkey = os.path.join(self.dir, "login_host_key")
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hostkey], check=True)
        authorized = os.path.join(self.dir, "authorized")
        os.makedirs(authorized)
        shutil.copy(self.ssh_dir + "/id_ed25519.pub", os.path.join(authorized, ALICE))
        config = os.path.join(self.dir, "sshd_config")
        with open(config, "w") as f:
            f.write("ListenAddress %s:%d\nHostKey %s\nAuthorizedKeysFile %s/%%u\nStrictModes no\nUsePAM yes\n"
                    "PasswordAuthentication no\nKbdInteractiveAuthentication no\nAllowUsers %s\n"
                    "PidFile none\nLogLevel ERROR\n" % (self.host.outer, self.port, hostkey, authorized, ALICE))
        os.makedirs("/run/sshd", 0o755, exist_ok=True)
        sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", config], stderr=open(  # noqa: SIM115
            os.path.join(self.dir, "sshd.log"), "w"))

        def listening():
            with socket.socket() as sock:
                return sock.connect_ex((self.host.outer, self.port)) == 0

        wait_for(listening, what="the login node's sshd")
        with open(hostkey + ".pub") as f:
            key = " ".join(f.read().split()[:2])
        self.write(".ssh/known_hosts", "login %s\n" % key)
        return sshd

    def firewall(self):
        """The laptop reaches the login node's sshd, and nothing else."""
        for rule in (["-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT"],
                     ["-A", "OUTPUT", "-p", "tcp", "-d", self.host.outer, "--dport", str(self.port), "-j", "ACCEPT"],
                     ["-P", "OUTPUT", "DROP"]):
            run(["ip", "netns", "exec", self.host.name, "iptables"] + rule, check=True)

    def write(self, name, text):
        path = os.path.join(self.home, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        shutil.chown(path, LAPTOP, LAPTOP)

    def configure(self, block):
        self.write(".ssh/config", "Host login\n    HostName %s\n    Port %d\n    User %s\n    HostKeyAlias login\n\n%s"
                   % (self.host.outer, self.port, ALICE, block))

    def argv(self, argv):
        """argv as the laptop's user types it, on the laptop: its HOME, its network."""
        variables = ["HOME=" + self.home, "PATH=/usr/local/bin:/usr/bin:/bin", "USER=" + LAPTOP, "LANG=C.UTF-8"]
        return ["ip", "netns", "exec", self.host.name, "runuser", "-u", LAPTOP, "--", "env", "-i"] + variables + argv

    def run(self, argv, timeout=90, **kwargs):
        return run(self.argv(argv), timeout=timeout, cwd="/", **kwargs)

    def public_key(self):
        with open(self.ssh_dir + "/id_ed25519.pub") as f:
            return f.read().strip()

    def close(self):
        self.sshd.terminate()
        self.sshd.wait()
        self.host.remove()


@pytest.fixture(scope="module")
def laptop(base, users):
    laptop = Laptop(base)
    yield laptop
    laptop.close()


@pytest.fixture(scope="module")
def login(base, users, laptop):
    """A root-run pool on the login node; the laptop configured from alice's `ssh-config --via`."""
    pool = Pool(base, INTERPRETERS[-1], "login").start()
    block = as_user(ALICE, [USER_PYTHON, pool.pyz, "--config", pool.config, "ssh-config", "--via", "login", "--key",
                            laptop.public_key()])
    assert block.returncode == 0, block.stderr
    laptop.configure(block.stdout)
    yield pool
    pool.stop()


def test_the_block_for_the_laptop_names_its_key_and_the_login_node(login, laptop):
    config = read(os.path.join(laptop.home, ".ssh", "config"))
    key_type, key_blob = laptop.public_key().split()[:2]
    assert "proxy --relay --key %s:%s %%h %%r" % (key_type, key_blob) in config
    assert "KnownHostsCommand /usr/bin/ssh " in config and " known-hosts %H" in config
    assert "User %s" % ALICE in config and "StrictHostKeyChecking yes" in config
    assert "PRIVATE" not in config
    for wrong, said in ((["--key", "not a key"], "--key takes your laptop's public key"),
                        ([], "--via needs the laptop's public key"),
                        (["--key", laptop.public_key(), "--ssh", "ssh"], "--ssh takes the laptop's ssh as")):
        refused = as_user(ALICE, [USER_PYTHON, login.pyz, "--config", login.config, "ssh-config", "--via", "login"]
                          + wrong)
        assert refused.returncode == 2 and refused.stderr.startswith("sshjob: " + said), refused.stderr
        assert "Traceback" not in refused.stderr


def test_the_laptop_reaches_only_the_login_node(login, laptop):
    with socket.socket() as listener:
        listener.bind((laptop.host.outer, 0))
        listener.listen(1)
        probe = laptop.run(["timeout", "5", "bash", "-c", "echo > /dev/tcp/%s/%d" % listener.getsockname()])
    assert probe.returncode != 0
    assert laptop.run(["ssh", "login", "echo", "login"]).stdout == "login\n"


def test_ssh_scp_rsync_and_a_dynamic_forward_from_the_laptop(login, laptop):
    workdir = login.workdir(ALICE)
    job = login.running_job("sleep", "900", user=ALICE, workdir=workdir, options=["--env", "FOO=bar"])
    host = job + ".sshjob"
    result = laptop.run(["ssh", host, "pwd; echo $FOO; exit 5"])
    assert result.returncode == 5, result.stderr
    assert result.stdout.splitlines() == [workdir, "bar"]
    laptop.write("notes.txt", "from the laptop\n")
    up = laptop.run(["scp", laptop.home + "/notes.txt", host + ":"])
    assert up.returncode == 0, up.stderr
    assert read(os.path.join(workdir, "notes.txt")) == "from the laptop\n"
    as_user(ALICE, ["sh", "-c", "mkdir -p %s/out && echo result > %s/out/r.txt" % (workdir, workdir)])
    down = laptop.run(["rsync", "-a", host + ":out/", laptop.home + "/out/"])
    assert down.returncode == 0, down.stderr
    assert read(os.path.join(laptop.home, "out", "r.txt")) == "result\n"
    served, socks = free_port(), free_port()  # VS Code's way to its server: a -D forward
    said = os.path.join(laptop.dir, "forward.err")
    with open(said, "w") as errors:
        forward = subprocess.Popen(laptop.argv(["ssh", "-N", "-o", "ExitOnForwardFailure=yes", "-D", str(socks),
                                                host]), stderr=errors)
    try:
        started = as_user(ALICE, ["sh", "-c", "cd %s && setsid %s -m http.server %d --bind 127.0.0.1 >/dev/null "
                                  "2>&1 < /dev/null &" % (workdir, USER_PYTHON, served)])
        assert started.returncode == 0, started.stderr

        def fetched():
            assert forward.poll() is None, "ssh -D ended: %s" % read(said)
            got = laptop.run(["curl", "-s", "--max-time", "5", "--socks5-hostname", "127.0.0.1:%d" % socks,
                              "http://127.0.0.1:%d/out/r.txt" % served])
            return got.stdout == "result\n"

        wait_for(fetched, timeout=60, what="the job's web server through the laptop's -D forward")
    finally:
        forward.terminate()
        forward.wait()
        run(["pkill", "-f", "http.server %d" % served])


def test_the_job_s_host_key_is_pinned_on_the_laptop(login, laptop):
    job = login.running_job("sleep", "900", user=ALICE, workdir=login.workdir(ALICE))
    assert laptop.run(["ssh", job + ".sshjob", "true"]).returncode == 0
    pinned = laptop.run(["ssh", "login", USER_PYTHON, login.pyz, "--config", login.config, "known-hosts",
                         job + ".sshjob"]).stdout.split()
    keys = [read(path).split()[:2] for path in
            run(["sh", "-c", "ls %s/execute/*/hostkey/*.pub" % login.dir]).stdout.split()]
    assert pinned[0] == job + ".sshjob" and pinned[1:3] in keys
    other = read(os.path.join(laptop.dir, "login_host_key.pub")).split()[:2]  # a real key, not the job's
    forged = laptop.run(["ssh", "-o", "KnownHostsCommand=/bin/echo %%H %s %s" % tuple(other),
                            job + ".sshjob", "true"])
    assert forged.returncode == 255 and "Host key verification failed" in forged.stderr


def test_a_slurm_job_from_the_laptop(login, laptop, cluster):
    workdir = cluster.workdir()
    job = cluster.running(workdir=workdir)
    host = job + ".slurm.sshjob"
    result = laptop.run(["ssh", host, "echo $SLURM_JOB_ID; pwd; exit 3"])
    assert result.returncode == 3, result.stderr
    assert result.stdout.splitlines() == [job, workdir]
    laptop.write("input.txt", "for slurm\n")
    up = laptop.run(["scp", laptop.home + "/input.txt", host + ":"])
    assert up.returncode == 0, up.stderr
    assert read(os.path.join(workdir, "input.txt")) == "for slurm\n"


def test_paramiko_on_the_laptop(login, laptop):
    workdir = login.workdir(ALICE)
    job = login.running_job("sleep", "900", user=ALICE, workdir=workdir)
    result = laptop.run([USER_PYTHON, "-W", "ignore", "-c", CLIENTS, "paramiko", job + ".sshjob", "pwd; exit 6"])
    assert result.returncode == 6, result.stderr
    assert result.stdout == workdir + "\n"


def test_failures_reach_the_laptop_as_one_sentence(login, laptop):
    missing = laptop.run(["ssh", "98765.0.sshjob", "true"])
    assert missing.returncode == 255 and missing.stderr.startswith("sshjob: job 98765.0 "), missing.stderr
    job = login.running_job("sleep", "900", user=BOB, workdir=login.workdir(BOB))
    others = laptop.run(["ssh", job + ".sshjob", "true"])
    assert others.returncode == 255 and others.stderr.startswith("sshjob: "), others.stderr
    assert "Traceback" not in missing.stderr + others.stderr


CLIENTS = read(os.path.join(os.path.dirname(__file__), "ssh_clients.py"))
