"""Sessions on nodes without OpenSSH: the built-in transport (issue 5).

The starter's sshd is hidden (its configured program does not exist), so the
client falls back to the built-in PTY and command transport inside TLS."""

import hashlib
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import termios
import time

import pytest
from conftest import INTERPRETERS, Pool, Terminal, listing, run, wait_for


@pytest.fixture(scope="module")
def nosshd(base):
    pools = [Pool(base, python, "nosshd", {"sshd": "/nonexistent/sshd"}).start() for python in INTERPRETERS]
    yield pools
    for pool in pools:
        pool.stop()


@pytest.fixture(params=[0, -1], ids=["oldest", "newest"])
def pool_without_sshd(request, nosshd):
    return nosshd[request.param]


def test_the_transport_is_chosen_and_said(pool_without_sshd, pool):
    job = pool_without_sshd.running_job()
    auto = pool_without_sshd.sshjob("client", "-debug", job, "echo hi")
    assert auto.stdout == "hi\n", auto.stderr
    assert "transport: builtin (/nonexistent/sshd was not found on node" in auto.stderr
    forced = pool_without_sshd.sshjob("client", "-transport", "openssh", job, "true")
    assert forced.returncode == 1 and "install the openssh-server package" in forced.stderr
    other = pool.running_job()
    asked = pool.sshjob("client", "--debug", "--transport=builtin", other, "echo asked")
    assert asked.stdout == "asked\n" and "transport: builtin (asked for)" in asked.stderr
    scp = pool_without_sshd.sshjob("client", "-ssh", "scp", job, "remote:x", ".")
    assert scp.returncode == 1 and "sshjob cp, and rsync -e 'sshjob client', copy files without it" in scp.stderr


def test_commands_keep_stdout_stderr_stdin_and_exit_status(pool_without_sshd):
    workdir = pool_without_sshd.workdir()
    job = pool_without_sshd.running_job(workdir=workdir, options=["--env", "FOO=bar"])
    result = pool_without_sshd.sshjob("client", job, 'cat; echo "$FOO $(pwd)" >&2; exit 4', input="in\nput\n")
    assert (result.returncode, result.stdout, result.stderr) == (4, "in\nput\n", "bar %s\n" % workdir)
    pids = pool_without_sshd.sshjob("client", job, "echo $_SSHJOB_JOB_PIDS").stdout.split()
    with open("/proc/%s/cmdline" % pids[0], "rb") as f:
        assert f.read().split(b"\0")[:2] == [b"sleep", b"600"]
    assert pool_without_sshd.sshjob("client", job, "kill -TERM $$").returncode == 143
    assert pool_without_sshd.sshjob("client", job, "kill -KILL $$").returncode == 137
    assert pool_without_sshd.sshjob("client", job, "no-such-command").returncode == 127


def test_100_mib_of_binary_data_both_ways(pool_without_sshd, tmp_path):
    workdir = pool_without_sshd.workdir()
    job = pool_without_sshd.running_job(workdir=workdir)
    data = tmp_path / "random.bin"
    with open(str(data), "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    expected = hashlib.sha256(data.read_bytes()).hexdigest()
    with open(str(data), "rb") as source:
        up = subprocess.run(pool_without_sshd.argv("client", job, "cat > copy.bin; sha256sum copy.bin"),
                            stdin=source, stdout=subprocess.PIPE, timeout=120)
    assert up.stdout.split()[0].decode() == expected
    down = subprocess.run(pool_without_sshd.argv("client", job, "cat copy.bin"), stdout=subprocess.PIPE, timeout=120)
    assert hashlib.sha256(down.stdout).hexdigest() == expected


def test_a_slow_reader_holds_the_remote_writer_back(pool_without_sshd):
    job = pool_without_sshd.running_job()
    reader = subprocess.Popen(pool_without_sshd.argv("client", job, "head -c 200000000 /dev/zero; echo done >&2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(3)  # nobody reads: the pipes and the TLS stream fill up, and everyone waits
    with open(os.path.join(pool_without_sshd.dir, "starter.pid")) as f:
        starter = int(f.read())
    with open("/proc/%d/status" % starter) as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    assert rss < 200 * 1024  # kB: far below the 200 MB the job tried to write
    total = 0
    while True:
        chunk = reader.stdout.read(1 << 20)
        if not chunk:
            break
        total += len(chunk)
    assert reader.wait(timeout=60) == 0 and total == 200000000


def test_interactive_shell_on_a_pty(pool_without_sshd):
    workdir = pool_without_sshd.workdir()
    job = pool_without_sshd.running_job(workdir=workdir, options=["--env", "FOO=bar"])
    term = Terminal(pool_without_sshd.argv("client", job, env={"SHELL": "/bin/bash", "TERM": "xterm"}))
    try:
        term.expect("Welcome to job %s" % job)
        term.expect("pid(s)")
        term.send("echo m-$FOO-$(pwd); tty; stty size\n")
        term.expect("m-bar-" + workdir)
        term.expect("/dev/pts/")
        term.expect("24 80")
        term.resize(40, 132)
        term.send("stty size\n")
        term.expect("40 132")  # the resize came first: a session's frames keep their order
        term.send("sleep 30 & wait\n")
        wait_for(lambda: "sleep 30" in run(["pgrep", "-a", "-f", "^sleep 30$"]).stdout, what="the sleep to start")
        started = time.time()
        term.send("\x03")  # Ctrl-C, as a character through the PTY
        term.expect("^C")
        term.send("echo after-sleep-$?\n")
        term.expect("after-sleep-130")
        assert time.time() - started < 5
        term.send("exit 6\n")
        assert term.proc.wait(timeout=20) == 6
    finally:
        term.close()


def test_the_terminal_is_restored_when_the_client_is_killed(pool_without_sshd):
    job = pool_without_sshd.running_job()
    term = Terminal(pool_without_sshd.argv("client", job))
    try:
        term.expect("pid(s)")
        raw = termios.tcgetattr(term.slave)
        assert not raw[3] & termios.ECHO  # the client put it in raw mode
        term.proc.send_signal(signal.SIGTERM)
        assert term.proc.wait(timeout=20) == 128 + signal.SIGTERM
        after = termios.tcgetattr(term.slave)
        assert after[3] & termios.ECHO and after[3] & termios.ICANON
        assert after == term.initial
    finally:
        term.close()


@pytest.mark.parametrize("transport", ["builtin", "openssh"])
def test_cp_copies_trees_both_ways_with_their_modes(pool_without_sshd, pool, tmp_path, transport):
    target_pool = pool_without_sshd if transport == "builtin" else pool
    workdir = target_pool.workdir()
    job = target_pool.running_job(workdir=workdir)
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha\n")
    (tree / "sub" / "b.bin").write_bytes(os.urandom(300000))
    (tree / "sub" / "deeper" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(str(tree / "sub" / "deeper" / "run.sh"), 0o751)
    os.chmod(str(tree / "sub"), 0o750)
    os.chmod(str(tree / "a.txt"), 0o640)
    up = target_pool.sshjob("cp", "--debug", str(tree), job + ":uploaded")
    assert up.returncode == 0, up.stderr
    assert "transport: %s" % transport in up.stderr
    assert listing(str(tree)) == listing(os.path.join(workdir, "uploaded"))
    down = target_pool.sshjob("cp", job + ":uploaded", str(tmp_path / "back"))
    assert down.returncode == 0, down.stderr
    assert listing(str(tree)) == listing(str(tmp_path / "back"))
    (tmp_path / "into").mkdir()
    single = target_pool.sshjob("cp", job + ":uploaded/a.txt", str(tmp_path / "into"))
    assert single.returncode == 0 and (tmp_path / "into" / "a.txt").read_text() == "alpha\n"
    missing = target_pool.sshjob("cp", job + ":no-such-file", str(tmp_path / "x"))
    assert missing.returncode != 0 and "no-such-file" in missing.stderr
    bad = target_pool.sshjob("cp", "a", "b")
    assert bad.returncode == 2 and "exactly one side as JOB:PATH" in bad.stderr


def test_a_malformed_frame_ends_that_session_only(pool_without_sshd, tmp_path):
    pool = pool_without_sshd
    job = pool.running_job()
    holder = "ab" * 32
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(os.path.join(pool.dir, "schedd.sock"))
    request = json.dumps({"op": "ticket", "v": 2, "job": job, "holder": hashlib.sha256(holder.encode()).hexdigest(),
                          "transport": "builtin"}).encode()
    sock.sendall(struct.pack("!I", len(request)) + request)
    ticket = json.loads(sock.recv(65536)[4:].decode())
    sock.close()
    host, port = ticket["address"].rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls = context.wrap_socket(socket.create_connection((host, int(port))))
    assert hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest() == ticket["tls_fingerprint"]
    hello = json.dumps({"op": "builtin", "v": 2, "run": ticket["run"], "holder": holder, "ticket": ticket["ticket"],
                        "command": "sleep 60"}).encode()
    tls.sendall(struct.pack("!I", len(hello)) + hello)
    assert b'"ok":true' in tls.recv(65536)
    tls.sendall(struct.pack("!BI", 77, 5) + b"junk!")
    tls.settimeout(10)
    deadline = time.time() + 10
    while tls.recv(65536) != b"":  # the starter ends this session: its output, then the close
        assert time.time() < deadline
    assert pool.sshjob("client", job, "echo still-fine").stdout == "still-fine\n"
    plain = socket.create_connection((host, int(port)))
    plain.sendall(struct.pack("!I", len(hello)) + hello)
    plain.settimeout(10)
    assert b"the built-in transport runs inside TLS only" in plain.recv(65536)


def test_builtin_sessions_belong_to_the_job(pool_without_sshd):
    job = pool_without_sshd.running_job()
    session = subprocess.Popen(pool_without_sshd.argv("client", job, "echo $$; sleep 300"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
    shell = int(session.stdout.readline())
    pool_without_sshd.sshjob("suspend", job)
    deadline = time.time() + 10
    while True:
        with open("/proc/%d/stat" % shell) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                break
        assert time.time() < deadline, "the session's shell was not stopped"
        time.sleep(0.05)
    pool_without_sshd.sshjob("continue", job)
    pool_without_sshd.sshjob("rm", job)
    _, err = session.communicate(timeout=30)
    assert session.returncode != 0
    assert err.splitlines()[-1] == "sshjob: the session ended because job %s was removed" % job
    assert not os.path.exists("/proc/%d" % shell)


def test_the_demo_works_without_openssh(pool):
    nothing = {"SSHJOB_SSHD": "/nonexistent/sshd", "SSHJOB_SSH": "/nonexistent/ssh",
               "SSHJOB_SSH_KEYGEN": "/nonexistent/ssh-keygen"}
    result = pool.sshjob("demo", config=False, env=nothing, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "hello from the job: root in /tmp/sshjob-demo-" in result.stdout


def test_an_ordinary_users_interactive_session(pool, users):
    """A PTY for a job of an ordinary user: the built-in transport makes it
    as root and hands it to the user (sshd as that user cannot chown its PTY
    in this sandbox's devpts)."""
    alice = users[0]
    workdir = pool.workdir(alice)
    job = pool.running_job("sleep", "600", user=alice, workdir=workdir)
    term = Terminal(pool.argv("client", "-transport", "builtin", job, user=alice, env={"SHELL": "/bin/bash"}))
    try:
        term.expect("pid(s)")
        term.send("echo who-$(id -un)-$(pwd); tty\n")
        term.expect("who-%s-%s" % (alice, workdir))
        term.send("exit 3\n")
        assert term.proc.wait(timeout=20) == 3
    finally:
        term.close()
