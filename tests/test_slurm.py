"""End to end: sessions inside the jobs of a real Slurm (issue 9).

A single-node Slurm (munged, slurmctld, slurmd from Debian's packages) is
started for these tests; two real users submit real batch jobs with sbatch
and enter them with the built pyz, as the README tells them to.  No sshjob
daemon runs anywhere: Slurm decides who gets in."""

import contextlib
import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
import slurm
from conftest import (
    ALICE,
    BOB,
    IMAGE,
    INTERPRETERS,
    PODMAN_RUN,
    ROOTFUL_LIMITS,
    USER_PYTHON,
    X11_CHECK,
    drive_terminal,
    make_user,
    podman,
    podman_env,
    podman_image,
    run,
    state_of,
    wait_for,
    wait_for_container,
    x_display,
)

NATTED = "sshjob-nat"  # a user of its own, whose connections alone go through NAT

pytestmark = pytest.mark.xdist_group("slurm")  # one worker runs what shares Slurm and ~alice/.cache


def batch_pids(job):
    rows = [line.split() for line in run(["scontrol", "listpids", job]).stdout.splitlines()[1:]]
    return [int(row[0]) for row in rows if row[2] == "batch"]


def pids_of(name):
    """Pids of the processes whose command line starts with `name`."""
    return [int(pid) for pid in run(["pgrep", "-f", "^" + name]).stdout.split()]


# -- sessions -----------------------------------------------------------------------


def test_a_command_runs_inside_the_job_as_its_user(cluster):
    workdir = cluster.workdir()
    job = cluster.running("--export=ALL,FROM_SUBMIT=yes", workdir=workdir)
    result = cluster.sshjob("client", job, 'echo $SLURM_JOB_ID; pwd; id -un; echo $FROM_SUBMIT; '
                            'echo $_SSHJOB_JOB_PIDS; echo oops >&2; exit 3', env={"CALLER_ONLY": "x"})
    assert result.returncode == 3, result.stderr
    job_id, where, who, variables, pids = result.stdout.splitlines()
    assert (job_id, where, who, variables) == (job, workdir, ALICE, "yes")
    assert int(pids.split()[0]) == batch_pids(job)[0]  # the batch script's pid first
    assert "oops" in result.stderr
    caller = cluster.sshjob("client", job, 'echo "[$CALLER_ONLY]"', env={"CALLER_ONLY": "x"})
    assert caller.stdout == "[]\n"  # the job's environment, not the caller's


def test_the_batch_scripts_exported_bash_functions_reach_the_session(cluster):
    """Lmod exports `module` as a bash function: sbatch hands it to the batch
    script, and a session of the job has it, whatever /bin/sh is."""
    greet = {"BASH_FUNC_greet%%": '() {  echo "greetings, $1"\n}'}
    job = cluster.running(env=dict(os.environ, **greet))
    for transport in ("openssh", "builtin"):
        result = cluster.sshjob("client", "-transport", transport, job, "greet " + transport,
                                env={"SHELL": "/bin/bash"})
        assert (result.returncode, result.stdout) == (0, "greetings, %s\n" % transport), result.stderr


def test_the_scheduler_is_chosen_by_variable_configuration_or_detection(cluster):
    job = cluster.running()
    by_variable = cluster.sshjob("client", job, "echo var", env={"SSHJOB_SCHEDULER": "slurm"}, scheduler=None)
    assert by_variable.stdout == "var\n", by_variable.stderr
    config = os.path.join(cluster.dir, "sshjob.conf")  # where alice may read it
    with open(config, "w") as f:
        f.write("[sshjob]\nscheduler = slurm\n")
    by_config = cluster.sshjob("client", job, "echo conf", env={"SSHJOB_CONFIG": config}, scheduler=None)
    assert by_config.stdout == "conf\n", by_config.stderr
    detected = cluster.sshjob("client", job, "echo found", scheduler=None)  # no pool configured, squeue on PATH
    assert detected.stdout == "found\n", detected.stderr
    prefixed = cluster.sshjob("client", "slurm:" + job, "echo prefix", scheduler=None)
    assert prefixed.stdout == "prefix\n", prefixed.stderr


def test_an_interactive_shell_on_a_terminal(cluster):
    workdir = cluster.workdir()
    job = cluster.running(workdir=workdir)
    status, output = drive_terminal(
        cluster.argv("client", "-debug", job, env={"SHELL": "/bin/bash", "TERM": "xterm"}),
        [("Welcome to job %s" % job, None), ("pid(s)", "echo marker-$SLURM_JOB_ID-$(pwd); tty; stty size\n"),
         ("marker-%s-%s" % (job, workdir), None), ("24 80", "exit 5\n")])
    assert status == 5, output
    assert "/dev/pts/" in output
    assert re.search(r"transport: (openssh|builtin)", output)


def test_multi_node_index_and_host_name(cluster):
    job = cluster.running("-n2")
    by_index = cluster.sshjob("client", job + ".0.0", "hostname")
    assert by_index.returncode == 0, by_index.stderr
    by_name = cluster.sshjob("client", "%s.0.%s" % (job, cluster.host), "echo $SLURM_NTASKS")
    assert by_name.stdout == "2\n", by_name.stderr
    out_of_range = cluster.sshjob("client", job + ".0.1", "true")
    assert out_of_range.returncode != 0
    assert out_of_range.stderr == "sshjob: job %s runs on 1 node(s): node index 1 is out of range (0 to 0)\n" % job


def test_a_task_of_an_array_job(cluster):
    array = cluster.sbatch("--array=0-2")
    for task in range(3):
        cluster.wait_running("%s_%d" % (array, task))
    task = cluster.sshjob("client", array + "_1", "echo $SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID")
    assert task.stdout == "%s 1\n" % array, task.stderr
    whole = cluster.sshjob("client", array, "true")
    assert whole.returncode != 0
    assert whole.stderr == "sshjob: job %s is an array of 3 tasks: name one, as %s_0\n" % (array, array)


def test_scp_sftp_rsync_and_cp(cluster):
    workdir = cluster.workdir()
    job = cluster.running(workdir=workdir)
    with open(os.path.join(workdir, "out.dat"), "w") as f:
        f.write("the job's results\n")
    os.makedirs(os.path.join(workdir, "results", "deep"))
    with open(os.path.join(workdir, "results", "deep", "r.txt"), "w") as f:
        f.write("deep result\n")
    mine = cluster.workdir()

    scp = cluster.sshjob("client", "-ssh", "scp", job, "remote:out.dat", mine + "/scp.dat")
    assert scp.returncode == 0, scp.stderr
    sftp = cluster.sshjob("client", "-ssh", "sftp", job, input="get out.dat %s/sftp.dat\n" % mine)
    assert sftp.returncode == 0, sftp.stderr
    rsync = run(["runuser", "-u", ALICE, "--", "rsync", "-a", "-e", " ".join(cluster.argv("client")[4:]),
                 job + ":results/", mine + "/rsynced/"], cwd="/")
    assert rsync.returncode == 0, rsync.stderr
    cp = cluster.sshjob("cp", job + ":results", mine, scheduler=None, env={"SSHJOB_SCHEDULER": "slurm"})
    assert cp.returncode == 0, cp.stderr
    builtin = cluster.sshjob("cp", "-transport", "builtin", job + ":out.dat", mine + "/builtin.dat",
                             env={"SSHJOB_SCHEDULER": "slurm"})
    assert builtin.returncode == 0, builtin.stderr
    for name in ("scp.dat", "sftp.dat", "builtin.dat"):
        with open(os.path.join(mine, name)) as f:
            assert f.read() == "the job's results\n", name
    for name in ("rsynced/deep/r.txt", "results/deep/r.txt"):
        with open(os.path.join(mine, name)) as f:
            assert f.read() == "deep result\n", name
    with open(os.path.join(mine, "up.txt"), "w") as f:
        f.write("uploaded\n")
    up = cluster.sshjob("cp", mine + "/up.txt", job + ":up.txt", env={"SSHJOB_SCHEDULER": "slurm"})
    assert up.returncode == 0, up.stderr
    with open(os.path.join(workdir, "up.txt")) as f:
        assert f.read() == "uploaded\n"


def test_the_builtin_transport_and_several_sessions_at_once(cluster):
    job = cluster.running()
    builtin = cluster.sshjob("client", "-debug", "-transport", "builtin", job, "echo $SLURM_JOB_ID; exit 4")
    assert builtin.returncode == 4, builtin.stderr
    assert builtin.stdout == job + "\n" and "transport: builtin (asked for)" in builtin.stderr
    sessions = [subprocess.Popen(cluster.argv("client", job, "sleep 1; echo session-%d" % i), stdout=subprocess.PIPE,
                                 universal_newlines=True, cwd="/") for i in range(3)]
    outputs = [s.communicate(timeout=60)[0] for s in sessions]
    assert outputs == ["session-%d\n" % i for i in range(3)]


COLD = {"SSHJOB_WARM_IDLE": "0"}  # no agent of the job's (the warm path): every session goes the cold way


def test_the_fast_path_and_the_pipe(cluster, tmp_path):
    job = cluster.running()
    data = "x" * 1000000
    direct = cluster.sshjob("client", "-debug", job, "wc -c", input=data, env=COLD)
    assert direct.stdout.strip() == "1000000", direct.stderr
    assert "connected to the job's sshd directly" in direct.stderr
    piped = cluster.sshjob("client", "-debug", job, "wc -c; exit 6", input=data,
                           env=dict(COLD, SSHJOB_SLURM_DIRECT="false"))
    assert (piped.returncode, piped.stdout.strip()) == (6, "1000000"), piped.stderr
    assert "the session goes through srun's pipe" in piped.stderr
    assert "directly" not in piped.stderr
    sftp = cluster.sshjob("client", "-ssh", "sftp", job, input="pwd\n", env=dict(COLD, SSHJOB_SLURM_DIRECT="false"))
    assert sftp.returncode == 0 and "Remote working directory" in sftp.stdout, sftp.stderr


@contextlib.contextmanager
def behind_nat(user, address="198.51.100.7"):
    """Every TCP connection of `user`'s but those to Slurm's daemons comes
    from `address`, as from a login node behind NAT: the node sees the
    client at another address than srun's.  Only that user's: the other
    tests, which run meanwhile, keep their connections."""
    rule = ["POSTROUTING", "-o", "lo", "-p", "tcp", "-m", "owner", "--uid-owner", user, "-m", "multiport", "!",
            "--dports", "6817,6818", "-j", "SNAT", "--to-source", address]
    assert shutil.which("iptables"), "iptables is missing: .ci/run installs it"
    added = run(["ip", "addr", "add", address + "/32", "dev", "lo"])
    assert added.returncode == 0, added.stderr
    nat = run(["iptables", "-t", "nat", "-A"] + rule)
    try:
        if nat.returncode != 0:
            pytest.skip("this kernel has no NAT (iptables -t nat: %s)" % nat.stderr.strip())
        yield
    finally:
        run(["iptables", "-t", "nat", "-D"] + rule)
        run(["ip", "addr", "del", address + "/32", "dev", "lo"])


def test_a_client_behind_nat_falls_back_to_the_pipe(cluster):
    """The node takes a direct connection only from srun's address; one it
    refuses sends the session through srun's pipe, not to a dead socket."""
    make_user(NATTED)
    job = cluster.running(user=NATTED)
    with behind_nat(NATTED):
        result = cluster.sshjob("client", "-debug", job, "echo through; exit 5", user=NATTED)
    assert (result.returncode, result.stdout) == (5, "through\n"), result.stderr
    assert "did not take the direct connection" in result.stderr
    assert "the session goes through srun's pipe" in result.stderr


def test_x11_forwarding(cluster):
    with x_display() as display:
        job = cluster.running()
        xauth = os.path.join(cluster.workdir(), "xauth")  # where alice may write it
        result = cluster.sshjob("client", "-X", job, X11_CHECK, env={"DISPLAY": display, "XAUTHORITY": xauth})
        assert result.returncode == 0, result.stderr
        remote_display, screens = result.stdout.split()
        assert remote_display.startswith("localhost:") and screens == "1"


def test_shells_keygen_options_and_the_temporary_directory(cluster, tmp_path):
    job = cluster.running()
    scratch = str(tmp_path / "scratch")
    os.mkdir(scratch)
    shutil.chown(scratch, ALICE, ALICE)
    chosen = cluster.sshjob("client", "-shells", "/no/such/shell,/bin/bash", "-keygen-options", "-t rsa -b 2048",
                            job, 'echo $0; cat "$SSH_USER_AUTH"', env={"TMPDIR": scratch})
    assert chosen.returncode == 0, chosen.stderr
    shell, auth = chosen.stdout.splitlines()
    assert shell == "/bin/bash" and auth.startswith("publickey ssh-rsa ")
    assert os.listdir(scratch) == []


def test_auto_retry_waits_for_a_pending_job(cluster):
    blocker = cluster.running()
    job = cluster.sbatch("--dependency=afterany:" + blocker)
    pending = cluster.sshjob("client", job, "true")
    assert pending.returncode != 0
    assert pending.stderr.startswith("sshjob: job %s is pending in Slurm (Dependency)" % job)
    assert pending.stderr.rstrip().endswith("use -auto-retry to wait for it")
    waiting = subprocess.Popen(cluster.argv("client", "-auto-retry", job, "echo at-last"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True, cwd="/")
    assert "is pending in Slurm (Dependency); waiting" in waiting.stderr.readline()
    run(["scancel", blocker])
    out, err = waiting.communicate(timeout=60)
    assert out == "at-last\n", err


def test_a_held_job_and_one_that_can_never_run_are_said_at_once(cluster):
    held = cluster.sbatch("--hold")
    result = cluster.sshjob("client", "-auto-retry", held, "true", timeout=20)
    assert (result.returncode, result.stderr) == (1, "sshjob: job %s is held in Slurm (JobHeldUser): it will not run "
                                                     "until it is released (scontrol release %s)\n" % (held, held))
    failed = cluster.sbatch(script="false")
    never = cluster.sbatch("--dependency=afterok:" + failed)
    wait_for(lambda: "DependencyNeverSatisfied" in run(["squeue", "-h", "-j", never, "-o", "%r"]).stdout, 30,
             "the dependency to fail")
    result = cluster.sshjob("client", "-auto-retry", never, "true", timeout=20)
    assert result.returncode == 1
    assert result.stderr == ("sshjob: job %s will never run in Slurm (DependencyNeverSatisfied): a job it depends "
                             "on can never satisfy its dependency; cancel it and submit it again\n" % never)
    run(["scancel", held, never])


def test_the_queue_shows_a_wrapped_job_by_its_name(cluster):
    job = cluster.running()
    queue = cluster.sshjob("q", scheduler=None, env={"SSHJOB_SCHEDULER": "slurm"})
    row = next(line.split() for line in queue.stdout.splitlines() if line.split()[0] == job)
    assert row[4:] == ["(wrap)"]


# -- containment: Slurm's scancel and suspend reach what a session forked --------------


def test_scancel_ends_double_forked_session_processes_and_suspend_stops_them(cluster):
    job = cluster.running()
    marker = "sshjob-escapee-%s" % job
    session = subprocess.Popen(cluster.argv("client", job, "setsid bash -c 'exec -a %s sleep 999' </dev/null "
                                            ">/dev/null 2>&1 & sleep 600" % marker),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    try:
        wait_for(lambda: pids_of(marker), 30, "the double-forked process")
        escapee = pids_of(marker)[0]
        run(["scontrol", "suspend", job])
        wait_for(lambda: state_of(escapee) == "T", 10, "the escaped process to stop with the job")
        run(["scontrol", "resume", job])
        wait_for(lambda: state_of(escapee) in ("R", "S"), 10, "the escaped process to continue with the job")
        run(["scancel", job])
        wait_for(lambda: not pids_of(marker), 20, "the double-forked process to end with the job")
        session.wait(timeout=30)
        assert session.returncode != 0
    finally:
        if session.poll() is None:
            session.kill()
        for pid in pids_of(marker):
            os.kill(pid, signal.SIGKILL)


def test_what_a_session_leaves_running_lives_on_with_the_job(cluster):
    """tmux started in one session is there for the next (as in a pool),
    stops when Slurm suspends the job and ends with it."""
    job = cluster.running()
    socket_dir = "/tmp/tmux-%d" % pwd.getpwnam(ALICE).pw_uid
    first = cluster.sshjob("client", job, "tmux new -d -s keep 'sleep 7771'; echo started")
    assert (first.returncode, first.stdout) == (0, "started\n"), first.stderr
    try:
        wait_for(lambda: pids_of("sleep 7771"), 10, "the session's tmux to run its command (ended with the session?)")
        server = pids_of("sleep 7771")
        later = cluster.sshjob("client", "-transport", "builtin", job,
                               "tmux send-keys -t keep 'echo typed-later' Enter; sleep 0.5; "
                               "tmux capture-pane -p -t keep | grep -c typed-later")
        assert later.returncode == 0 and later.stdout.strip() in ("1", "2"), later.stdout + later.stderr
        run(["scontrol", "suspend", job])
        wait_for(lambda: state_of(server[0]) == "T", 10, "the session's leftovers to stop with the job")
        run(["scontrol", "resume", job])
        wait_for(lambda: state_of(server[0]) in ("R", "S"), 10, "the leftovers to continue with the job")
        run(["scancel", job])
        wait_for(lambda: not pids_of("sleep 7771"), 20, "the leftovers to end with the job")
    finally:
        for pid in pids_of("sleep 7771"):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(socket_dir, ignore_errors=True)


# -- the program reaches the node by itself -------------------------------------------


def test_the_node_gets_the_program_shipped_or_says_why_not(cluster, tmp_path):
    home = pwd.getpwnam(ALICE).pw_dir
    private = os.path.join(home, "private-copy")
    shutil.rmtree(private, ignore_errors=True)
    os.mkdir(private, 0o700)
    shutil.chown(private, ALICE, ALICE)
    pyz = os.path.join(private, "sshjob.pyz")
    shutil.copy(cluster.pyz, pyz)
    shutil.chown(pyz, ALICE, ALICE)
    shutil.rmtree(os.path.join(home, ".cache", "sshjob"), ignore_errors=True)
    for ship, expected in (("false", None), ("true", "shipped by the client")):
        blocker = cluster.running()
        job = cluster.sbatch("--dependency=afterany:" + blocker)
        argv = cluster.argv("client", "-debug", "-auto-retry", job, "echo shipped-ok", env={
            "SSHJOB_SHIP_PROGRAM": ship})
        argv[argv.index(cluster.pyz)] = pyz
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                cwd="/")
        time.sleep(2)  # the client has started, from its pyz, and waits for the job
        os.unlink(pyz)  # which is then gone: the node cannot read it at the client's path
        run(["scancel", blocker])
        out, err = proc.communicate(timeout=60)
        shutil.copy(cluster.pyz, pyz)
        shutil.chown(pyz, ALICE, ALICE)
        if expected is None:
            assert proc.returncode != 0
            assert "sshjob: node %s cannot read %s, and ship_program = false" % (cluster.host, pyz) in err
            assert "Traceback" not in err
        else:
            assert out == "shipped-ok\n", err
            assert "the node has sshjob: shipped by the client" in err
    again = cluster.sshjob("client", "-debug", cluster.running(), "true")
    assert "the node has sshjob: cached in" in again.stderr, again.stderr


# -- refusals and failures: one sentence, a non-zero exit ------------------------------


def test_refusals_and_failures_are_one_sentence(cluster):
    job = cluster.running()
    other = cluster.sshjob("client", job, "true", user=BOB)
    assert (other.returncode, other.stderr) == (1, "sshjob: Slurm refuses a session in job %s: it is not yours "
                                                   "(Access/permission denied)\n" % job)
    unknown = cluster.sshjob("client", "987654", "true")
    assert unknown.stderr == "sshjob: job 987654 is unknown to Slurm (Invalid job id)\n"
    assert unknown.returncode != 0
    finished = cluster.sbatch(script="true")
    wait_for(lambda: not cluster.state(finished) or cluster.state(finished) == ["COMPLETED"], 30, "the job to end")
    ended = cluster.sshjob("client", finished, "true")
    assert ended.returncode != 0 and ended.stderr.startswith("sshjob: job %s has finished" % finished), ended.stderr
    malformed = cluster.sshjob("client", job + ".3", "true")
    assert malformed.returncode == 2 and malformed.stderr.startswith("sshjob: malformed Slurm job id")
    no_slurm = cluster.sshjob("client", job, "true", env={"PATH": "/usr/local/sbin:/nowhere"})
    assert no_slurm.stderr == "sshjob: Slurm's client commands are not on PATH (srun was not found)\n"
    for result in (other, unknown, ended, malformed, no_slurm):
        assert "Traceback" not in result.stderr


def test_the_queue_lists_the_users_slurm_jobs(cluster):
    job = cluster.running()
    queue = cluster.sshjob("q", env={"SSHJOB_SCHEDULER": "slurm"})
    assert queue.returncode == 0, queue.stderr
    lines = queue.stdout.splitlines()
    assert lines[0].split() == ["ID", "OWNER", "STATE", "NODE", "COMMAND"]
    mine = [line.split() for line in lines[1:] if line.split()[0] == job]
    assert mine and mine[0][1:4] == [ALICE, "running", cluster.host]
    theirs = cluster.sshjob("q", user=BOB, env={"SSHJOB_SCHEDULER": "slurm"})
    assert job not in [line.split()[0] for line in theirs.stdout.splitlines()[1:]]


def test_a_controller_that_is_down_is_one_sentence(cluster):
    job = cluster.running()
    pidfile = os.path.join(slurm.STATE, "log", "slurmctld.pid")
    with open(pidfile) as f:
        os.kill(int(f.read()), signal.SIGTERM)
    try:
        time.sleep(1)
        down = cluster.sshjob("client", job, "true", timeout=120)
        assert down.returncode != 0
        assert down.stderr.startswith("sshjob: Slurm's controller (slurmctld) does not answer"), down.stderr
    finally:
        slurm.start_controller()


@pytest.mark.parametrize("python", INTERPRETERS, ids=lambda p: "py" + p.split("/")[-3] if "pyenv" in p else "py")
def test_the_oldest_and_newest_python_on_both_ends(cluster, python):
    """root's own job, so that the pyenv interpreters under /root serve as the client's and the node's."""
    job = cluster.running(user="root")
    argv = cluster.argv("client", "-debug", job, 'echo $SLURM_JOB_ID; exit 2', user="root",
                        env={"SSHJOB_REMOTE_PYTHON": python})
    argv[argv.index(USER_PYTHON)] = python
    result = run(argv, cwd="/")
    assert (result.returncode, result.stdout) == (2, job + "\n"), result.stderr
    assert "%s -I -S -c BOOT" % python in result.stderr
    builtin = run(argv[:-2] + ["-transport", "builtin", job, "echo builtin"], cwd="/")
    assert builtin.stdout == "builtin\n", builtin.stderr


def test_a_slurm_job_as_an_ssh_host(cluster):
    workdir = cluster.workdir()
    job = cluster.running(workdir=workdir)
    config = os.path.join(cluster.dir, "ssh_config")  # readable by bob too
    printed = cluster.sshjob("ssh-config", scheduler=None)
    assert printed.returncode == 0, printed.stderr
    with open(config, "w") as f:
        f.write(printed.stdout)
    ssh = ["runuser", "-u", ALICE, "--", "env", "-i"] + ["%s=%s" % item for item in cluster.env(ALICE).items()]
    result = run(ssh + ["ssh", "-F", config, job + ".slurm.sshjob", "echo $SLURM_JOB_ID; pwd; exit 3"], cwd="/")
    assert (result.returncode, result.stdout) == (3, "%s\n%s\n" % (job, workdir)), result.stderr
    with open(os.path.join(workdir, "local.txt"), "w") as f:
        f.write("copied\n")
    copied = run(ssh + ["scp", "-F", config, job + ".slurm.sshjob:local.txt", workdir + "/back.txt"], cwd="/")
    assert copied.returncode == 0, copied.stderr
    other = run(["runuser", "-u", BOB, "--", "env", "-i"] + ["%s=%s" % item for item in cluster.env(BOB).items()]
                + ["ssh", "-F", config, "-o", "IdentityFile=/nonexistent", job + ".slurm.sshjob", "true"], cwd="/")
    assert other.returncode == 255 and "sshjob: Slurm refuses a session in job %s" % job in other.stderr


def test_nothing_planted_beside_the_cached_module_runs(cluster):
    """The node runs only bytes whose hash it checked: a cache directory that
    others may write is not used, and a package planted there never runs."""
    job = cluster.running()
    first = cluster.sshjob("client", "-debug", job, "true", env=COLD)
    assert first.returncode == 0, first.stderr
    cache = os.path.join(pwd.getpwnam(ALICE).pw_dir, ".cache", "sshjob")
    digest = [name for name in os.listdir(cache) if len(name) == 64]
    marker = os.path.join(cluster.dir, "planted-code-ran")
    for name in digest:
        package = os.path.join(cache, name, "sshjob")
        os.makedirs(package, exist_ok=True)
        with open(os.path.join(package, "__init__.py"), "w") as f:
            f.write("open(%r, 'w').close()\n" % marker)
        os.chmod(os.path.join(cache, name), 0o777)  # as if another user could write there
    try:
        again = cluster.sshjob("client", "-debug", job, "echo still-fine", env=COLD)
        assert again.stdout == "still-fine\n", again.stderr
        assert "run from memory (no private cache directory)" in again.stderr
        assert not os.path.exists(marker)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


FLOODER = r"""
import os, socket, sys, time
uid, end = int(sys.argv[1]), time.time() + float(sys.argv[2])
held = []
def listeners():
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f][1:]
    for row in rows:
        host, port = row[1].split(":")
        if row[3] == "0A" and int(row[7]) == uid and host != "00000000":
            yield socket.inet_ntoa(bytes.fromhex(host)[::-1]), int(port, 16)
while time.time() < end:
    for address in list(listeners()):
        for _ in range(64):
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.connect(address)
            except OSError:
                pass
            held.append(sock)
    while len(held) > 900:
        held.pop(0).close()
print(len(held))
"""


def test_another_user_flooding_the_direct_listener_stalls_no_session(cluster):
    """bob watches for alice's step listeners and floods each with connections
    that send nothing (the second audit's N4): alice's sessions still go
    straight in, direct, and never wait for the flood."""
    job = cluster.running()
    flooder = subprocess.Popen(["runuser", "-u", BOB, "--", USER_PYTHON, "-c", FLOODER,
                                str(pwd.getpwnam(ALICE).pw_uid), "60"], stdout=subprocess.PIPE,
                               start_new_session=True)
    try:
        for _ in range(3):
            started = time.monotonic()
            result = cluster.sshjob("client", "-debug", job, "echo in", env=COLD)
            assert (result.returncode, result.stdout) == (0, "in\n"), result.stderr
            assert "connected to the job's sshd directly" in result.stderr
            assert time.monotonic() - started < 5
    finally:
        os.killpg(flooder.pid, signal.SIGKILL)
        flooder.wait()


# -- containers (issue 22) ----------------------------------------------------------------------------


def podman_batch(cluster, image=IMAGE, command="sh -c 'cd /data; export MARK=inside; exec sleep 600'", path=None):
    """(job, container name, its first pid) of a batch job that runs a rootless podman container."""
    name = "sshjob-test-%s" % os.urandom(4).hex()
    env = dict(podman_env(ALICE), HOME=pwd.getpwnam(ALICE).pw_dir, PATH=path or os.environ["PATH"])
    exports = ",".join("%s=%s" % item for item in env.items())
    job = cluster.running("--export=ALL," + exports, script="%s --name %s %s %s" % (
        " ".join(PODMAN_RUN), name, image, command))
    return job, name, wait_for_container(ALICE, name)


def test_a_session_lands_in_the_container_of_a_batch_job(cluster, images):
    job, name, pid = podman_batch(cluster)
    inside = run(["nsenter", "-t", str(pid), "-u", "hostname"]).stdout.strip()
    try:
        for transport in ("openssh", "builtin"):
            result = cluster.sshjob("client", "-transport", transport, job,
                                    "echo MARK=$MARK; pwd; hostname; ps; echo PIDS=$_SSHJOB_JOB_PIDS; exit 4")
            assert result.returncode == 4, (transport, result.stderr)
            assert result.stdout.startswith("MARK=inside\n/data\n%s\n" % inside), result.stdout
            assert re.search(r"^\s*1\s+\S+\s+sleep 600$", result.stdout, re.M) and "PIDS=1\n" in result.stdout
        debug = cluster.sshjob("client", "-debug", "-transport", "builtin", job, "true")  # OpenSSH's: through its ssh
        assert "runs inside its podman container %s (pid %d)" % (name, pid) in debug.stderr
        outside = cluster.sshjob("client", "-container", "none", job, "hostname")
        assert outside.stdout == socket.gethostname() + "\n", outside.stderr
        here = cluster.workdir()
        got = cluster.sshjob("cp", "slurm:%s:/data/input.txt" % job, here, scheduler=None)
        assert got.returncode == 0, got.stderr
        with open(os.path.join(here, "input.txt")) as f:
            assert f.read() == "the image's data\n"
        rsh = "%s %s client --scheduler=slurm" % (USER_PYTHON, cluster.pyz)
        synced = run(["runuser", "-u", ALICE, "--", "env", "-i"] + ["%s=%s" % i for i in cluster.env(ALICE).items()]
                     + ["rsync", "-rt", "-e", rsh, job + ":/data/", here + "/synced/"], cwd="/")
        assert synced.returncode == 0 and os.listdir(os.path.join(here, "synced")) == ["input.txt"], synced.stderr
        marker = "sshjob-left-%s" % job
        left = cluster.sshjob("client", job, "sleep 999 </dev/null >/dev/null 2>&1 & echo $! > /tmp/%s" % marker)
        assert left.returncode == 0, left.stderr
        assert copies_in(pid, "999"), "what the session left in the container ended with the session"
        assert cluster.sshjob("client", job, "true").returncode == 0
        assert copies_in(pid, "999"), "what a session left in the container lives on, as the job's"
    finally:
        run(["scancel", job])
        podman(ALICE, "rm", "--force", "--time", "0", name)


def copies_in(container, seconds):
    """Pids of `sleep SECONDS` in the pid namespace of process `container`."""
    namespace = os.readlink("/proc/%d/ns/pid" % container)
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and os.readlink("/proc/%s/ns/pid" % entry) == namespace:
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    if f.read().split(b"\0")[:2] == [b"sleep", seconds.encode()]:
                        found.append(int(entry))
    return found


def test_a_session_has_what_the_batch_script_exported_before_its_program(cluster):
    workdir = cluster.workdir()
    job = cluster.running(workdir=workdir, script="export MARK=inbatch; mkdir -p deeper; cd deeper; sleep 300; true")
    wait_for(lambda: sleeper_in(workdir + "/deeper"), 20, "the batch script's program")  # Slurm says RUNNING first
    sleeper = sleeper_in(workdir + "/deeper")
    wait_for(lambda: age_of(sleeper) > 1.0, 10, "the program to have lived a second")
    payload = cluster.sshjob("client", "-debug", job, "echo MARK=$MARK; pwd")
    assert payload.stdout == "MARK=inbatch\n%s/deeper\n" % workdir, payload.stderr
    assert "with the environment and directory of pid %d (sleep)" % sleeper in payload.stderr
    script = cluster.sshjob("client", "-job-env", "script", job, "echo MARK=$MARK; pwd")
    assert script.stdout == "MARK=\n%s\n" % workdir, script.stderr
    run(["scancel", job])


def sleeper_in(directory):
    """The pid of a `sleep 300` that runs in `directory`, or None."""
    for pid in pids_of("sleep 300"):
        with contextlib.suppress(OSError):  # another test's, ended meanwhile
            if os.readlink("/proc/%d/cwd" % pid) == directory:
                return pid
    return None


def age_of(pid):
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    with open("/proc/%d/stat" % pid) as f:
        started = int(f.read().rpartition(")")[2].split()[19])
    return uptime - started / os.sysconf("SC_CLK_TCK")


def test_an_owner_s_own_podman_cannot_lead_a_session_into_a_root_container(cluster, images):
    """The job's podman is the owner's word: a fake one on the owner's PATH
    names root's container as the job's.  The session, which enters with
    the owner's rights, is refused by the kernel, in one sentence."""
    podman_image("root", IMAGE)
    name = "sshjob-test-root-%s" % os.urandom(4).hex()
    started = podman("root", "run", "-d", "--runtime", "runc", "--rm", "--network", "none", *ROOTFUL_LIMITS, "--name",
                     name, IMAGE, "sleep", "600")
    assert started.returncode == 0, started.stderr
    fake = pathlib.Path(cluster.workdir(), "bin")
    try:
        root_pid = wait_for_container("root", name)
        fake.mkdir()
        (fake / "podman").write_text(
            "#!/bin/bash\ncase \" $* \" in\n  *\" ps \"*) echo forged ;;\n"
            "  *\" inspect \"*) echo '[%d,\"%s\",[\"podman\",\"-c\",\"sleep 600; true\",\"run\"]]' ;;\n"
            "  *) exec -a podman /bin/bash -c 'sleep 600; true' run ;;\nesac\n" % (root_pid, name))
        (fake / "podman").chmod(0o755)
        path = "%s:%s" % (fake, os.environ["PATH"])
        job = cluster.running("--export=ALL,PATH=" + path, script="podman run")
        wait_for(lambda: pids_of("podman -c sleep 600; true run"), 20, "the fake runtime")
        for transport in ("openssh", "builtin"):
            result = cluster.sshjob("client", "-transport", transport, job, "hostname", env={"PATH": path})
            assert result.returncode == 126 and result.stdout == "", (transport, result.stdout, result.stderr)
            assert result.stderr == "sshjob: cannot enter podman container %s (pid %d): it is not yours to enter " \
                                    "(another user's or root's, as a runtime that runs as root makes it): a " \
                                    "session enters a container with its owner's rights only\n" % (name, root_pid)
        run(["scancel", job])
    finally:
        podman("root", "rm", "--force", "--time", "0", name)


def test_a_container_as_an_ssh_host_name(cluster, images):
    job, name, pid = podman_batch(cluster)
    config = os.path.join(cluster.dir, "ssh_config_containers")
    with open(config, "w") as f:
        f.write(cluster.sshjob("ssh-config", scheduler=None).stdout)
    ssh = ["runuser", "-u", ALICE, "--", "env", "-i"] + ["%s=%s" % item for item in cluster.env(ALICE).items()]
    inside = run(["nsenter", "-t", str(pid), "-u", "hostname"]).stdout
    try:
        for host, expected in ((job, inside), (name + "--" + job, inside), ("%d--%s" % (pid, job), inside),
                               ("none--" + job, socket.gethostname() + "\n")):
            result = run(ssh + ["ssh", "-F", config, host + ".slurm.sshjob", "hostname"], cwd="/")
            assert (result.returncode, result.stdout) == (0, expected), (host, result.stderr)
        wrong = run(ssh + ["ssh", "-F", config, "nosuch--%s.slurm.sshjob" % job, "hostname"], cwd="/")
        assert wrong.returncode == 255 and "sshjob: job %s has no container nosuch" % job in wrong.stderr
    finally:
        run(["scancel", job])
        podman(ALICE, "rm", "--force", "--time", "0", name)
