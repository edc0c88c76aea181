"""The daemons' sockets under bad input, and the tickets' promises.

Frames are written by hand here, byte by byte, so that these tests do not
depend on the code they check."""

import errno
import json
import os
import random
import socket
import struct
import subprocess
import time

import pytest
from conftest import wait_for


def frame(obj):
    """A message of sshjob's protocol 2, by hand: its version goes with every object."""
    data = json.dumps(dict({"v": 2}, **obj) if isinstance(obj, dict) and "v" not in obj else obj).encode()
    return struct.pack("!I", len(data)) + data


def exchange(connect, payload, timeout=20):
    """Send raw bytes, half-close, and return the decoded reply or None if
    the daemon closed the connection without one."""
    sock = connect()
    sock.settimeout(timeout)
    data = b""
    try:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:  # the daemon answered and closed before reading it all: a close
            if e.errno not in (errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET):
                raise
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:  # closed with our bytes unread: a close, as allowed
        pass
    finally:
        sock.close()
    if not data:
        return None
    (size,) = struct.unpack("!I", data[:4])
    return json.loads(data[4:4 + size].decode())


def schedd_connector(pool):
    def connect():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(os.path.join(pool.dir, "schedd.sock"))
        return sock
    return connect


def starter_address(pool):
    with open(os.path.join(pool.dir, "starter.log")) as f:
        for line in f:
            if "listening on" in line:
                host, port = line.split("listening on ")[1].strip().rsplit(":", 1)
                return host, int(port)
    raise AssertionError("the starter did not log its address")


def starter_connector(pool):
    address = starter_address(pool)
    return lambda: socket.create_connection(address)


GARBAGE = [
    b"",
    b"\x00",
    b"GET / HTTP/1.0\r\n\r\n",
    struct.pack("!I", 0xFFFFFFFF) + b"x" * 100,
    struct.pack("!I", 1000) + b"{\"op\": \"ping\"",  # truncated
    struct.pack("!I", 4) + b"\xff\xfe\xfd\xfc",  # not UTF-8
    frame([1, 2, 3]),
    frame("just a string"),
    frame({"no": "op"}),
    frame({"op": "no_such_request"}),
    frame({"op": 17}),
    frame({"op": "submit", "cmd": "not a list", "env": {}, "workdir": "/"}),
    frame({"op": "submit", "cmd": [1, 2], "env": {}, "workdir": "/"}),
    frame({"op": "explode", "job": "1.0"}),
    frame({"op": "ticket", "job": "1", "key": "ssh-ed25519 AAAA\ncommand=\"evil\""}),
    frame({"op": "ssh", "run": "1.0", "node": "zero", "key": 5}),
    frame({"op": "ping", "v": 1}),
    struct.pack("!I", 50000) + b"[" * 50000,
]


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def threads(pid):
    return len(os.listdir("/proc/%d/task" % pid))


@pytest.mark.parametrize("target", ["schedd", "starter"])
def test_malformed_frames_get_an_error_or_a_close_and_the_daemon_serves_on(pool, target):
    job = pool.running_job()
    connect = (schedd_connector if target == "schedd" else starter_connector)(pool)
    pid = pool.pid(target)
    pool.sshjob("client", job, "true")  # warm up: threads and files of a normal session
    time.sleep(0.5)  # the warm-up's threads end; nothing says when
    fds_before, threads_before = open_fds(pid), threads(pid)
    rng = random.Random(7)
    payloads = GARBAGE + [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(1000)]
    payloads += [frame({"op": rng.choice(["ssh", "poll", "exited", "submit", "ticket"]),  # each missing a field
                        "job": rng.choice([None, 5, "1.0", "x" * 1000]), "ticket": rng.choice([None, {}, [], "t"])})
                 for _ in range(1000)]
    for payload in payloads:
        reply = exchange(connect, payload)
        assert reply is None or (reply["ok"] is False and reply["error"]), (payload[:60], reply)
    assert pool.sshjob("client", job, "echo still-serving").stdout == "still-serving\n"
    wait_for(lambda: open_fds(pid) <= fds_before and threads(pid) <= threads_before, 10,
             "the daemon's descriptors and threads to come back")


def test_a_stalled_peer_is_dropped_and_does_not_block_others(pool):
    job = pool.running_job()
    stalled = [schedd_connector(pool)() for _ in range(5)] + [starter_connector(pool)() for _ in range(5)]
    for sock in stalled:
        sock.sendall(struct.pack("!I", 100) + b"{")
    result = pool.sshjob("client", job, "echo unblocked")
    assert result.stdout == "unblocked\n"
    for sock in stalled:
        sock.close()


def session_key(tmp_path, name):
    path = str(tmp_path / name)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
    with open(path + ".pub") as f:
        return " ".join(f.read().split()[:2])


def ticket_for(pool, job, key):
    reply = exchange(schedd_connector(pool), frame({"op": "ticket", "job": job, "key": key, "shells": []}))
    assert reply["ok"], reply
    assert reply["run"] == job + ".0"  # the id between schedd and starter names the node
    return reply["ticket"]


def present_and_read_banner(pool, job, key, ticket):
    """Present a ticket; a granted one is followed by sshd's own banner."""
    sock = starter_connector(pool)()
    sock.settimeout(20)
    try:
        sock.sendall(frame({"op": "ssh", "run": job + ".0", "key": key, "ticket": ticket}))
        (size,) = struct.unpack("!I", recv_exactly(sock, 4))
        reply = json.loads(recv_exactly(sock, size).decode())
        if reply["ok"]:
            reply["banner"] = sock.recv(100)
        return reply
    finally:
        sock.close()


def recv_exactly(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def test_tickets_are_single_use_bound_to_key_and_job_and_expire(pool, tmp_path):
    job = pool.running_job()
    other_job = pool.running_job()
    key = session_key(tmp_path, "a")
    other_key = session_key(tmp_path, "b")

    ticket = ticket_for(pool, job, key)
    granted = present_and_read_banner(pool, job, key, ticket)
    assert granted["ok"] and granted["banner"].startswith(b"SSH-2.0-")
    replay = present_and_read_banner(pool, job, key, ticket)
    assert (replay["ok"], replay["kind"], replay["error"]) == (False, "ticket", "the ticket was already used")

    wrong_key = present_and_read_banner(pool, job, other_key, ticket_for(pool, job, key))
    assert wrong_key["error"] == "the ticket was issued for another key"

    wrong_job = present_and_read_banner(pool, other_job, key, ticket_for(pool, job, key))
    assert wrong_job["ok"] is False and wrong_job["kind"] == "ticket"

    altered = ticket_for(pool, job, key)
    altered["claims"]["expires"] += 3600
    assert present_and_read_banner(pool, job, key, altered)["error"] == "the ticket's signature is not valid"

    forged = {"claims": dict(altered["claims"]), "mac": "00" * 32}
    assert present_and_read_banner(pool, job, key, forged)["error"] == "the ticket's signature is not valid"

    stale = ticket_for(pool, job, key)
    time.sleep(6)  # the test pool's tickets live 5 s
    assert present_and_read_banner(pool, job, key, stale)["error"] == "the ticket has expired"


def test_tickets_need_an_authorised_requester(pool, users):
    job = pool.running_job()
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("the test user needs a system /usr/bin/python3")
    argv = ["runuser", "-u", users[1], "--", "/usr/bin/python3", "-c", """
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
d = json.dumps({"op": "ticket", "v": 2, "job": sys.argv[2], "key": sys.argv[3]}).encode()
s.sendall(struct.pack("!I", len(d)) + d)
print(s.recv(65536)[4:].decode())
""", os.path.join(pool.dir, "schedd.sock"), job, key]
    reply = json.loads(subprocess.run(argv, stdout=subprocess.PIPE, check=True).stdout.decode())
    assert reply["ok"] is False and reply["kind"] == "refused"


@pytest.mark.parametrize("target", ["schedd", "starter"])
def test_a_peer_of_another_version_gets_a_sentence_naming_both(pool, target):
    connect = (schedd_connector if target == "schedd" else starter_connector)(pool)
    old = b'{"op": "ping"}'  # as sshjob 0.1.0 wrote it: no version
    reply = exchange(connect, struct.pack("!I", len(old)) + old)
    assert reply["ok"] is False and reply["kind"] == "protocol"
    assert reply["error"] == ("its sender runs sshjob 0.1.0 or older (protocol 1), and this %s runs sshjob %s "
                              "(protocol 2): use one version of sshjob on both" % (target, reply["sshjob"]))
    newer = exchange(connect, frame({"op": "ping", "v": 3, "sshjob": "9.0"}))
    assert "its sender runs sshjob 9.0 (protocol 3)" in newer["error"]
