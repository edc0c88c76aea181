"""Faults injected on purpose (issue 12): a job runs at most once whatever
fails, and no daemon dies silently.  Real daemons, real processes; each job
runs a command with a marker of its own (`sleep 987.N`), counted in /proc
while the faults happen."""

import json
import os
import random
import signal
import socket
import subprocess
import time

import pytest
from conftest import INTERPRETERS, Census, copies, run, wait_for


def second_starter(pool, name):
    """Another starter of the same pool, with a directory of its own."""
    directory = os.path.join(pool.dir, "execute-" + name)
    log = open(os.path.join(pool.dir, name + ".log"), "w")  # noqa: SIM115 (closed by the caller)
    env = dict(os.environ, SSHJOB_STARTER_NAME=name, SSHJOB_STARTER_DIR=directory)
    proc = subprocess.Popen([pool.python, pool.pyz, "--config", pool.config, "starter"], env=env,
                            stdout=log, stderr=log, start_new_session=True)
    return proc, log


def node_of(pool, job):
    for line in pool.sshjob("q").stdout.splitlines()[1:]:
        fields = line.split()
        if fields[0] == job:
            return fields[3]
    return None


def read(path):
    with open(path) as f:
        return f.read()


def test_a_hung_starter_stops_its_job_before_another_starter_runs_it(make_pool):
    pool = make_pool({"job_lease": "4", "starter_slots": "2"})
    jobs = [pool.running_job("sleep", "987.%d" % n) for n in range(2)]
    census = Census("987.%d" % n for n in range(2))
    other, log = second_starter(pool, "starter@other")
    try:
        os.kill(pool.pid("starter"), signal.SIGSTOP)
        try:
            for job in jobs:
                wait_for(lambda job=job: node_of(pool, job) == "starter@other", 60, "job %s on the other starter" % job)
        finally:
            os.kill(pool.pid("starter"), signal.SIGCONT)
        time.sleep(6)  # the first starter catches up with what happened meanwhile
        most = census.stop()
        assert most == {"987.0": 1, "987.1": 1}, most  # never two copies of a job
        assert [copies("987.%d" % n) for n in range(2)] == [1, 1]
        assert [node_of(pool, job) for job in jobs] == ["starter@other"] * 2
        first = read(os.path.join(pool.dir, "starter.log"))
        assert "has not renewed its lease" in first and "Traceback" not in first
        assert pool.sshjob("client", jobs[0], "echo moved").stdout == "moved\n"
    finally:
        census.done.set()
        other.terminate()
        other.wait(timeout=30)
        log.close()


def test_a_job_that_the_lease_keeper_ended_runs_again_when_its_starter_wakes_up(make_pool):
    """The starter hangs past its lease; its keeper ends the job; the
    starter goes on before the schedd moves the job, sees it exit, and must
    say that the lease ended it: the job runs again, never "completed"."""
    pool = make_pool({"job_lease": "4", "starter_slots": "2"})
    job = pool.running_job("sleep", "987.40")
    starter = pool.pid("starter")
    os.kill(starter, signal.SIGSTOP)
    try:
        wait_for(lambda: copies("987.40") == 0, 30, "the lease's keeper to end the job")
    finally:
        os.kill(starter, signal.SIGCONT)
    deadline, seen = time.time() + 60, []
    while not (seen[-1:] == ["running"] and copies("987.40") == 1):
        assert time.time() < deadline, "the job did not run again: %s" % seen
        state = pool.state(job)
        if state not in seen[-1:]:
            seen.append(state)
        assert state != "completed", seen
        time.sleep(0.1)
    assert "has not renewed its lease" in read(os.path.join(pool.dir, "starter.log"))


def test_an_expired_starter_token_stops_its_jobs_and_the_starter_recovers(make_pool):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = make_pool({"job_lease": "4", "schedd_tls_address": "127.0.0.1:%d" % port}, start=False)
    init = pool.sshjob("init", "--dir", pool.dir, "--listen", "127.0.0.1:%d" % port)
    assert init.returncode == 0, init.stderr
    fingerprint = init.stdout.split("schedd certificate SHA-256: ")[1].split()[0]
    pool.start()
    local = pool.pid("starter")
    os.kill(local, signal.SIGTERM)  # this test's starter is a remote one, with a token
    wait_for(lambda: not os.path.exists("/proc/%d" % local), 30, "the local starter to stop")
    token = os.path.join(pool.dir, "remote.token")
    made = pool.sshjob("token", "create", "--for", "starter", "--name", "starter@remote", "--expires", "12s",
                       "--output", token)
    assert made.returncode == 0, made.stderr
    remote_dir = os.path.join(pool.dir, "remote")
    os.mkdir(remote_dir)
    config = os.path.join(remote_dir, "sshjob.conf")
    with open(config, "w") as f:
        f.write("[sshjob]\nschedd_address = 127.0.0.1:%d\nschedd_fingerprint = %s\ntoken_file = %s\n"
                "starter_name = starter@remote\njob_lease = 4\n" % (port, fingerprint, token))
    log = open(os.path.join(remote_dir, "starter.log"), "w")  # noqa: SIM115 (closed below)
    starter = subprocess.Popen([pool.python, pool.pyz, "--config", config, "starter"], stdout=log, stderr=log,
                               start_new_session=True)
    try:
        wait_for(lambda: "starter@remote" in pool.sshjob("status").stdout, 20, "the remote starter")
        job = pool.running_job("sleep", "987.7")
        assert node_of(pool, job) == "starter@remote"
        status = json.loads(pool.sshjob("status", "--json").stdout)
        remote = next(s for s in status["starters"] if s["name"] == "starter@remote")
        assert (remote["used"], remote["address"] is not None, status["lease"]) == (1, True, 4)
        assert any(p.startswith("its token expires in 0.0 days") for p in remote["problems"]), remote
        assert "starter@remote: its token expires in" in pool.sshjob("status").stdout
        census = Census(["987.7"])
        wait_for(lambda: copies("987.7") == 0, 40, "the job to stop when the token has expired")
        wait_for(lambda: pool.state(job) == "idle", 40, "the job to be requeued")
        assert starter.poll() is None  # the starter lives on, saying why it cannot work
        os.unlink(token)
        renewed = pool.sshjob("token", "create", "--for", "starter", "--name", "starter@remote", "--output", token)
        assert renewed.returncode == 0, renewed.stderr
        pool.wait_state(job, "running", timeout=60)  # it re-reads its token, and runs the job again
        assert census.stop() == {"987.7": 1}
        text = read(os.path.join(remote_dir, "starter.log"))
        assert "the token of starter@remote has expired" in text
        assert "has not renewed its lease" in text or "has not renewed this starter's lease" in text, text
        assert "Traceback" not in text
    finally:
        starter.terminate()
        starter.wait(timeout=30)
        log.close()


def test_random_kills_and_stops_lose_no_job_and_run_none_twice(make_pool):
    """A bounded storm: the schedd killed (-9) and restarted, the schedd or
    the starter stopped and continued, while jobs are submitted and entered."""
    pool = make_pool({"job_lease": "6", "starter_slots": "64"})
    rng = random.Random(12)
    acknowledged, markers = [], []
    census = Census([])
    faults = {"kill schedd": 0, "stop schedd": 0, "stop starter": 0}
    for cycle in range(6):
        marker = "987.%d" % (100 + cycle)
        submitted = pool.sshjob("submit", "--workdir", pool.workdir(), "--", "sleep", marker)
        if submitted.returncode == 0:
            acknowledged.append(submitted.stdout.split()[0])
            markers.append(marker)
            census.markers.append(marker)
            census.most[marker] = 0
        fault = rng.choice(sorted(faults))
        faults[fault] += 1
        if fault == "kill schedd":
            os.kill(pool.pid("schedd"), signal.SIGKILL)
            time.sleep(rng.uniform(0.1, 1.0))
            restarted = pool.sshjob("pool", "start", "--dir", pool.dir)
            assert restarted.returncode == 0, restarted.stderr
        else:
            role = fault.split()[1]
            os.kill(pool.pid(role), signal.SIGSTOP)
            time.sleep(rng.uniform(0.5, 3.0))
            os.kill(pool.pid(role), signal.SIGCONT)
        session = pool.sshjob("client", "-auto-retry", acknowledged[-1], "echo in", timeout=120) \
            if acknowledged else None
        assert session is None or session.stdout == "in\n" or (session.returncode != 0 and \
            session.stderr.count("\n") == 1), session
    for job in acknowledged:
        pool.wait_state(job, "running", timeout=60)
    time.sleep(2)
    most = census.stop()
    assert all(count == 1 for count in most.values()), most
    assert [copies(m) for m in markers] == [1] * len(markers)
    for role in ("schedd", "starter"):
        assert "Traceback" not in read(os.path.join(pool.dir, role + ".log"))
    print("fault storm: %d cycles, faults %s, jobs %d, lost 0, duplicates 0" % (6, json.dumps(faults),
                                                                               len(acknowledged)))


def test_a_full_disk_is_named_and_loses_nothing(make_pool, tmp_path):
    pool = make_pool(start=False)
    mount = run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=755", "tmpfs", pool.dir])
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % mount.stderr.strip())
    try:
        with open(pool.config, "w") as f:
            f.write("[sshjob]\nstarter_slots = 4\n")
        pool.start()
        first = pool.running_job("sleep", "987.300")
        filler = os.path.join(pool.dir, "filler")
        run(["dd", "if=/dev/zero", "of=" + filler, "bs=64k"])
        full = pool.sshjob("submit", "--count", "500", "--workdir", "/tmp", "--", "sleep", "987.301")
        assert full.returncode == 1
        assert full.stderr.startswith("sshjob: the schedd cannot use its queue %s/queue.db (" % pool.dir)
        assert "full" in full.stderr and full.stderr.count("\n") == 1
        session = pool.sshjob("client", first, "echo still")
        assert session.returncode != 0 and session.stderr.count("\n") == 1 and "sshjob: " in session.stderr
        os.unlink(filler)
        again = pool.sshjob("submit", "--workdir", "/tmp", "--", "sleep", "987.302")
        assert again.returncode == 0, again.stderr
        assert pool.sshjob("client", first, "echo back").stdout == "back\n"
        assert pool.state(first) == "running"
    finally:
        pool.stop()
        run(["umount", "-l", pool.dir])


def test_daemons_that_cannot_work_say_why_and_exit(make_pool, base, tmp_path):
    python, pyz = INTERPRETERS[-1], os.path.join(base, "sshjob.pyz")
    bad = run([python, pyz, "init", "--dir", str(tmp_path / "p"), "--listen", "127.0.0.1:290007"])
    assert bad.returncode == 1
    assert bad.stderr == ("sshjob: address '127.0.0.1:290007' is neither a socket path nor host:port "
                          "(a port of 0 to 65535)\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        pool = make_pool({"schedd_tls_address": "127.0.0.1:%d" % port}, start=False)
        started = pool.sshjob("pool", "start", "--dir", pool.dir, config=False)
        assert started.returncode == 1
        assert started.stderr == ("sshjob: the schedd did not start: cannot listen on 127.0.0.1:%d (Address "
                                  "already in use); see the logs in %s\n" % (port, pool.dir))
