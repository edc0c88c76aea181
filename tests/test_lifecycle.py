"""Sessions belong to the job: suspend, remove, vacate and exit follow them;
jobs of several nodes; nothing lost when daemons die (issue 4)."""

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
from conftest import state_of, wait_for


def background_session(pool, job, command):
    """A client running `command` in the job; its first line of output is returned with it."""
    proc = subprocess.Popen(pool.argv("client", job, command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    return proc, proc.stdout.readline().strip()


def pids_with(marker):
    """Pids of `sleep 7MARKER` and `sleep 8MARKER`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                argv = f.read().split(b"\0")
                if argv[:1] == [b"sleep"] and argv[1:2] in ([b"7" + marker.encode()], [b"8" + marker.encode()]):
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


@pytest.fixture(params=["cgroup", "tag"])
def tracking_pool(request, make_pool):
    """Pools tracking processes with a cgroup per job (where the starter can
    make one) and with the environment tag, its fallback."""
    pool = make_pool({"use_cgroups": "true" if request.param == "cgroup" else "false"})
    with open(os.path.join(pool.dir, "starter.log")) as f:
        log = f.read()
    if request.param == "cgroup" and "one cgroup v2 per job" not in log:
        pytest.skip("this starter cannot make cgroups here: " + log.splitlines()[0])
    assert ("environment tag" in log) == (request.param == "tag")
    return pool


def test_rm_ends_double_forked_session_processes(tracking_pool):
    pool = tracking_pool
    job = pool.running_job()
    marker = "%d" % os.getpid()  # sleeps of 7PID and 8PID seconds
    result = pool.sshjob("client", job, "setsid nohup sleep 7%s >/dev/null 2>&1 < /dev/null & "
                                        "(sleep 8%s > /dev/null 2>&1 &) ; echo started" % (marker, marker))
    assert result.stdout == "started\n", result.stderr
    wait_for(lambda: len(pids_with(marker)) == 2, what="the session's background processes")
    session, _ = background_session(pool, job, "echo open; sleep 300")
    removed = pool.sshjob("rm", job)
    assert removed.stdout == "Job %s marked for removal.\n" % job
    wait_for(lambda: pids_with(marker) == [], what="the double-forked processes to go")
    _, err = session.communicate(timeout=30)
    assert session.returncode != 0
    assert err.splitlines()[-1] == "sshjob: the session ended because job %s was removed" % job


def test_suspend_stops_the_job_and_its_sessions_and_continue_resumes_them(tracking_pool):
    pool = tracking_pool
    job = pool.running_job()
    session, shell = background_session(pool, job, "echo $$; while :; do sleep 0.1; done")
    shell = int(shell)
    main = int(pool.sshjob("client", job, "echo $_SSHJOB_JOB_PIDS").stdout.split()[0])
    assert pool.sshjob("suspend", job).stdout == "Job %s suspended.\n" % job
    wait_for(lambda: state_of(shell) == "T" and state_of(main) == "T", what="state T")
    assert pool.state(job) == "suspended"
    refused = pool.sshjob("client", job, "true")
    assert refused.returncode == 1 and "is suspended, not running yet" in refused.stderr
    assert pool.sshjob("continue", job).stdout == "Job %s continued.\n" % job
    wait_for(lambda: state_of(shell) in ("S", "R") and state_of(main) in ("S", "R"), what="the job to run again")
    assert pool.state(job) == "running"
    session.kill()
    session.wait()


def test_a_job_stays_running_while_sessions_are_open(pool):
    job = pool.running_job("sleep", "2")
    session, first = background_session(pool, job, "echo in; sleep 5; echo out; exit 3")
    assert first == "in"
    wait_for(lambda: "waiting for its ssh sessions to close" in pool.sshjob("q").stdout, 10,
             "the job's command to exit")  # after 2 s
    assert pool.state(job) == "running"
    late = pool.sshjob("client", job, "true")
    assert late.returncode == 1 and "has exited; only its open sessions remain" in late.stderr
    out, _ = session.communicate(timeout=30)
    assert out == "out\n" and session.returncode == 3
    pool.wait_state(job, "completed")
    assert "completed (0)" in pool.sshjob("q", "--all").stdout


def test_vacate_ends_sessions_and_the_job_runs_again(pool):
    job = pool.running_job()
    first = int(pool.sshjob("client", job, "echo $_SSHJOB_JOB_PIDS").stdout.split()[0])
    session, _ = background_session(pool, job, "echo open; sleep 300")
    assert pool.sshjob("vacate", job).stdout == "Job %s vacated: it goes back to idle.\n" % job
    _, err = session.communicate(timeout=30)
    assert err.splitlines()[-1] == "sshjob: the session ended because job %s was pre-empted (vacated)" % job, err
    wait_for(lambda: state_of(first) is None, what="the first run to end")
    pool.wait_state(job, "running")
    second = int(pool.sshjob("client", job, "echo $_SSHJOB_JOB_PIDS").stdout.split()[0])
    assert second != first


def test_jobs_of_several_nodes(pool):
    workdir = pool.workdir()
    job = pool.submit("sleep", "600", workdir=workdir, options=["--nodes", "3"])
    for node in range(3):
        pool.wait_state("%s.%d" % (job, node), "running")
    seen = set()
    for node in range(3):
        result = pool.sshjob("client", "%s.%d" % (job, node), 'echo $SSHJOB_NODE_INDEX; pwd; echo $_SSHJOB_JOB_PIDS')
        number, cwd, pids = result.stdout.splitlines()
        assert (number, cwd) == (str(node), os.path.join(workdir, "node%d" % node))
        seen.add(pids.split()[0])
    assert len(seen) == 3
    assert pool.sshjob("client", job, "echo $SSHJOB_NODE_INDEX $SSHJOB_NODE").stdout == "0 %s\n" % socket.gethostname()
    missing = pool.sshjob("client", job + ".3", "true")
    assert "has no node 3: its nodes are 0 to 2" in missing.stderr
    pool.sshjob("rm", job)
    for node in range(3):
        pool.wait_state("%s.%d" % (job, node), "removed")


def test_auto_retry_stops_cleanly_on_ctrl_c(make_pool, tmp_path):
    pool = make_pool({"starter_slots": "1"})
    pool.running_job()
    idle = pool.submit("sleep", "600")
    proc = subprocess.Popen(pool.argv("client", "-auto-retry", idle, "true", env={"TMPDIR": str(tmp_path)}),
                            stderr=subprocess.PIPE, universal_newlines=True, start_new_session=True)
    first = proc.stderr.readline()
    assert "waiting (" in first, first
    wait_for(lambda: pids_in_group(proc.pid, "ssh"), what="ssh and its ProxyCommand to wait with the client")
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a terminal sends it: to ssh and its bridge as well
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert err.splitlines()[-1] == "sshjob: interrupted"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert os.listdir(str(tmp_path)) == []


def pids_in_group(group, name):
    """Pids of the processes named `name` in process group `group`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        if fields[0].endswith("(" + name) and int(fields[1].split()[2]) == group:
            found.append(int(entry))
    return found


def raw_submit(pool, n):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(os.path.join(pool.dir, "schedd.sock"))
    data = json.dumps({"op": "submit", "v": 2, "cmd": ["echo", str(n)], "env": {}, "workdir": pool.dir}).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)
    reply = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    sock.close()
    return "%d.0" % json.loads(reply[4:].decode())["cluster"]


def test_schedd_killed_mid_submissions_loses_no_acknowledged_job(make_pool):
    pool = make_pool({"starter_slots": "2"})
    survivor = pool.running_job()
    main = int(pool.sshjob("client", survivor, "echo $_SSHJOB_JOB_PIDS").stdout.split()[0])
    acknowledged = []

    def submit_all():
        for n in range(200):
            try:
                acknowledged.append(raw_submit(pool, n))
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)

    submitter = threading.Thread(target=submit_all)
    submitter.start()
    wait_for(lambda: len(acknowledged) >= 60, what="60 submissions")
    schedd = pool.pid("schedd")
    os.kill(schedd, signal.SIGKILL)
    wait_for(lambda: state_of(schedd) in (None, "Z"), what="the schedd to die")
    restart = pool.sshjob("pool", "start", "--dir", pool.dir)
    assert restart.returncode == 0, restart.stderr
    submitter.join(timeout=120)
    queue = pool.sshjob("q", "--all").stdout
    ids = {line.split()[0] for line in queue.splitlines()[1:]}
    assert set(acknowledged) <= ids
    assert len(acknowledged) < 200 or len(ids) >= 200  # some were refused while the schedd was down
    assert state_of(main) in ("S", "R")  # the starter kept its job running
    again = pool.sshjob("client", survivor, "echo $_SSHJOB_JOB_PIDS")
    assert int(again.stdout.split()[0]) == main, again.stderr


def test_a_killed_starter_loses_its_jobs_which_run_again_after_its_restart(make_pool):
    pool = make_pool({"job_lease": "3"})
    job = pool.running_job()
    first = int(pool.sshjob("client", job, "echo $_SSHJOB_JOB_PIDS").stdout.split()[0])
    os.kill(pool.pid("starter"), signal.SIGKILL)
    # its lease keeper ends the orphan when the lease runs out, before the schedd requeues the job
    wait_for(lambda: state_of(first) is None, timeout=20, what="the lease keeper to end the orphan")
    wait_for(lambda: pool.state(job) == "idle", timeout=30, what="the job to be requeued")
    assert "was lost" in pool.sshjob("q").stdout
    restart = pool.sshjob("pool", "start", "--dir", pool.dir)
    assert restart.returncode == 0, restart.stderr
    pool.wait_state(job, "running")
    second = int(pool.sshjob("client", job, "echo $_SSHJOB_JOB_PIDS").stdout.split()[0])
    assert second != first
