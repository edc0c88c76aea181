"""End to end: allocations on demand, `sshjob new PROFILE` (issue 24).

Against the tests' real single-node Slurm and a real pool, as ordinary users: a profile in
the configuration sshjob reads; `new` submits the allocation (its batch
script is sshjob), waits saying why, enters it; a second `new`, `ssh
PROFILE.new.sshjob` and another $HOME land in the same job; the allocation
is given back when idle, and what its sessions left running ends with it;
Ctrl-C while it waits removes it unless another client still waits."""

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest
from conftest import (
    ALICE,
    BOB,
    IMAGE,
    INTERPRETERS,
    PODMAN_RUN,
    USER_PYTHON,
    Host,
    Pool,
    Terminal,
    free_port,
    podman,
    podman_env,
    run,
    wait_for,
)

pytestmark = pytest.mark.xdist_group("slurm")

WHOLE_NODE = "32"  # the tests' Slurm node has 32 CPUs: a job of them all makes the next one wait


@pytest.fixture(scope="module")
def site(cluster):
    """The cluster, with a configuration of profiles that alice and bob read."""
    config = os.path.join(cluster.dir, "new.conf")
    with open(config, "w") as f:
        f.write("[sshjob]\nscheduler = slurm\n\n"
                "[profile quick]\noptions = -c 1 --time=00:20:00\nidle = 15s\n\n"
                "[profile short]\noptions = -c 1 --time=00:02:00\nidle = none\n\n"
                "[profile nowhere]\noptions = --partition=nosuchpartition\n\n"
                "[profile wrapped]\noptions = -c 1 --wrap 'sleep 1'\n")
    os.chmod(config, 0o644)
    cluster.config = config
    yield cluster
    run(["scancel", "--user", ALICE])
    run(["scancel", "--user", BOB])


def new(site, *args, user=ALICE, home=None, cwd="/", **kwargs):
    env = {"SSHJOB_CONFIG": site.config}
    if home:
        env["HOME"] = home
    return site.sshjob("new", *args, user=user, env=env, scheduler=None, cwd=cwd, timeout=120, **kwargs)


def started(site, *args, user=ALICE, errors=None):
    """`sshjob new ARGS`, running in a session of its own (Ctrl-C goes to its group)."""
    argv = site.argv("new", *args, user=user, env={"SSHJOB_CONFIG": site.config}, scheduler=None)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, cwd="/", universal_newlines=True,
                            start_new_session=True)


def allocations(user=ALICE, name="quick"):
    said = run(["squeue", "--noheader", "--user", user, "--name", "sshjob-new-" + name, "--format=%i %T"]).stdout
    return [line.split() for line in said.splitlines()]


def filled(site):
    """A job of bob's that takes the whole node: the next job waits (Resources)."""
    job = site.sbatch("-c", WHOLE_NODE, user=BOB)
    site.wait_running(job)
    return job


def read(path):
    with open(path) as f:
        return f.read()


def test_new_enters_reuses_and_gives_back_when_idle(site):
    run(["scancel", "--user", ALICE, "--name", "sshjob-new-quick"])
    workdir = site.workdir()
    first = new(site, "quick", "echo $SLURM_JOB_ID; pwd; exit 3", cwd=workdir)
    assert first.returncode == 3, first.stderr
    job, where = first.stdout.split()
    assert where == workdir
    assert "submitted allocation %s for profile quick" % job in first.stderr
    again = new(site, "quick", "echo $SLURM_JOB_ID; setsid sleep 4321 < /dev/null > /dev/null 2>&1 &")
    assert (again.returncode, again.stdout) == (0, job + "\n"), again.stderr
    assert "submitted" not in again.stderr
    config = os.path.join(site.dir, "alice-ssh-config")
    block = site.sshjob("ssh-config", env={"SSHJOB_CONFIG": site.config}, scheduler=None)
    with open(config, "w") as f:
        f.write(block.stdout)
    os.chmod(config, 0o644)
    by_name = run(["runuser", "-u", ALICE, "--", "ssh", "-F", config, "quick.new.sshjob", "echo $SLURM_JOB_ID"],
                  cwd="/")
    assert by_name.stdout == job + "\n", by_name.stderr
    queue = site.sshjob("q", env={"SSHJOB_CONFIG": site.config}, scheduler=None)
    assert "sshjob new quick: " in queue.stdout and "given back after 15 s idle" in queue.stdout, queue.stdout
    assert run(["pgrep", "-u", ALICE, "-f", "^sleep 4321"]).returncode == 0  # left running: lives in the job
    wait_for(lambda: not allocations(), timeout=90, what="the idle allocation to be given back")
    wait_for(lambda: run(["pgrep", "-u", ALICE, "-f", "^sleep 4321"]).returncode == 1, timeout=30,
             what="what a session left running to end with the allocation, which it did not keep")


def test_another_home_finds_the_allocation_and_another_user_does_not(site):
    run(["scancel", "--user", ALICE, "--name", "sshjob-new-quick"])
    first = new(site, "quick", "echo $SLURM_JOB_ID")
    assert first.returncode == 0, first.stderr
    home = tempfile.mkdtemp(prefix="second-login-home-")  # empty: no state of the first login's
    record = pwd.getpwnam(ALICE)
    os.chown(home, record.pw_uid, record.pw_gid)
    try:
        second = new(site, "quick", "echo $SLURM_JOB_ID", home=home)
        assert second.stdout == first.stdout and "submitted" not in second.stderr, second.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)
    bobs = new(site, "quick", "echo $SLURM_JOB_ID; id -un", user=BOB)
    assert bobs.returncode == 0, bobs.stderr
    assert bobs.stdout.split() != [first.stdout.strip(), BOB] and bobs.stdout.split()[1] == BOB
    gave = site.sshjob("rm", "quick", env={"SSHJOB_CONFIG": site.config}, scheduler=None)
    assert gave.returncode == 0 and gave.stdout == "Allocation %s (profile quick) given back.\n" % first.stdout.strip()
    wait_for(lambda: not allocations(), what="alice's allocation to go")
    assert allocations(BOB), "bob's allocation is his, and stays"
    run(["scancel", "--user", BOB, "--name", "sshjob-new-quick"])


def test_vs_code_s_flow_lands_twice_in_one_allocation(site):
    """As VS Code's Remote-SSH does it: a ControlMaster to PROFILE.new.sshjob,
    a remote `bash -s` that starts its server in the job, a -D forward that
    reaches it, the master dropped and made again: the same job."""
    run(["scancel", "--user", ALICE, "--name", "sshjob-new-quick"])
    config = os.path.join(site.dir, "vscode-ssh-config")
    with open(config, "w") as f:
        f.write(site.sshjob("ssh-config", env={"SSHJOB_CONFIG": site.config}, scheduler=None).stdout)
    os.chmod(config, 0o644)
    control = tempfile.mkdtemp(prefix="cm-")
    shutil.chown(control, ALICE, ALICE)
    ssh = ["runuser", "-u", ALICE, "--", "ssh", "-F", config, "-o", "ControlMaster=auto", "-o",
           "ControlPath=%s/%%C" % control, "-o", "ControlPersist=60"]
    served, socks = free_port(), free_port()
    script = ("echo job=$SLURM_JOB_ID\ncd $HOME\nsetsid %s -m http.server %d --bind 127.0.0.1 "
              "</dev/null >/dev/null 2>&1 &\necho started\n" % (USER_PYTHON, served))
    try:
        master = run(ssh + ["quick.new.sshjob", "true"], cwd="/", timeout=120, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)  # the master lives on in the background, with these
        assert master.returncode == 0
        first = run(ssh + ["quick.new.sshjob", "bash -s"], input=script, cwd="/", timeout=120)
        assert first.returncode == 0 and "started" in first.stdout, first.stderr
        job = first.stdout.split()[0].split("=")[1]
        forward = subprocess.Popen(ssh + ["-N", "-D", str(socks), "quick.new.sshjob"], cwd="/")
        try:
            def fetched():
                got = run(["curl", "-s", "--max-time", "5", "--socks5-hostname", "127.0.0.1:%d" % socks,
                           "http://127.0.0.1:%d/" % served])
                return got.returncode == 0 and "Directory listing" in got.stdout

            wait_for(fetched, timeout=60, what="the job's server through the -D forward")
        finally:
            forward.terminate()
            forward.wait()
        run(ssh + ["-O", "exit", "quick.new.sshjob"], cwd="/")
        remade = run(ssh + ["quick.new.sshjob", "true"], cwd="/", timeout=120, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
        assert remade.returncode == 0
        again = run(ssh + ["quick.new.sshjob", "echo job=$SLURM_JOB_ID"], cwd="/", timeout=120)
        assert again.stdout == "job=%s\n" % job, again.stderr
        assert [row[0] for row in allocations()] == [job]
    finally:
        run(ssh + ["-O", "exit", "quick.new.sshjob"], cwd="/")
        run(["pkill", "-f", "http.server %d" % served])
        shutil.rmtree(control, ignore_errors=True)
        run(["scancel", "--user", ALICE, "--name", "sshjob-new-quick"])


CLIENTS = read(os.path.join(os.path.dirname(__file__), "ssh_clients.py"))


@pytest.mark.parametrize("kind", ["paramiko", "asyncssh"])
def test_clients_that_are_not_openssh_reach_a_slurm_job_and_an_allocation(site, kind):
    """paramiko and asyncssh through the Host block, relayed by the proxy, as
    for a pool's job (test_ssh_hosts.py): a Slurm job, and PROFILE.new.sshjob."""
    config = os.path.join(site.dir, "clients-ssh-config")
    with open(config, "w") as f:
        f.write(site.sshjob("ssh-config", env={"SSHJOB_CONFIG": site.config}, scheduler=None).stdout)
    os.chmod(config, 0o644)
    job = site.running()
    try:
        for host in (job + ".slurm.sshjob", "quick.new.sshjob"):
            result = run(["runuser", "-u", ALICE, "--", "env", "-i", "HOME=" + pwd.getpwnam(ALICE).pw_dir,
                          "PATH=" + os.environ["PATH"], "USER=" + ALICE, "SSHJOB_TEST_SSH_CONFIG=" + config,
                          USER_PYTHON, "-W", "ignore", "-c", CLIENTS, kind, host, "echo $SLURM_JOB_ID; exit 7"],
                         cwd="/", timeout=120)
            assert result.returncode == 7, (host, result.stderr)
            assert result.stdout.strip() == (job if host.startswith(job) else allocations()[0][0])
    finally:
        run(["scancel", job])
        run(["scancel", "--user", ALICE, "--name", "sshjob-new-quick"])


def test_a_second_login_host_finds_the_same_allocation(site):
    """Another network namespace, with its own view of the controller's
    name and another $HOME: the allocation is found through Slurm."""
    run(["scancel", "--user", ALICE, "--name", "sshjob-new-quick"])
    first = new(site, "quick", "echo $SLURM_JOB_ID")
    assert first.returncode == 0, first.stderr
    host = Host("login2")
    names = "/etc/netns/" + host.name
    home = tempfile.mkdtemp(prefix="login2-home-")
    record = pwd.getpwnam(ALICE)
    os.chown(home, record.pw_uid, record.pw_gid)
    try:
        os.makedirs(names)
        with open(os.path.join(names, "hosts"), "w") as f:  # ip netns exec puts it over /etc/hosts there
            f.write("127.0.0.1 localhost\n%s %s\n" % (host.outer, site.host))
        argv = site.argv("new", "quick", "echo $SLURM_JOB_ID; hostname", user=ALICE,
                         env={"SSHJOB_CONFIG": site.config, "HOME": home}, scheduler=None)
        second = run(["ip", "netns", "exec", host.name] + argv, cwd="/", timeout=120)
        assert second.returncode == 0, second.stderr
        assert second.stdout.split()[0] == first.stdout.strip() and "submitted" not in second.stderr
    finally:
        host.remove()
        shutil.rmtree(names, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        run(["scancel", "--user", ALICE, "--name", "sshjob-new-quick"])


def test_a_pending_allocation_says_why_and_opens_when_it_runs(site):
    run(["scancel", "--user", ALICE, "--name", "sshjob-new-quick"])
    filler = filled(site)
    errors = os.path.join(site.dir, "pending.err")
    with open(errors, "w") as sink:
        client = started(site, "quick", "echo ran in $SLURM_JOB_ID", errors=sink)
    try:
        wait_for(lambda: "is pending in Slurm (Resources" in read(errors), timeout=60, what="the reason it waits")
        assert "waiting (" in read(errors)
        run(["scancel", filler])
        out, _ = client.communicate(timeout=90)
        assert client.returncode == 0, read(errors)
        assert out.startswith("ran in ")
    finally:
        client.kill()
        run(["scancel", filler])


def test_ctrl_c_while_pending_removes_it_only_when_nobody_else_waits(site):
    run(["scancel", "--user", ALICE, "--name", "sshjob-new-quick"])
    filler = filled(site)
    logs = [os.path.join(site.dir, "waiter-%d.err" % n) for n in (1, 2)]
    try:
        with open(logs[0], "w") as first_log:
            first = started(site, "quick", "true", errors=first_log)
        wait_for(lambda: "waiting (" in read(logs[0]), timeout=60, what="the first client to wait")
        with open(logs[1], "w") as second_log:
            second = started(site, "quick", "true", errors=second_log)
        wait_for(lambda: "waiting (" in read(logs[1]), timeout=60, what="the second client to wait")
        job = allocations()[0][0]
        queue = site.sshjob("q", env={"SSHJOB_CONFIG": site.config}, scheduler=None).stdout
        assert re.search(r"^%s .* pending .* sshjob new quick( +\[\w+\])?; 2 client\(s\) waiting$" % job, queue,
                         re.M), queue
        os.killpg(first.pid, signal.SIGINT)
        assert first.wait(timeout=30) == 130
        assert "removed" not in read(logs[0])
        assert allocations() == [[job, "PENDING"]]  # the second client still waits for it
        os.killpg(second.pid, signal.SIGINT)
        assert second.wait(timeout=30) == 130
        assert "allocation %s removed: it had not started, and nobody else waits for it" % job in read(logs[1])
        wait_for(lambda: not allocations(), what="the pending allocation to go")
    finally:
        run(["scancel", filler])


def test_an_ssh_client_that_goes_away_while_pending_and_an_admin_s_scancel(site):
    """VS Code gives up: its ssh dies while the proxy waits; the proxy sees
    it gone and removes the pending allocation.  An admin removes another:
    its client says so in one sentence."""
    run(["scancel", "--user", ALICE, "--name", "sshjob-new-quick"])
    filler = filled(site)
    config = os.path.join(site.dir, "pending-ssh-config")
    with open(config, "w") as f:
        f.write(site.sshjob("ssh-config", env={"SSHJOB_CONFIG": site.config}, scheduler=None).stdout)
    os.chmod(config, 0o644)
    errors = os.path.join(site.dir, "ssh-pending.err")
    try:
        with open(errors, "w") as sink:
            ssh = subprocess.Popen(["runuser", "-u", ALICE, "--", "ssh", "-F", config, "quick.new.sshjob", "true"],
                                   stderr=sink, cwd="/", start_new_session=True)
        wait_for(lambda: "waiting (" in read(errors), timeout=60, what="the proxy to wait")
        job = allocations()[0][0]
        client = run(["pgrep", "-u", ALICE, "-f", "^ssh -F %s quick" % config]).stdout.split()
        assert len(client) == 1
        os.kill(int(client[0]), signal.SIGKILL)  # ssh alone: its ProxyCommand is left to notice
        ssh.wait()
        wait_for(lambda: not allocations(), timeout=20, what="the proxy to remove what nobody waits for")
        assert run(["squeue", "-h", "-j", job]).stdout.strip() == ""
        with open(errors, "w") as sink:
            waiting = started(site, "quick", "true", errors=sink)
        wait_for(lambda: "waiting (" in read(errors), timeout=60, what="the client to wait")
        run(["scancel", allocations()[0][0]])  # as an admin would
        assert waiting.wait(timeout=30) != 0
        said = read(errors).splitlines()[-1]
        assert said.startswith("sshjob: job ") and "has finished (CANCELLED)" in said, said
    finally:
        run(["scancel", filler])


def test_open_sessions_are_warned_before_the_time_limit(site):
    """A profile with a two-minute limit: its session hears, on its terminal,
    that the allocation ends soon (the warning comes five minutes ahead).
    A session without a terminal comes first, and the holder counts it: the
    terminal that comes later is warned all the same."""
    run(["scancel", "--user", ALICE, "--name", "sshjob-new-short"])
    env = {"SSHJOB_CONFIG": site.config}
    first = subprocess.Popen(site.argv("new", "short", "sleep 60", user=ALICE, env=env, scheduler=None),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    terminal = None
    try:
        wait_for(lambda: "1 session(s)" in run(["squeue", "--noheader", "--user", ALICE, "--name",
                                                 "sshjob-new-short", "--format=%k"]).stdout, 60,
                 "the holder to count the session without a terminal")
        terminal = Terminal(site.argv("new", "short", user=ALICE, env=env, scheduler=None))
        terminal.expect("its time limit: save your work", timeout=90)  # before the prompt or after it
        terminal.send("exit\r")
    finally:
        if terminal:
            terminal.close()
        first.kill()
        first.wait()
        run(["scancel", "--user", ALICE, "--name", "sshjob-new-short"])


def test_bad_profiles_and_refusals_are_one_sentence_each(site):
    env = {"SSHJOB_CONFIG": site.config}
    said = {}
    for args in (["nosuch"], ["GPU_1"], ["wrapped"], ["nowhere"], ["--options", "--array=1-3", "adhoc"]):
        result = site.sshjob("new", *args, "true", env=env, scheduler=None)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        said[args[-1]] = result.stderr
    assert said["nosuch"].startswith("sshjob: there is no profile 'nosuch' in %s (its profiles: nowhere, quick, "
                                     "short, wrapped)" % site.config)
    assert "'GPU_1' is not a profile name" in said["GPU_1"]
    assert said["wrapped"] == "sshjob: profile wrapped cannot ask for --wrap: the allocation's batch script is " \
                              "sshjob's\n"
    assert said["nowhere"].startswith("sshjob: Slurm refuses an allocation of profile nowhere: ")
    assert "partition" in said["nowhere"].lower()
    assert "cannot ask for --array" in said["adhoc"]
    none = site.sshjob("rm", "short", env=env, scheduler=None)
    assert (none.returncode, none.stderr) == (1, "sshjob: you have no allocation of profile short\n")


def test_a_profile_that_names_an_image_puts_sessions_in_its_container(site, images):
    """image = IMAGE: the allocation runs a container of it, and its
    sessions land inside, as in any job whose payload is a container; the
    container goes when the allocation is given back.  Its batch script's
    `python3` is slow to start here: a session that came before the holder
    runs would find no container to come, and land on the node."""
    slow = os.path.join(site.dir, "slow")
    os.makedirs(slow, exist_ok=True)
    with open(os.path.join(slow, "python3"), "w") as f:
        f.write("#!/bin/sh\nsleep 1.5\nexec %s \"$@\"\n" % USER_PYTHON)
    os.chmod(os.path.join(slow, "python3"), 0o755)
    config = os.path.join(site.dir, "image.conf")
    with open(config, "w") as f:
        f.write("[sshjob]\nscheduler = slurm\nremote_python = %s\n\n[profile boxed]\n"
                "options = -c 1 --time=00:10:00\nidle = none\nimage = %s\npodman = %s\npodman_options = %s\n"
                % (USER_PYTHON, IMAGE, " ".join(PODMAN_RUN[:3]), " ".join(PODMAN_RUN[5:])))
    os.chmod(config, 0o644)
    env = dict(podman_env(ALICE), SSHJOB_CONFIG=config, PATH=slow + ":" + os.environ["PATH"])
    run(["scancel", "--user", ALICE, "--name", "sshjob-new-boxed"])
    try:
        inside = site.sshjob("new", "boxed", "cat /etc/os-release; hostname", env=env, scheduler=None, timeout=120)
        assert inside.returncode == 0, inside.stderr
        assert "VARIANT=busybox" in inside.stdout and socket.gethostname() not in inside.stdout
        job = allocations(name="boxed")[0][0]
        name = "sshjob-new-boxed-%s" % job
        assert podman(ALICE, "container", "exists", name).returncode == 0
        gave = site.sshjob("rm", "boxed", env=env, scheduler=None)
        assert gave.returncode == 0, gave.stderr
        wait_for(lambda: podman(ALICE, "container", "exists", name).returncode != 0, timeout=30,
                 what="the allocation's container to go with it")
    finally:
        run(["scancel", "--user", ALICE, "--name", "sshjob-new-boxed"])


def test_a_profile_made_on_the_command_line(site):
    run(["scancel", "--user", ALICE, "--name", "sshjob-new-scratch"])
    result = new(site, "--options", "--time=00:05:00 -c 2", "scratch", "echo $SLURM_CPUS_ON_NODE")
    assert (result.returncode, result.stdout) == (0, "2\n"), result.stderr
    run(["scancel", "--user", ALICE, "--name", "sshjob-new-scratch"])


# -- on a pool -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(base, users):
    pool = Pool(base, INTERPRETERS[-1], "new")
    with open(pool.config, "a") as f:
        f.write("\n[profile dev]\noptions = --env FOO=bar\nidle = 8s\n\n[profile wide]\noptions = --nodes 2\n"
                "\n[profile odd]\noptions = --partition=gpu\n")
    pool.start()
    yield pool
    pool.stop()


def pool_allocations(pool, user=ALICE):
    rows = [line.split() for line in pool.sshjob("q", user=user).stdout.splitlines()[1:]]
    ours = (["sshjob", "new", "dev"], ["sshjob", "new", "dev:"])  # dev: when the queue has its sessions
    return [row[0] for row in rows if row[4:7] in ours and row[1] == user]


def test_new_on_a_pool_enters_reuses_gives_back_and_is_an_ssh_host(pool):
    workdir = pool.workdir(ALICE)
    first = pool.sshjob("new", "dev", "echo $SSHJOB_JOB_ID $FOO; pwd; exit 4", user=ALICE, cwd=workdir)
    assert first.returncode == 4, first.stderr
    job = first.stdout.split()[0]
    assert first.stdout.split()[1:] == ["bar", workdir]
    assert pool_allocations(pool) == [job]
    again = pool.sshjob("new", "dev", "echo $SSHJOB_JOB_ID", user=ALICE)
    assert again.stdout == job + "\n" and "submitted" not in again.stderr, again.stderr
    wait_for(lambda: re.search(r"^%s .* sshjob new dev: idle since [\d:]+; given back after 8 s idle$" % job,
                               pool.sshjob("q", user=ALICE).stdout, re.M), what="q to show the idle clock")
    config = os.path.join(pool.dir, "alice-ssh-config")
    with open(config, "w") as f:
        f.write(pool.sshjob("ssh-config", user=ALICE).stdout)
    os.chmod(config, 0o644)
    by_name = run(["runuser", "-u", ALICE, "--", "ssh", "-F", config, "dev.new.sshjob", "echo $SSHJOB_JOB_ID"],
                  cwd="/")
    assert by_name.stdout == job + "\n", by_name.stderr
    wait_for(lambda: not pool_allocations(pool), timeout=60, what="the idle pool allocation to be given back")
    assert pool.sshjob("new", "dev", "true", user=BOB).returncode == 0  # bob's own
    mine, bobs = pool_allocations(pool), pool_allocations(pool, BOB)
    assert not mine and len(bobs) == 1
    gave = pool.sshjob("rm", "dev", user=BOB)
    assert gave.stdout == "Allocation %s (profile dev) given back.\n" % bobs[0], gave.stderr
    refused = pool.sshjob("new", "odd", "true", user=ALICE)
    assert refused.returncode == 2
    assert refused.stderr == "sshjob: profile odd: a pool's allocation takes --nodes N and --env NAME=VALUE, not " \
                             "'--partition=gpu'\n"
