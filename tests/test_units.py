"""The fast layer: sshjob.py imported directly, its pure logic tested without
daemons, in a few seconds, as any user may run it.  Where a unit needs the
operating system (sockets, files), it gets the real one."""

import contextlib
import gc
import os
import socket
import sys
import tarfile
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sshjob

# -- code run from source ---------------------------------------------------------------


@pytest.mark.parametrize("function", [sshjob.slurm_boot, sshjob.bridge, sshjob.pyz_launcher])
def test_functions_run_from_their_source_are_whole_and_self_contained(function):
    source = sshjob.source_of(function)
    namespace = {}
    exec(compile(source, "source_of", "exec"), namespace)
    assert list(namespace) == ["__builtins__", function.__name__]
    assert source.startswith("def %s(" % function.__name__)
    assert compile(source, "x", "exec").co_names == (function.__name__,)


# -- a Slurm step's direct listener under a flood ---------------------------------------


@pytest.fixture
def listener(monkeypatch):
    monkeypatch.setenv("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(sshjob.DIRECT_BACKLOG)
    sock.setblocking(False)
    yield sock
    sock.close()


@contextlib.contextmanager
def flooded(listener):
    """Connections that send nothing, as fast as they come, until the block ends; the count of those made."""
    held, stop = [], threading.Event()

    def flood():
        while not stop.is_set():
            try:
                held.append(socket.create_connection(listener.getsockname(), timeout=0.2))
            except OSError:
                time.sleep(0.001)

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        yield held
    finally:
        stop.set()
        flooder.join()
        for sock in held:
            sock.close()


def test_a_flooded_listener_admits_the_client_at_once(listener):
    channel, _ = socket.socketpair()
    secret, answer = os.urandom(32), []

    def client():
        with socket.create_connection(listener.getsockname(), timeout=5) as sock:
            sock.sendall(secret)
            answer.append(sock.recv(1))

    with flooded(listener) as held:
        time.sleep(0.3)  # the backlog fills up before the client comes
        comer = threading.Thread(target=client)
        started = time.monotonic()
        comer.start()
        sock = sshjob.NodeStep.await_client(channel, listener, secret, timeout=10)
        comer.join()
        assert sock is not None and answer == [sshjob.DIRECT_TAKEN]
        assert time.monotonic() - started < 2
        assert len(held) >= sshjob.DIRECT_BACKLOG
    sock.close()


def test_a_listener_that_gets_only_a_flood_gives_up_at_its_deadline(listener):
    channel, _ = socket.socketpair()
    started = time.monotonic()
    with flooded(listener), pytest.raises(sshjob.Unreachable, match="did not connect within 1 s"):
        sshjob.NodeStep.await_client(channel, listener, os.urandom(32), timeout=1)
    assert time.monotonic() - started < 1.5


def test_the_clients_choice_of_the_pipe_is_read_while_the_listener_is_busy(listener):
    channel, theirs = socket.socketpair()
    sshjob.send_msg(theirs, {"op": "pipe"})
    with flooded(listener):
        assert sshjob.NodeStep.await_client(channel, listener, os.urandom(32), timeout=5) is None


def test_a_wrong_secret_is_closed_and_a_part_of_one_says_nothing(listener):
    port = listener.getsockname()[1]
    channel, _ = socket.socketpair()
    secret = os.urandom(32)
    wrong = socket.create_connection(("127.0.0.1", port))
    wrong.sendall(bytes([secret[0] ^ 1]) + secret[1:])
    part = socket.create_connection(("127.0.0.1", port))
    part.sendall(secret[:31])
    right = socket.create_connection(("127.0.0.1", port))
    time.sleep(0.05)
    right.sendall(secret)
    sock = sshjob.NodeStep.await_client(channel, listener, secret, timeout=5)
    assert sock is not None and right.recv(1) == sshjob.DIRECT_TAKEN
    assert wrong.recv(1) == b""
    part.settimeout(2)
    assert part.recv(1) == b""  # closed unanswered when the wait ended


# -- what a job hands back ------------------------------------------------------------


def member(name, kind=tarfile.REGTYPE, mode=0o644, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.uid, info.gid = kind, mode, linkname, 1234, 1234
    return info


@pytest.mark.parametrize("shared, expected", [(True, 0o755), (False, 0o775)])
def test_a_member_comes_out_as_data(shared, expected):
    out = sshjob.as_data(member("tree/s", mode=0o6775), "tree", set(), shared)
    assert (out.mode, out.uid, out.gid) == (expected, os.getuid(), os.getgid())
    sticky = sshjob.as_data(member("tree", tarfile.DIRTYPE, 0o1777), "tree", set(), shared)
    assert sticky.mode == (0o755 if shared else 0o777)


@pytest.mark.parametrize("name, kind, linkname", [
    ("other", tarfile.REGTYPE, ""), ("tree/../../x", tarfile.REGTYPE, ""), ("/etc/passwd", tarfile.REGTYPE, ""),
    ("tree/dev", tarfile.CHRTYPE, ""), ("tree/fifo", tarfile.FIFOTYPE, ""), ("tree/l", tarfile.SYMTYPE, "/etc"),
    ("tree/l", tarfile.SYMTYPE, "../.."), ("tree/h", tarfile.LNKTYPE, "other/file")])
def test_members_that_leave_the_tree_stop_the_copy(name, kind, linkname):
    with pytest.raises(sshjob.Refused, match="the copy stops"):
        sshjob.as_data(member(name, kind, linkname=linkname), "tree", set())


def test_no_member_passes_through_a_link_the_archive_made():
    links = set()
    sshjob.as_data(member("tree/a", tarfile.SYMTYPE, linkname="."), "tree", links)
    with pytest.raises(sshjob.Refused):
        sshjob.as_data(member("tree/a/x"), "tree", links)


# -- trust in files -----------------------------------------------------------------------


def test_a_file_is_trusted_only_if_no_one_else_may_change_it_or_its_directories(tmp_path):
    top = tmp_path / "top"
    (top / "pool").mkdir(parents=True)
    config = top / "pool" / "sshjob.conf"
    config.write_text("[sshjob]\nssh = /bin/true\n")
    for path in (tmp_path, top, top / "pool", config):
        os.chmod(str(path), 0o755 if path != config else 0o644)
    with sshjob.open_trusted(str(config)) as f:
        assert "ssh = /bin/true" in f.read()
    os.chmod(str(top), 0o1777)  # sticky above the file's own directory: others cannot move what is ours
    sshjob.check_trusted(str(config), "file")
    for loose in (top / "pool", config):
        os.chmod(str(loose), 0o777 if loose != config else 0o666)
        with pytest.raises(sshjob.ConfigError, match="is not a file that only"):
            sshjob.check_trusted(str(config), "file")
        os.chmod(str(loose), 0o755 if loose != config else 0o644)
    os.chmod(str(top), 0o777)
    with pytest.raises(sshjob.ConfigError, match=r"\(%s is not\)" % top):
        sshjob.check_trusted(str(config), "file")


def test_known_hosts_keep_one_key_per_name(tmp_path):
    path = str(tmp_path / "known_hosts")
    keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI%s" % (c * 43) for c in "ABC"]
    sshjob.remember_host_key(path, "1.0.sshjob", keys[0])
    sshjob.remember_host_key(path, "2.0.sshjob", keys[1])
    sshjob.remember_host_key(path, "1.0.sshjob", keys[2])
    with open(path) as f:
        assert f.read().splitlines() == ["2.0.sshjob " + keys[1], "1.0.sshjob " + keys[2]]


# -- the wire protocol ----------------------------------------------------------------


def test_messages_carry_their_version_and_a_peer_of_another_is_named():
    ours, theirs = socket.socketpair()
    sshjob.send_msg(ours, {"op": "ping"})
    assert sshjob.recv_msg(theirs) == {"op": "ping", "v": sshjob.PROTOCOL, "sshjob": sshjob.__version__}
    old = b'{"ok": true, "name": "vm"}'
    ours.sendall(len(old).to_bytes(4, "big") + old)
    with pytest.raises(sshjob.ProtocolError) as caught:
        sshjob.recv_msg(theirs, "the schedd at /p/schedd.sock")
    assert str(caught.value) == ("the schedd at /p/schedd.sock runs sshjob 0.1.0 or older (protocol 1), and this "
                                 "program runs sshjob %s (protocol %d): use one version of sshjob on both"
                                 % (sshjob.__version__, sshjob.PROTOCOL))


def test_every_op_is_in_the_table_once_and_each_receiver_knows_its_own():
    ops = [op for op, _, _, _ in sshjob.MESSAGES]
    assert len(ops) == len(set(ops))
    assert sshjob.Schedd.OPS == sshjob.receives("schedd") >= set(sshjob.JOB_ACTIONS) | sshjob.Schedd.NEWS
    assert {news for news, _, _ in sshjob.ENDINGS.values()} | {"started", "sessions_open",
                                                                                        "failed"} == sshjob.Schedd.NEWS
    assert sshjob.receives("step") == {"builtin", "session", "pipe"}


@pytest.mark.parametrize("kind, payload", [(sshjob.STDOUT, b"x" * 10), (sshjob.EXIT, b'{"status": 3}'),
                                           (sshjob.RESIZE, sshjob.WINSIZE.pack(50, 132))])
def test_channel_frames_go_through_whole(kind, payload):
    ours, theirs = socket.socketpair()
    sshjob.send_frame(ours, kind, payload)
    assert sshjob.recv_frame(theirs) == (kind, payload)
    ours.close()
    assert sshjob.recv_frame(theirs) == (None, b"")


@pytest.mark.parametrize("raw", [b"\x09\x00\x00\x00\x00", b"\x01\x00\x10\x00\x01"], ids=["kind", "size"])
def test_a_malformed_channel_frame_is_refused(raw):
    ours, theirs = socket.socketpair()
    ours.sendall(raw)
    with pytest.raises(sshjob.ProtocolError, match="malformed channel frame"):
        sshjob.recv_frame(theirs)


# -- the session host ------------------------------------------------------------------


def test_a_session_that_cannot_start_leaks_no_pty_and_no_descriptor(tmp_path):
    """Popen fails on the node (here: in its preexec step, as a failing drop
    of privileges would): one sentence, and every PTY and pipe closed."""
    import pwd

    def refuse():
        raise OSError(1, "no")

    host = sshjob.SessionHost(sshjob.Config(None), str(tmp_path), None, become=lambda: refuse)
    context = sshjob.JobContext("7.0", pwd.getpwuid(os.getuid()), {}, "/", [], "tag", "node")
    channel, _ = socket.socketpair()
    gc.collect()
    before, terminals = sorted(os.listdir("/proc/self/fd")), sorted(os.listdir("/dev/pts"))
    for session in ({"pty": {"rows": 24, "columns": 80, "term": "xterm"}}, {"command": "true"}):
        with pytest.raises(sshjob.StorageError, match="node node cannot start the session"):
            host.run_builtin(context, channel, session, [])
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert sorted(os.listdir("/dev/pts")) == terminals
    assert host.sessions == set()


def test_a_command_sessions_pipes_close_when_it_ends(tmp_path):
    import pwd
    host = sshjob.SessionHost(sshjob.Config(None), str(tmp_path), None)
    context = sshjob.JobContext("7.0", pwd.getpwuid(os.getuid()), {"PATH": os.defpath}, "/", [], "tag", "node")
    ours, theirs = socket.socketpair()
    gc.collect()
    before = sorted(os.listdir("/proc/self/fd"))
    sshjob.send_frame(theirs, sshjob.STDIN_EOF)
    assert host.run_builtin(context, ours, {"command": "echo out; exit 3"}, []) == 3
    assert sshjob.recv_frame(theirs) == (sshjob.STDOUT, b"out\n")
    assert sshjob.recv_frame(theirs)[0] == sshjob.EXIT
    assert sorted(os.listdir("/proc/self/fd")) == before
