"""End to end: jobs as ssh hosts, `ssh 1.0.sshjob`, for every ssh tool (issue 10).

The real OpenSSH client reads the real ~/.ssh/config of a test user, into
which `sshjob ssh-config --install` put the Host block; git, rsync, scp,
sftp, curl through -L, -R and -D forwards, a ControlMaster, and Ansible run
against a job of a root-run pool that the user owns."""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
from conftest import (
    ALICE,
    BOB,
    IMAGE,
    INTERPRETERS,
    PODMAN_RUN,
    USER_PYTHON,
    X11_CHECK,
    Pool,
    as_user,
    free_port,
    home_of,
    podman,
    podman_env,
    run,
    wait_for,
    wait_for_container,
    x_display,
)

pytestmark = pytest.mark.xdist_group("ssh-hosts")  # one worker: the Host block is in the users' own ~/.ssh


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait_for_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError("nothing listens on port %d" % port)


def pin_file(name, user=ALICE):
    """The file of pinned host keys that the Host block names for job `name`."""
    said = as_user(user, ["ssh", "-G", name + ".sshjob"]).stdout.splitlines()
    return next(line.split(" ", 1)[1] for line in said if line.startswith("userknownhostsfile "))


@pytest.fixture(scope="module")
def hosts(base, users):
    """A root-run pool; alice and bob with the Host block in their ~/.ssh/config."""
    pool = Pool(base, INTERPRETERS[-1], "hosts").start()
    saved = {}
    for user in (ALICE, BOB):
        config = os.path.join(home_of(user), ".ssh", "config")
        saved[config] = open(config).read() if os.path.exists(config) else None  # noqa: SIM115
        os.makedirs(os.path.dirname(config), exist_ok=True)
        with open(config, "w") as f:  # a user's own global option, which must stay global
            f.write("ServerAliveInterval 7\n")
        shutil.chown(os.path.dirname(config), user, user)
        shutil.chown(config, user, user)
        installed = as_user(user, [USER_PYTHON, pool.pyz, "ssh-config", "--install"],
                            env={"SSHJOB_CONFIG": pool.config})
        assert installed.returncode == 0, installed.stderr
    yield pool
    pool.stop()
    for config, text in saved.items():
        if text is None:
            os.unlink(config)
        else:
            with open(config, "w") as f:
                f.write(text)


@pytest.fixture(scope="module")
def job(hosts):
    workdir = hosts.workdir(ALICE)
    job = hosts.running_job("sleep", "900", user=ALICE, workdir=workdir, options=["--env", "FOO=bar"])
    return job, workdir


def test_the_host_block_installs_once_and_names_absolute_paths(hosts, job):
    again = as_user(ALICE, [USER_PYTHON, hosts.pyz, "ssh-config", "--install"], env={"SSHJOB_CONFIG": hosts.config})
    assert again.returncode == 0 and "ssh JOB.sshjob" in again.stderr
    with open(os.path.join(home_of(ALICE), ".ssh", "config")) as f:
        text = f.read()
    assert text.count("Host *.sshjob") == 1
    printed = as_user(ALICE, [USER_PYTHON, hosts.pyz, "ssh-config"], env={"SSHJOB_CONFIG": hosts.config}).stdout
    assert printed in text
    assert "ProxyCommand %s %s --config %s proxy '%%h' '%%r'" % (USER_PYTHON, hosts.pyz, hosts.config) in printed
    assert "IdentitiesOnly yes" in printed and "ProxyUseFdpass yes" in printed
    mode = os.stat(os.path.join(home_of(ALICE), ".ssh", "config")).st_mode & 0o777
    assert mode == 0o600
    elsewhere = as_user(ALICE, ["ssh", "-G", "example.org"]).stdout.splitlines()
    assert "serveraliveinterval 7" in elsewhere and "proxyusefdpass no" in elsewhere


def test_ssh_by_name_runs_inside_the_job_with_a_pinned_host_key(hosts, job):
    name, workdir = job
    result = as_user(ALICE, ["ssh", name + ".sshjob", "pwd; echo $FOO; echo $SSHJOB_JOB_ID; exit 4"])
    assert result.returncode == 4, result.stderr
    assert result.stdout.splitlines() == [workdir, "bar", name]
    cluster = as_user(ALICE, ["ssh", name.split(".")[0] + ".sshjob", "echo cluster-form"])
    node = as_user(ALICE, ["ssh", name + ".0.sshjob", "echo node-form"])
    assert (cluster.stdout, node.stdout) == ("cluster-form\n", "node-form\n"), cluster.stderr + node.stderr
    share = os.path.join(home_of(ALICE), ".local", "share", "sshjob")
    assert os.path.dirname(pin_file(name)) == share  # one file of pins for the jobs of the pool's configuration
    assert {os.stat(path).st_mode & 0o777 for path in (os.path.join(share, "id_ed25519"), pin_file(name))} == {0o600}
    with open(pin_file(name)) as f:
        known = [line.split() for line in f if line.startswith(name + ".sshjob ")]
    keys = [open(p).read().split()[:2] for p in  # noqa: SIM115
            subprocess.run(["sh", "-c", "ls %s/execute/*/hostkey/*.pub" % hosts.dir], stdout=subprocess.PIPE,
                           universal_newlines=True).stdout.split()]
    assert known and known[-1][1:3] in keys  # the job's own key, as the schedd knows it
    unpinned = as_user(ALICE, ["ssh", "-o", "UserKnownHostsFile=/dev/null", name + ".sshjob", "true"])
    assert unpinned.returncode == 255 and "Host key verification failed" in unpinned.stderr


def test_a_name_keeps_one_host_key_the_one_its_job_has_now(hosts, users):
    """A job run again (vacated) has a new host key; its old one, which the
    job's owner could read, is trusted for the name no longer."""
    name = hosts.running_job("sleep", "900", user=ALICE, workdir=hosts.workdir(ALICE))
    known_hosts = pin_file(name)

    def pinned():
        with open(known_hosts) as f:
            return [line.split()[1:3] for line in f if line.split()[0] == name + ".sshjob"]

    assert as_user(ALICE, ["ssh", name + ".sshjob", "true"]).returncode == 0
    first = pinned()
    assert len(first) == 1
    assert hosts.sshjob("vacate", name).returncode == 0
    hosts.wait_state(name, "running")
    again = as_user(ALICE, ["ssh", name + ".sshjob", "echo again"])
    assert again.stdout == "again\n", again.stderr
    second = pinned()
    assert len(second) == 1 and second != first


def test_scp_sftp_rsync_and_git(hosts, job):
    name, workdir = job
    mine = hosts.workdir(ALICE)
    with open(os.path.join(mine, "results.tar"), "w") as f:
        f.write("local data\n")
    up = as_user(ALICE, ["scp", os.path.join(mine, "results.tar"), name + ".sshjob:"])
    assert up.returncode == 0, up.stderr
    with open(os.path.join(workdir, "results.tar")) as f:
        assert f.read() == "local data\n"
    sftp = as_user(ALICE, ["sftp", name + ".sshjob"], input="get results.tar %s/sftp.tar\n" % mine)
    assert sftp.returncode == 0, sftp.stderr
    as_user(ALICE, ["sh", "-c", "mkdir -p %s/out/sub && echo deep > %s/out/sub/d.txt" % (workdir, workdir)])
    rsync = as_user(ALICE, ["rsync", "-av", name + ".sshjob:out/", mine + "/out/"])
    assert rsync.returncode == 0, rsync.stderr
    with open(os.path.join(mine, "out", "sub", "d.txt")) as f:
        assert f.read() == "deep\n"
    made = as_user(ALICE, ["sh", "-c", "cd %s && git init -q repo && cd repo && echo hello > README && git add README "
                           "&& git -c user.name=a -c user.email=a@b commit -qm first" % workdir])
    assert made.returncode == 0, made.stderr
    clone = as_user(ALICE, ["git", "clone", "-q", name + ".sshjob:repo", mine + "/clone"])
    assert clone.returncode == 0, clone.stderr
    with open(os.path.join(mine, "clone", "README")) as f:
        assert f.read() == "hello\n"


def test_forwards_and_a_multiplexed_reconnect_as_vs_code_does(hosts, job):
    """VS Code's steps: a remote bash fed a script on stdin starts a server
    in the job; a dynamic forward over a multiplexed connection reaches it;
    the master dies and the client reconnects."""
    name, workdir = job
    host = name + ".sshjob"
    socks, local = free_port(), free_port()
    control = tempfile.mkdtemp(prefix="cm-", dir="/tmp")  # a short path: ssh adds 17 characters to a socket name
    shutil.chown(control, ALICE, ALICE)
    mux = ["-o", "ControlMaster=auto", "-o", "ControlPath=%s/cm-%%C" % control, "-o", "ControlPersist=60"]
    with open(os.path.join(workdir, "index.html"), "w") as f:
        f.write("served from the job\n")
    script = ("cd %s\nnohup python3 -u -m http.server 0 --bind 127.0.0.1 </dev/null >server.log 2>&1 &\n"
              "echo started\n" % workdir)
    served = os.path.join(workdir, "server.log")
    try:
        for attempt in ("first", "after a reconnect"):
            master = as_user(ALICE, ["ssh"] + mux + [host, "true"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # the master lives on in the background, with these
            assert master.returncode == 0
            if attempt == "first":
                started = as_user(ALICE, ["ssh"] + mux + [host, "bash", "-s"], input=script)
                assert started.stdout == "started\n", started.stderr
                wait_for(lambda: " port " in read_text(served), 20, "the server in the job")
                port = int(read_text(served).split(" port ")[1].split()[0])
            assert as_user(ALICE, ["ssh"] + mux + ["-O", "check", host]).returncode == 0
            forward = subprocess.Popen(["runuser", "-u", ALICE, "--", "env", "HOME=" + home_of(ALICE), "ssh"] + mux
                                       + ["-N", "-D", "127.0.0.1:%d" % socks, host], cwd="/")
            try:
                wait_for_port(socks)
                deadline = time.time() + 20
                while True:
                    got = run(["curl", "-s", "--socks5-hostname", "127.0.0.1:%d" % socks,
                               "http://localhost:%d/index.html" % port])
                    if got.stdout == "served from the job\n" or time.time() > deadline:
                        break
                    time.sleep(0.3)
                assert got.stdout == "served from the job\n", (attempt, got.stderr)
            finally:
                forward.terminate()
                forward.wait()
            stopped = as_user(ALICE, ["ssh"] + mux + ["-O", "exit", host])  # the connection drops
            assert stopped.returncode == 0, stopped.stderr
        tunnel = subprocess.Popen(["runuser", "-u", ALICE, "--", "env", "HOME=" + home_of(ALICE), "ssh", "-N", "-L",
                                   "127.0.0.1:%d:localhost:%d" % (local, port), host], cwd="/")
        try:
            wait_for_port(local)
            assert run(["curl", "-s", "http://127.0.0.1:%d/index.html" % local]).stdout == "served from the job\n"
        finally:
            tunnel.terminate()
            tunnel.wait()
        back = free_port()
        reverse = as_user(ALICE, ["ssh", "-R", "127.0.0.1:%d:127.0.0.1:%d" % (back, port), host,
                                  "curl -s http://127.0.0.1:%d/index.html" % back])
        assert reverse.stdout == "served from the job\n", reverse.stderr
    finally:
        as_user(ALICE, ["ssh", host, "pkill -f 'http.server 0' || true"])
        shutil.rmtree(control, ignore_errors=True)


def test_an_interactive_terminal_and_no_agent_unless_the_pool_allows_it(hosts, job):
    name, workdir = job
    terminal = as_user(ALICE, ["ssh", "-tt", name + ".sshjob", "tty; pwd; exit 3"], stdin=subprocess.DEVNULL)
    assert terminal.returncode == 3, terminal.stderr
    assert terminal.stdout.replace("\r", "").splitlines()[:2] == ["/dev/pts/0", workdir]
    forwarded = as_user(ALICE, ["ssh-agent", "sh", "-c", "ssh -A %s.sshjob 'echo \"[$SSH_AUTH_SOCK]\"'" % name])
    assert forwarded.stdout.strip().endswith("[]"), forwarded.stdout + forwarded.stderr


def test_ansible_with_its_default_ssh_connection(hosts, job):
    if not shutil.which("ansible"):
        pytest.fail("ansible is not installed (apt-get install ansible-core)")
    name, _ = job
    result = as_user(ALICE, ["ansible", "all", "-i", name + ".sshjob,", "-m", "ping", "-e",
                             "ansible_python_interpreter=/usr/bin/python3"], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"ping": "pong"' in result.stdout


def test_sshfs_mounts_the_job(hosts, job):
    if not shutil.which("sshfs"):
        pytest.fail("sshfs is not installed (apt-get install sshfs)")
    probe = run(["sh", "-c", "exec 3<>/dev/fuse"])
    if probe.returncode != 0:
        pytest.skip("this machine has no usable FUSE (/dev/fuse cannot be opened): %s" % probe.stderr.strip())
    name, workdir = job
    config = os.path.join(hosts.dir, "root-ssh-config")
    with open(config, "w") as f:
        f.write(hosts.sshjob("ssh-config").stdout)
    mount = tempfile.mkdtemp(prefix="mnt-", dir=hosts.dir)
    mounted = run(["sshfs", "-F", config, "%s@%s.sshjob:" % (ALICE, name), mount])
    if mounted.returncode != 0 and "fuse" in mounted.stderr.lower():
        pytest.skip("FUSE does not mount here: %s" % mounted.stderr.strip())
    try:
        assert mounted.returncode == 0, mounted.stderr
        assert sorted(os.listdir(mount)) == sorted(os.listdir(workdir))
    finally:
        run(["fusermount3", "-u", mount])


def test_failures_are_ssh_shaped(hosts, job):
    name, _ = job
    other = as_user(BOB, ["ssh", name + ".sshjob", "true"])
    assert other.returncode == 255
    assert other.stderr.startswith("sshjob: "), other.stderr
    assert "Traceback" not in other.stderr
    unknown = as_user(ALICE, ["ssh", "98765.0.sshjob", "true"])
    assert unknown.returncode == 255 and unknown.stderr.startswith("sshjob: job 98765.0 "), unknown.stderr
    root_config = os.path.join(hosts.dir, "root-ssh-config")
    with open(root_config, "w") as f:
        f.write(hosts.sshjob("ssh-config").stdout)
    wrong_user = run(["ssh", "-F", root_config, name + ".sshjob", "true"])
    assert wrong_user.returncode == 255
    assert "sshjob: job %s runs as %s: connect as %s" % (name, ALICE, ALICE) in wrong_user.stderr
    as_root = run(["ssh", "-F", root_config, "-l", ALICE, name + ".sshjob", "id -un"])
    assert as_root.stdout == ALICE + "\n", as_root.stderr  # a queue super user, as the job's owner


def test_a_stopped_schedd_is_one_sentence(base, users):
    pool = Pool(base, INTERPRETERS[-1], "stopped").start()
    job = pool.running_job("sleep", "600")
    config = os.path.join(pool.dir, "ssh_config")
    with open(config, "w") as f:
        f.write(pool.sshjob("ssh-config").stdout)
    pool.stop()
    down = run(["ssh", "-F", config, job + ".sshjob", "true"])
    assert down.returncode == 255
    assert down.stderr.startswith("sshjob: cannot reach the schedd"), down.stderr


def test_x11_and_a_finished_job(hosts, job):
    name, _ = job
    with x_display() as display:
        xauth = os.path.join(hosts.workdir(ALICE), "xauth")
        forwarded = as_user(ALICE, ["ssh", "-X", name + ".sshjob", X11_CHECK],
                            env={"DISPLAY": display, "XAUTHORITY": xauth})
        assert forwarded.returncode == 0, forwarded.stderr
        remote_display, screens = forwarded.stdout.split()
        assert remote_display.startswith("localhost:") and screens == "1"
    done = hosts.submit("true", user=ALICE)
    hosts.wait_state(done, "completed")
    ended = as_user(ALICE, ["ssh", done + ".sshjob", "true"])
    assert ended.returncode == 255
    assert ended.stderr.startswith("sshjob: job %s " % done) and "Traceback" not in ended.stderr, ended.stderr


def test_terminals_for_an_ordinary_users_own_pool_where_devpts_lacks_the_tty_group(base, users):
    """A starter that runs as the user (no root to mend /dev/pts): ssh -tt,
    which Ansible uses, still gets a terminal through the Host block."""
    pool_dir = tempfile.mkdtemp(prefix="alice-pool-", dir=base)
    os.chmod(pool_dir, 0o755)
    shutil.chown(pool_dir, ALICE, ALICE)
    pyz = os.path.join(base, "sshjob.pyz")
    config = os.path.join(pool_dir, "ssh_config")
    env = {"SSHJOB_CONFIG": os.path.join(pool_dir, "sshjob.conf")}
    assert as_user(ALICE, [USER_PYTHON, pyz, "pool", "start", "--dir", pool_dir]).returncode == 0
    try:
        job = as_user(ALICE, [USER_PYTHON, pyz, "submit", "--workdir", pool_dir, "--", "sleep", "600"],
                      env=env).stdout.strip()
        deadline = time.time() + 30
        while "running" not in as_user(ALICE, [USER_PYTHON, pyz, "q"], env=env).stdout:
            assert time.time() < deadline, "the job did not start"
            time.sleep(0.1)
        with open(config, "w") as f:
            f.write(as_user(ALICE, [USER_PYTHON, pyz, "ssh-config"], env=env).stdout)
        forced = as_user(ALICE, ["ssh", "-F", config, "-tt", job + ".sshjob", "tty; echo in"])
        assert forced.returncode == 0, forced.stdout + forced.stderr
        terminal, said = forced.stdout.replace("\r", "").splitlines()
        assert terminal.startswith("/dev/pts/") and said == "in", forced.stdout  # the host's: others have some
        if not shutil.which("ansible"):
            pytest.fail("ansible is not installed (apt-get install ansible-core)")
        ping = as_user(ALICE, ["ansible", "all", "-i", job + ".sshjob,", "-m", "ping", "-e",
                               "ansible_python_interpreter=/usr/bin/python3", "-e",
                               "ansible_ssh_common_args='-F %s'" % config], timeout=120)
        assert ping.returncode == 0 and '"ping": "pong"' in ping.stdout, ping.stdout + ping.stderr
    finally:
        as_user(ALICE, [USER_PYTHON, pyz, "pool", "stop", "--dir", pool_dir])


def test_a_job_s_container_as_an_ssh_host(hosts, images):
    """JOB.sshjob lands in the job's container; NAME--JOB.sshjob in the one
    of that name, none--JOB.sshjob on the node, outside it."""
    name = "sshjob-test-host-%s" % os.urandom(4).hex()
    submit = ["--env", "XDG_RUNTIME_DIR=" + podman_env(ALICE)["XDG_RUNTIME_DIR"]]
    job = hosts.running_job(*PODMAN_RUN, "--name", name, IMAGE, "sh", "-c", "cd /data; exec sleep 600", user=ALICE,
                            options=submit)
    try:
        pid = wait_for_container(ALICE, name)
        inside = run(["nsenter", "-t", str(pid), "-u", "hostname"]).stdout
        for host, expected in ((job, inside), (name + "--" + job, inside), ("none--" + job, socket.gethostname() +
                                                                            "\n")):
            result = as_user(ALICE, ["ssh", host + ".sshjob", "hostname"])
            assert (result.returncode, result.stdout) == (0, expected), (host, result.stderr)
        target = os.path.join(hosts.workdir(ALICE), "copied.txt")
        copied = as_user(ALICE, ["scp", job + ".sshjob:/data/input.txt", target])
        assert copied.returncode == 0, copied.stderr
        with open(target) as f:
            assert f.read() == "the image's data\n"
    finally:
        hosts.sshjob("rm", job, user=ALICE)
        podman(ALICE, "rm", "--force", "--time", "0", name)


CLIENTS = open(os.path.join(os.path.dirname(__file__), "ssh_clients.py")).read()  # noqa: SIM115


def other_client(kind, host, command):
    """`command` in `host` through a client that is not OpenSSH (tests/ssh_clients.py), as alice."""
    return as_user(ALICE, [USER_PYTHON, "-W", "ignore", "-c", CLIENTS, kind, host, command], timeout=90)


@pytest.mark.parametrize("kind", ["paramiko", "asyncssh", "socketpair"])
def test_clients_that_are_not_openssh_get_the_bytes_relayed(hosts, job, kind):
    """paramiko and asyncssh run the Host block's ProxyCommand on pipes; a
    third client runs it on a socket pair and never takes a passed socket:
    the proxy relays for all of them, with the job's host key pinned."""
    name, workdir = job
    result = other_client(kind, name + ".sshjob", "pwd; echo $FOO; exit 3")
    assert result.returncode == 3, result.stderr
    assert result.stdout.splitlines() == [workdir, "bar"]
    big = other_client(kind, name + ".sshjob", "head -c 3000000 /dev/zero | od -An -c | tail -2")
    assert big.returncode == 0 and "\\0" in big.stdout, big.stderr
    refused = other_client(kind, "987654.0.sshjob", "true")
    assert refused.returncode != 0
    if kind == "socketpair":  # the ProxyCommand's stderr is the client's
        assert "sshjob: job 987654" in refused.stderr
    else:  # paramiko discards it, asyncssh reads it as the server's: the proxy keeps it for the user
        log = read_text(os.path.join(home_of(ALICE), ".local", "share", "sshjob", "proxy.log"))
        openssh = as_user(ALICE, ["ssh", "987654.0.sshjob", "true"]).stderr.splitlines()[0]
        assert openssh.startswith("sshjob: job 987654.0 ")
        mine = [line for line in log.splitlines() if " 987654.0.sshjob: " in line]  # other tests' proxies write too
        assert mine and mine[-1].split(" ", 2)[2] == "987654.0.sshjob: " + openssh


def test_openssh_still_takes_the_socket_and_nothing_stays_in_the_data_path(hosts, job):
    name, _ = job
    result = as_user(ALICE, ["ssh", name + ".sshjob", "sleep 1; ps -o args= -u $(id -u)"])
    assert result.returncode == 0, result.stderr
    proxies = [line for line in run(["ps", "-o", "args=", "-u", ALICE]).stdout.splitlines() if " proxy " in line]
    assert proxies == []
