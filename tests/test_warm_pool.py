"""End to end: the warm path in a pool (issue 25), and ssh's master
connections on both sites.

Against real pools, as ordinary users: a job's first session goes the cold
way (the schedd's ticket, the starter) and makes the job's agent, which the
starter starts inside the job; later built-in sessions go through the agent,
later OpenSSH sessions through the ssh master that the first one left. The
agent is neither a job's process nor a session: a job whose command ended
completes when its last session does; a suspended job's sessions do not
wait on it; a job whose command exited takes no new session through it;
another user can use none of it."""

import glob
import json
import os
import pwd
import random
import socket
import ssl
import subprocess
import time
import zlib

import pytest
from conftest import ALICE, BOB, Host, agent_log, run, state_of, wait_for


def record_path(pool, job, user=ALICE):
    """Where alice's record of the job's agent is: named by the pool (its configuration) and the job."""
    name = "pool-%08x-%s.json" % (zlib.crc32(json.dumps([pool.config, None]).encode()), job)
    return os.path.join(pwd.getpwnam(user).pw_dir, ".local", "share", "sshjob", "warm", name)


def warm_rows(pool, job):
    """The lines of `sshjob warm list` for the job."""
    listed = pool.sshjob("warm", "list", user=ALICE)
    assert listed.returncode == 0, listed.stderr
    return [line for line in listed.stdout.splitlines()[1:] if line.split()[0] == job]


@pytest.fixture(params=[{}, {"use_cgroups": "false"}], ids=["cgroups", "tags"])
def warm_pool(request, make_pool):
    """A pool of its own: with cgroups, and with the environment tag alone (where no cgroup holds the agent's sshd)."""
    return make_pool(request.param)


def test_later_sessions_go_through_the_agent_and_ssh_s_master(pool):
    job = pool.running_job(user=ALICE)
    first = pool.sshjob("client", "-debug", "-transport", "builtin", job, "echo first; exit 2", user=ALICE)
    assert (first.returncode, first.stdout) == (2, "first\n"), first.stderr
    assert "the warm path" not in first.stderr
    wait_for(lambda: os.path.exists(record_path(pool, job)), what="the job's agent to write its record")
    assert os.stat(record_path(pool, job)).st_mode & 0o777 == 0o600
    later = pool.sshjob("client", "-debug", "-transport", "builtin", job, "echo $SSHJOB_JOB_ID; pwd; exit 3",
                        user=ALICE)
    assert later.returncode == 3 and later.stdout.splitlines()[0] == job, later.stderr
    assert "the warm path: job %s's agent" % job in later.stderr
    assert "warm entry: user %s, job %s, builtin transport" % (ALICE, job) in agent_log(job + ".0")
    ssh1 = pool.sshjob("client", "-debug", job, "echo ssh1", user=ALICE)  # its agent serves it; its ssh stays
    assert ssh1.stdout == "ssh1\n" and "the warm path: job %s's agent" % job in ssh1.stderr, ssh1.stderr
    assert "warm entry: user %s, job %s, auto transport" % (ALICE, job) in agent_log(job + ".0")
    ssh2 = pool.sshjob("client", "-debug", job, "echo $SSHJOB_JOB_ID", user=ALICE)
    assert ssh2.stdout == job + "\n" and "the warm path: ssh's master connection to %s" % job in ssh2.stderr
    scp = pool.sshjob("client", "-ssh", "scp", job, "remote:/etc/hostname", os.devnull, user=ALICE)
    assert scp.returncode == 0, scp.stderr
    rows = warm_rows(pool, job)
    assert len(rows) == 2 and " agent " in rows[0] and " ssh master " in rows[1], rows
    stopped = pool.sshjob("warm", "stop", job, user=ALICE).stdout.splitlines()
    assert len(stopped) == 2 and stopped[0].startswith("Job %s's agent on " % job), stopped
    assert stopped[1] == "Job %s's ssh master connection stopped." % job
    assert not os.path.exists(record_path(pool, job))
    cold = pool.sshjob("client", "-debug", job, "echo cold-again", user=ALICE)
    assert cold.stdout == "cold-again\n" and "the warm path" not in cold.stderr, cold.stderr
    pool.sshjob("rm", job, user=ALICE)


def test_the_agent_is_no_session_and_a_job_completes_as_it_would_without(warm_pool):
    job = warm_pool.submit("sleep", "4", user=ALICE)
    warm_pool.wait_state(job, "running")
    assert warm_pool.sshjob("client", "-transport", "builtin", job, "true", user=ALICE).returncode == 0
    wait_for(lambda: os.path.exists(record_path(warm_pool, job)), what="the job's agent")
    assert warm_pool.sshjob("client", job, "true", user=ALICE).returncode == 0  # leaves an ssh master
    assert warm_pool.sshjob("client", job, "true", user=ALICE).returncode == 0  # through it
    started = time.monotonic()
    warm_pool.wait_state(job, "completed", timeout=20)
    assert time.monotonic() - started < 8, "the job outlived its command by more than its agent's idle sessions may"
    wait_for(lambda: not [row for row in warm_rows(warm_pool, job) if " agent " in row], what="the agent to go")
    gone = warm_pool.sshjob("client", job, "true", user=ALICE)
    assert gone.returncode != 0 and "has finished" in gone.stderr and gone.stderr.count("\n") == 1, gone.stderr


def test_a_job_whose_command_exited_takes_no_new_session_through_its_warm_paths(warm_pool):
    job = warm_pool.submit("sh", "-c", "while [ ! -e stop ]; do sleep 0.1; done", user=ALICE)
    warm_pool.wait_state(job, "running")
    assert warm_pool.sshjob("client", "-transport", "builtin", job, "true", user=ALICE).returncode == 0
    wait_for(lambda: os.path.exists(record_path(warm_pool, job)), what="the job's agent")
    assert warm_pool.sshjob("client", job, "true", user=ALICE).returncode == 0  # its ssh stays as a master
    holder = subprocess.Popen(warm_pool.argv("client", "-transport", "builtin", job, "touch stop; sleep 5",
                                             user=ALICE), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: "its command exited" in warm_pool.sshjob("q", user=ALICE).stdout,
                 what="the job's command to exit")
        for transport in ("builtin", "auto"):
            refused = warm_pool.sshjob("client", "-transport", transport, job, "echo no", user=ALICE)
            assert refused.returncode != 0 and refused.stdout == "", refused.stderr
            assert "has exited; only its open sessions remain" in refused.stderr, refused.stderr
    finally:
        holder.communicate(timeout=30)
    warm_pool.wait_state(job, "completed", timeout=20)


def test_a_suspended_job_s_warm_paths_say_so_at_once(warm_pool):
    job = warm_pool.running_job(user=ALICE)
    first = warm_pool.sshjob("client", "-transport", "builtin", job, "echo $_SSHJOB_JOB_PIDS", user=ALICE)
    main = int(first.stdout.split()[0])
    wait_for(lambda: os.path.exists(record_path(warm_pool, job)), what="the job's agent")
    assert warm_pool.sshjob("client", job, "true", user=ALICE).returncode == 0
    assert warm_pool.sshjob("suspend", job, user=ALICE).returncode == 0
    try:  # suspend is the schedd's word to the starter: a session that starts before the starter acts runs, and stops
        wait_for(lambda: state_of(main) == "T", what="the starter to stop the job")
        wait_for(lambda: any(" agent (not answering: suspended?) " in row for row in warm_rows(warm_pool, job)),
                 what="its agent to stop with it")
        for transport in ("auto", "builtin"):
            started = time.monotonic()
            said = warm_pool.sshjob("client", "-transport", transport, job, "echo during", user=ALICE, timeout=20)
            took = time.monotonic() - started
            assert said.returncode != 0 and said.stdout == "" and "suspended" in said.stderr, said.stderr
            assert took < 3, "a suspended job held a %s client %.1f s" % (transport, took)
        assert [" agent (not answering: suspended?) " in row for row in warm_rows(warm_pool, job)] == [True, False]
    finally:
        assert warm_pool.sshjob("continue", job, user=ALICE).returncode == 0
    after = warm_pool.sshjob("client", "-debug", job, "echo after", user=ALICE)
    assert after.stdout == "after\n" and "ssh's master connection" in after.stderr, after.stderr
    warm_pool.sshjob("rm", job, user=ALICE)


def test_another_user_can_use_no_warm_path_of_alice_s(pool):
    job = pool.running_job(user=ALICE)
    assert pool.sshjob("client", "-transport", "builtin", job, "true", user=ALICE).returncode == 0
    assert pool.sshjob("client", job, "true", user=ALICE).returncode == 0
    wait_for(lambda: os.path.exists(record_path(pool, job)), what="the job's agent to write its record")
    with open(record_path(pool, job)) as f:
        said = json.load(f)
    for path in (record_path(pool, job), "/tmp/sshjob-%d/agent-%s.0.log" % (pwd.getpwnam(ALICE).pw_uid, job)):
        peek = run(["runuser", "-u", BOB, "--", "cat", path])
        assert peek.returncode != 0 and "Permission denied" in peek.stderr
    sockets = glob.glob(os.path.join(pwd.getpwnam(ALICE).pw_dir, ".local", "share", "sshjob", "cm-pool-*[0-9a-f]"))
    assert sockets
    for path in sockets:
        check = run(["runuser", "-u", BOB, "--", "ssh", "-o", "ControlPath=" + path, "-O", "check", "x"])
        assert check.returncode != 0 and "Permission denied" in check.stderr, check.stderr
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    before = agent_log(job + ".0").count("warm entry")
    for guess in ({"v": 2, "op": "session", "secret": "00" * 32, "transport": "builtin"}, {"v": 2, "op": "stop"}):
        with socket.create_connection(("127.0.0.1", said["port"]), timeout=10) as sock, \
                context.wrap_socket(sock) as tls:
            body = json.dumps(guess).encode()
            tls.sendall(len(body).to_bytes(4, "big") + body)
            assert tls.recv(4096) == b""  # closed, nothing said
    logged = agent_log(job + ".0")
    assert logged.count("refused a connection") >= 2 and logged.count("warm entry") == before
    assert pool.sshjob("client", "-transport", "builtin", job, "echo still", user=ALICE).stdout == "still\n"
    bobs = pool.sshjob("client", job, "true", user=BOB)
    assert bobs.returncode != 0 and ("not yours" in bobs.stderr or "may not" in bobs.stderr), bobs.stderr
    pool.sshjob("rm", job, user=ALICE)


def test_an_interrupted_session_through_ssh_s_master_lets_its_caller_go(pool):
    """ssh's master holds a session's stderr until its command ends, even
    after ssh was interrupted: a caller reading the client's stderr to its
    end must not wait for that."""
    job = pool.running_job(user=ALICE)
    assert pool.sshjob("client", job, "true", user=ALICE).returncode == 0  # its ssh stays as the master
    wait_for(lambda: os.path.exists(record_path(pool, job)), what="the job's agent, which says whether it runs")
    sleep = "sleep 30.%d" % random.randrange(10 ** 6)  # its own: an interrupted one runs on till it ends
    proc = subprocess.Popen(pool.argv("client", "-debug", job, "echo started >&2; " + sleep, user=ALICE),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        wait_for(lambda: run(["pgrep", "-u", ALICE, "-x", "-f", sleep]).returncode == 0, what="the session")
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert "ssh's master connection" in err and "started" in err, err
    pool.sshjob("rm", job, user=ALICE)


def test_the_pool_s_warm_path_reaches_the_job_from_another_host(pool):
    """A second network namespace: the job's agent answers there, by the
    address that faces it, for both transports; ssh's master (a Unix socket
    of this host's) is this host's only."""
    job = pool.running_job(user=ALICE)
    host = Host("login3")
    try:
        assert pool.sshjob("client", "-transport", "builtin", job, "true", user=ALICE).returncode == 0
        wait_for(lambda: os.path.exists(record_path(pool, job)), what="the job's agent to write its record")
        with open(record_path(pool, job)) as f:
            assert host.outer in json.load(f)["hosts"]
        before = agent_log(job + ".0").count("from %s" % host.inner)  # the log is the node's, of every job 1.0
        for transport in ("builtin", "openssh"):
            argv = pool.argv("client", "-transport", transport, job, "echo from-elsewhere $SSHJOB_JOB_ID; exit 4",
                             user=ALICE)
            remote = run(["ip", "netns", "exec", host.name] + argv, cwd="/")
            assert (remote.returncode, remote.stdout) == (4, "from-elsewhere %s\n" % job), remote.stderr
        assert agent_log(job + ".0").count("from %s" % host.inner) == before + 2
    finally:
        host.remove()
        pool.sshjob("rm", job, user=ALICE)
