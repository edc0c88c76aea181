"""A pool across hosts: a schedd on TLS with tokens, a starter in another
network namespace, remote users (part of issue 3)."""

import hashlib
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time

import pytest
from conftest import INTERPRETERS, Census, Host, copies, run, wait_for


def require_namespaces():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    probe = subprocess.run(["ip", "netns", "add", "sshjob-probe"], stderr=subprocess.PIPE)
    if probe.returncode != 0:
        pytest.skip("cannot make network namespaces here: %s" % probe.stderr.decode().strip())
    subprocess.run(["ip", "netns", "delete", "sshjob-probe"])


@pytest.fixture(scope="module")
def cluster(base):
    """A schedd on TLS (this host) and a starter in another network namespace."""
    require_namespaces()
    yield from make_cluster(base, 1, "starter_address = {inner}:0")


@pytest.fixture(scope="module")
def firewalled(base):
    """The same, but the starter takes no connections from outside its host:
    it listens on its own loopback only, as behind a firewall or NAT."""
    require_namespaces()
    yield from make_cluster(base, 2, "starter_address = 127.0.0.1:0")


def make_cluster(base, index, starter_settings, schedd_settings=""):
    host = Host("remote%d" % index)
    python = INTERPRETERS[-1]
    pyz = os.path.join(base, "sshjob.pyz")
    submit_dir = tempfile.mkdtemp(prefix="submit-", dir=base)
    exec_dir = tempfile.mkdtemp(prefix="exec-", dir=base)
    init = run([python, pyz, "init", "--dir", submit_dir, "--listen", "%s:0" % host.outer])  # a port of its choice
    assert init.returncode == 0, init.stderr
    fingerprint = init.stdout.split("schedd certificate SHA-256: ")[1].split()[0]
    with open(os.path.join(submit_dir, "sshjob.conf"), "a") as f:
        f.write(schedd_settings + "\n")
    token = run([python, pyz, "--config", os.path.join(submit_dir, "sshjob.conf"), "token", "create", "--for",
                 "starter", "--name", "exec@" + host.name, "--output", os.path.join(exec_dir, "starter.token")])
    assert token.returncode == 0, token.stderr
    logs = [open(os.path.join(d, role + ".log"), "w")  # noqa: SIM115 (closed at teardown)
            for d, role in ((submit_dir, "schedd"), (exec_dir, "starter"))]
    daemons = [subprocess.Popen([python, pyz, "--config", os.path.join(submit_dir, "sshjob.conf"), "schedd"],
                                stdout=logs[0], stderr=logs[0])]
    wait_for(lambda: " with TLS" in read(os.path.join(submit_dir, "schedd.log")), 30, "the schedd's TLS port")
    port = int(read(os.path.join(submit_dir, "schedd.log")).split(" with TLS")[0].rsplit(":", 1)[1])
    with open(os.path.join(exec_dir, "sshjob.conf"), "w") as f:
        f.write("[sshjob]\nschedd_address = %s:%d\nschedd_fingerprint = %s\ntoken_file = %s\n"
                "starter_name = exec@%s\nstarter_slots = 16\n%s\n"
                % (host.outer, port, fingerprint, os.path.join(exec_dir, "starter.token"), host.name,
                   starter_settings.format(inner=host.inner)))
    daemons.append(subprocess.Popen(["ip", "netns", "exec", host.name, python, pyz, "--config",
                                     os.path.join(exec_dir, "sshjob.conf"), "starter"],
                                    stdout=logs[1], stderr=logs[1]))
    env = {"SSHJOB_CONFIG": os.path.join(submit_dir, "sshjob.conf"), "PATH": os.environ["PATH"], "HOME": "/root"}
    deadline = time.time() + 30
    while "listening on" not in read(os.path.join(exec_dir, "starter.log")):
        assert time.time() < deadline, read(os.path.join(exec_dir, "starter.log"))
        time.sleep(0.2)
    state = {"python": python, "pyz": pyz, "submit": submit_dir, "exec": exec_dir, "host": host, "port": port,
             "fingerprint": fingerprint, "env": env}
    yield state
    for daemon in reversed(daemons):
        daemon.terminate()
        daemon.wait(timeout=30)
    for log in logs:
        log.close()
    host.remove()


def read(path):
    with open(path) as f:
        return f.read()


def sshjob(cluster, *args, config=None, **kwargs):
    env = dict(cluster["env"])
    if config:
        env["SSHJOB_CONFIG"] = config
    return run([cluster["python"], cluster["pyz"]] + list(args), env=env, **kwargs)


def remote_config(cluster, tmp_path, subject, fingerprint=None, expires="1d", options=()):
    """A user's configuration on another host: the schedd's address, its
    pinned certificate, and a token."""
    token = str(tmp_path / (subject + ".token"))
    made = sshjob(cluster, "token", "create", "--for", subject, "--expires", expires, "--output", token, *options)
    assert made.returncode == 0, made.stderr
    path = str(tmp_path / (subject + ".conf"))
    with open(path, "w") as f:
        f.write("[sshjob]\nschedd_address = %s:%d\nschedd_fingerprint = %s\ntoken_file = %s\n"
                % (cluster["host"].outer, cluster["port"], fingerprint or cluster["fingerprint"], token))
    return path


def running_job(cluster):
    job = sshjob(cluster, "submit", "--workdir", cluster["submit"], "--", "sleep", "600").stdout.strip()
    deadline = time.time() + 30
    while "running" not in sshjob(cluster, "q").stdout:
        assert time.time() < deadline
        time.sleep(0.1)
    return job


def test_a_starter_on_another_host_runs_jobs_and_sessions(cluster):
    job = running_job(cluster)
    assert "exec@" + cluster["host"].name in sshjob(cluster, "q").stdout
    inner = cluster["host"].inner
    result = sshjob(cluster, "client", "-debug", job, 'ip -o -4 addr show | grep -c " %s/"; echo in-$SSHJOB_JOB_ID'
                    % inner)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1", "in-" + job]  # the session runs on the other host
    assert "transport: openssh" in result.stderr
    builtin = sshjob(cluster, "client", "-transport", "builtin", job, "echo builtin-ok")
    assert builtin.stdout == "builtin-ok\n", builtin.stderr


def test_remote_users_come_with_tokens(cluster, tmp_path):
    job = running_job(cluster)
    root = remote_config(cluster, tmp_path, "root")
    assert sshjob(cluster, "client", job, "echo by-token", config=root).stdout == "by-token\n"
    assert job in sshjob(cluster, "q", config=root).stdout
    bob = remote_config(cluster, tmp_path, "bob")
    refused = sshjob(cluster, "client", job, "true", config=bob)
    assert refused.returncode == 1
    assert refused.stderr == ("sshjob: user bob may not enter job %s: it belongs to root, and only its owner or "
                              "a queue super user may\n" % job)
    submitted = sshjob(cluster, "submit", "--", "true", config=bob).stdout.strip()
    assert "bob" in [line.split()[1] for line in sshjob(cluster, "q", "--all").stdout.splitlines()
                     if line.startswith(submitted)]


def test_tokens_and_certificates_that_do_not_hold_are_refused(cluster, tmp_path):
    expired = remote_config(cluster, tmp_path, "carol", expires="1s")
    time.sleep(2)
    result = sshjob(cluster, "q", config=expired)
    assert result.returncode == 1 and result.stderr == (
        "sshjob: the token of carol has expired: ask the pool's admin for a new one\n")

    forged = remote_config(cluster, tmp_path, "dave")
    token = str(tmp_path / "dave.token")
    with open(token) as f:
        body, _, mac = f.read().strip().partition(".")
    with open(token, "w") as f:
        f.write(body.replace(body[5], "A" if body[5] != "A" else "B", 1) + "." + mac)
    assert sshjob(cluster, "q", config=forged).stderr == "sshjob: the token is not signed by this pool\n"

    as_user = remote_config(cluster, tmp_path, "starter", options=("--name", "starter@x"))  # used for a user's request
    refused = sshjob(cluster, "submit", "--", "true", config=as_user)
    assert refused.returncode == 1 and "a starter's token is not a user's" in refused.stderr

    wrong = remote_config(cluster, tmp_path, "erin", fingerprint="ab" * 32)
    mismatch = sshjob(cluster, "q", config=wrong)
    assert mismatch.stderr == "sshjob: the TLS certificate of the schedd does not match its pinned fingerprint\n"

    plain = socket.create_connection((cluster["host"].outer, cluster["port"]))
    plain.sendall(b"\x00\x00\x00\x0f{\"op\": \"ping\"}")
    plain.settimeout(20)
    try:
        answer = plain.recv(100)
    except ConnectionResetError:  # closed with our bytes unread
        answer = b""
    assert answer == b""  # no TLS, no answer
    plain.close()
    assert sshjob(cluster, "q").returncode == 0  # and the schedd serves on
    with open(os.path.join(cluster["submit"], "schedd.log")) as f:
        log = f.read()
    assert "no TLS" in log
    assert "the token of carol has expired" in log and "the token is not signed by this pool" in log


def test_secrets_are_private_files_and_stay_off_the_process_list(cluster, tmp_path):
    for path, mode in (("private", 0o700), ("private/signing.key", 0o600), ("private/key.pem", 0o600)):
        assert stat.S_IMODE(os.stat(os.path.join(cluster["submit"], path)).st_mode) == mode, path
    assert stat.S_IMODE(os.stat(os.path.join(cluster["exec"], "starter.token")).st_mode) == 0o600
    with open(os.path.join(cluster["exec"], "starter.token")) as f:
        token = f.read().strip()
    with open(os.path.join(cluster["submit"], "private", "signing.key")) as f:
        key = f.read().strip()
    processes = run(["ps", "-eo", "args"]).stdout
    assert token not in processes and key not in processes
    for log in ("submit/schedd.log", "exec/starter.log"):
        with open(os.path.join(cluster[log.split("/")[0]], log.split("/")[1])) as f:
            text = f.read()
        assert token not in text and key not in text
    job = running_job(cluster)
    environment = sshjob(cluster, "client", job, "env").stdout
    assert token not in environment and key not in environment


def test_a_firewalled_starter_is_reached_through_the_schedd(firewalled, tmp_path):
    job = running_job(firewalled)
    result = sshjob(firewalled, "client", "-debug", job, "echo relayed-$SSHJOB_JOB_ID")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "relayed-%s\n" % job
    assert "asking the schedd to relay" in result.stderr and "the schedd relays the connection" in result.stderr
    builtin = sshjob(firewalled, "client", "-transport", "builtin", job, "echo builtin-relayed")
    assert builtin.stdout == "builtin-relayed\n", builtin.stderr
    remote = remote_config(firewalled, tmp_path, "root")
    over_tls = sshjob(firewalled, "client", job, "echo tls-relayed", config=remote)
    assert over_tls.stdout == "tls-relayed\n", over_tls.stderr
    data = os.urandom(5 << 20)
    copied = subprocess.run([firewalled["python"], firewalled["pyz"], "client", job, "md5sum"], input=data,
                            stdout=subprocess.PIPE, env=firewalled["env"], timeout=60)
    assert copied.stdout.split()[0].decode() == hashlib.md5(data).hexdigest()


@pytest.fixture(scope="module")
def declared_firewalled(base):
    """A starter reachable in fact, but configured as not (starter_reachable = false)."""
    require_namespaces()
    yield from make_cluster(base, 3, "starter_address = {inner}:0\nstarter_reachable = false")


def test_a_starter_configured_unreachable_is_relayed_at_once(declared_firewalled):
    job = running_job(declared_firewalled)
    result = sshjob(declared_firewalled, "client", "-debug", job, "echo declared")
    assert result.stdout == "declared\n", result.stderr
    assert "the schedd relays the connection" in result.stderr
    assert "asking the schedd to relay" not in result.stderr  # no direct attempt first


@pytest.fixture
def short_lease(base):
    """A starter on another host whose lease is 4 s."""
    require_namespaces()
    yield from make_cluster(base, 4, "starter_address = {inner}:0\njob_lease = 4", "job_lease = 4")


def test_a_starter_cut_off_longer_than_its_lease_stops_its_job_which_runs_again_later(short_lease):

    cluster = short_lease
    job = sshjob(cluster, "submit", "--workdir", cluster["submit"], "--", "sleep", "987.400").stdout.strip()
    deadline = time.time() + 30
    while "running" not in sshjob(cluster, "q").stdout:
        assert time.time() < deadline
        time.sleep(0.2)
    census = Census(["987.400"])
    subprocess.run(["ip", "link", "set", cluster["host"].link, "down"], check=True)
    try:
        deadline = time.time() + 30
        while copies("987.400") and time.time() < deadline:  # the starter stops it when its lease runs out
            time.sleep(0.2)
        assert copies("987.400") == 0
        while "idle" not in sshjob(cluster, "q").stdout:  # and only then the schedd requeues it
            assert time.time() < deadline + 30
            time.sleep(0.2)
    finally:
        subprocess.run(["ip", "link", "set", cluster["host"].link, "up"], check=True)
    deadline = time.time() + 60
    while "running" not in sshjob(cluster, "q").stdout:  # the link is back: the starter runs it again
        assert time.time() < deadline, sshjob(cluster, "q").stdout
        time.sleep(0.5)
    assert census.stop() == {"987.400": 1}
    log = read(os.path.join(cluster["exec"], "starter.log"))
    assert "has not renewed" in log and "Traceback" not in log  # the starter, or its lease keeper, said so
    assert sshjob(cluster, "client", job, "echo back").stdout == "back\n"


def test_jobs_on_other_hosts_as_ssh_hosts_over_tls_and_through_the_relay(cluster, firewalled, tmp_path):
    """ssh JOB.sshjob (issue 10) with a user's token over TLS: straight to a
    starter on another host, and through the schedd's relay to a firewalled one."""
    for pool, name in ((cluster, "direct"), (firewalled, "relayed")):
        job = running_job(pool)
        (tmp_path / name).mkdir()
        remote = remote_config(pool, tmp_path / name, "root")
        config = tmp_path / name / "ssh_config"
        config.write_text(sshjob(pool, "ssh-config", config=remote).stdout)
        inner = pool["host"].inner
        result = run(["ssh", "-F", str(config), job + ".sshjob",
                      'ip -o -4 addr show | grep -c " %s/"; echo %s-$SSHJOB_JOB_ID' % (inner, name)])
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["1", "%s-%s" % (name, job)]
