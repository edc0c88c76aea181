"""The fast layer: sshjob.py imported directly, its pure logic tested without
daemons, in a few seconds, as any user may run it.  Where a unit needs the
operating system (sockets, files), it gets the real one."""

import contextlib
import gc
import os
import shlex
import socket
import subprocess
import sys
import tarfile
import threading
import time

import pytest
from conftest import INTERPRETERS

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
        assert time.monotonic() - started < 5  # well before the 10 s deadline, however busy the machine
        assert len(held) >= sshjob.DIRECT_BACKLOG
    sock.close()


def test_a_listener_that_gets_only_a_flood_gives_up_at_its_deadline(listener):
    channel, _ = socket.socketpair()
    started = time.monotonic()
    with flooded(listener), pytest.raises(sshjob.Unreachable, match="did not connect within 1 s"):
        sshjob.NodeStep.await_client(channel, listener, os.urandom(32), timeout=1)
    assert time.monotonic() - started < 3  # its deadline, not a stall


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
    assert {news for news, _, _ in sshjob.ENDINGS.values()} | {"started", "sessions_open", "sessions",
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


def test_a_window_change_goes_before_the_keys_typed_after_it_even_without_its_signal():
    """The terminal here is not the relay's controlling one, so no SIGWINCH
    comes at all: the latest a signal can be.  The size is read again before
    keys go, and the change is sent ahead of them."""
    import fcntl
    import pty
    import struct
    import termios
    import tty
    master, terminal = pty.openpty()
    tty.setraw(terminal)  # keys as they are typed, as a client's terminal is in a session
    ours, theirs = socket.socketpair()
    frames = []

    def job():
        theirs.settimeout(5)
        try:
            frames.append(sshjob.recv_frame(theirs))  # the first keys: the size has not changed
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 132, 0, 0))
            os.write(master, b"stty size\r")
            frames.append(sshjob.recv_frame(theirs))
            frames.append(sshjob.recv_frame(theirs))
        finally:
            sshjob.send_frame(theirs, sshjob.EXIT, b'{"status": 0}')

    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    os.write(master, b"x")
    peer = threading.Thread(target=job)
    peer.start()
    nowhere = os.open(os.devnull, os.O_WRONLY)
    try:
        assert sshjob.relay_to_job(ours, True, (terminal, nowhere, 2)) == 0
    finally:
        peer.join(10)
        for fd in (master, terminal, nowhere):
            os.close(fd)
        ours.close()
        theirs.close()
    assert [kind for kind, _ in frames] == [sshjob.STDIN, sshjob.RESIZE, sshjob.STDIN]
    assert sshjob.WINSIZE.unpack(frames[1][1])[:2] == (40, 132)


def test_a_session_that_cannot_start_leaks_no_pty_and_no_descriptor(tmp_path):
    """Popen fails on the node (here: in its preexec step, as a failing drop
    of privileges would): one sentence, and every PTY and pipe closed."""
    import pwd

    def refuse():
        raise OSError(1, "no")

    host = sshjob.SessionHost(sshjob.Config(None), str(tmp_path), None, become=lambda: refuse)
    context = sshjob.JobContext("7.0", pwd.getpwuid(os.getuid()), {}, "/", [], "tag", "node", 0)
    channel, _ = socket.socketpair()
    with pytest.raises(sshjob.StorageError):  # once first: what a process sets up once for good (NSS's sockets)
        host.run_builtin(context, channel, {"pty": {"rows": 24, "columns": 80, "term": "xterm"}}, [])
    gc.collect()
    before = sorted(os.listdir("/proc/self/fd"))  # a PTY's two ends are descriptors of this process, too
    for session in ({"pty": {"rows": 24, "columns": 80, "term": "xterm"}}, {"command": "true"}):
        with pytest.raises(sshjob.StorageError, match="node node cannot start the session"):
            host.run_builtin(context, channel, session, [])
    assert sorted(os.listdir("/proc/self/fd")) == before  # not /dev/pts: the tests beside this one open PTYs
    assert host.sessions == set()


def test_a_command_sessions_pipes_close_when_it_ends(tmp_path):
    import pwd
    host = sshjob.SessionHost(sshjob.Config(None), str(tmp_path), None)
    context = sshjob.JobContext("7.0", pwd.getpwuid(os.getuid()), {"PATH": os.defpath}, "/", [], "tag", "node", 0)
    gc.collect()
    before = sorted(os.listdir("/proc/self/fd"))
    ours, theirs = socket.socketpair()
    statuses = []
    node = threading.Thread(target=lambda: statuses.append(
        host.run_builtin(context, ours, {"command": "echo out; exit 3"}, [])))
    node.start()
    sshjob.send_frame(theirs, sshjob.STDIN_EOF)
    assert sshjob.recv_frame(theirs) == (sshjob.STDOUT, b"out\n")
    assert sshjob.recv_frame(theirs)[0] == sshjob.EXIT
    theirs.close()  # as the client does once it has the exit frame: the node waits for that
    node.join(timeout=10)
    assert statuses == [3]
    ours.close()
    assert sorted(os.listdir("/proc/self/fd")) == before


# -- the module's layout ----------------------------------------------------------------


def sections_and_definitions():
    """([section titles, in order], {top-level name: the index of its section}) of sshjob.py,
    whose sections open with a banner: a line of dashes, comments, a line of dashes."""
    import ast
    import re
    with open(sshjob.__file__) as f:
        source = f.read()
    lines = source.splitlines()
    dashes = re.compile(r"# -{20,}$")
    starts = [n for n in range(len(lines) - 2) if dashes.match(lines[n]) and not dashes.match(lines[n + 1])
              and lines[n + 1].startswith("# ")]
    titles = [lines[n + 1][2:].split(":")[0] for n in starts]
    tree = ast.parse(source)

    def section(node):
        return sum(1 for start in starts if start < node.lineno) - 1

    where = {}
    for node in tree.body:
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else getattr(node, "targets", [])
        for target in targets:
            for name in ([target.name] if hasattr(target, "name") else
                         [e.id for e in getattr(target, "elts", [target]) if isinstance(e, ast.Name)]):
                where[name] = section(node)
    return titles, where, tree, section


def test_each_section_uses_only_those_above_it_but_the_command_line():
    import ast
    titles, where, tree, section = sections_and_definitions()
    assert titles[0] == "Constants, logging and small helpers" and titles[-1] == "The command line"
    uses_below = set()
    for node in tree.body:
        here = section(node)
        if here == len(titles) - 1:
            continue
        for name in {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}:
            if where.get(name, -1) > here:
                uses_below.add("%s (%s) uses %s (%s)" % (getattr(node, "name", "?"), titles[here], name,
                                                          titles[where[name]]))
    assert not uses_below


def test_the_module_docstring_names_every_section_and_every_role():
    titles, _, _, _ = sections_and_definitions()
    doc = sshjob.__doc__
    for title in titles:
        assert title.split()[0] in doc, title
    roles = [line.split()[0] for line in sshjob.ROLES.splitlines()[1:] if line.startswith("  ")]
    assert all(role in doc for role in roles), [role for role in roles if role not in doc]


# -- job ids and client options -------------------------------------------------------------


@pytest.mark.parametrize("text, parsed", [("32", (32, 0, None)), ("32.1", (32, 1, None)), ("32.1.4", (32, 1, 4))])
def test_pool_job_ids(text, parsed):
    assert sshjob.parse_job_id(text) == parsed


@pytest.mark.parametrize("text", ["", "x", "1.", "1..2", "1.2.3.4", "-1", "1e3", "1234567890"])
def test_malformed_pool_job_ids(text):
    with pytest.raises(sshjob.UsageError, match="malformed job id"):
        sshjob.parse_job_id(text)


@pytest.mark.parametrize("text, ok", [("1234", True), ("1234_7", True), ("1234.0.1", True), ("1234.0.node-3", True),
                                      ("slurm:1234", True), ("pool:1.0", True), ("1234.2", True), ("x", False),
                                      ("slurm:", False), ("nope:12", False), ("1_2_3", False)])
def test_the_job_ids_any_site_takes(text, ok):
    assert bool(sshjob.ANY_JOB_ID.fullmatch(text)) is ok


def test_client_options_one_dash_or_two_and_the_command_untouched():
    opts = sshjob.parse_client_args(["-ssh", "scp -p", "--debug", "-auto-retry", "-X", "--keygen-options=-t rsa",
                                     "32.0", "-v", "--", "x"])
    assert (opts.ssh, opts.debug, opts.auto_retry, opts.x11, opts.keygen_options) == ("scp -p", True, True, True,
                                                                                       "-t rsa")
    assert (opts.job, opts.command) == ("32.0", ["-v", "--", "x"])
    assert opts.replace(transport="builtin").transport == "builtin" and opts.transport == "auto"
    for argv, sentence in ((["-nope", "1"], "unknown option -nope"), (["-ssh"], "option -ssh needs a value"),
                           ([], "no job given"), (["1.x"], "malformed job id '1.x'")):
        with pytest.raises(sshjob.UsageError, match=sentence):
            sshjob.parse_client_args(argv)


@pytest.mark.parametrize("options, words", [("-t rsa -b 4096", ["-t", "rsa", "-b", "4096"]),
                                            ("-trsa -q", ["-trsa", "-q"]), ("-C 'a note'", ["-C", "a note"])])
def test_keygen_options_that_shape_the_key(options, words):
    assert sshjob.keygen_arguments(options) == words


@pytest.mark.parametrize("options", ["-f /tmp/x", "-y", "-t", "'"])
def test_keygen_options_that_do_not(options):
    with pytest.raises(sshjob.UsageError):
        sshjob.keygen_arguments(options)


@pytest.mark.parametrize("host, parsed", [("1.0.sshjob", (None, "1.0", "auto")),
                                          ("1234.slurm.sshjob", ("slurm", "1234", "auto")),
                                          ("7.pool.sshjob", ("pool", "7", "auto")),
                                          ("1234_2.sshjob", (None, "1234_2", "auto")),
                                          ("analysis--1.0.sshjob", (None, "1.0", "analysis")),
                                          ("none--1234.slurm.sshjob", ("slurm", "1234", "none")),
                                          ("my--box--7.pool.sshjob", ("pool", "7", "my--box")),
                                          ("4242--1.0.sshjob", (None, "1.0", "4242"))])
def test_host_names_of_jobs_and_their_containers(host, parsed):
    assert sshjob.job_of_host(host) == parsed


def test_the_container_and_environment_options():
    opts = sshjob.parse_client_args(["-container", "none", "--job-env=script", "1.0"])
    assert (opts.container, opts.job_env) == ("none", "script")
    default = sshjob.parse_client_args(["1.0"])
    assert (default.container, default.job_env) == ("auto", "payload")
    request = sshjob.SessionRequest("1.0", container="box")
    assert request.place() == {"container": "box", "job_env": "payload"}
    for argv, sentence in ((["-job-env", "env", "1.0"], "-job-env is payload or script, not 'env'"),
                           (["-container", " ", "1.0"], "-container needs a container's name or pid")):
        with pytest.raises(sshjob.UsageError, match=sentence):
            sshjob.parse_client_args(argv)


def test_a_session_chooses_its_payload_by_name_or_pid():
    first = sshjob.Payload(10, "100", "podman", "web", (["podman"], {}))
    second = sshjob.Payload(20, "200", "user namespace", "sleep")
    assert sshjob.choose_payload([first, second], "auto", "1.0") is first
    assert sshjob.choose_payload([first, second], "20", "1.0") is second
    assert sshjob.choose_payload([first, second], "web", "1.0") is first
    assert sshjob.choose_payload([first, second], "none", "1.0") is None
    assert sshjob.choose_payload([], "auto", "1.0") is None
    with pytest.raises(sshjob.ContainerError, match=r"job 1.0 has no container db: podman container web \(pid 10\); "
                                                    r"sleep in an unprivileged user namespace \(pid 20\)"):
        sshjob.choose_payload([first, second], "db", "1.0")
    with pytest.raises(sshjob.ContainerError, match="its processes all run on the node itself"):
        sshjob.choose_payload([], "web", "1.0")


def test_a_job_without_containers_has_no_payload():
    assert sshjob.find_payloads(sshjob.Config(), [os.getpid()], lambda: None) == ([], [])


@pytest.mark.parametrize("python", INTERPRETERS, ids=lambda p: p.split("/")[-3] if "pyenv" in p else "python")
def test_the_sftp_server_with_openssh_s_sftp(python, tmp_path):
    """serve_sftp, as a container without sftp-server gets it, driven by
    the real sftp client (sftp -D runs a server program on its pipes)."""
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "a.txt").write_text("hello\n")
    os.symlink("a.txt", str(root / "dir" / "link"))
    big = os.urandom(700000)
    (tmp_path / "big.bin").write_bytes(big)
    server = tmp_path / "server"
    server.write_text("#!/bin/sh\ncd %s && exec %s -I -S -c %s\n" % (root, python, shlex.quote(
        sshjob.source_of(sshjob.serve_sftp) + "serve_sftp()\n")))
    server.chmod(0o755)
    batch = tmp_path / "batch"
    batch.write_text("ls -l dir\nget dir/a.txt %s/got.txt\nput %s/big.bin dir/big.bin\nget dir/big.bin %s/back.bin\n"
                     "mkdir made\nrename dir/a.txt made/b.txt\nchmod 600 made/b.txt\nsymlink b.txt made/l\n"
                     "rm dir/big.bin\nrmdir made\n" % (tmp_path, tmp_path, tmp_path))
    result = subprocess.run(["sftp", "-D", str(server), "-b", str(batch)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("remote rmdir")  # the last line: made is not empty
    assert result.stdout.count("sftp>") == 10 and " link\n" in result.stdout, result.stdout + result.stderr
    assert (tmp_path / "got.txt").read_text() == "hello\n" and (tmp_path / "back.bin").read_bytes() == big
    assert (root / "made" / "b.txt").stat().st_mode & 0o777 == 0o600
    assert os.readlink(str(root / "made" / "l")) == "b.txt" and not (root / "dir" / "big.bin").exists()


# -- tickets and tokens ------------------------------------------------------------------


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def test_a_ticket_is_single_use_bound_to_its_run_and_key_and_expires():
    secret = sshjob.token_hex(32)
    claims = {"run": "1.0.0", "key": sshjob.key_fingerprint(KEY), "holder": None}
    book = sshjob.TicketBook()
    ticket = sshjob.make_ticket(secret, claims, 60)
    assert book.redeem(secret, ticket, "1.0.0", key=KEY)["run"] == "1.0.0"
    for args, sentence in (((secret, ticket, "1.0.0"), "already used"),
                           ((secret, sshjob.make_ticket(secret, claims, 60), "2.0.0"), "another job or node"),
                           ((sshjob.token_hex(32), sshjob.make_ticket(secret, claims, 60), "1.0.0"), "signature"),
                           ((secret, sshjob.make_ticket(secret, claims, -1), "1.0.0"), "expired"),
                           ((secret, "not a ticket", "1.0.0"), "malformed")):
        with pytest.raises(sshjob.TicketInvalid, match=sentence):
            book.redeem(*args, key=KEY)
    held = sshjob.make_ticket(secret, dict(claims, key=None, holder=sshjob.holder_hash("s3cret")), 60)
    with pytest.raises(sshjob.TicketInvalid, match="another holder"):
        book.redeem(secret, held, "1.0.0", holder="guess")
    assert book.redeem(secret, held, "1.0.0", holder="s3cret")


def test_tokens_speak_for_their_subject_until_they_expire_or_are_revoked(tmp_path):
    key = tmp_path / "signing.key"
    key.write_text(sshjob.token_hex(32))
    tokens = sshjob.Tokens(str(key), str(tmp_path / "revoked"))
    token = tokens.create("alice", "user", 60)
    assert tokens.verify(token)["sub"] == "alice"
    with pytest.raises(sshjob.Refused, match="not signed by this pool"):
        tokens.verify(token[:-2] + ("AA" if not token.endswith("AA") else "BB"))
    with pytest.raises(sshjob.Refused, match="has expired"):
        tokens.verify(tokens.create("alice", "user", -5))
    time.sleep(0.01)
    tokens.revoke("alice")
    with pytest.raises(sshjob.Refused, match="was revoked"):
        tokens.verify(token)
    assert tokens.verify(tokens.create("alice", "user", 60))["sub"] == "alice"
    assert sshjob.parse_public_key(KEY + " a comment") == KEY
    for bad in ("ssh-ed25519 AAAA", KEY + "\ncommand=x", "ssh-dss " + KEY.split()[1], 5):
        with pytest.raises(sshjob.TicketInvalid):
            sshjob.parse_public_key(bad)


# -- configuration -------------------------------------------------------------------------


def test_configuration_defaults_file_and_environment(tmp_path, monkeypatch):
    (tmp_path / "sshjob.conf").write_text("[sshjob]\nticket_lifetime = 30\nuse_cgroups = no\n")
    os.chmod(str(tmp_path), 0o755)
    config = sshjob.Config(str(tmp_path / "sshjob.conf"))
    assert config["schedd_address"] == "%s/schedd.sock" % tmp_path
    assert (config.number("ticket_lifetime"), config.flag("use_cgroups")) == (30.0, False)
    monkeypatch.setenv("SSHJOB_TICKET_LIFETIME", "7")
    assert config.number("ticket_lifetime") == 7.0
    monkeypatch.setenv("SSHJOB_USE_CGROUPS", "maybe")
    with pytest.raises(sshjob.ConfigError, match="is not true or false"):
        config.flag("use_cgroups")
    (tmp_path / "bad.conf").write_text("[sshjob\n")
    with pytest.raises(sshjob.ConfigError, match="is malformed at line 1"):
        sshjob.Config(str(tmp_path / "bad.conf"))


# -- the session's texts ------------------------------------------------------------------


def context(env=None, workdir="/work dir"):
    import pwd
    return sshjob.JobContext("5.0", pwd.getpwuid(os.getuid()), env or {}, workdir, [11, 12], "tag", "node7", 2)


def test_the_session_script_puts_back_the_job_and_lets_the_client_bring_its_terminal():
    script = sshjob.session_script(context({"FOO": "a b'c", "TERM": "dumb", "SHELLOPTS": "errexit", "SSH_X": "1",
                                            "BAD-NAME": "x"}), ["/bin/bash"], "session-3")
    assert "export FOO='a b'\"'\"'c'" in script
    assert '[ -n "${TERM+set}" ] || export TERM=dumb' in script
    assert "SHELLOPTS" not in script and "SSH_X" not in script and "BAD-NAME" not in script
    assert "_SSHJOB_JOB_PIDS='11 12'" in script and "SSHJOB_NODE=node7" in script and "SSHJOB_NODE_INDEX=2" in script
    assert "cd -- '/work dir'" in script and "Welcome to job 5.0 on node7" in script


def test_the_sshd_configuration_of_a_session(tmp_path):
    import pwd
    config = sshjob.Config(None)
    text = sshjob.sshd_config(config, "/keys/host key", str(tmp_path), pwd.getpwuid(os.getuid()), terminals=False)
    assert 'HostKey "/keys/host key"' in text and "PermitTTY no" in text
    assert 'AuthorizedKeysFile "%s/authorized_keys"' % tmp_path in text
    assert "AllowAgentForwarding no" in text and "AcceptEnv LANG LANGUAGE LC_*" in text


@pytest.mark.parametrize("path, expanded, quoted", [("/a b/c", True, '"/a b/c"'), ("/x%y", True, '"/x%%y"'),
                                                     ("/x%y", False, '"/x%y"')])
def test_paths_in_openssh_configurations(path, expanded, quoted):
    assert sshjob.openssh_quoted(path, expanded) == quoted


@pytest.mark.parametrize("path, expanded", [('/a"b', True), ("/a\\b", False), ("/a%b", None)])
def test_paths_that_openssh_versions_read_differently(path, expanded):
    with pytest.raises(sshjob.ConfigError, match="versions of it read"):
        sshjob.openssh_quoted(path, expanded)


@pytest.mark.parametrize("request_, uid, problems, chosen", [
    ({"key": "k"}, 1000, (None, None), ("openssh", "both ends have OpenSSH")),
    ({}, 1000, (None, None), ("builtin", "this machine has no ssh client")),
    ({"key": "k"}, 1000, ("no sshd", None), ("builtin", "no sshd")),
    ({"key": "k", "interactive": True}, 1000, (None, "no tty"), ("builtin", "no tty")),
    ({"key": "k", "interactive": True}, 0, (None, "no tty"), ("openssh", "both ends have OpenSSH")),
    ({"key": "k", "transport": "builtin"}, 1000, (None, None), ("builtin", "asked for"))])
def test_the_transport_is_openssh_where_both_ends_have_it(request_, uid, problems, chosen):
    assert sshjob.choose_transport(request_, uid, *problems) == chosen


def test_a_transport_that_cannot_be_is_a_sentence():
    with pytest.raises(sshjob.MissingProgram, match="no sshd"):
        sshjob.choose_transport({"key": "k", "transport": "openssh"}, 1000, "no sshd", None)
    with pytest.raises(sshjob.UsageError, match="unknown transport"):
        sshjob.choose_transport({"transport": "pigeon"}, 1000, None, None)


# -- Slurm's words ---------------------------------------------------------------------------


def test_scontrols_records_and_srun_complaints():
    record = sshjob.slurm_fields("JobId=12 JobName=wrap UserId=alice(1001) JobState=RUNNING Reason=None "
                                 "Command=/bin/sh -c x WorkDir=/home/a b")
    assert (record["JobId"], record["UserId"], record["Command"], record["WorkDir"]) == (
        "12", "alice(1001)", "/bin/sh -c x", "/home/a b")
    for said, kind, sentence in (
            ("srun: error: Unable to create step for job 12: Access/permission denied", sshjob.Refused,
             "Slurm refuses a session in job 12: it is not yours (Access/permission denied)"),
            ("srun: error: Unable to contact slurm controller", sshjob.Unreachable,
             "Slurm's controller (slurmctld) does not answer"),
            ("sshjob: cannot prepare\nsrun: error: task 0: Exited with exit code 1", sshjob.Unreachable,
             "on node n1: cannot prepare"),
            ("slurmstepd: error: execve(): python3: No such file or directory", sshjob.MissingProgram,
             "node n1 cannot run python3")):
        error = sshjob.slurm_error(said, "12", "n1")
        assert isinstance(error, kind) and str(error).startswith(sentence), str(error)


# -- the warm path ----------------------------------------------------------------------------


def test_warm_names_say_the_site_the_pool_and_the_job():
    config = sshjob.Config(None)
    site = sshjob.PoolSite.__new__(sshjob.PoolSite)
    site.config, site.pool = config, sshjob.pool_key(config)
    site.job("12.0.3")
    assert site.warm_name() == "pool-%s-12.0.3" % sshjob.pool_key(config)
    assert sshjob.WARM_KEY.fullmatch(site.warm_name())
    assert sshjob.pool_key(config) != sshjob.pool_key(config, "another-schedd")
    master = "/home/a/.local/share/sshjob/cm-%s-0123abcd" % site.warm_name()
    assert sshjob.SshMaster.name_of(master) == site.warm_name()
    assert sshjob.SshMaster.name_of("/x/cm-slurm-1234.0.node-3-89abcdef") == "slurm-1234.0.node-3"


def test_the_masters_listed_are_those_that_answer_and_one_that_ends_meanwhile_is_passed_over(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    home = sshjob.sshjob_home()
    live, dead = os.path.join(home, "cm-slurm-12-0000abcd"), os.path.join(home, "cm-slurm-13-0000abcd")
    for path in (live, dead):
        with open(path + ".hosts", "w") as f:
            f.write("job-12 ssh-ed25519 AAAA\n")
    with socket.socket(socket.AF_UNIX) as master, socket.socket(socket.AF_UNIX) as gone:
        master.bind(live)
        master.listen(1)
        gone.bind(dead)  # a socket nobody listens on: ssh's stale one
        listdir = os.listdir
        monkeypatch.setattr(os, "listdir", lambda path: listdir(path) + ["cm-slurm-14-0000abcd"])  # it just went
        assert [m.path for m in sshjob.SshMaster.all_of_user()] == [live]


def test_an_agent_that_does_not_listen_is_gone_and_one_that_does_not_answer_is_silent():
    import socket
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert sshjob.ping_agent({"hosts": ["127.0.0.1"], "port": port}) == "gone"
    with socket.socket() as mute:  # a stopped agent: the kernel accepts, nobody answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(1)
        assert sshjob.ping_agent({"hosts": ["127.0.0.1"], "port": mute.getsockname()[1]}) == "silent"
