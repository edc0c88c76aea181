"""End to end: the warm path, later sessions through a job's agent (issue 25).

Against the tests' real Slurm, as ordinary users: the first session of a
job goes the cold way (srun, a step) and its step stays as the job's agent
on the node; later sessions, of either transport and through the ssh-config
hosts, go through it, over the network (from another network namespace too,
where srun cannot reach Slurm at all); an agent that is gone, stopped, lied
about or suspended is never a hang and never an error but one sentence for
the suspended job; another user can use none of it."""

import json
import os
import pwd
import socket
import ssl
import time

import pytest
from conftest import (
    ALICE,
    BOB,
    IMAGE,
    PODMAN_RUN,
    Host,
    agent_log,
    podman,
    podman_env,
    run,
    wait_for,
    wait_for_container,
)

pytestmark = pytest.mark.xdist_group("slurm")


def record_path(job, user=ALICE):
    return os.path.join(pwd.getpwnam(user).pw_dir, ".local", "share", "sshjob", "warm", "slurm-%s.json" % job)


def record(job):
    with open(record_path(job)) as f:
        return json.load(f)


def steps(job):
    said = run(["squeue", "--noheader", "--steps", "--jobs", job, "--format=%i"]).stdout.split()
    return [step for step in said if step.split(".")[-1] not in ("batch", "extern")]


@pytest.fixture
def job(cluster):
    job = cluster.running()
    yield job
    run(["scancel", job])


def test_later_sessions_go_through_the_job_s_agent(cluster, job):
    first = cluster.sshjob("client", "-debug", job, "echo first; exit 2")
    assert first.returncode == 2 and first.stdout == "first\n", first.stderr
    assert "starting the session's step" in first.stderr
    wait_for(lambda: os.path.exists(record_path(job)), what="the job's agent to write its record")
    mode = os.stat(record_path(job)).st_mode & 0o777
    assert mode == 0o600 and os.stat(os.path.dirname(record_path(job))).st_mode & 0o777 == 0o700
    for transport, way in (("openssh", "ssh's master connection to %s" % job), ("builtin", "job %s's agent" % job)):
        later = cluster.sshjob("client", "-debug", "-transport", transport, job, "echo $SLURM_JOB_ID; pwd; exit 3")
        assert later.returncode == 3, later.stderr
        assert later.stdout.splitlines()[0] == job
        assert "the warm path: " + way in later.stderr  # OpenSSH: through the first session's ssh, which stayed
        assert "starting the session's step" not in later.stderr
    assert "warm entry: user %s, job %s, builtin transport" % (ALICE, job) in agent_log(job)
    assert len(steps(job)) == 1  # the first session's step, which is the agent: no step per later session
    config = os.path.join(cluster.dir, "warm-ssh-config")
    with open(config, "w") as f:
        f.write(cluster.sshjob("ssh-config", scheduler=None).stdout)
    os.chmod(config, 0o644)
    entries = agent_log(job).count("warm entry")
    by_name = run(["runuser", "-u", ALICE, "--", "ssh", "-F", config, job + ".slurm.sshjob", "echo by-name"], cwd="/")
    assert by_name.stdout == "by-name\n", by_name.stderr
    assert agent_log(job).count("warm entry") == entries + 1


def test_the_warm_path_reaches_the_job_from_another_host(cluster, job):
    """A second network namespace, from which Slurm's controller is out of
    reach: srun could not start a step there, the agent still answers."""
    host = Host("login2")
    try:
        assert cluster.sshjob("client", job, "true").returncode == 0
        wait_for(lambda: os.path.exists(record_path(job)), what="the job's agent to write its record")
        assert host.outer in record(job)["hosts"]
        argv = cluster.argv("client", "-transport", "builtin", job, "echo from-elsewhere $SLURM_JOB_ID; exit 4")
        remote = run(["ip", "netns", "exec", host.name] + argv, cwd="/")
        assert remote.returncode == 4, remote.stderr
        assert remote.stdout == "from-elsewhere %s\n" % job
        assert "from %s" % host.inner in agent_log(job)
    finally:
        host.remove()


def test_a_container_that_the_job_starts_later_is_where_warm_sessions_land(cluster, images):
    """The agent reads the job's processes anew for each session: a job that
    starts its container after the first session has its later sessions,
    through the agent, inside it."""
    flag = os.path.join(cluster.dir, "start-the-container-%s" % os.urandom(4).hex())
    name = "sshjob-test-%s" % os.urandom(4).hex()
    env = dict(podman_env(ALICE), HOME=pwd.getpwnam(ALICE).pw_dir, PATH=os.environ["PATH"])
    job = cluster.running("--export=ALL," + ",".join("%s=%s" % item for item in env.items()),
                          script="while ! test -e %s; do sleep 0.1; done; %s --name %s %s sleep 600" % (
                              flag, " ".join(PODMAN_RUN), name, IMAGE))
    try:
        first = cluster.sshjob("client", "-transport", "builtin", job, "hostname")
        assert first.stdout == socket.gethostname() + "\n", first.stderr
        wait_for(lambda: os.path.exists(record_path(job)), what="the job's agent to write its record")
        with open(flag, "w"):
            pass
        inside = run(["nsenter", "-t", str(wait_for_container(ALICE, name)), "-u", "hostname"]).stdout
        for transport in ("builtin", "openssh"):
            later = cluster.sshjob("client", "-debug", "-transport", transport, job, "hostname")
            assert later.stdout == inside, (transport, later.stderr)
            assert "the warm path: job %s's agent" % job in later.stderr
    finally:
        run(["scancel", job])
        podman(ALICE, "rm", "--force", "--time", "0", name)


def test_a_gone_stopped_or_forged_agent_is_silent_and_a_suspended_job_is_said_at_once(cluster, job):
    assert cluster.sshjob("client", job, "true").returncode == 0
    wait_for(lambda: os.path.exists(record_path(job)), what="the job's agent to write its record")
    stopped = cluster.sshjob("warm", "stop", job, scheduler=None)
    assert stopped.stdout == "Job %s's agent on %s stopped.\nJob %s's ssh master connection stopped.\n" % (
        job, cluster.host, job), stopped.stderr
    assert not os.path.exists(record_path(job))
    again = cluster.sshjob("client", job, "echo cold-again")
    assert (again.returncode, again.stdout, again.stderr) == (0, "cold-again\n", "")
    wait_for(lambda: os.path.exists(record_path(job)), what="a new agent")
    forged = record(job)
    forged["fingerprint"] = "00" * 32
    with open(record_path(job), "w") as f:
        json.dump(forged, f)
    lied = cluster.sshjob("client", "-debug", "-transport", "builtin", job, "echo despite-a-forged-record")
    assert lied.returncode == 0 and lied.stdout == "despite-a-forged-record\n", lied.stderr
    assert "does not match its pinned fingerprint" in lied.stderr and "starting the session's step" in lied.stderr
    wait_for(lambda: os.path.exists(record_path(job)) and record(job)["fingerprint"] != "00" * 32,
             what="an agent of its own again")
    run(["scontrol", "suspend", job])
    try:
        started = time.monotonic()
        suspended = cluster.sshjob("client", job, "true")
        took = time.monotonic() - started
        assert suspended.returncode != 0 and "suspended" in suspended.stderr, suspended.stderr
        assert took < 5, "a suspended job's agent held the client %.1f s" % took
    finally:
        run(["scontrol", "resume", job])
    assert cluster.sshjob("client", job, "echo resumed").stdout == "resumed\n"


def test_an_agent_ends_when_idle_and_while_leftovers_live_only_as_their_holder(cluster, job):
    first = cluster.sshjob("client", job, "true", env={"SSHJOB_WARM_IDLE": "3s"})
    assert first.returncode == 0, first.stderr
    wait_for(lambda: os.path.exists(record_path(job)), what="the job's agent")
    wait_for(lambda: not os.path.exists(record_path(job)) and not steps(job), timeout=30,
             what="the idle agent and its step to go")
    assert cluster.sshjob("client", job, "echo works").stdout == "works\n"


def test_another_user_can_use_no_agent_of_alice_s(cluster, job):
    assert cluster.sshjob("client", job, "true").returncode == 0
    wait_for(lambda: os.path.exists(record_path(job)), what="the job's agent to write its record")
    said = record(job)
    peek = run(["runuser", "-u", BOB, "--", "cat", record_path(job)])
    assert peek.returncode != 0 and "Permission denied" in peek.stderr
    log = "/tmp/sshjob-%d/agent-%s.log" % (pwd.getpwnam(ALICE).pw_uid, job)
    assert run(["runuser", "-u", BOB, "--", "cat", log]).returncode != 0
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    guesses = ({"v": 2, "op": "session", "secret": "00" * 32, "key": "x", "transport": "builtin"},
               {"v": 2, "op": "stop"}, {"op": "session", "secret": said["secret"][:10]})
    for guess in guesses:
        with socket.create_connection(("127.0.0.1", said["port"]), timeout=10) as sock, \
                context.wrap_socket(sock) as tls:
            body = json.dumps(guess).encode()
            tls.sendall(len(body).to_bytes(4, "big") + body)
            assert tls.recv(4096) == b""  # closed, nothing said
    assert agent_log(job).count("refused a connection") == 2 and agent_log(job).count("closed a connection") == 1
    flood = [socket.create_connection(("127.0.0.1", said["port"])) for _ in range(100)]
    try:
        started = time.monotonic()
        through = cluster.sshjob("client", job, "echo through-the-flood")  # warm, or the cold way past the flood
        assert through.stdout == "through-the-flood\n", through.stderr
        assert time.monotonic() - started < 10
    finally:
        for sock in flood:
            sock.close()
    bobs = cluster.sshjob("client", job, "true", user=BOB)
    assert bobs.returncode != 0 and "not yours" in bobs.stderr, bobs.stderr
