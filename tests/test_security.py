"""Attacks on a root-run pool by one of its real users, against the real
daemons and the built pyz, by subject: the files a root starter writes, what
users may submit, whom a starter's token speaks for, daemons under load,
requests for sessions, process tracking, pools' directories, a starter that
comes back, logs.  (What a job hands back is tests/test_copies.py's; what code
and configuration run, tests/test_trust.py's.)

The attacker is sshjob-alice (a job owner), the victim sshjob-bob or root.
Requests an attacker would craft by hand are written here byte by byte."""

import glob
import hashlib
import json
import os
import pwd
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import tempfile
import time

import pytest
from conftest import ALICE, BOB, INTERPRETERS, USER_PYTHON, run, wait_for

RACER_C = r"""
/* racer JOBDIR TARGET SCRATCH SECONDS COUNT: swap symlinks to TARGET into
   the files a root starter writes for the sessions session-1..COUNT of a
   job, and into its host key directory, as fast as C goes. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    const char *names[] = {"sshd_config", "authorized_keys", "session.sh"};
    char link[4096], path[4096];
    time_t end = time(0) + atoi(argv[4]);
    int count = atoi(argv[5]);
    long swaps = 0;
    snprintf(link, sizeof link, "%s/link", argv[3]);
    while (time(0) < end) {
        for (int n = 1; n <= count; n++)
            for (int i = 0; i < 3; i++) {
                snprintf(path, sizeof path, "%s/session-%d/%s", argv[1], n, names[i]);
                unlink(link);
                if (symlink(argv[2], link) == 0 && rename(link, path) == 0)
                    swaps++;
            }
        snprintf(path, sizeof path, "%s/hostkey/ssh_host_ed25519_key.pub", argv[1]);
        unlink(link);
        if (symlink(argv[2], link) == 0 && rename(link, path) == 0)
            swaps++;
    }
    printf("%ld\n", swaps);
    return 0;
}
"""

RACER_PY = r"""
import os, sys, time
jobdir, target, scratch, seconds, count = sys.argv[1:6]
link, swaps, end = os.path.join(scratch, "link"), 0, time.time() + int(seconds)
while time.time() < end:
    for n in range(1, int(count) + 1):
        for name in ("sshd_config", "authorized_keys", "session.sh"):
            try:
                os.unlink(link)
            except OSError:
                pass
            try:
                os.symlink(target, link)
                os.rename(link, os.path.join(jobdir, "session-%d" % n, name))
                swaps += 1
            except OSError:
                pass
print(swaps)
"""


# -- requests written by hand ------------------------------------------------


def frame(obj):
    """A message of sshjob's protocol 2, by hand."""
    data = json.dumps(dict(obj, v=2)).encode()
    return struct.pack("!I", len(data)) + data


def read_frame(sock):
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        if not chunk:
            return None
        header += chunk
    (size,) = struct.unpack("!I", header)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return json.loads(data.decode())


def request(sock, message):
    with sock:
        sock.settimeout(30)
        sock.sendall(frame(message))
        return read_frame(sock)


def unix(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def tls(address):
    """TLS to a daemon of ours; the certificate is not checked: an attacker's client."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context.wrap_socket(socket.create_connection(address, timeout=30))


def session_key(tmp_path):
    path = str(tmp_path / "key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
    with open(path + ".pub") as f:
        return " ".join(f.read().split()[:2])


def ticket(pool, job, key=None, holder=None):
    message = {"op": "ticket", "job": job, "shells": [], "command": None,
               "transport": "openssh" if key else "builtin", "key": key,
               "holder": holder and hashlib.sha256(holder.encode()).hexdigest()}
    reply = request(unix(os.path.join(pool.dir, "schedd.sock")), message)
    assert reply["ok"], reply
    return reply


def address(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def bare_session(pool, job, key):
    """A ticket, presented to the starter, then a hang-up: the starter makes
    a session directory and starts sshd, as for a real session."""
    granted = ticket(pool, job, key=key)
    reply = request(socket.create_connection(address(granted["address"]), timeout=30),
                    {"op": "ssh", "run": granted["run"], "key": key, "ticket": granted["ticket"]})
    assert reply["ok"] is True, reply


def fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def job_directory(pool, job):
    found = glob.glob(os.path.join(pool.dir, "execute", job + ".0-*"))
    assert len(found) == 1, found
    return found[0]


def root_only_file(tmp_path):
    """A stand-in for /etc/shadow: root's, 0600, in a root 0700 directory."""
    directory = tmp_path / "rootonly"
    directory.mkdir(mode=0o700)
    target = directory / "shadow"
    target.write_text("root:$6$FAKE\n")
    os.chmod(str(target), 0o600)
    return str(target)


def user_scratch(user):
    path = tempfile.mkdtemp(prefix="scratch-", dir="/tmp")
    record = pwd.getpwnam(user)
    os.chown(path, record.pw_uid, record.pw_gid)
    return path


# -- what a root starter writes for a session: nothing through its owner's paths -------------------


def test_a_racing_owner_cannot_make_the_starter_chown_a_root_file(make_pool, users, tmp_path):
    pool = make_pool()
    target = root_only_file(tmp_path)
    job = pool.running_job("sleep", "600", user=ALICE, workdir=pool.workdir(ALICE))
    jobdir = job_directory(pool, job)
    scratch = user_scratch(ALICE)
    try:
        racer = [USER_PYTHON, "-c", RACER_PY]
        if shutil.which("cc"):
            source = os.path.join(scratch, "racer.c")
            with open(source, "w") as f:
                f.write(RACER_C)
            built = run(["cc", "-O2", "-o", os.path.join(scratch, "racer"), source])
            assert built.returncode == 0, built.stderr
            racer = [os.path.join(scratch, "racer")]
        sessions = 150
        attacker = subprocess.Popen(["runuser", "-u", ALICE, "--"] + racer +
                                    [jobdir, target, scratch, "60", str(sessions + 5)],
                                    stdout=subprocess.PIPE, universal_newlines=True)
        key = session_key(tmp_path)
        time.sleep(0.5)
        for _ in range(sessions):
            bare_session(pool, job, key)
        time.sleep(1)  # the last sessions' files, raced too
        attacker.terminate()
        attacker.communicate(timeout=60)
        info = os.lstat(target)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)
        with open(target) as f:
            assert f.read() == "root:$6$FAKE\n"
        for directory in [jobdir] + glob.glob(os.path.join(jobdir, "*")):
            if os.path.isdir(directory):
                assert os.lstat(directory).st_uid == 0, directory  # nothing the owner could swap files in
        assert pool.sshjob("client", job, "echo still-fine", user=ALICE).stdout == "still-fine\n"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- what users may submit: nothing that stops a starter, no more than their share -----------------


def test_poison_submissions_are_refused_and_the_starter_serves_on(pool, users):
    victim = pool.running_job("sleep", "600", user=BOB, workdir=pool.workdir(BOB))
    sock_path = os.path.join(pool.dir, "schedd.sock")
    workdir = pool.workdir(ALICE)
    poisons = [
        ({"cmd": ["sleep", "1"], "env": {"X": "a\u0000b"}}, "hold a NUL byte"),
        ({"cmd": ["sleep\u00001"], "env": {}}, "hold a NUL byte"),
        ({"cmd": ["sleep", "1"], "env": {"A=B": "c"}}, "is not a valid name for an environment variable"),
        ({"cmd": ["sleep", "1"], "env": {"": "c"}}, "is not a valid name for an environment variable"),
        ({"cmd": ["sleep", "1"], "env": {}, "workdir": workdir + "\u0000x"}, "hold a NUL byte"),
        ({"cmd": ["sleep", "1"], "env": {}, "output": "relative.out"}, "must be absolute paths"),
        ({"cmd": ["sleep", "1"], "env": {}, "count": 10001}, "at most 10000 node rows"),
    ]
    for fields, sentence in poisons:
        message = dict({"op": "submit", "workdir": workdir}, **fields)
        reply = subprocess.run(["runuser", "-u", ALICE, "--", USER_PYTHON, "-c",
                                "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
                                "s.sendall(bytes.fromhex(sys.argv[2])); sys.stdout.buffer.write(s.recv(65536))",
                                sock_path, frame(message).hex()], stdout=subprocess.PIPE, check=True).stdout
        answer = json.loads(reply[4:].decode())
        assert answer["ok"] is False and sentence in answer["error"], (fields, answer)
    fresh = pool.submit("echo", "fine", user=ALICE, workdir=pool.workdir(ALICE))
    pool.wait_state(fresh, "completed")
    assert pool.sshjob("client", victim, "echo served", user=BOB).stdout == "served\n"


def test_submit_quota_and_a_long_queue(make_pool, users):
    pool = make_pool({"starter_slots": "1", "max_jobs_per_user": "2500"})
    workdir = pool.workdir(ALICE)
    many = pool.sshjob("submit", "--workdir", workdir, "--count", "2000", "--", "sleep", "600", user=ALICE)
    assert many.returncode == 0, many.stderr
    assert many.stdout.split()[-1] == "1.1999"
    over = pool.sshjob("submit", "--workdir", workdir, "--count", "600", "--", "true", user=ALICE)
    assert over.returncode == 1
    assert over.stderr == ("sshjob: user %s has 2000 node rows in the queue, and may have 2500 at most "
                           "(max_jobs_per_user)\n" % ALICE)
    listed = pool.sshjob("q", user=BOB)
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 2001
    assert pool.sshjob("submit", "--workdir", pool.workdir(BOB), "--", "true", user=BOB).returncode == 0
    assert pool.sshjob("rm", "1", user=ALICE).returncode == 0


# -- whom a starter's token speaks for: that starter alone -----------------------------------------


@pytest.fixture
def tls_pool(make_pool):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = make_pool({"schedd_tls_address": "127.0.0.1:%d" % port, "starter_slots": "1"}, start=False)
    made = pool.sshjob("init", "--dir", pool.dir, "--listen", "127.0.0.1:%d" % port)
    assert made.returncode == 0, made.stderr
    pool.tls_port = port
    return pool.start()


def starter_token(pool, name, *options):
    made = pool.sshjob("token", "create", "--for", "starter", "--name", name, *options)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def as_starter(pool, token, name, **fields):
    message = dict({"op": "poll", "name": name, "user": "root", "address": "127.0.0.9:1", "jobs": {},
                    "news": [], "wait": 0, "token": token}, **fields)
    return request(tls(("127.0.0.1", pool.tls_port)), message)


def test_a_starter_token_speaks_for_its_own_starter_only(tls_pool, users):
    pool = tls_pool
    job = pool.running_job("sleep", "600", user=BOB, workdir=pool.workdir(BOB))
    own_starter = pool.sshjob("q").stdout.split("\n")[1].split()[3]
    evil = starter_token(pool, "starter@evil")

    hijack = as_starter(pool, evil, own_starter, ssh_problem="no sshd", tls_fingerprint="ab" * 32)
    assert hijack["ok"] is False and "this token speaks for starter starter@evil, not for %s" % own_starter \
        in hijack["error"]
    update = request(tls(("127.0.0.1", pool.tls_port)), {"op": "exited", "name": own_starter, "run": job + ".0",
                                                          "status": 0, "token": evil})
    assert update["ok"] is False and "speaks for starter starter@evil" in update["error"]
    relay = request(tls(("127.0.0.1", pool.tls_port)), {"op": "relay_accept", "name": own_starter, "id": "x",
                                                         "token": evil})
    assert relay["ok"] is False

    # The evil starter's own news about the victim's job is not believed.
    news = as_starter(pool, evil, "starter@evil", news=[{"op": "exited", "run": job + ".0", "status": 0}])
    assert news["ok"] is True
    assert pool.state(job) == "running"
    debug = pool.sshjob("client", "-debug", job, "echo mine", user=BOB)
    assert debug.stdout == "mine\n" and "transport: openssh" in debug.stderr  # not sent to the attacker

    # A starter limited to one user gets no one else's jobs (the pool's own starter has one slot, taken).
    limited = starter_token(pool, "starter@alice-only", "--user", ALICE)
    idle = pool.submit("sleep", "600", user=BOB, workdir=pool.workdir(BOB))
    for _ in range(3):
        polled = as_starter(pool, limited, "starter@alice-only", user="root", slots=8)
        assert polled["ok"] and all(c.get("owner") != BOB for c in polled["commands"]), polled
    pool.sshjob("rm", idle)

    # Two tokens for one name: the second is refused while the first holds.
    first, second = starter_token(pool, "starter@twin"), starter_token(pool, "starter@twin")
    assert as_starter(pool, first, "starter@twin")["ok"]
    refused = as_starter(pool, second, "starter@twin")
    assert refused["ok"] is False and "already connected with another token" in refused["error"]

    # Revocation: every token of the name issued until now is void.
    revoked = pool.sshjob("token", "revoke", "--for", "starter@twin")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    gone = as_starter(pool, first, "starter@twin")
    assert gone["ok"] is False and gone["error"] == "the token of starter@twin was revoked: ask the pool's admin " \
                                                    "for a new one"
    assert as_starter(pool, starter_token(pool, "starter@twin"), "starter@twin")["ok"]
    missing = pool.sshjob("token", "create", "--for", "starter")
    assert missing.returncode == 2 and "add --name" in missing.stderr


# -- a daemon under load: no peer without a token exhausts it --------------------------------------


def test_a_flood_of_idle_connections_does_not_take_the_daemons_down(tls_pool, users):
    pool = tls_pool
    job = pool.running_job("sleep", "600", user=ALICE, workdir=pool.workdir(ALICE))
    starter_at = address(ticket(pool, job, holder="x")["address"])
    targets = {"schedd": ("127.0.0.1", pool.tls_port), "starter": starter_at}
    pids = {role: pool.pid(role) for role in targets}
    before = {role: fds(pid) for role, pid in pids.items()}
    flood = []
    try:
        for _ in range(300):  # from 127.0.0.2, the attacker's address; the users come from 127.0.0.1
            for where in targets.values():
                sock = socket.socket()
                sock.bind(("127.0.0.2", 0))
                sock.settimeout(5)
                try:
                    sock.connect(where)
                    sock.send(b"\x00")  # the first byte of a length, and then nothing
                except OSError:
                    sock.close()
                    continue
                flood.append(sock)
        time.sleep(1)
        during = {role: fds(pid) for role, pid in pids.items()}
        started = time.time()
        q = pool.sshjob("q", user=ALICE)
        session = pool.sshjob("client", job, "echo through-the-flood", user=ALICE)
        builtin = pool.sshjob("client", "-transport", "builtin", job, "echo builtin-too", user=ALICE)
        took = time.time() - started
        assert q.returncode == 0 and job in q.stdout, q.stderr
        assert session.stdout == "through-the-flood\n", session.stderr
        assert builtin.stdout == "builtin-too\n", builtin.stderr
        for role in targets:  # one peer keeps at most half the gate's 256 (each with its watchdog handle)
            assert during[role] - before[role] <= 2 * (128 + 16) + 8, (role, before, during)
        print("flood: %d connections held open by the attacker; daemon fds %s -> %s; three user requests in "
              "%.2f s" % (len(flood), before, during, took))
        # The deadline: a request trickled a byte at a time is cut off within IO_TIMEOUT.
        trickle = socket.socket()
        trickle.bind(("127.0.0.3", 0))
        trickle.connect(starter_at)
        opened = time.time()
        trickle.sendall(struct.pack("!I", 60000))
        trickle.settimeout(2)
        closed = None
        while closed is None and time.time() - opened < 40:
            try:
                trickle.send(b"[")
                if trickle.recv(1) == b"":
                    closed = time.time() - opened
            except socket.timeout:
                continue
            except OSError:
                closed = time.time() - opened
        trickle.close()
        assert closed is not None and closed < 25, closed
    finally:
        for sock in flood:
            sock.close()


def test_a_user_cannot_lock_others_on_the_same_address_or_socket_out(pool, users):
    """Review of the fixes: idle connections from the users' own address, and
    a connect-and-close storm on the schedd's Unix socket."""
    job = pool.running_job("sleep", "600", user=BOB, workdir=pool.workdir(BOB))
    starter_at = address(ticket(pool, job, holder="x")["address"])
    idle = []
    try:
        for _ in range(40):  # more than one address's share, from the address every local user has
            sock = socket.create_connection(starter_at)
            sock.send(b"\x00")
            idle.append(sock)
        assert pool.sshjob("client", job, "echo through", user=BOB).stdout == "through\n"
    finally:
        for sock in idle:
            sock.close()
    storm = ("import socket, sys, time\nend = time.time() + 8\nwhile time.time() < end:\n"
             "    s = socket.socket(socket.AF_UNIX)\n    try:\n        s.connect(sys.argv[1])\n"
             "    except OSError:\n        pass\n    s.close()\n")
    stormers = [subprocess.Popen(["runuser", "-u", ALICE, "--", USER_PYTHON, "-c", storm,
                                  os.path.join(pool.dir, "schedd.sock")]) for _ in range(3)]
    try:
        time.sleep(1)
        answers = [pool.sshjob("q", user=BOB) for _ in range(5)]
        assert [a.returncode for a in answers] == [0] * 5, [a.stderr for a in answers]
    finally:
        for stormer in stormers:
            stormer.wait(timeout=30)


# -- requests for sessions: malformed ones leak nothing --------------------------------------------


def test_malformed_builtin_requests_leak_no_pty_and_no_fd(pool, users):
    job = pool.running_job("sleep", "600", user=ALICE, workdir=pool.workdir(ALICE))
    starter = pool.pid("starter")
    warm = pool.sshjob("client", "-transport", "builtin", job, "true", user=ALICE)
    assert warm.returncode == 0, warm.stderr
    time.sleep(0.5)
    before = fds(starter)
    bad_terminals = [{"rows": 70000, "columns": 80, "term": "xterm"}, {"rows": 24, "columns": 80, "term": 5},
                     "a terminal", {"rows": 24, "columns": 80, "term": "x\u0000"}]
    for n in range(20):
        holder = "holder-%d" % n
        granted = ticket(pool, job, holder=holder)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        sock = context.wrap_socket(socket.create_connection(address(granted["address"]), timeout=30))
        message = {"op": "builtin", "run": granted["run"], "holder": holder, "ticket": granted["ticket"],
                   "command": None if n % 2 else "true\u0000", "pty": bad_terminals[n % 4]}
        with sock:
            sock.sendall(frame(message))
            while sock.recv(65536):
                pass
    wait_for(lambda: fds(starter) <= before, 10, "the starter's descriptors to come back")
    assert pool.sshjob("client", "-transport", "builtin", job, "echo ok", user=ALICE).stdout == "ok\n"


# -- process tracking: no recycled pid is signalled ------------------------------------------------


def process_state(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_tag_mode_never_signals_a_recycled_pid(make_pool, users):
    if not os.path.exists("/proc/sys/kernel/ns_last_pid"):
        pytest.skip("this kernel has no /proc/sys/kernel/ns_last_pid to steer pids with")
    pool = make_pool({"use_cgroups": "false"})
    job = pool.running_job("sleep", "600", user=ALICE, workdir=pool.workdir(ALICE))
    assert pool.sshjob("client", "-transport", "builtin", job, "true", user=ALICE).returncode == 0
    with open(os.path.join(pool.dir, "starter.log")) as f:
        dead = int([line for line in f if "built-in session" in line][-1].rsplit(" pid ", 1)[1].split()[0])
    time.sleep(0.5)
    assert not os.path.exists("/proc/%d" % dead)
    bob = pwd.getpwnam(BOB)

    def become_bob():
        os.setsid()
        os.setgid(bob.pw_gid)
        os.setuid(bob.pw_uid)

    victim, got = None, []
    for _ in range(20):  # steer the next pid onto the session's dead sshd, as an attacker cycling pids would
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(dead - 1))
        candidate = subprocess.Popen(["sleep", "300"], preexec_fn=become_bob)
        if candidate.pid == dead:
            victim = candidate
            break
        got.append(candidate.pid)
        candidate.kill()
        candidate.wait()
    if victim is None:
        pytest.skip("could not steer a new process onto pid %d here (got %s)" % (dead, got))
    try:
        assert pool.sshjob("suspend", job, user=ALICE).returncode == 0
        time.sleep(1)
        assert process_state(victim.pid) != "T"
        assert pool.sshjob("rm", job, user=ALICE).returncode == 0
        time.sleep(2)
        assert victim.poll() is None  # bob's process lives on
    finally:
        victim.kill()
        victim.wait()


# -- pools' directories: none that another user prepared -------------------------------------------


def test_pool_start_refuses_a_directory_another_user_prepared(base, users, tmp_path):

    prepared = tempfile.mkdtemp(prefix="trap-", dir="/tmp")
    try:
        bob = pwd.getpwnam(BOB)
        os.chown(prepared, bob.pw_uid, bob.pw_gid)
        os.chmod(prepared, 0o777)
        evil = os.path.join(prepared, "evil")
        marker = os.path.join(prepared, "pwned")
        with open(evil, "w") as f:
            f.write("#!/bin/sh\nid -u > %s\nexec /usr/bin/openssl \"$@\"\n" % marker)
        with open(os.path.join(prepared, "sshjob.conf"), "w") as f:
            f.write("[sshjob]\nopenssl = %s\nssh_keygen = %s\n" % (evil, evil))
        for path in (evil, os.path.join(prepared, "sshjob.conf")):
            os.chown(path, bob.pw_uid, bob.pw_gid)
        os.chmod(evil, 0o755)
        pyz = os.path.join(base, "sshjob.pyz")
        result = run([INTERPRETERS[-1], pyz, "pool", "start", "--dir", prepared])
        assert result.returncode == 1
        assert result.stderr == ("sshjob: %s is not a directory that only root may change: make a new "
                                 "one, or fix its owner and mode\n" % prepared)
        os.chown(prepared, 0, 0)
        os.chmod(prepared, 0o755)
        again = run([INTERPRETERS[-1], pyz, "pool", "start", "--dir", prepared])
        assert again.returncode == 1 and "sshjob.conf is not a file that only root" in again.stderr
        assert not os.path.exists(marker)
    finally:
        shutil.rmtree(prepared, ignore_errors=True)


# -- a starter that comes back: the rerun of its job lives -----------------------------------------


def test_a_starter_that_comes_back_does_not_kill_the_rerun_of_its_job(make_pool, users):
    pool = make_pool({"job_lease": "4"})
    job = pool.running_job("sleep", "600", user=ALICE, workdir=pool.workdir(ALICE))
    starter = pool.pid("starter")
    os.kill(starter, 19)  # SIGSTOP: the lease runs out, and the schedd gives the starter up for lost
    try:
        deadline = time.time() + 40
        while pool.state(job) == "running" and time.time() < deadline:
            time.sleep(0.5)
        assert pool.state(job) == "idle"
    finally:
        os.kill(starter, 18)  # SIGCONT
    pool.wait_state(job, "running", timeout=40)
    time.sleep(12)  # longer than the kill grace of anything left of the old run
    assert pool.state(job) == "running"
    assert pool.sshjob("client", job, "echo rerun", user=ALICE).stdout == "rerun\n"
    with open(os.path.join(pool.dir, "starter.log")) as f:
        log = f.read()
    assert log.count("job %s started as pid" % job) == 2
    assert "exited with status 137" not in log and "Traceback" not in log


# -- logs and shells: private, and chosen as the user ----------------------------------------------


def test_logs_are_private_and_shells_are_chosen_as_the_user(pool, users, tmp_path):
    hidden = tmp_path / "rootonly"
    hidden.mkdir(mode=0o700)
    shutil.copy("/bin/sh", str(hidden / "prog"))
    job = pool.running_job("sleep", "600", user=ALICE, workdir=pool.workdir(ALICE))
    for transport in ("openssh", "builtin"):
        answers = [pool.sshjob("client", "-transport", transport, "-shells", str(hidden / name), job,
                               "echo $SHELL", user=ALICE) for name in ("prog", "missing")]
        assert [(a.returncode, a.stdout) for a in answers] == [(0, "/bin/sh\n")] * 2, answers
    for name in ("audit.log", "schedd.log", "starter.log"):
        assert stat.S_IMODE(os.stat(os.path.join(pool.dir, name)).st_mode) == 0o600, name
