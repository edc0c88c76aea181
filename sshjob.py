#!/usr/bin/env python3
r"""sshjob: open an ssh session inside a running batch job.

One file, standard library only, to copy onto a cluster's nodes.  Its first
argument picks the role (ROLES, below, gives each one's arguments):

    client, cp          the user's way into a job: condor_ssh_to_job's command
                        line (run_client) and files both ways (run_cp)
    ssh-config, proxy, known-hosts
                        jobs as ssh hosts for every ssh tool, on this machine
                        or a laptop: the Host block (run_ssh_config), its
                        ProxyCommand (run_proxy) and a laptop's
                        KnownHostsCommand (run_known_hosts)
    bridge              what ssh runs as the client's ProxyCommand, without
                        this module: it passes ssh the connection that the
                        client's ticket desk made (bridge)
    schedd, starter     an sshjob pool's daemons (serve_schedd, serve_starter)
    submit, q, status, rm, suspend, continue, vacate, hold, release
                        the user's handles on a pool's queue (run_submit, run_q,
                        run_status, run_action)
    warm                the user's warm paths into jobs, for later sessions:
                        the jobs' agents (JobAgent on the node) and ssh's
                        master connections (SshMaster) (run_warm)
    pool, demo, init, token
                        personal and multi-host pools (run_pool, run_demo,
                        run_init, run_token)
    slurm-step          a session's step on a Slurm node (run_slurm_step,
                        which slurm_boot starts there)
    pool-agent          a pool job's agent, which its starter starts in the
                        job (run_pool_agent, PoolAgent)
    new, allocation     allocations on demand: find or submit, wait, enter
                        (run_new), and the allocation's batch script, which
                        holds it until it is idle (run_allocation)

The sections, in order: each uses only those above it, but the command line
at the end (tests/test_units.py holds the module to that):

    Constants, logging and small helpers
    Errors                  one type per kind of failure; main() says them
    Wire protocol           MESSAGES, the table of every message, and ENDINGS,
                            how a run ends; framing, connections, servers
    Jobs, users, files and processes
    Security                keys, tickets, tokens, TLS
    Configuration
    Containers              where a job's payload runs (podman, a user
                            namespace, a chroot), and container_session, which
                            a session runs to enter it with the owner's rights
    The session host        the node's side of every session: sshd -i, or a
                            built-in session relayed as channel frames; and
                            JobAgent, the warm path of later sessions
    The schedd              a pool's queue, and who may enter which job
    The starter             a pool's node: Job, with a SessionHost per job;
                            PoolAgent, a job's agent
    Slurm, on the node      NodeStep, with a SessionHost per step
    Sites                   the client's one seam to a batch system
    The client
    Files: sshjob cp
    Allocations on demand   sshjob new PROFILE: find or submit, wait, enter;
                            the allocation's batch script, which gives it back
    Jobs as ssh hosts
    Queue commands
    Pools
    The command line

The two seams, drawn as socketserver.py draws its classes:

            Site                            SessionHost
           /    \                          (used by)
     PoolSite    SlurmSite               Job        JobSide (served by a JobAgent)
    (a schedd,   (srun starts            (a pool's    /          \
     a starter)   a step)                 starter) PoolAgent    NodeStep
                                                   (in a pool   (a Slurm
                                                    job)         step)

A session: the client makes a key pair, whose private half never leaves it,
and asks its Site for a Ticket (a SessionRequest says for what); the node
side checks it and its SessionHost starts `sshd -i` on the client's
connection, which ssh gets through the bridge (ProxyUseFdpass: nothing in
the data path), or runs a built-in session itself; where the job's payload
runs in a container, the session's shell or command enters it first.  An adapter for another
engine (HTCondor, PBS, LSF, a container runtime) is a Site (job, ticket,
connect_ssh, open_builtin, state, remove, queue, close) and a SessionHost
started inside the job, as NodeStep is on Slurm; it takes one line in SITES.
Later sessions take the warm path: the job's agent (a JobAgent in the job,
which its JobSide serves: no ticket, no step, no new interpreter) and, for
OpenSSH, the first session's ssh kept as the job's master (SshMaster).
"""

import array
import collections
import contextlib
import errno
import fcntl
import functools
import os
import pwd
import re
import select
import signal
import socket
import socketserver
import stat
import struct
import sys
import threading
import time


class LazyModule:
    """A module that is imported where it is first used, and then stands in
    the module's namespace itself: most roles never use these, and every
    role's start would pay for them (a client's, some 6 ms)."""

    def __init__(self, name):
        self.__name = name

    def __getattr__(self, attribute):
        module = __import__(self.__name)
        globals()[self.__name] = module
        return getattr(module, attribute)


base64, grp, json, shlex, shutil, subprocess, termios = map(LazyModule, (
    "base64", "grp", "json", "shlex", "shutil", "subprocess", "termios"))

# Every role imports the modules above, and the lazy ones where it uses
# them.  The others (argparse, configparser, ctypes, hashlib, hmac,
# logging, pty, sqlite3, ssl, tarfile, tempfile, tty, zipfile, zlib) are
# imported by the functions that use them, so that each role loads only
# what it uses: a client starts some 25 ms sooner than it would with them
# all.


# ---------------------------------------------------------------------------
# Constants, logging and small helpers: what every role shares.
# ---------------------------------------------------------------------------

__version__ = "0.2.0"


class Log:
    """The "sshjob" logger, loaded when a message is to be printed: the
    logging package costs some 8 ms at every start, and a client without
    -debug prints none of its debug and info messages."""

    DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50  # logging's own numbers

    def __init__(self):
        self.level = self.WARNING
        self.logger = None

    def set_level(self, level):
        self.level = level
        if self.logger:
            self.logger.setLevel(level)

    def debugging(self):
        return self.level <= self.DEBUG

    def log(self, level, message, *args, **kwargs):
        if level < self.level:
            return
        if self.logger is None:
            import logging

            logging.basicConfig(format="%(asctime)s sshjob %(levelname)s %(message)s", stream=sys.stderr)
            self.logger = logging.getLogger("sshjob")
            self.logger.setLevel(self.level)
        self.logger.log(level, message, *args, **kwargs)

    def debug(self, message, *args):
        self.log(self.DEBUG, message, *args)

    def info(self, message, *args):
        self.log(self.INFO, message, *args)

    def warning(self, message, *args):
        self.log(self.WARNING, message, *args)

    def error(self, message, *args):
        self.log(self.ERROR, message, *args)

    def exception(self, message, *args):
        self.log(self.ERROR, message, *args, exc_info=True)

    def critical(self, message, *args):
        self.log(self.CRITICAL, message, *args)


log = Log()


def token_hex(nbytes):
    """What secrets.token_hex returns, without importing secrets: it loads
    random and hashlib, some 5 ms, for one call to os.urandom."""
    return os.urandom(nbytes).hex()


@functools.lru_cache(maxsize=None)
def module_bytes():
    """This module's file, as bytes."""
    with open(os.path.abspath(__file__), "rb") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def source_of(function):
    """The source text of a top-level function of this module, to run with
    `python -c` where importing the whole module would cost too much (or
    where the module is not there yet).  Such a function imports what it
    uses inside its body; its lines below the `def` are all indented."""
    lines = module_bytes().decode("utf-8").splitlines()
    start = end = function.__code__.co_firstlineno - 1
    while end + 1 < len(lines) and (not lines[end + 1].strip() or lines[end + 1][0] in " \t"):
        end += 1
    return "\n".join(lines[start:end + 1]).rstrip() + "\n"


MAX_FRAME = 1024 * 1024  # bytes a message may have: a job's spec, with a login environment, and room to spare

MAX_JOB_SPEC = 512 * 1024  # bytes of a job's command, environment and paths, as JSON

IO_TIMEOUT = 15.0  # seconds a peer may take over one request or reply, TLS handshake included

MAX_UNANSWERED = 256  # connections a daemon holds at once before their first request is read

MAX_UNANSWERED_PER_PEER = 16  # of those, from one address (one uid on a Unix socket)

MAX_RELAYS_PER_USER = 64  # sessions the schedd relays for one user at once

POLL_WAIT = 10.0  # seconds a starter's poll waits at the schedd for work

KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL when a job ends
LEASE_ENDED = "lease-ended"  # in a job's directory on the starter: the lease's keeper ended the job

LEASE_MARGIN = KILL_GRACE + 5.0  # after a lease runs out, seconds before its jobs may run elsewhere

TOKEN_WARNING = 7 * 86400.0  # seconds before a starter's token expires that its logs and status say so

DEFAULT_CONFIG = "/etc/sshjob/sshjob.conf"

SBIN_PATH = "/usr/sbin:/usr/local/sbin:/sbin"

KEY_DIR_PREFIX = "sshjob-keys-"  # a client's key directory under $TMPDIR

TAG_VAR = "_SSHJOB_JOB_TAG"  # inherited by every process of a job

PIDS_VAR = "_SSHJOB_JOB_PIDS"

SESSION_VAR = "_SSHJOB_SESSION"  # set in session processes only, and in sshjob's Slurm steps

CONNECTION_GRACE = 1.0  # seconds an sshd connection counts as a session before its first channel opens

TALLY_VAR = "SSHJOB_SESSIONS"  # a pool job's file of its live sessions (SessionHost.count_sessions)

PACKAGES = {
    "ssh": "openssh-client",
    "scp": "openssh-client",
    "sftp": "openssh-client",
    "ssh-keygen": "openssh-client",
    "sshd": "openssh-server",
    "rsync": "rsync",
    "openssl": "openssl",
    "podman": "podman",
}

NO_LOGIN_SHELLS = ("nologin", "false")  # login shells of accounts that refuse every session

SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
    "/usr/lib/ssh/sftp-server",
)


# ---------------------------------------------------------------------------
# Errors: one type per kind of failure; main() turns them into a sentence
# on stderr and an exit status.  Daemons send them back as error replies.
# ---------------------------------------------------------------------------


class SshjobError(Exception):
    """A failure the user sees as one sentence and a non-zero exit status."""

    kind = "error"
    status = 1


class UsageError(SshjobError):
    kind = "usage"
    status = 2


class ConfigError(SshjobError):
    kind = "config"


class Unreachable(SshjobError):
    """A daemon does not answer."""

    kind = "unreachable"


class ProtocolError(SshjobError):
    """A peer sent something that is not a well-formed message."""

    kind = "protocol"


class NotFound(SshjobError):
    kind = "not_found"


class NotRunning(SshjobError):
    """The job may still run: -auto-retry waits for it."""

    kind = "not_running"


class JobGone(SshjobError):
    """The job finished or was removed: it will never run again."""

    kind = "gone"


class Held(SshjobError):
    """The job waits for someone to release it: -auto-retry does not wait for that."""

    kind = "held"


class Refused(SshjobError):
    kind = "refused"


class TicketInvalid(SshjobError):
    kind = "ticket"


class StorageError(SshjobError):
    """A daemon cannot write what it must keep: a full disk, a read-only file system."""

    kind = "storage"


class MissingProgram(SshjobError):
    kind = "missing_program"


class ContainerError(SshjobError):
    """A job's container cannot be found or entered."""

    kind = "container"


class Interrupted(SshjobError):
    """A signal asked us to stop; the exit status says which, as shells do."""

    kind = "interrupted"

    def __init__(self, signum):
        super().__init__("interrupted by %s" % signal.Signals(signum).name)
        self.status = 128 + signum


ERRORS = {
    cls.kind: cls
    for cls in (
        UsageError,
        ConfigError,
        Unreachable,
        ProtocolError,
        NotFound,
        NotRunning,
        JobGone,
        Held,
        Refused,
        TicketInvalid,
        StorageError,
        MissingProgram,
        ContainerError,
    )
}


def describe(error):
    """An exception as one line for a log or a user: ours say it all; others
    name their type, which tracebacks would."""
    if isinstance(error, (SshjobError, OSError)):
        return str(error)
    return "%s: %s" % (type(error).__name__, error)


def error_reply(error):
    return {"ok": False, "kind": error.kind, "error": str(error)}


def raise_for_reply(reply):
    if not reply.get("ok"):
        cls = ERRORS.get(reply.get("kind"), SshjobError)
        raise cls(str(reply.get("error", "the peer gave no reason")))
    return reply


# ---------------------------------------------------------------------------
# Wire protocol: every message is a JSON object behind a 4-byte big-endian
# length; after some requests the connection carries a stream of its own
# (the ssh protocol, a relayed session, or channel frames).  The servers
# that daemons run, with the gate that admits their connections.
# ---------------------------------------------------------------------------

PROTOCOL = 2  # the version of the messages below; every message carries it ("v"), and sshjob's own ("sshjob")
ROLE = "program"  # what this process is (client, schedd, starter, Slurm step...): a sentence may name it

# Every message of the protocol: its op, who sends it, who answers, and what it is.  `job` is a job as
# users name it (1.0, 1.0.2, 1234_7); `run` is one run of one node of a pool's job, as the schedd and its
# starter name it (cluster.proc.node, with `gen` to tell the runs of one node apart).
MESSAGES = (
    # op              from        to                what
    ("ping",          "anyone",   "schedd",         "its name, version and live starters"),
    ("status",        "user",     "schedd",         "the pool's starters, their slots and problems"),
    ("submit",        "user",     "schedd",         "queue a job: command, environment, directory, outputs"),
    ("q",             "user",     "schedd",         "a page of the queue, after the row `after` names"),
    ("rm",            "user",     "schedd starter", "remove a job; to a starter (in a poll's reply): end a run"),
    ("suspend",       "user",     "schedd starter", "stop a job and its sessions (SIGSTOP)"),
    ("continue",      "user",     "schedd starter", "let a suspended job go on"),
    ("vacate",        "user",     "schedd starter", "pre-empt a job: it ends here and runs again"),
    ("hold",          "user",     "schedd",         "keep a job from running until released"),
    ("release",       "user",     "schedd",         "let a held job run again"),
    ("ticket",        "client",   "schedd",         "a ticket for a session in a job, and how to reach it"),
    ("relay",         "client",   "schedd",         "a connection to a job's starter through the schedd"),
    ("poll",          "starter",  "schedd",         "the starter's state and news; the reply: commands, lease"),
    ("relay_accept",  "starter",  "schedd",         "the starter's connection back, for a relay"),
    ("started",       "starter",  "schedd",         "news: a run started (its host key, pids, ssh problem)"),
    ("sessions_open", "starter",  "schedd",         "news: a run's command ended while sessions are open"),
    ("sessions",      "starter",  "schedd",         "news: how many sessions a run has now (q says it)"),
    ("exited",        "starter",  "schedd",         "news: a run ended by itself (its status, and why)"),
    ("removed",       "starter",  "schedd",         "news: a run ended as rm asked"),
    ("vacated",       "starter",  "schedd",         "news: a run ended as vacate or hold asked"),
    ("lost",          "starter",  "schedd",         "news: a run ended with the starter's lease"),
    ("failed",        "starter",  "schedd",         "news: a run could not start (and whether to try again)"),
    ("start",         "schedd",   "starter",        "a command in a poll's reply: run a node of a job"),
    ("connect_back",  "schedd",   "starter",        "a command: connect to the schedd for a relay"),
    ("ssh",           "client",   "starter",        "a ticket for an sshd session; then the ssh protocol"),
    ("builtin",       "client",   "starter step",   "a built-in session: its command, terminal, variables; "
                                                    "then channel frames"),
    ("session",       "client",   "step",           "the session a Slurm step is to serve; the reply: its "
                                                    "transport, host key, direct address"),
    ("pipe",          "client",   "step",           "the session goes through srun's pipe, not direct"),
)
# Before its first message a Slurm step's boot says "need" (the client answers with the module's size and
# its zlib-compressed bytes, or 0) and then "have HOW", each a line.  A built-in session's stream, after its
# request, is channel frames (CHANNEL, below).


def receives(who):
    """The ops that `who` answers."""
    return frozenset(op for op, _, to, _ in MESSAGES if who in to.split())


# How a run of a job ends: the starter's news of it, the queue's state after it, and the sentence that a
# session it cut short ends with ("the session ended because job 1.0 ...").
ENDINGS = {
    "exit": ("exited", "completed", "finished"),
    "rm": ("removed", "removed", "was removed"),
    "vacate": ("vacated", "idle", "was pre-empted (vacated)"),
    "hold": ("vacated", "held", "was held"),
    "lease": ("lost", "idle", "lost its lease: its starter could not reach the schedd; it will run again"),
}
ENDED = {state: sentence for _, state, sentence in reversed(list(ENDINGS.values()))}  # a job's state: how it ended
ENDED["starting"] = ENDINGS["vacate"][2]

_HEADER = struct.Struct("!I")


def send_msg(sock, message):
    data = json.dumps(dict(message, v=PROTOCOL, sshjob=__version__), separators=(",", ":")).encode("utf-8")
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exactly(sock, size):
    """Read exactly `size` bytes and not one more: after a reply, the rest of
    the stream belongs to sshd."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ProtocolError("the connection closed in the middle of a message")
        data += chunk
    return bytes(data)


def recv_msg(sock, peer="the peer"):
    """A message from `peer` (named in the sentence if it speaks another version)."""
    (size,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    if size > MAX_FRAME:
        raise ProtocolError("a message of %d bytes exceeds the limit of %d" % (size, MAX_FRAME))
    try:
        message = json.loads(_recv_exactly(sock, size).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("a message is not valid JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message is not a JSON object")
    if message.get("v") != PROTOCOL:
        theirs = message.get("sshjob") if isinstance(message.get("sshjob"), str) else "0.1.0 or older"
        raise ProtocolError("%s runs sshjob %s (protocol %s), and this %s runs sshjob %s (protocol %d): use one "
                            "version of sshjob on both" % (peer, theirs, message.get("v", 1), ROLE, __version__,
                                                          PROTOCOL))
    return message


def field(message, name, kind, default=None):
    """The value of `name` in a peer's message, checked to be of `kind`."""
    value = message.get(name, default)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError("field %r is missing or malformed" % name)
    return value


def parse_address(address):
    """("unix", path) for a Unix socket, ("tcp", (host, port)) otherwise."""
    if address.startswith("/"):
        return "unix", address
    if address.startswith("unix:"):
        return "unix", address[5:]
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError("address %r is neither a socket path nor host:port (a port of 0 to 65535)" % address)
    return "tcp", (host.strip("[]") or "127.0.0.1", int(port))


@contextlib.contextmanager
def reachable_path(path):
    """`path`, to bind or connect a Unix socket to; where it is longer than
    a socket's address may be (108 bytes: a deep $TMPDIR, a pool in a deep
    directory), the same place named through a descriptor of its directory
    (/proc/self/fd/N/NAME), for as long as the block lasts."""
    if len(os.fsencode(path)) < 100:
        yield path
        return
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield "/proc/self/fd/%d/%s" % (directory, os.path.basename(path))
    finally:
        os.close(directory)


def connect_unix(path, timeout):
    """Connect to a Unix socket.  When the daemon's queue is full, connect()
    waits in the kernel's line for room, for at most `timeout` (SO_SNDTIMEO
    bounds it): a socket with a Python timeout would only poll, and lose
    every freed place to a flood's blocked connects."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        seconds = int(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", seconds, int((timeout - seconds) * 1e6)))
        with reachable_path(path) as where:
            sock.connect(where)
    except OSError:
        sock.close()
        raise
    sock.settimeout(timeout)
    return sock


def connect(address, what, timeout=IO_TIMEOUT):
    family, where = parse_address(address)
    try:
        if family == "unix":
            sock = connect_unix(where, timeout)
        else:
            sock = socket.create_connection(where, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        raise Unreachable("cannot reach %s at %s (%s)" % (what, address, e.strerror or e)) from None
    return sock


def call(address, request, what, timeout=IO_TIMEOUT):
    """Send one request, return its reply; error replies become exceptions."""
    with connect(address, what, timeout) as sock:
        try:
            send_msg(sock, request)
            reply = recv_msg(sock, "%s at %s" % (what, address))
        except OSError as e:
            raise Unreachable("%s at %s did not answer (%s)" % (what, address, e)) from None
    return raise_for_reply(reply)


def splice(a, b):
    """Copy both ways between two connected sockets until both directions end."""

    def pump(source, target):
        with contextlib.suppress(OSError):
            for data in iter(lambda: source.recv(256 * 1024), b""):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    a.settimeout(None)
    b.settimeout(None)
    backward = threading.Thread(target=pump, args=(b, a), daemon=True)
    backward.start()
    pump(a, b)
    backward.join()


def wait_for(readers, writers=(), timeout=None):
    """(readable, writable): which of `readers` and `writers` (sockets or
    descriptors) are ready, as select() says, but for descriptors of any
    number: select() refuses those past 1023, which a busy daemon has."""
    poller = select.poll()
    masks, objects = {}, {}
    for mask, group in ((select.POLLIN, readers), (select.POLLOUT, writers)):
        for thing in group:
            fd = thing if isinstance(thing, int) else thing.fileno()
            masks[fd] = masks.get(fd, 0) | mask
            objects[fd, mask] = thing
    for fd, mask in masks.items():
        poller.register(fd, mask)
    ready = poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999)))
    done = select.POLLHUP | select.POLLERR | select.POLLNVAL
    readable = [objects[fd, select.POLLIN] for fd, events in ready
                if events & (select.POLLIN | done) and (fd, select.POLLIN) in objects]
    writable = [objects[fd, select.POLLOUT] for fd, events in ready
                if events & (select.POLLOUT | done) and (fd, select.POLLOUT) in objects]
    return readable, writable


def peer_credentials(sock):
    """(pid, uid, gid) of the process on the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def start_vital(target, what):
    """Run one of a daemon's loops in a thread.  The loops catch and retry
    what they expect; should one die all the same, the daemon exits with a
    sentence in its log rather than live on without it."""

    def run():
        try:
            target()
        except BaseException as e:
            log.critical("%s stopped (%s): the daemon exits", what, describe(e))
            os._exit(70)

    threading.Thread(target=run, daemon=True).start()


class Gate:
    """Admission to a daemon: who has not sent a whole request yet.

    Anyone may connect before proving who they are, so that phase is where
    a peer without credentials could hold a daemon's threads and fds for
    ever (slowloris).  The gate holds at most `total` such connections, each
    with one deadline for the TLS handshake and the request together, which
    a watchdog enforces.  It turns no one away: when it is full, the oldest
    waiting connection goes, and once it is half full, a peer with
    `per_peer` waiting connections loses its own oldest.  So a flood only
    churns the flooder's own connections, while a real request, which takes
    milliseconds, gets through.  What follows the request is authenticated
    and not the gate's business."""

    def __init__(self, total=MAX_UNANSWERED, per_peer=MAX_UNANSWERED_PER_PEER, deadline=IO_TIMEOUT):
        self.total = total
        self.per_peer = per_peer
        self.deadline = deadline
        self.waiting = {}  # connection: (peer, deadline, a duplicate socket to shut it with); oldest first
        self.lock = threading.Lock()
        self.evicted = 0
        start_vital(self.watch, "the watch over unanswered connections")

    def enter(self, sock, peer):
        with self.lock:
            if len(self.waiting) >= self.total // 2:
                own = [s for s, (p, _, _) in self.waiting.items() if p == peer]
                if len(own) >= self.per_peer:
                    self.evict(own[0], peer)
            if len(self.waiting) >= self.total:
                self.evict(next(iter(self.waiting)), peer)
            handle = socket.fromfd(sock.fileno(), sock.family, sock.type)  # dup(): SSLSocket has none
            self.waiting[sock] = (peer, time.monotonic() + self.deadline, handle)

    def evict(self, sock, newcomer):
        """Shut a waiting connection (called with the lock held)."""
        self.evicted += 1
        if self.evicted in (1, 10, 100) or self.evicted % 1000 == 0:
            log.warning("dropped %d unanswered connection(s) so far to make room (the last for %s)",
                        self.evicted, newcomer)
        self.shut(sock)

    def shut(self, sock):
        _, _, handle = self.waiting.pop(sock)
        with contextlib.suppress(OSError):
            handle.shutdown(socket.SHUT_RDWR)
        handle.close()

    def leave(self, sock):
        with self.lock:
            entry = self.waiting.pop(sock, None)
        if entry:
            entry[2].close()

    def watch(self):
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with self.lock:
                for sock in [sock for sock, (_, deadline, _) in self.waiting.items() if deadline < now]:
                    self.shut(sock)


class GatedServer(socketserver.ThreadingMixIn):
    """A threading server whose connections pass a Gate first."""

    daemon_threads = True
    request_queue_size = socket.SOMAXCONN  # listen() backlog: bursts are accepted, then the gate judges

    def __init__(self, *args, **kwargs):
        self.gate = Gate()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        self.gate.enter(request, self.peer_of(request, client_address))
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.gate.leave(request)


class UnixServer(GatedServer, socketserver.UnixStreamServer):
    """The Unix-socket server: peers are told apart by their uid.  Its queue
    is short, so that a request waits behind few others: local clients wait
    for room in the kernel (see connect_unix), they are not refused."""

    request_queue_size = 64

    @staticmethod
    def peer_of(request, client_address):
        return peer_credentials(request)[1]


class TCPServer(GatedServer, socketserver.TCPServer):
    allow_reuse_address = True

    @staticmethod
    def peer_of(request, client_address):
        return client_address[0]

    def shutdown_request(self, request):
        """Close our copy only: a handed-off socket lives on in sshd, and
        socketserver's shutdown() would end the session for it too."""
        self.close_request(request)


class RequestHandler(socketserver.BaseRequestHandler):
    """Reads one request and writes the reply that `server.app.answer` gives.

    A malformed request gets an error reply; a peer that stalls is dropped
    after IO_TIMEOUT; neither disturbs the daemon."""

    def setup(self):
        self.admission = self.request  # the gate knows the connection by its first socket

    def handle(self):
        self.request.settimeout(IO_TIMEOUT)
        try:
            message = recv_msg(self.request, "its sender")
            self.server.gate.leave(self.admission)
            reply = self.server.app.answer(message, self.request)
        except SshjobError as e:
            log.info("answered a request with an error: %s", e)
            reply = error_reply(e)
        except OSError as e:
            log.debug("dropped a connection: %s", e)
            return
        except Exception:
            log.exception("internal error while answering a request")
            reply = {"ok": False, "kind": "error", "error": "internal error in the daemon"}
        if reply is not None:  # None: the request took the connection over
            with contextlib.suppress(OSError):
                send_msg(self.request, reply)


def listen(server_class, address, handler):
    """A server on `address` (a Unix socket's path of any length, or (host,
    port)), or one sentence on why there can be none."""
    try:
        if not isinstance(address, str):
            return server_class(address, handler)
        with reachable_path(address) as where:
            server = server_class(where, handler)
        server.server_address = address  # its name, which outlives the directory's descriptor
        return server
    except (OSError, OverflowError) as e:
        where = address if isinstance(address, str) else "%s:%d" % address
        raise ConfigError("cannot listen on %s (%s)" % (where, getattr(e, "strerror", None) or e)) from None


def run_until_signalled(server, on_stop=None):
    """Serve until SIGTERM or SIGINT, then stop cleanly."""

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        if on_stop:
            on_stop()
        server.server_close()
        if isinstance(server.server_address, str):
            with contextlib.suppress(OSError):
                os.unlink(server.server_address)


CHANNEL = struct.Struct("!BI")

STDIN, STDOUT, STDERR, STDIN_EOF, RESIZE, EXIT = range(6)

MAX_CHUNK = 64 * 1024

MAX_STDIN_BACKLOG = 256 * 1024  # past this the starter stops reading the client, who then waits

WINSIZE = struct.Struct("!HH")  # rows, columns


def send_frame(sock, kind, payload=b""):
    sock.sendall(CHANNEL.pack(kind, len(payload)) + payload)


def recv_frame(sock):
    """(kind, payload), or (None, b"") when the peer closed between frames."""
    first = sock.recv(1)
    if not first:
        return None, b""
    kind, size = CHANNEL.unpack(first + _recv_exactly(sock, CHANNEL.size - 1))
    if kind > EXIT or size > MAX_CHUNK:
        raise ProtocolError("a malformed channel frame")
    return kind, _recv_exactly(sock, size) if size else b""


def readable(sock, others, timeout=None):
    """wait_for() that knows TLS may hold decrypted bytes the socket does not show."""
    if getattr(sock, "pending", lambda: 0)():
        return [sock] + wait_for(others, timeout=0)[0]
    return wait_for([sock] + others, timeout=timeout)[0]


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def copy_until_end(source, target):
    """Copy descriptor `source` to `target` until its end, then close `source`."""
    with contextlib.suppress(OSError):
        for data in iter(lambda: os.read(source, 65536), b""):
            write_all(target, data)
    os.close(source)


# ---------------------------------------------------------------------------
# Jobs, users, files and processes: job ids, users and their privileges,
# files made safely (never through another user's link), process families
# and how a job ends, terminals.
# ---------------------------------------------------------------------------

JOB_ID = re.compile(r"(\d{1,9})(?:\.(\d{1,9}))?(?:\.(\d{1,9}))?")

SLURM_JOB_ID = re.compile(r"(\d{1,10}(?:_\d{1,10})?)(?:\.(\d{1,9})(?:\.([A-Za-z0-9][A-Za-z0-9_-]*))?)?")


def allocation_profile(cmd):
    """The profile of a pool job that is an allocation (sshjob new), else None."""
    return allocation_args(cmd)[0]


def image_to_come(pids):
    """Whether one of `pids` is an allocation's holder whose profile names an
    image (sshjob new): its container is the job's payload, once it is up."""
    return any(len(argv) >= 8 and allocation_args(argv)[0] for argv in map(process_argv, pids))


def holder_runs(pids):
    """Whether one of `pids` is an allocation's holder, as Python: before
    that, a batch script's first process is `env` or a shim on its way there."""
    return any(allocation_args(argv)[0] for argv in map(process_argv, pids))


def allocation_args(cmd):
    """(profile, idle) of a pool job whose command is `sshjob allocation`, else (None, None)."""
    at = cmd.index("allocation") if "allocation" in cmd[1:3] else -1
    return (cmd[at + 1], cmd[at + 2]) if at > 0 and len(cmd) >= at + 3 else (None, None)


def parse_job_id(text):
    """(cluster, proc, node) from "cluster", "cluster.proc" or "cluster.proc.node";
    node is None when not given."""
    match = JOB_ID.fullmatch(text)
    if not match:
        raise UsageError(
            "malformed job id %r: expected cluster, cluster.proc or cluster.proc.node" % text
        )
    cluster, proc, node = match.groups()
    return int(cluster), int(proc or 0), None if node is None else int(node)


def job_name(cluster, proc):
    return "%d.%d" % (cluster, proc)


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid%d" % uid


def privileges_of(user):
    """A preexec_fn that turns a child of a root starter into `user`;
    None when the starter runs as an ordinary user (it is the user).  The
    user's groups are looked up here, not in the child: NSS there would
    load its modules anew at every session, and may take locks that
    another thread of the starter held when it forked."""
    if os.geteuid() != 0:
        return None
    record = pwd.getpwnam(user)
    groups = os.getgrouplist(record.pw_name, record.pw_gid)

    def become_user():
        os.setgroups(groups)
        os.setgid(record.pw_gid)
        os.setuid(record.pw_uid)

    return become_user


def child_setup(*steps):
    """One preexec_fn from several steps (None ones skipped)."""
    steps = [step for step in steps if step]

    def setup():
        for step in steps:
            step()

    return setup if steps else None


CLONE_NEWNS, CLONE_NEWUSER, MS_BIND, MS_REC, MS_SLAVE = 0x20000, 0x10000000, 0x1000, 0x4000, 0x80000


def private_terminals():
    """A preexec step for a root starter: the new process gets a mount
    namespace and a devpts instance of its own that gives terminals to the
    tty group, so that an sshd running as an ordinary user can allocate a
    PTY on a node whose /dev/pts was mounted without gid=5 (as in many
    containers).  Prepared here: a child of a threaded parent must not
    import."""
    import ctypes  # a root starter's only use of it, and only on such nodes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
    options = b"newinstance,gid=%d,mode=620,ptmxmode=666" % grp.getgrnam("tty").gr_gid
    calls = ((libc.unshare, CLONE_NEWNS), (libc.mount, b"none", b"/", None, MS_REC | MS_SLAVE, None),
             (libc.mount, b"devpts", b"/dev/pts", b"devpts", 0, options),
             (libc.mount, b"/dev/pts/ptmx", b"/dev/ptmx", None, MS_BIND, None))

    def enter():
        for call, *args in calls:
            if call(*args) != 0:
                raise OSError(ctypes.get_errno(), "cannot make private terminals")

    return enter


def tty_group_namespace(uid, gid, tty):
    """A preexec step for the sshd of ordinary user `uid` where /dev/pts
    lacks the tty group and a root starter's private terminals are not to
    be had: a user namespace in which the user's own group `gid` is the tty
    group (`tty`), so that sshd's chown of a new PTY to the tty group is a
    chown to the group the PTY has already.  Its processes see their group
    as tty; on disk it stays theirs.  Prepared here: a child of a threaded
    parent must not import."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    maps = (("/proc/self/setgroups", b"deny"), ("/proc/self/uid_map", b"%d %d 1" % (uid, uid)),
            ("/proc/self/gid_map", b"%d %d 1" % (tty, gid)))

    def enter():
        if libc.unshare(CLONE_NEWUSER) != 0:
            raise OSError(ctypes.get_errno(), "cannot make a user namespace")
        for path, text in maps:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, text)
            finally:
                os.close(fd)

    return enter


def children_of(pid):
    """The pids of `pid`'s children, as /proc tells them."""
    found = []
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/%d/task" % pid):
            with contextlib.suppress(OSError), open("/proc/%d/task/%s/children" % (pid, task)) as f:
                found += [int(child) for child in f.read().split()]
    return found


def descendants(pid):
    """The pids of `pid`'s children, theirs, and so on."""
    found, below = [], children_of(pid)
    while below:
        child = below.pop()
        found.append(child)
        below += children_of(child)
    return found


def serves_a_channel(pid):
    """Whether the sshd whose pid is `pid` serves a channel: a process of a
    session's own (a shell, a command, sftp-server) runs below it, under
    its own name; sshd's own helpers are all named sshd."""
    for child in descendants(pid):
        with contextlib.suppress(OSError), open("/proc/%d/comm" % child) as f:
            if f.read().strip() != "sshd":
                return True
    return False


def process_state(pid, started=None):
    """The state letter of process `pid` (R, S, T, Z...), if it is still the
    one that started at `started` (clock ticks after boot, as /proc says),
    where that is given; else None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0] if started is None or fields[19] == started else None


def process_alive(pid):
    """True while `pid` runs: a zombie counts as gone (and is reaped if it
    is our child; others' wait for whoever reaps them, which may be slow)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return process_state(pid) not in (None, "Z", "X")


def process_stat(pid):
    """(parent pid, start time in clock ticks after boot, program name) of
    process `pid`; None if it is gone or closed to us."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            text = f.read()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return int(fields[1]), fields[19], text[text.find("(") + 1:text.rfind(")")]


def process_environment(pid):
    """The environment that process `pid` started with; OSError if closed to us."""
    with open("/proc/%d/environ" % pid, "rb") as f:
        pairs = [item.partition(b"=") for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def process_argv(pid):
    """The command line of process `pid`, [] if it is gone or closed to us."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return [word.decode(errors="replace") for word in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


def process_age(started):
    """Seconds since a process started at `started` (clock ticks after boot)."""
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - int(started) / os.sysconf("SC_CLK_TCK")


def exit_status(returncode):
    """A Popen return code as a shell reports it: 128+N for death by signal N."""
    return returncode if returncode >= 0 else 128 - returncode


PR_SET_DUMPABLE = 4  # prctl(2): a process that changed its uid is not its owner's to ptrace, or to map ids of

PR_SET_CHILD_SUBREAPER = 36  # prctl(2): what its descendants leave running when their parent exits comes to it


def prctl(option, value):
    """Whether prctl(2) `option` took `value` for this process."""
    import ctypes
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def self_command():
    """How to run this module again, for the daemons and a pool job's
    agent: imported by path (a cached import starts faster than a script,
    which is compiled anew each time, or a zipapp's bootstrap), and
    isolated from the user's Python settings, since it needs only the
    standard library."""
    here = os.path.abspath(__file__)
    if not os.path.isfile(here):
        return [sys.executable, os.path.abspath(sys.argv[0])]
    module = os.path.splitext(os.path.basename(here))[0]
    launcher = "import sys; sys.path.insert(0, %r); import %s; sys.exit(%s.main())" % (
        os.path.dirname(here), module, module)
    return [sys.executable, "-I", "-S", "-c", launcher]


def tagged_pids(tag):
    """(pid, in_session) of the processes whose environment carries the
    job's tag: the way to find a job's processes that double-forked or
    setsid'd away."""
    needle = ("%s=%s" % (TAG_VAR, tag)).encode()
    session = (SESSION_VAR + "=").encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/environ" % entry, "rb") as f:
                variables = f.read().split(b"\0")
        except OSError:
            continue
        if needle in variables:
            found.append((int(entry), any(v.startswith(session) for v in variables)))
    return found


def signal_pids(pids, signum):
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def cgroup_base(name, directory):
    """A cgroup v2 directory for the jobs of the starter with this name and
    directory (several may share a host), under the starter's own cgroup;
    None where it may not make one (no cgroup v2, not root, not delegated)
    or the kernel lacks cgroup.freeze and cgroup.kill."""
    import hashlib
    try:
        with open("/proc/self/mounts") as f:
            mount = next((line.split()[1] for line in f if line.split()[2:3] == ["cgroup2"]), None)
        with open("/proc/self/cgroup") as f:
            own = next((line[3:].strip() for line in f if line.startswith("0::")), "/")
        if mount is None:
            return None
        unique = "%s-%s" % (re.sub(r"[^\w.-]", "_", name), hashlib.sha256(directory.encode()).hexdigest()[:8])
        base = os.path.join(mount, own.lstrip("/"), "sshjob-" + unique)
        os.makedirs(base, exist_ok=True)
        if all(os.path.exists(os.path.join(base, f)) for f in ("cgroup.freeze", "cgroup.kill")):
            return base
        os.rmdir(base)
    except OSError:
        pass
    return None


def end_families(families):
    """How every job ends: SIGTERM, a grace of KILL_GRACE, then SIGKILL."""
    for family in families:
        family.signal(signal.SIGCONT)
        family.signal(signal.SIGTERM)
    deadline = time.time() + KILL_GRACE
    while time.time() < deadline and any(family.pids() for family in families):
        time.sleep(0.05)
    for family in families:
        family.kill()


def job_families(starter_dir, cgroup_base):
    """(directory, process family) of each job a starter's directory holds,
    found from the files alone: for a starter that died, or hangs."""
    for entry in os.scandir(starter_dir):
        if entry.name.startswith("."):  # the starter's own, such as its TLS certificate
            continue
        try:
            with open(os.path.join(entry.path, "tag")) as f:
                yield entry.path, ProcessFamily(cgroup_base, "job-" + entry.name, f.read(), adopt=True)
        except OSError:
            yield entry.path, None


def keep_lease(starter_dir, cgroup_base, starter_pid):
    """The lease's last guard, in a process of its own, so that it holds when
    the starter hangs (SIGSTOP) or dies (SIGKILL): once the lease that the
    starter renews at each poll (the file .lease: expiry, starter's pid) has
    run out, end the jobs; the schedd runs them elsewhere only LEASE_MARGIN
    later.  Returns once a new starter keeps the lease, or the jobs of a
    dead starter have ended."""
    path = os.path.join(starter_dir, ".lease")
    ended = None
    while True:
        time.sleep(1.0)
        try:
            with open(path) as f:
                expiry, writer = f.read().split()
            expiry, writer = float(expiry), int(writer)
        except (OSError, ValueError):
            continue
        starter_gone = os.getppid() != starter_pid
        if starter_gone and writer != starter_pid:
            return
        if time.time() > expiry and ended != expiry:
            ended = expiry
            found = [(path, family) for path, family in job_families(starter_dir, cgroup_base)
                     if family and family.pids()]
            if found:
                log.error("the starter has not renewed its lease with the schedd in time: ending %d job(s), "
                          "which the schedd will run again", len(found))
                for path, _ in found:  # the starter, which sees them exit, tells the schedd so
                    with contextlib.suppress(OSError):
                        write_file(os.path.join(path, LEASE_ENDED), "")
                end_families([family for _, family in found])
            if starter_gone:
                return


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


class ProcessFamily:
    """The processes of one job and of its sessions, however they fork.

    With cgroup v2 (a root starter, or a delegated subtree): a cgroup for the
    job with a child for the job's own processes ("main") and one that all
    its sessions share ("sessions": a process's first entry into a new
    cgroup can take milliseconds, which each session would pay); nothing
    leaves it, and cgroup.kill ends it at once.  Without: the
    environment tag that every process of the job inherits, found in /proc
    (HTCondor's own fallback), plus the process groups of the job and of
    each session."""

    def __init__(self, base, name, tag, adopt=False):
        self.tag = tag
        self.cgroup = os.path.join(base, name) if base else None
        if self.cgroup and not adopt:
            os.mkdir(self.cgroup)
        self.leaders = []  # Popen objects of the group leaders: the job's first process, each session's
        self.companions = []  # (pid, start time) of processes outside it that go with it: its containers'

    def enter(self, part):
        """A step for preexec_fn that puts the new process in the family
        (taken before the process gives up root)."""
        if not self.cgroup:
            return None
        path = os.path.join(self.cgroup, part)
        os.makedirs(path, exist_ok=True)
        procs = os.path.join(path, "cgroup.procs")
        return lambda: write_file(procs, "0")

    def pids(self, part=None):
        """The family's pids; with part "main", the job's own only."""
        if not self.cgroup:
            return sorted(pid for pid, in_session in tagged_pids(self.tag) if part is None or not in_session)
        try:
            parts = [part] if part else [e.name for e in os.scandir(self.cgroup) if e.is_dir()]
        except FileNotFoundError:  # removed: the family has ended
            return []
        pids = []
        for name in parts:
            with contextlib.suppress(OSError), open(os.path.join(self.cgroup, name, "cgroup.procs")) as f:  # or gone
                pids += [int(line) for line in f]
        return sorted(pids)

    def signal(self, signum):
        signal_pids(self.pids() + self.live_companions(), signum)
        if not self.cgroup:
            for leader in list(self.leaders):
                if leader.poll() is not None:  # reaped: its pid may be someone else's by now
                    self.leaders.remove(leader)
                    continue
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(leader.pid, signum)

    def live_companions(self):
        """The companions that are still the processes they were (their pids may be others' by now)."""
        return [pid for pid, started in self.companions if process_state(pid, started) is not None]

    def suspend(self):
        """Stop every process, as HTCondor suspends a job (state T); with a
        cgroup, frozen meanwhile, so that none forks past the signal."""
        if self.cgroup:
            write_file(os.path.join(self.cgroup, "cgroup.freeze"), "1")
        self.signal(signal.SIGSTOP)
        if self.cgroup:
            write_file(os.path.join(self.cgroup, "cgroup.freeze"), "0")

    def kill(self):
        signal_pids(self.live_companions(), signal.SIGKILL)
        if self.cgroup:
            try:
                write_file(os.path.join(self.cgroup, "cgroup.kill"), "1")
                return
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENODEV):  # removed, or being removed: nothing is left
                    return
                log.debug("cgroup.kill of %s: %s; signalling its processes instead", self.cgroup, describe(e))
        self.signal(signal.SIGKILL)

    def remove(self):
        """Kill what is left and remove the cgroup."""
        self.kill()
        if not self.cgroup:
            return
        deadline = time.time() + KILL_GRACE
        while self.pids() and time.time() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.cgroup):
                if entry.is_dir():
                    os.rmdir(entry.path)
            os.rmdir(self.cgroup)


def open_log(path, mode="a"):
    """A log file to append to, readable by its owner only: logs hold users'
    commands and errors."""
    return open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600), mode)


def write_atomically(path, text, mode=0o600):
    """Replace a file of the daemon's own in one step."""
    import tempfile
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_private(path, text, owner=None):
    """Create a new file, mode 0600, never through a symlink; given to
    `owner` (uid, gid) by its descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        if owner:
            os.fchown(fd, *owner)
        f.write(text)


def check_trusted(path, kind):
    """Refuse a file or directory that another user could have written or
    swapped: a pool's configuration names the programs that its users and
    its daemons run, as root too.  See walk_trusted."""
    os.close(walk_trusted(path, kind))


def open_trusted(path):
    """A file that only the caller or root may have written (see
    walk_trusted), open for reading, by the descriptor the walk checked."""
    return os.fdopen(walk_trusted(path, "file"), errors="replace")


def walk_trusted(path, kind):
    """A descriptor of `path` ("file" or "directory") if it, its directory
    and every directory above belong to the caller or root and are
    writable by no one else; directories above its own may be sticky, as
    /tmp is, where others cannot move what is ours.  The walk goes down
    from / by directory descriptors, never following a link, so nothing
    can be swapped in between a check and the use.  Else ConfigError."""
    real = os.path.realpath(path)
    parts = [part for part in real.split("/") if part]
    uid = os.geteuid()
    own_level = len(parts) - (2 if kind == "file" else 1)  # the depth of the directory that holds it, or of it
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if not last or kind == "directory" else 0)
            try:
                inner = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if last and e.errno == errno.ENOENT:
                    raise
                raise ConfigError("cannot use %s (%s)" % (path, e.strerror)) from None
            os.close(fd)
            fd = inner
            info = os.fstat(fd)
            loose = info.st_mode & 0o022 and not (depth < own_level and info.st_mode & stat.S_ISVTX)
            if info.st_uid not in (0, uid) or loose or (last and kind == "file" and not stat.S_ISREG(info.st_mode)):
                who = "root" if uid == 0 else "%s or root" % user_name(uid)
                what = "/" + "/".join(parts[:depth + 1])
                raise ConfigError("%s is not a %s that only %s may change%s: make a new one, or fix its owner "
                                  "and mode" % (path, kind, who, "" if what == real else " (%s is not)" % what))
        return fd
    except BaseException:
        os.close(fd)
        raise


def own_directory(path, mode):
    """Make a directory of ours, or check that the one there is ours alone."""
    with contextlib.suppress(FileExistsError):
        os.makedirs(path, mode=mode)
    check_trusted(path, "directory")


def set_window_size(fd, rows, columns):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def window_size(fd):
    rows, columns = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))[:2]
    return rows or 24, columns or 80


# ---------------------------------------------------------------------------
# Security: public keys, tickets, tokens, TLS.  A ticket is a set of claims
# with an HMAC-SHA256 over their canonical JSON, keyed with the job's own
# secret, which only the schedd and the job's starter know.  A token names
# a user or a starter to a schedd on another host; TLS certificates are
# pinned by fingerprint, learnt over an authenticated channel.
# ---------------------------------------------------------------------------

KEY_TYPES = frozenset(
    (
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    )
)


def parse_public_key(text):
    """Return "TYPE BASE64" of an OpenSSH public key, comment dropped.

    Strict, because the key is written into an authorized_keys file: one
    line, a known type, base64 that decodes to a blob naming the same type."""
    fields = text.split() if isinstance(text, str) else []
    try:
        blob = base64.b64decode(fields[1], validate=True)
        (size,) = struct.unpack("!I", blob[:4])
        valid = fields[0] in KEY_TYPES and blob[4 : 4 + size] == fields[0].encode()
    except (IndexError, ValueError, struct.error):
        valid = False
    if not valid or "\n" in text.strip():
        raise TicketInvalid("the public key is not an OpenSSH public key")
    return fields[0] + " " + fields[1]


def start_keygen(keygen, path, comment, options=()):
    """ssh-keygen making a key pair without a passphrase at `path`, an
    ed25519 one unless `options` name another type; it runs while the
    caller goes on, until finish_keygen."""
    argv = [keygen, "-q", "-N", "", "-C", comment, "-f", path] + list(options)
    if "-t" not in options:
        argv[1:1] = ["-t", "ed25519"]
    log.debug("making a key: %s", " ".join(shlex.quote(a) for a in argv))
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True)


def finish_keygen(making):
    """None once ssh-keygen has made the key; else what went wrong."""
    said = making.communicate()[0].strip()
    return None if making.returncode == 0 else said or "ssh-keygen exited with status %d" % making.returncode


def key_fingerprint(key):
    """The SHA256 fingerprint of a public key, as `ssh-keygen -l` prints it."""
    import hashlib
    digest = hashlib.sha256(base64.b64decode(key.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _ticket_mac(secret, claims):
    import hashlib
    import hmac
    body = json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(bytes.fromhex(secret), body, hashlib.sha256).hexdigest()


def make_ticket(secret, claims, lifetime):
    claims = dict(claims, expires=time.time() + lifetime, nonce=token_hex(16))
    return {"claims": claims, "mac": _ticket_mac(secret, claims)}


def holder_hash(holder):
    """What a ticket for the built-in transport names: the hash of a secret
    that only the client knows, and shows to the starter inside TLS."""
    import hashlib
    return hashlib.sha256(holder.encode()).hexdigest()


def require_modern_tls(context):
    """TLS 1.2 or newer."""
    import ssl  # here and below: only the roles that speak TLS pay for loading it

    if hasattr(ssl, "TLSVersion"):
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # novermin
    else:
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1


def server_tls_context(cert, key):
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    require_modern_tls(context)
    context.load_cert_chain(cert, key)
    return context


def pinned_tls_connection(sock, fingerprint, what):
    """TLS over `sock` to a peer whose certificate has this SHA-256
    fingerprint; the fingerprint came over an authenticated channel, so it
    stands in for a CA."""
    import hashlib
    import hmac
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # checked below, against the pinned fingerprint
    require_modern_tls(context)
    try:
        tls = context.wrap_socket(sock)
    except OSError as e:  # ssl.SSLError included
        raise Unreachable("no TLS with %s (%s)" % (what, e)) from None
    if not hmac.compare_digest(hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest(), fingerprint):
        tls.close()
        raise Refused("the TLS certificate of %s does not match its pinned fingerprint" % what)
    return tls


def is_tls(sock):
    return hasattr(sock, "cipher")  # an ssl.SSLSocket, without importing ssl where none is


def without_tls(sock):
    """The plain connection under a TLS one, for what is authenticated end to end."""
    return sock.unwrap() if is_tls(sock) else sock


def make_certificate(directory, openssl):
    """A self-signed TLS certificate for a daemon, made once with the openssl
    program that `openssl()` finds; returns (cert, key, SHA-256 fingerprint)."""
    import hashlib
    import ssl

    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    own_directory(directory, 0o700)  # it holds the pool's signing key too
    if not os.path.exists(cert):
        subprocess.run([openssl(), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "3650", "-subj", "/CN=sshjob", "-keyout", key, "-out", cert],
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.chmod(key, 0o600)
    with open(cert) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    return cert, key, hashlib.sha256(der).hexdigest()


def b64url(data):
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def from_b64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Tokens:
    """Identity tokens, as HTCondor's IDTOKENS: who (`sub`: a user, or the
    one starter it speaks for), for what (`scope`: "user" or "starter"),
    until when; HMAC-SHA256 with the pool's signing key, which only the
    schedd's host holds.  A starter's token may also name the one user whose
    jobs that starter may run (`user`).  Revoking a subject refuses every
    token of it issued until then."""

    def __init__(self, key_path, revoked_path=None):
        self.revoked_path = revoked_path
        try:
            with open(key_path, "rb") as f:
                self.key = f.read()
        except FileNotFoundError:
            self.key = None

    def create(self, subject, scope, lifetime, user=None):
        import hashlib
        import hmac
        if not self.key:
            raise ConfigError("this pool has no signing key: run sshjob init first")
        now = time.time()
        claims = {"sub": subject, "scope": scope, "iat": now, "exp": int(now) + int(lifetime),
                  "jti": token_hex(8)}
        if user:
            claims["user"] = user
        body = b64url(json.dumps(claims, sort_keys=True).encode())
        return body + "." + b64url(hmac.new(self.key, body.encode(), hashlib.sha256).digest())

    def verify(self, token):
        """The token's claims, or Refused saying why."""
        import hashlib
        import hmac
        if not self.key:
            raise Refused("this schedd takes no tokens: its pool has no signing key")
        body, _, mac = token.partition(".")
        expected = b64url(hmac.new(self.key, body.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(mac.encode(), expected.encode()):
            raise Refused("the token is not signed by this pool")
        try:
            claims = json.loads(from_b64url(body).decode())
        except (ValueError, UnicodeDecodeError):
            raise Refused("the token is malformed") from None
        if not isinstance(claims, dict) or claims.get("scope") not in ("user", "starter") or \
                not isinstance(claims.get("sub"), str) or not isinstance(claims.get("exp"), int) or \
                not isinstance(claims.get("iat"), (int, float)) or not isinstance(claims.get("user", ""), str):
            raise Refused("the token is malformed")
        self.check_current(claims)
        return claims

    def check_current(self, claims):
        """Refused if the token has expired or its subject was revoked since."""
        if claims["exp"] < time.time():
            raise Refused("the token of %s has expired: ask the pool's admin for a new one" % claims["sub"])
        if claims["iat"] <= self.revoked().get(claims["sub"], -1):
            raise Refused("the token of %s was revoked: ask the pool's admin for a new one" % claims["sub"])

    def revoked(self):
        """{subject: time}: tokens of that subject issued until then are void."""
        try:
            with open(self.revoked_path or "") as f:
                lines = [line.split() for line in f]
        except OSError:
            return {}
        found = {}
        for fields in lines:
            with contextlib.suppress(ValueError, IndexError):
                found[fields[0]] = max(float(fields[1]), found.get(fields[0], -1))
        return found

    def revoke(self, subject):
        fd = os.open(self.revoked_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write("%s %.6f\n" % (subject, time.time()))


class TicketBook:
    """Verifies tickets and remembers the nonces of used ones until they expire."""

    def __init__(self):
        self._used = {}
        self._lock = threading.Lock()

    def redeem(self, secret, ticket, run, key=None, holder=None):
        """Return the ticket's claims, or raise TicketInvalid saying why.

        The ticket must be presented with the public key it was issued for
        (`key`, for sshd), or with the secret whose hash it names (`holder`,
        for the built-in transport)."""
        import hmac
        claims = ticket.get("claims") if isinstance(ticket, dict) else None
        mac = ticket.get("mac") if isinstance(ticket, dict) else None
        if not isinstance(claims, dict) or not isinstance(mac, str):
            raise TicketInvalid("the ticket is malformed")
        if not hmac.compare_digest(mac, _ticket_mac(secret, claims)):
            raise TicketInvalid("the ticket's signature is not valid")
        if claims.get("run") != run:
            raise TicketInvalid("the ticket is for another job or node")
        if key is not None and claims.get("key") != key_fingerprint(key):
            raise TicketInvalid("the ticket was issued for another key")
        if key is None and (holder is None or claims.get("holder") != holder_hash(holder)):
            raise TicketInvalid("the ticket was issued to another holder")
        now = time.time()
        expires = claims.get("expires")
        if not isinstance(expires, (int, float)) or expires < now:
            raise TicketInvalid("the ticket has expired")
        with self._lock:
            self._used = {n: t for n, t in self._used.items() if t >= now}
            if claims.get("nonce") in self._used:
                raise TicketInvalid("the ticket was already used")
            self._used[claims.get("nonce")] = expires
        return claims


# ---------------------------------------------------------------------------
# Configuration: one INI file, section [sshjob]; every key can be overridden
# by the environment variable SSHJOB_<KEY>.  Defaults may refer to the pool
# directory (the configuration file's own directory unless set).
# ---------------------------------------------------------------------------

DEFAULTS = {
    "pool_dir": "",
    "schedd_name": "{host}",
    "schedd_address": "{pool_dir}/schedd.sock",
    "schedd_db": "{pool_dir}/queue.db",
    "schedd_tls_address": "",
    "schedd_fingerprint": "",
    "signing_key": "{pool_dir}/private/signing.key",
    "revoked_tokens": "{pool_dir}/private/revoked_tokens",
    "token_file": "",
    "schedd_enable_ssh_to_job": "true",
    "queue_super_users": "root",
    "audit_log": "{pool_dir}/audit.log",
    "ticket_lifetime": "60",
    "job_lease": "1200",
    "requeue_lost_jobs": "true",
    "max_jobs_per_user": "50000",
    "starter_name": "starter@{host}",
    "starter_address": "127.0.0.1:0",
    "starter_dir": "{pool_dir}/execute",
    "starter_slots": "0",
    "enable_ssh_to_job": "true",
    "starter_reachable": "true",
    "use_cgroups": "true",
    "ssh": "ssh",
    "sshd": "sshd",
    "ssh_keygen": "ssh-keygen",
    "openssl": "openssl",
    "podman": "podman",
    "sftp_server": "",
    "sshd_config_template": "",
    "ssh_options": "",
    "scheduler": "",
    "remote_python": "python3",
    "ship_program": "true",
    "slurm_direct": "true",
    "allow_agent_forwarding": "false",
    "warm_idle": "10m",
}


class Config:
    """Settings of one pool, as every role reads them."""

    def __init__(self, path=None):
        import configparser
        self.path = os.path.abspath(path) if path else None
        self._file = configparser.ConfigParser(interpolation=None)
        if path:
            try:
                with open_trusted(self.path) as f:  # it names programs that run as the caller, root too
                    self._file.read_file(f)
            except OSError as e:
                raise ConfigError("cannot read the configuration %s (%s)" % (path, e.strerror)) from None
            except configparser.Error as e:
                where = " at line %d" % e.lineno if getattr(e, "lineno", None) else ""
                raise ConfigError("the configuration %s is malformed%s: %s" % (
                    path, where, e.message.splitlines()[0].rstrip("."))) from None

    def __getitem__(self, key):
        value = os.environ.get("SSHJOB_" + key.upper())
        if value is None:
            value = self._file.get("sshjob", key, fallback=None)
        if value is None:
            pool_dir = self["pool_dir"] if key != "pool_dir" else ""
            if key != "pool_dir" or not self.path:
                value = DEFAULTS[key].format(pool_dir=pool_dir, host=socket.gethostname())
            else:
                value = os.path.dirname(self.path)
        return value

    def flag(self, key):
        value = self[key].strip().lower()
        if value not in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            raise ConfigError("setting %s = %r is not true or false" % (key, value))
        return value in ("true", "yes", "1", "on")

    def seconds(self, key):
        """A setting that is a duration (90s, 10m, 4h, a bare number of seconds), in seconds; 0 where empty."""
        seconds = duration(self[key] or "0")
        if seconds is None:
            raise ConfigError("setting %s = %r is not a duration: e.g. 90s, 10m, 4h, or 0" % (key, self[key]))
        return seconds

    def number(self, key):
        try:
            return float(self[key])
        except ValueError:
            raise ConfigError("setting %s = %r is not a number" % (key, self[key])) from None

    def names(self, key):
        return [name.strip() for name in self[key].split(",") if name.strip()]

    def profile_options(self, name):
        """The settings of profile `name` ([profile NAME]), or None."""
        section = "profile " + name
        return dict(self._file.items(section)) if self._file.has_section(section) else None

    def profile_names(self):
        return sorted(section[len("profile "):] for section in self._file.sections() if section.startswith("profile "))

    def schedd(self, name=None):
        """How to reach the schedd called `name` (default: the pool's own)."""
        if name is None or name == self["schedd_name"]:
            return Link(self["schedd_address"], "the schedd", self["schedd_fingerprint"], self["token_file"])
        section = "schedd " + name
        if self._file.has_option(section, "address"):
            return Link(self._file.get(section, "address"), "schedd " + name,
                        self._file.get(section, "fingerprint", fallback=""), self["token_file"])
        raise NotFound("there is no schedd named %r in this pool" % name)


class Link:
    """How to reach a schedd: a Unix socket (peer credentials say who we
    are), or host:port over TLS with its certificate pinned and a token."""

    def __init__(self, address, what, fingerprint="", token_file=""):
        self.address = address
        self.what = what
        self.tcp = parse_address(address)[0] == "tcp"
        self.fingerprint = fingerprint.replace(":", "").lower()
        self.token_file = token_file
        if self.tcp and not (self.fingerprint and token_file):
            raise ConfigError("to reach %s at %s over TCP, set schedd_fingerprint and token_file" % (what, address))

    def call(self, request, timeout=IO_TIMEOUT):
        sock, reply = self.stream(request, timeout, keep=False)
        sock.close()
        return reply

    def stream(self, request, timeout=IO_TIMEOUT, keep=True):
        """Send one request; return (connection, reply).  A connection kept
        for what follows (a relayed session, authenticated end to end) is
        unwrapped from its TLS by both ends."""
        if not self.tcp:
            sock = connect(self.address, self.what, timeout)
        else:
            try:
                with open(self.token_file) as f:
                    request = dict(request, token=f.read().strip())
            except OSError as e:
                raise ConfigError("cannot read the token %s (%s)" % (self.token_file, e.strerror)) from None
            sock = pinned_tls_connection(connect(self.address, self.what, timeout), self.fingerprint, self.what)
        try:
            send_msg(sock, request)
            reply = raise_for_reply(recv_msg(sock, "%s at %s" % (self.what, self.address)))
            if self.tcp and keep:
                sock = sock.unwrap()
        except OSError as e:
            sock.close()
            raise Unreachable("%s at %s did not answer (%s)" % (self.what, self.address, e)) from None
        except SshjobError:
            sock.close()
            raise
        return sock, reply


def find_config_path(explicit=None):
    path = explicit or os.environ.get("SSHJOB_CONFIG") or DEFAULT_CONFIG
    if os.path.isdir(path):
        path = os.path.join(path, "sshjob.conf")
    if not os.path.exists(path):
        if explicit or os.environ.get("SSHJOB_CONFIG"):
            raise ConfigError("the configuration %s does not exist: check SSHJOB_CONFIG or --config" % path)
        raise ConfigError(
            "no sshjob pool is configured: set SSHJOB_CONFIG to a pool's sshjob.conf "
            "(`sshjob pool start --dir DIR` makes one)"
        )
    return path


def write_pool_config(pool_dir, extra=None):
    """Create a pool directory with a configuration file, unless it has one;
    one that exists must be ours (see check_trusted)."""
    pool_dir = os.path.abspath(pool_dir)
    own_directory(pool_dir, 0o755)
    path = os.path.join(pool_dir, "sshjob.conf")
    lines = ["# sshjob pool configuration; its keys and defaults: README.md, section Configuration", "[sshjob]"]
    lines += ["%s = %s" % item for item in sorted((extra or {}).items())]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        check_trusted(path, "file")
        return path
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def find_program(config, key, where="this node"):
    """The path of an external program, or MissingProgram naming its package."""
    name = config[key]
    found = shutil.which(name, path=os.environ.get("PATH", os.defpath) + ":" + SBIN_PATH)
    if not found:
        raise MissingProgram("%s was not found on %s: %s, or set %s in the configuration" % (
            name, where, how_to_install(name), key))
    return found


def how_to_install(program):
    """What to do about a program that is not there, as a user reads it."""
    package = PACKAGES.get(os.path.basename(program))
    return "install the %s package" % package if package else "check its name, or install it"


def find_sftp_server(config):
    if config["sftp_server"]:
        return config["sftp_server"]
    return next((path for path in SFTP_SERVERS if os.access(path, os.X_OK)), "/bin/false")


DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")


def duration(text, bare=1):
    """Seconds in "90s", "20m", "4h", "1d", or a bare number of `bare`
    seconds; None if `text` is none of these."""
    match = DURATION.fullmatch(text.strip().lower())
    if not match:
        return None
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "": bare}[match.group(2)]


def describe_duration(seconds):
    return "%d min" % round(seconds / 60.0) if seconds >= 120 else "%d s" % seconds


def sshjob_home():
    """The user's private sshjob directory: the persistent key and known_hosts
    of jobs as ssh hosts, the waiters of allocations, the records of jobs'
    agents and the client's ssh masters (the warm path)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    path = os.path.join(base, "sshjob")
    try:
        os.makedirs(path, 0o700, exist_ok=True)
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o700)
    except OSError as e:
        raise ConfigError("cannot make %s for the key and known hosts of jobs as ssh hosts (%s): set HOME, or "
                          "XDG_DATA_HOME, to a directory of yours" % (path, e.strerror)) from None
    return path


@contextlib.contextmanager
def locked(path):
    """An exclusive lock on `path` (made if missing): ssh may run several proxies at once, an editor several
    clients."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------------------
# Containers: where a job's payload runs.  A process of the job that lives
# in other namespaces than the node's, or under another root (Apptainer
# without privileges: a user namespace, a chroot), is a payload; so is a
# container that the job's `podman run` started, which podman's conmon
# double-forks out of the job: podman's own record, asked as the job's
# owner, links it to the job.  Every such link is the owner's word, so a
# session enters a payload with the owner's rights and nothing more
# (container_session), and the kernel's checks decide where it may go.
# ---------------------------------------------------------------------------

NAMESPACES = ("user", "mnt", "pid", "uts", "ipc", "net")  # those a session enters, in the order it tries them

CONTAINER_RUNTIMES = ("podman",)  # programs whose containers their own records name (podman inspect)

RUNTIME_HELPERS = ("conmon", "catatonit", "slirp4netns", "pasta", "fuse-overlayfs", "rootlessport")

PODMAN_VARIABLES = re.compile(r"XDG_\w+|CONTAINERS?_\w+|HOME|TMPDIR|PATH")  # where podman keeps its containers

PODMAN_WAIT = 10.0  # seconds podman has to list the job owner's containers

CONTAINER_START_WAIT = 30.0  # seconds a session waits for a job's `podman run` whose container is not up yet

LONG_LIVED = 1.0  # seconds a job's process must have lived for its environment to be taken as the job's

PAYLOAD_KINDS = {"podman": "a podman container", "user namespace": "an unprivileged user namespace",
                 "chroot": "a chroot", "namespaces": "namespaces of its own"}


class Payload(collections.namedtuple("Payload", "pid started runtime name control")):
    """Where a job's work runs: its process (the pid, and the start time
    that tells it from a later process with that pid), the runtime that
    made it (a key of PAYLOAD_KINDS), the name to choose it by (podman's
    name of the container, else the program's), and for a runtime that
    keeps records, (argv, environment) of the command that asks it
    things as the job's owner (podman and its global options)."""

    def __new__(cls, pid, started, runtime, name, control=None):
        return super().__new__(cls, pid, started, runtime, name, control)

    def describe(self):
        if self.runtime == "podman":
            return "podman container %s (pid %d)" % (self.name, self.pid)
        return "%s in %s (pid %d)" % (self.name, PAYLOAD_KINDS[self.runtime], self.pid)


def where_it_runs(pid):
    """The ids of the namespaces of process `pid` (NAMESPACES), then the
    path of its root; None if they are closed to us."""
    try:
        return tuple(os.readlink("/proc/%d/ns/%s" % (pid, ns)) for ns in NAMESPACES) + (
            os.readlink("/proc/%d/root" % pid),)
    except OSError:
        return None


def runtime_of(place, here):
    """What made a process run in `place` rather than `here` (where_it_runs)."""
    if place[0] != here[0]:
        return "user namespace"
    return "chroot" if place[:-1] == here[:-1] else "namespaces"


def find_payloads(config, pids, run_as):
    """(the payloads of a job whose processes are `pids`, oldest first; the
    pids of its `podman run` processes that have no container running).
    The payloads: the job's processes that run elsewhere than this one, and
    the containers of its `podman run` processes.  Of places that differ
    only in their root, the ones under another root: a shell that made a
    chroot and waits for it is not the payload.  `run_as()` is the preexec
    step that makes a child the job's owner."""
    here = where_it_runs(os.getpid())
    places, runs = {}, []
    for pid in pids:
        argv = process_argv(pid)
        program = os.path.basename(argv[0]) if argv else ""
        if program in CONTAINER_RUNTIMES:
            runs.append((pid, argv))
            continue
        place = where_it_runs(pid)
        if program not in RUNTIME_HELPERS and place is not None and place != here:
            places.setdefault(place, []).append(pid)
    payloads, orphans = podman_payloads(config, runs, run_as)
    known = [where_it_runs(payload.pid) for payload in payloads]  # where a container's processes are the job's too
    for place, members in places.items():
        if place in known or (place[-1] == "/" and any(o[:-1] == place[:-1] and o[-1] != "/" for o in places)):
            continue
        found = [(int(stat[1]), pid, stat) for pid, stat in ((pid, process_stat(pid)) for pid in members) if stat]
        if found:
            _, pid, (_, started, name) = min(found)
            payloads.append(Payload(pid, started, runtime_of(place, here), name))
    return sorted(payloads, key=lambda payload: int(payload.started)), orphans


def podman_payloads(config, runs, run_as):
    """(the containers that the job's `podman` processes, (pid, argv) each,
    started; the pids of those that have none running).  podman, asked as
    the job's owner with the environment and global options of each,
    lists the owner's running containers with the command line that made
    each: a container whose command line is a process's own is that
    process's (of two alike, the older process has the older container)."""
    if not runs:
        return [], []
    podman = find_program(config, "podman")
    listed = {}
    containers, orphans = [], []
    for pid, argv in sorted(runs, key=lambda run: int((process_stat(run[0]) or (0, "0"))[1])):
        subcommand = next((i for i, word in enumerate(argv) if word in ("run", "container")), None)
        if subcommand is None:
            continue  # not a podman run (podman ps, podman pull...)
        try:
            env = {k: v for k, v in process_environment(pid).items() if PODMAN_VARIABLES.fullmatch(k)}
        except OSError:
            continue
        control = ([podman] + argv[1:subcommand], env)
        key = json.dumps(control, sort_keys=True)
        if key not in listed:
            listed[key] = podman_containers(control, run_as)
        mine = next((c for c in listed[key] if c[2] == argv and c[0] not in [p.pid for p in containers]), None)
        stat = mine and process_stat(mine[0])
        if stat:
            containers.append(Payload(mine[0], stat[1], "podman", mine[1], control))
        else:
            orphans.append(pid)
    return containers, orphans


def ask_podman(control, run_as, words, what, timeout=PODMAN_WAIT, tolerate=None):
    """What podman says on stdout when run as the job's owner (`control`:
    see Payload) with `words`, to do `what`; ContainerError if it fails,
    unless each error it names contains `tolerate`."""
    argv, env = control
    try:
        done = subprocess.run(argv + list(words), env=env, cwd="/", stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                              timeout=timeout, preexec_fn=child_setup(run_as()))
    except subprocess.TimeoutExpired:
        raise ContainerError("podman did not %s within %.0f s" % (what, timeout)) from None
    except OSError as e:
        raise ContainerError("podman cannot run on this node (%s)" % describe(e)) from None
    errors = [line for line in done.stderr.splitlines() if "Error:" in line]
    if done.returncode and not (tolerate and errors and all(tolerate in line for line in errors)):
        said = done.stderr.strip().splitlines() or ["exit status %d" % done.returncode]
        raise ContainerError("podman cannot %s: %s" % (what, said[-1]))
    return done.stdout


def podman_containers(control, run_as):
    """(pid, name, the command line that made it) of each running container
    that podman (`control`: see Payload) lists for the job's owner.  The
    owner's podman is the owner's word: see find_payloads."""
    what = "list the job's containers"
    ids = ask_podman(control, run_as, ["ps", "--quiet", "--no-trunc"], what).split()
    if not ids:
        return []
    found = []
    shape = "[{{json .State.Pid}},{{json .Name}},{{json .Config.CreateCommand}}]"
    for line in ask_podman(control, run_as, ["inspect", "--type", "container", "--format", shape] + ids,
                           what, tolerate="no such container").splitlines():  # one gone since ps
        with contextlib.suppress(ValueError):
            pid, name, created = json.loads(line)
            if isinstance(pid, int) and pid > 0 and isinstance(name, str) and isinstance(created, list):
                found.append((pid, name, created))
    return found


def stop_containers(payloads, run_as, grace):
    """Stop the payloads that a runtime keeps records of, through the
    runtime (podman stop: SIGTERM, SIGKILL after `grace` seconds), so that
    it knows they ended and cleans up after them (--rm); killed behind its
    back, with its conmon, a container stays "running" in its records.
    Returns whether there were any."""
    stopped = False
    for payload in payloads:
        if payload.control:
            stopped = True
            try:
                ask_podman(payload.control, run_as, ["stop", "--ignore", "--time", "%d" % grace, payload.name],
                           "stop container %s" % payload.name, timeout=grace + PODMAN_WAIT)
            except ContainerError as e:
                log.warning("%s", e)
    return stopped


def choose_payload(payloads, choice, job):
    """The payload that `choice` names ("auto": the first, if any; "none":
    none; else a payload's pid or name)."""
    if choice == "none" or (choice == "auto" and not payloads):
        return None
    if choice == "auto":
        return payloads[0]
    chosen = next((p for p in payloads if choice in (str(p.pid), p.name)), None)
    if chosen is None:
        raise ContainerError("job %s has no container %s: %s" % (job, choice, "; ".join(
            p.describe() for p in payloads) or "its processes all run on the node itself"))
    return chosen


def payload_members(payload):
    """[(pid on the node, pid inside)] of the processes in the payload's pid
    namespace, the payload's first; where it shares ours, the payload alone."""
    try:
        namespace = os.readlink("/proc/%d/ns/pid" % payload.pid)
        if namespace == os.readlink("/proc/self/ns/pid"):
            return [(payload.pid, payload.pid)]
    except OSError:
        return []
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, StopIteration):
                if os.readlink("/proc/%s/ns/pid" % entry) == namespace:
                    members.append((int(entry), pid_inside(int(entry))))
    return sorted(members, key=lambda member: (member[0] != payload.pid, member[1]))


def pid_inside(pid):
    """Process `pid`'s number in its own pid namespace (the last of NSpid)."""
    with open("/proc/%d/status" % pid) as f:
        return int(next(line for line in f if line.startswith("NSpid:")).split()[-1])


def newest_long_lived(pids):
    """Of a job's processes on the node itself, the one that started last
    of those that have lived LONG_LIVED seconds: the program that the job's
    script started, with what the script exported, and in the directory it
    entered (a script's own /proc shows neither); None where none has."""
    here = where_it_runs(os.getpid())
    found = []
    for pid in pids:
        stat = process_stat(pid)
        if stat and process_age(stat[1]) >= LONG_LIVED and stat[2] not in RUNTIME_HELPERS + CONTAINER_RUNTIMES \
                and where_it_runs(pid) == here:
            found.append((int(stat[1]), pid, stat[2]))
    return max(found)[1:] if found else None


def container_session():
    """What a session inside a job's container runs, as the job's owner, as
    `python3 -I -S -c SOURCE SPEC [COMMAND]` (the command else from
    SSH_ORIGINAL_COMMAND, as sshd hands it to a forced command).  It enters
    the namespaces and the root of the payload that SPEC names and runs the
    image's shell, or the command by that shell, or the file work that
    needs no tool in the image: sshjob cp's tar (the tarfile module), SFTP
    (serve_sftp), and this node's rsync, scp and tar, run by this node's
    dynamic loader from this node's files through a descriptor of its
    root.  All it uses it imports before it leaves the node's root.

    The owner's rights are all it has: setns(2) lets it into a namespace
    only if the namespace's user namespace is the owner's, and a payload
    that ended, or a pid that another process took since it was found, is
    refused by its start time, checked once the namespaces are open."""
    import json
    import os
    import shlex
    import signal
    import sys

    spec = json.loads(sys.argv[1])
    command = sys.argv[2] if len(sys.argv) > 2 else os.environ.pop("SSH_ORIGINAL_COMMAND", None)
    pid, label = spec["pid"], spec["label"]
    namespaces = ("user", "mnt", "pid", "uts", "ipc", "net")
    words = {"user": "user", "mnt": "mount", "pid": "pid", "uts": "host name (uts)", "ipc": "IPC", "net": "network"}

    def fail(sentence, status=126):
        sys.stderr.write("sshjob: %s\n" % sentence)
        sys.stderr.flush()
        os._exit(status)

    def what_to_run():
        """(kind, argument) of the session: ("shell", None), ("command",
        the command), ("get", (directory, name)), ("put", (path, name)),
        ("sftp", None) or ("tool", argv)."""
        if command is None:
            return "shell", None
        if command.startswith("# sshjob-put "):  # see UPLOAD_SCRIPT
            path, name = command.partition("\n")[0].split()[2:4]
            return "put", (os.fsdecode(bytes.fromhex(path)), os.fsdecode(bytes.fromhex(name)))
        try:
            argv = shlex.split(command)
        except ValueError:
            return "command", command
        if len(argv) == 7 and argv[:2] == ["tar", "-C"] and argv[3:6] == ["-cf", "-", "--"]:
            return "get", (argv[2], argv[6])
        program = os.path.basename(argv[0]) if argv else ""
        if program == "sftp-server" or command.strip() == "internal-sftp":
            return "sftp", None
        if program in ("rsync", "scp", "tar") and not any(c in command for c in "|&;<>()$`\n"):
            return "tool", [program] + argv[1:]
        return "command", command

    def elf_interpreter(path):
        """The dynamic loader that an ELF program names (PT_INTERP), None for a static one."""
        import struct
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4:5] != b"\x02":
                return None
            order = "<" if head[5:6] == b"\x01" else ">"
            offset, = struct.unpack(order + "Q", head[32:40])
            size, count = struct.unpack(order + "HH", head[54:58])
            for index in range(count):
                f.seek(offset + index * size)
                entry = f.read(size)
                if struct.unpack(order + "I", entry[:4])[0] == 3:
                    where, length = struct.unpack(order + "Q", entry[8:16])[0], struct.unpack(order + "Q",
                                                                                             entry[32:40])[0]
                    f.seek(where)
                    return os.path.realpath(f.read(length).rstrip(b"\0").decode())
        return None

    def host_tool(argv):
        """The argv that runs this node's `argv[0]` inside the container: its
        loader and libraries come from this node's files, through an
        inherited descriptor of this node's root, as /proc/self/fd/N/..."""
        import subprocess
        program = next((os.path.realpath(os.path.join(d, argv[0])) for d in ("/usr/bin", "/bin", "/usr/local/bin")
                        if os.access(os.path.join(d, argv[0]), os.X_OK)), None)
        if program is None:
            fail("this node has no %s to run inside %s" % (argv[0], label), 127)
        node = os.open("/", os.O_PATH | os.O_DIRECTORY)
        os.set_inheritable(node, True)
        via = "/proc/self/fd/%d" % node
        loader = elf_interpreter(program)
        if loader is None:
            return [via + program] + argv[1:], via
        listed = subprocess.run([loader, "--list", program], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                universal_newlines=True).stdout
        directories = []
        for line in listed.splitlines():
            library = line.partition("=>")[2].strip().rpartition(" (")[0]
            if library.startswith("/"):
                directory = os.path.dirname(os.path.realpath(library))
                if directory not in directories:
                    directories.append(directory)
        return [via + loader, "--inhibit-cache", "--library-path", ":".join(via + d for d in directories),
                via + program] + argv[1:], via

    def setns(fd):
        if hasattr(os, "setns"):  # Python 3.12 on; before it, ctypes
            os.setns(fd, 0)  # novermin
            return
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, 0) != 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number))

    def why(error):
        if error.errno in (1, 13):  # EPERM, EACCES
            return "it is not yours to enter (another user's or root's, as a runtime that runs as root makes " \
                   "it): a session enters a container with its owner's rights only"
        return error.strerror

    def enter():
        """Into the payload's namespaces and root, in its working directory;
        returns the names of the namespaces entered."""
        try:
            opened = [(ns, os.open("/proc/%d/ns/%s" % (pid, ns), os.O_RDONLY)) for ns in namespaces]
            root = os.open("/proc/%d/root" % pid, os.O_RDONLY | os.O_DIRECTORY)
            cwd = os.open("/proc/%d/cwd" % pid, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            fail("%s has ended: try again, or use -container none" % label)
        except OSError as e:
            fail("cannot enter %s: %s" % (label, why(e)))
        try:
            with open("/proc/%d/stat" % pid) as f:
                started = f.read().rpartition(")")[2].split()[19]
        except OSError:
            started = None
        if started != spec["started"]:
            fail("%s has ended: try again, or use -container none" % label)
        pending = [(ns, fd) for ns, fd in opened if os.fstat(fd).st_ino != os.stat("/proc/self/ns/" + ns).st_ino]
        entered = []
        for last_try in (False, True):  # entering one may be what allows another, as nsenter finds
            for ns, fd in list(pending):
                try:
                    setns(fd)
                except OSError as e:
                    if last_try:
                        fail("cannot enter the %s namespace of %s: %s" % (words[ns], label, why(e)))
                    continue
                pending.remove((ns, fd))
                entered.append(ns)
        for _, fd in opened:
            os.close(fd)
        info, mine = os.fstat(root), os.stat("/")
        if (info.st_dev, info.st_ino) != (mine.st_dev, mine.st_ino):
            try:
                os.fchdir(root)
                os.chroot(".")
            except OSError as e:
                fail("cannot enter the root directory of %s: %s" % (label, why(e)))
        os.fchdir(cwd)
        os.close(root)
        os.close(cwd)
        return entered

    def wait_for(child):
        """As the parent of the session in the container's pid namespace:
        pass on hang-ups and terminations, and end as the session ends."""
        for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTOU, signal.SIGTTIN):
            signal.signal(signum, signal.SIG_IGN)
        for signum in (signal.SIGHUP, signal.SIGTERM):
            signal.signal(signum, lambda number, frame: os.kill(child, number))
        status = os.waitpid(child, 0)[1]
        if os.WIFSIGNALED(status):
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
            os.kill(os.getpid(), os.WTERMSIG(status))
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)

    def expand(word):
        """A word of a file tool's command as a shell would see it (~, globs),
        where the image may have no shell to do it."""
        word = os.path.expanduser(word) if word.startswith("~") else word
        return sorted(glob.glob(word)) or [word] if glob.has_magic(word) else [word]

    def shell():
        found = next((s for s in spec["shells"] + ["/bin/sh"] if os.path.isabs(s) and os.path.isfile(s)
                      and os.access(s, os.X_OK)), None)
        if found is None:
            fail("the image of %s has no shell (%s): sshjob cp, scp, sftp and rsync still reach its files, and "
                 "-container none opens a shell on the node, outside the container"
                 % (label, ", ".join(spec["shells"] + ["/bin/sh"])), 127)
        os.environ["SHELL"] = found
        return found

    def send_tree(directory, name):
        """sshjob cp's download: a tar of `name` in `directory` on stdout."""
        try:
            os.chdir(directory)
            with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT) as archive:
                archive.add(name)
        except OSError as e:
            fail("tar: %s: %s" % (e.filename or name, e.strerror), 2)

    def receive_tree(path, name):
        """sshjob cp's upload: the tar on stdin, whose top is `name`, into
        `path` if it is a directory, else as `path`; files keep the
        session's owner, whatever the tar says."""

        class Archive(tarfile.TarFile):
            def chown(self, *args, **kwargs):
                pass

        rename = None
        if not os.path.isdir(path):
            path, rename = os.path.split(path)
        trust = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
        try:
            with Archive.open(fileobj=sys.stdin.buffer, mode="r|") as archive:
                for member in archive:
                    if rename and (member.name == name or member.name.startswith(name + "/")):
                        member.name = rename + member.name[len(name):]
                    archive.extract(member, path or ".", set_attrs=True, **trust)
        except (OSError, tarfile.TarError) as e:
            fail("tar: %s" % (e.strerror if isinstance(e, OSError) else e), 2)

    kind, argument = what_to_run()
    if kind in ("get", "put"):
        import tarfile
        import warnings  # noqa: F401 (what tarfile may warn with)
    elif kind == "sftp":
        import contextlib  # noqa: F401 (serve_sftp's, imported while the node's files are in reach)
        import stat  # noqa: F401
        import struct  # noqa: F401
        import time  # noqa: F401
    elif kind == "tool":
        import glob
        argument, via = host_tool(argument)
    entered = enter()
    if "net" in entered and os.environ.get("DISPLAY", "").startswith("localhost:"):
        sys.stderr.write("sshjob: %s has a network of its own, so the X11 display that ssh forwards (DISPLAY=%s) "
                         "is out of its reach\n" % (label, os.environ["DISPLAY"]))
    if "pid" in entered:
        child = os.fork()
        if child:
            wait_for(child)
    if kind == "tool" and not os.path.isdir(via):
        fail("%s has no /proc, through which this node's %s runs inside it" % (label, argument[-1]), 127)
    if kind == "tool":
        argument = argument[:1] + [expanded for word in argument[1:] for expanded in expand(word)]
    if kind == "shell":
        program = shell()
        os.execv(program, ["-" + os.path.basename(program)])
    elif kind == "command":
        program = shell()
        os.execv(program, [os.path.basename(program), "-c", argument])
    elif kind == "get":
        send_tree(*argument)
    elif kind == "put":
        receive_tree(*argument)
    elif kind == "sftp":
        serve_sftp()
    else:
        os.execv(argument[0], argument)
    sys.stdout.flush()
    os._exit(0)


def serve_sftp(read_fd=0, write_fd=1):
    """An SFTP server (version 3, as OpenSSH's sftp-server speaks it) on
    `read_fd` and `write_fd`, until the client closes: for a container
    whose image has no sftp-server, and where this node's cannot run (it
    looks its user up first, and an image's /etc/passwd may not have the
    owner's mapped uid).  Paths are the process's own, so inside the
    container's root they resolve there.  Runs as `python3 -c` with no
    module of sshjob's: see container_session."""
    import contextlib
    import errno
    import os
    import stat
    import struct
    import time

    handles, made = {}, [0]
    codes = {errno.ENOENT: 2, errno.EACCES: 3, errno.EPERM: 3}

    def read_exactly(size):
        data = b""
        while len(data) < size:
            chunk = os.read(read_fd, size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def send(kind, request_id, body=b""):
        head = struct.pack(">IB", len(body) + 5, kind) + struct.pack(">I", request_id)
        data = head + body
        while data:
            data = data[os.write(write_fd, data):]

    def string(value):
        value = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
        return struct.pack(">I", len(value)) + value

    def status(request_id, code, message=""):
        send(101, request_id, struct.pack(">I", code) + string(message or ("Success", "End of file",
             "No such file", "Permission denied", "Failure", "Bad message", "", "", "Operation unsupported")[code])
             + string(""))

    def attributes(info):
        return struct.pack(">IQIIIII", 1 | 2 | 4 | 8, info.st_size, info.st_uid, info.st_gid, info.st_mode,
                           int(info.st_atime), int(info.st_mtime))

    def long_name(name, info):
        when = time.strftime("%b %d %H:%M", time.localtime(info.st_mtime))
        return "%s %3d %-8d %-8d %8d %s %s" % (stat.filemode(info.st_mode), info.st_nlink, info.st_uid,
                                                info.st_gid, info.st_size, when, name)

    class Reader:
        def __init__(self, data):
            self.data, self.at = data, 0

        def take(self, size):
            if self.at + size > len(self.data):
                raise ValueError("short packet")
            self.at += size
            return self.data[self.at - size:self.at]

        def number(self):
            return struct.unpack(">I", self.take(4))[0]

        def big(self):
            return struct.unpack(">Q", self.take(8))[0]

        def string(self):
            return self.take(self.number())

        def path(self):
            return os.fsdecode(self.string()) or "."

        def attributes(self):
            flags = self.number()
            found = {}
            if flags & 1:
                found["size"] = self.big()
            if flags & 2:
                found["owner"] = (self.number(), self.number())
            if flags & 4:
                found["mode"] = self.number()
            if flags & 8:
                found["times"] = (self.number(), self.number())
            if flags & 0x80000000:
                for _ in range(self.number()):
                    self.string(), self.string()
            return found

    def apply(target, found):
        """SETSTAT and FSETSTAT: `target` a path or a descriptor."""
        if "size" in found:
            os.truncate(target, found["size"])
        if "mode" in found:
            os.chmod(target, found["mode"] & 0o7777)
        if "times" in found:
            os.utime(target, found["times"])
        if "owner" in found:
            os.chown(target, *found["owner"])

    def handle(value):
        made[0] += 1
        handles[b"%d" % made[0]] = value
        return b"%d" % made[0]

    def answer(kind, request_id, r):
        if kind in (17, 7):  # STAT, LSTAT
            info = os.stat(r.path(), follow_symlinks=kind == 17)
            send(105, request_id, attributes(info))
        elif kind == 8:  # FSTAT
            send(105, request_id, attributes(os.fstat(handles[r.string()])))
        elif kind == 16:  # REALPATH
            path = os.path.realpath(r.path())
            send(104, request_id, struct.pack(">I", 1) + string(path) + string(path) + struct.pack(">I", 0))
        elif kind == 3:  # OPEN
            path, flags = r.path(), r.number()
            found = r.attributes()
            mode = {1: os.O_RDONLY, 2: os.O_WRONLY, 3: os.O_RDWR}.get(flags & 3, os.O_RDONLY)
            mode |= (os.O_APPEND if flags & 4 else 0) | (os.O_CREAT if flags & 8 else 0)
            mode |= (os.O_TRUNC if flags & 0x10 else 0) | (os.O_EXCL if flags & 0x20 else 0)
            fd = os.open(path, mode, found.get("mode", 0o666) & 0o7777)
            send(102, request_id, string(handle(fd)))
        elif kind == 5:  # READ
            fd, offset, size = handles[r.string()], r.big(), r.number()
            data = os.pread(fd, min(size, 261120), offset)
            if data:
                send(103, request_id, string(data))
            else:
                status(request_id, 1)
        elif kind == 6:  # WRITE
            fd, offset, data = handles[r.string()], r.big(), r.string()
            while data:
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
            status(request_id, 0)
        elif kind == 4:  # CLOSE
            value = handles.pop(r.string())
            if isinstance(value, int):
                os.close(value)
            status(request_id, 0)
        elif kind == 11:  # OPENDIR
            path = r.path()
            names = [".", ".."] + sorted(os.listdir(path))
            send(102, request_id, string(handle([path, names])))
        elif kind == 12:  # READDIR
            path, names = handles[r.string()]
            if not names:
                status(request_id, 1)
                return
            batch, names[:] = names[:100], names[100:]
            entries = []
            for name in batch:
                with contextlib.suppress(OSError):
                    info = os.lstat(os.path.join(path, name))
                    entries.append(string(name) + string(long_name(name, info)) + attributes(info))
            send(104, request_id, struct.pack(">I", len(entries)) + b"".join(entries))
        elif kind in (9, 10):  # SETSTAT, FSETSTAT
            target = r.path() if kind == 9 else handles[r.string()]
            apply(target, r.attributes())
            status(request_id, 0)
        elif kind == 13:  # REMOVE
            os.unlink(r.path())
            status(request_id, 0)
        elif kind == 14:  # MKDIR
            path = r.path()
            os.mkdir(path, r.attributes().get("mode", 0o777) & 0o7777)
            status(request_id, 0)
        elif kind == 15:  # RMDIR
            os.rmdir(r.path())
            status(request_id, 0)
        elif kind == 18:  # RENAME
            old, new = r.path(), r.path()
            if os.path.lexists(new):
                raise OSError(errno.EEXIST, "File exists")
            os.rename(old, new)
            status(request_id, 0)
        elif kind == 19:  # READLINK
            target = os.readlink(r.path())
            send(104, request_id, struct.pack(">I", 1) + string(target) + string(target) + struct.pack(">I", 0))
        elif kind == 20:  # SYMLINK: OpenSSH sends the link's target first
            target, link = r.path(), r.path()
            os.symlink(target, link)
            status(request_id, 0)
        elif kind == 200 and r.string() == b"posix-rename@openssh.com":  # EXTENDED
            os.replace(r.path(), r.path())
            status(request_id, 0)
        else:
            status(request_id, 8)

    while True:
        head = read_exactly(4)
        if head is None:
            return
        size = struct.unpack(">I", head)[0]
        packet = read_exactly(size) if size <= 4 * 1024 * 1024 else None  # OpenSSH's own ceiling is 256 KiB
        if not packet:
            return
        kind, body = packet[0], packet[1:]
        if kind == 1:  # INIT: our version, and the one extension we take
            send(2, 3, string("posix-rename@openssh.com") + string("1"))
            continue
        r = Reader(body)
        request_id = 0
        try:
            request_id = r.number()
            answer(kind, request_id, r)
        except OSError as e:
            status(request_id, codes.get(e.errno, 4), e.strerror or "")
        except (KeyError, ValueError, struct.error):
            status(request_id, 5)


# ---------------------------------------------------------------------------
# The session host: what runs a session inside a job, on the node.  It
# writes the files of a one-off `sshd -i` (host key, authorized key, the
# forced command that puts back the job's environment and directory), or
# runs the job's shell or command itself for the built-in transport, on a
# PTY or on pipes, relayed as channel frames.
# ---------------------------------------------------------------------------

DEFAULT_SSHD_TEMPLATE = """\
# sshd configuration of one sshjob session; written by the starter.
HostKey ${host_key}
AuthorizedKeysFile ${authorized_keys}
ForceCommand ${force_command}
AllowUsers ${user}
UsePAM no
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
HostbasedAuthentication no
PermitRootLogin prohibit-password
X11Forwarding yes
AllowAgentForwarding ${agent_forwarding}
${shell_level}
PermitTTY ${permit_tty}
PrintMotd no
PrintLastLog no
ExposeAuthInfo yes
UseDNS no
AcceptEnv LANG LANGUAGE LC_*
Subsystem sftp ${sftp_server}
MaxSessions 1024
LogLevel ERROR
"""


def openssh_quoted(path, percent_expanded=True):
    """`path` as a value of an OpenSSH configuration line (or of ssh's -o):
    quoted, as a directory may have a space in its name, and with its %s
    doubled where OpenSSH expands %-tokens in the value.  None for
    `percent_expanded` where the version decides (ssh expands them in
    UserKnownHostsFile from 8.4 on): a % is refused there, as are a double
    quote and a backslash anywhere (OpenSSH reads them as escapes from 8.7
    on, literally before)."""
    odd = [c for c in '"\\' + ("%" if percent_expanded is None else "") if c in path]
    if odd:
        raise ConfigError("OpenSSH cannot be given the path %s: versions of it read %s differently; use a "
                          "directory without it (for a client, set TMPDIR)" % (path, " and ".join(odd)))
    return '"%s"' % (path.replace("%", "%%") if percent_expanded else path)


def login_shell_problem(owner):
    """Why sshd cannot run sessions for this user, or None: sshd runs every
    session, forced command included, through the user's login shell, and
    nologin or false (batch and service accounts) refuse them all."""
    shell = owner.pw_shell or "/bin/sh"
    if os.path.basename(shell) in NO_LOGIN_SHELLS or not os.access(shell, os.X_OK):
        return "user %s's login shell is %s, through which sshd runs every session" % (owner.pw_name, shell)
    return None


def sshd_problem(config, node):
    """Why `node` (this machine) cannot start sshd, in a sentence; None if it can."""
    try:
        find_program(config, "sshd", "node " + node)
        find_program(config, "ssh_keygen", "node " + node)
    except MissingProgram as e:
        return str(e)
    return None


def choose_transport(request, uid, why_no_sshd, why_no_terminal, why_no_builtin=None):
    """(transport, why) of a session of user `uid`: OpenSSH where both ends
    have it, else the built-in transport; or what the client asks for, if
    the node can.  The why_no_ arguments say why the node cannot run sshd,
    give sshd a terminal, or serve the built-in transport; None if it can."""
    wanted = field(request, "transport", str, "auto")
    if request.get("interactive") is True and uid != 0 and wanted == "auto":
        why_no_sshd = why_no_sshd or why_no_terminal  # commands need no terminal: sshd serves them
    if wanted == "openssh" or (wanted == "auto" and request.get("key") and not why_no_sshd):
        if why_no_sshd:
            raise MissingProgram(why_no_sshd)
        return "openssh", "both ends have OpenSSH" if wanted == "auto" else "asked for"
    if wanted not in ("auto", "builtin"):
        raise UsageError("unknown transport %r: openssh, builtin or auto" % wanted)
    if why_no_builtin:
        raise MissingProgram(why_no_sshd or why_no_builtin)
    return "builtin", "asked for" if wanted == "builtin" else why_no_sshd or "this machine has no ssh client"


def with_exported_functions(env):
    """`env NAME=VALUE... ` to put before the command of a shell's `exec`:
    it hands the bash functions that `env` exports to the program, past a
    /bin/sh (dash) that drops them; "" where there are none."""
    words = [shlex.quote("%s=%s" % item) for item in sorted(env.items()) if EXPORTED_FUNCTION.fullmatch(item[0])]
    return "/usr/bin/env %s " % " ".join(words) if words else ""  # by path: the job's PATH may not have it


def shell_and_workdir(shells, workdir):
    """Shell code, run as the job's user, that exports SHELL as the first
    of the client's `shells` that this user can run (else /bin/sh) and
    enters the job's working directory.  Deciding as the user, not as a
    root starter, tells the user nothing of paths closed to them."""
    candidates = " ".join(shlex.quote(s) for s in shells if os.path.isabs(s))
    lines = ["SHELL=/bin/sh"]
    if candidates:
        lines.append('for s in %s; do if [ -f "$s" ] && [ -x "$s" ]; then SHELL=$s; break; fi; done' % candidates)
    lines += ["export SHELL",
              "cd -- %s || { printf \"sshjob: cannot enter the job's working directory %%s\\n\" %s >&2; exit 1; }"
              % (shlex.quote(workdir), shlex.quote(workdir))]
    return lines


# Variables the ssh client may bring into a session; the job's value applies
# only when the client brought none.
CLIENT_VARIABLES = re.compile(r"TERM|DISPLAY|LANG|LANGUAGE|LC_\w+|XAUTHORITY")

SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# How bash exports a function (`export -f`; Lmod's `module` and `ml`): a
# variable that /bin/sh cannot name, and dash drops.
EXPORTED_FUNCTION = re.compile(r"BASH_FUNC_[^=]+%%")

# Login shells that read session.sh themselves; ksh93 crashes on its
# `unset SHLVL; exec`, and mksh holds KSH_VERSION read-only.
SOURCING_SHELLS = {"sh", "bash", "dash"}

# The state of a bash shell, not of the job: read-only in bash, and a job's
# exported shell options (set -e) would end an interactive session at its
# first failing command.
BASH_STATE = {"BASHOPTS", "BASH_VERSINFO", "EUID", "PPID", "SHELLOPTS", "UID"}

GENERATION = re.compile(r"[0-9a-f]{0,64}")


def sshd_config(config, host_key, sdir, owner, terminals=True):
    """The sshd configuration of one session of user `owner` (a passwd
    entry) whose files are in `sdir`; without `terminals` where sshd cannot
    give this user one (see devpts_problem), so that it refuses a client's
    request for one, which then runs its session without, instead of
    ending the connection when it fails to make one.

    sshd runs the forced command through the user's login shell, and bash
    reads ~/.bashrc there as in any ssh session; then session.sh starts the
    session's own shell, which reads it again.  Where sshd can set it,
    SHLVL=1 makes the first shell skip it (bash reads ~/.bashrc under ssh
    only at SHLVL 1), and session.sh unsets SHLVL: ~/.bashrc is read once,
    by the session's shell, in the job's environment, as plain ssh does."""
    import string
    template = DEFAULT_SSHD_TEMPLATE
    path = config["sshd_config_template"]
    if path:
        with open(path) as f:
            template = f.read()
    shell_level = "SetEnv SHLVL=1" if sshd_version(find_program(config, "sshd")) >= (7, 8) else ""
    clean_login_shell = bool(shell_level) and "shell_level" in template
    try:
        return string.Template(template).substitute(
            host_key=openssh_quoted(host_key, percent_expanded=False),
            authorized_keys=openssh_quoted(os.path.join(sdir, "authorized_keys")),
            force_command=force_command(os.path.join(sdir, "session.sh"), owner.pw_shell, clean_login_shell),
            user=owner.pw_name,
            sftp_server=find_sftp_server(config),
            agent_forwarding="yes" if config.flag("allow_agent_forwarding") else "no",
            shell_level=shell_level,
            permit_tty="yes" if terminals else "no",
        )
    except (KeyError, ValueError) as e:
        raise ConfigError("the sshd configuration template %s is malformed: %s" % (path, e)) from None


def force_command(script, login_shell, clean):
    """What sshd runs, through the user's login shell, to start a session:
    a POSIX login shell reads session.sh itself, which spares every session
    the start of one more shell, where it is `clean` (it read no ~/.bashrc,
    whose functions and options would apply to the script); any other
    shell (csh, fish, ksh) hands it to /bin/sh."""
    if clean and os.path.basename(login_shell or "/bin/sh") in SOURCING_SHELLS:
        return ". " + shlex.quote(script)
    return "/bin/sh " + shlex.quote(script)


@functools.lru_cache(maxsize=None)
def sshd_version(sshd):
    """(major, minor) of this sshd, (0, 0) if unknown: `sshd -V` prints it,
    and an sshd too old to know -V prints it atop its usage message."""
    try:
        said = subprocess.run([sshd, "-V"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        said = b""
    found = re.search(rb"OpenSSH_(\d+)\.(\d+)", said)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def job_variables(job_env):
    """What of the job's environment its sessions get: all but bash's state
    and the variables of the ssh connection that submitted the job (a stale
    SSH_ORIGINAL_COMMAND would run in place of a session's shell)."""
    return {k: v for k, v in job_env.items() if k not in BASH_STATE and not k.startswith("SSH_")}


def session_variables(job_env, client_env, marks):
    """The environment of a session inside a job: the job's, except where
    the client brings its own terminal, display or locale, and the marks."""
    env = job_variables(job_env)
    env.update(client_env)
    env.update(marks)
    return env


def session_script(context, shells, part):
    """A session's forced command: sshd gives every session a fresh
    environment in $HOME, so this script puts back the job's environment
    and working directory, then runs the requested command or a shell.
    The client's terminal, display and locale, if it brings them, win."""
    q = shlex.quote
    lines = ["# sshjob %s in job %s" % (part, context.name)]
    marks = context.marks(part)
    variables = job_variables(context.env)
    for name, value in sorted(variables.items()):
        if not SHELL_NAME.fullmatch(name) or name in marks:
            continue
        if CLIENT_VARIABLES.fullmatch(name):
            lines.append('[ -n "${%s+set}" ] || export %s=%s' % (name, name, q(value)))
        else:
            lines.append("export %s=%s" % (name, q(value)))
    lines.append("export " + " ".join("%s=%s" % (name, q(value)) for name, value in marks.items()))
    if context.notice:
        lines.append("printf 'sshjob: %%s\\n' %s >&2" % q(context.notice))
    if context.payload:
        return "\n".join(lines + ["unset SHLVL", '[ -n "${SSH_ORIGINAL_COMMAND+set}" ] || printf %%s %s'
                                  % q(context.welcome())] + container_launch(context, shells)) + "\n"
    lines += shell_and_workdir(shells, context.workdir)
    functions = with_exported_functions(variables)
    lines += [
        "unset SHLVL",  # the session's shell is a top-level one: it reads ~/.bashrc (see sshd_config)
        'if [ -n "${SSH_ORIGINAL_COMMAND+set}" ]; then exec %s"$SHELL" -c "$SSH_ORIGINAL_COMMAND"; fi' % functions,
        "printf %%s %s" % q(context.welcome()),
        'exec %s"$SHELL" -l' % functions,
    ]
    return "\n".join(lines) + "\n"


def builtin_session(context, client_env, part, shells, command):
    """(argv, environment) of built-in session `part`: the job's shell, or
    `command` run by that shell, in the job's working directory, with the
    job's environment, the client's terminal, display and locale, and the
    marks that make it the job's."""
    owner = context.owner
    env = session_variables(context.env, client_env, context.marks(part))
    base = {"HOME": owner.pw_dir, "USER": owner.pw_name, "LOGNAME": owner.pw_name, "PATH": os.defpath}
    base.update(env)
    functions = with_exported_functions(env)
    notice = ["printf 'sshjob: %%s\\n' %s >&2" % shlex.quote(context.notice)] if context.notice else []
    if context.payload:
        lines = container_launch(context, shells)
    else:
        lines = shell_and_workdir(shells, context.workdir) + [
            'if [ "$#" -gt 0 ]; then exec %s"$SHELL" -c "$1"; fi' % functions, 'exec %s"$SHELL" -l' % functions]
    script = "\n".join(notice + lines)
    return ["/bin/sh", "-c", script, "sshjob-session"] + ([command] if command is not None else []), base


def container_launch(context, shells):
    """Shell lines, run as the job's owner on the node, that start
    container_session for the context's payload with the first Python
    that the owner may run: the one this node's sshjob runs on, else the
    system's (a root starter's may be closed to the owner)."""
    spec = json.dumps({"pid": context.payload.pid, "started": context.payload.started,
                       "label": context.payload.describe(), "shells": [s for s in shells if os.path.isabs(s)]})
    code = source_of(serve_sftp) + source_of(container_session) + "container_session()\n"
    pythons = []
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", "/usr/libexec/platform-python"):
        if python and python not in pythons:
            pythons.append(python)
    return ["for p in %s; do" % " ".join(shlex.quote(p) for p in pythons),
            '    if [ -x "$p" ]; then exec "$p" -I -S -c %s %s "$@"; fi' % (shlex.quote(code), shlex.quote(spec)),
            "done",
            "printf 'sshjob: %%s\\n' %s >&2" % shlex.quote(
                "node %s has no python3 that %s may run (%s), and entering the job's container needs one: "
                "use -container none" % (context.node, context.owner.pw_name, ", ".join(pythons))),
            "exit 127"]


class BuiltinSession:
    """The node's half: the job's shell or command, on a PTY or on pipes,
    relayed to and from the client's channel (TLS, or srun's pipe).  Its
    last frame says the exit status of job `name`'s session, and how the
    job ended, if its end is what ended the session (`ending()`)."""

    def __init__(self, sock, proc, master, name, ending):
        self.name = name
        self.ending = ending
        self.sock = sock
        self.proc = proc
        self.master = master
        if master is not None:
            self.outputs = {master: STDOUT}
            self.stdin = master
        else:
            self.outputs = {proc.stdout.fileno(): STDOUT, proc.stderr.fileno(): STDERR}
            self.stdin = proc.stdin.fileno()
        os.set_blocking(self.stdin, False)
        self.backlog = bytearray()
        self.stdin_eof = False

    def run(self):
        """Relay until the command ends; returns its exit status."""
        client_open = True
        while self.outputs:
            if self.master is not None and self.proc.poll() is not None:
                self.drain_terminal()
                break
            listen = list(self.outputs)
            waiting = [self.stdin] if self.backlog else []
            take_client = client_open and len(self.backlog) < MAX_STDIN_BACKLOG
            if take_client and getattr(self.sock, "pending", lambda: 0)():  # TLS holds bytes the socket hides
                ready, writable = [self.sock], []
            else:
                ready, writable = wait_for(listen + [self.sock] * take_client, waiting, 0.5)
            if writable:
                self.feed_stdin()
            for fd in ready:
                if fd is self.sock:
                    client_open = self.take_from_client()
                    if not client_open:
                        self.hang_up()
                else:
                    self.pass_output(fd)
        status = exit_status(self.proc.wait())
        with contextlib.suppress(OSError):
            send_frame(self.sock, EXIT, json.dumps({"status": status, "ending": self.ending(),
                                                         "job": self.name}).encode())
            self.linger()
        return status

    def linger(self):
        """Read what the client still sends until it closes, which it does
        once it has the exit frame: a socket closed with bytes unread in it
        resets the connection, and the client would lose the output it has
        yet to read (a fast command's, the client's stdin's end unread)."""
        if not hasattr(self.sock, "settimeout"):
            return  # srun's pipe: no reset there
        self.sock.settimeout(IO_TIMEOUT)
        with contextlib.suppress(ProtocolError):
            while recv_frame(self.sock)[0] is not None:
                pass

    def take_from_client(self):
        kind, payload = recv_frame(self.sock)
        if kind is None:
            return False
        if kind == STDIN:
            self.backlog += payload
        elif kind == STDIN_EOF:
            self.stdin_eof = True
        elif kind == RESIZE and self.master is not None and len(payload) == WINSIZE.size:
            set_window_size(self.master, *WINSIZE.unpack(payload))
        else:
            raise ProtocolError("an unexpected channel frame")
        self.feed_stdin()
        return True

    def feed_stdin(self):
        with contextlib.suppress(BlockingIOError):
            if self.backlog:
                del self.backlog[: os.write(self.stdin, self.backlog)]
        if self.stdin_eof and not self.backlog and self.master is None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def pass_output(self, fd):
        try:
            data = os.read(fd, MAX_CHUNK)
        except OSError:  # EIO: the terminal's last user has gone
            data = b""
        if data:
            send_frame(self.sock, self.outputs[fd], data)
        else:
            del self.outputs[fd]

    def drain_terminal(self):
        """The shell has exited: pass on what it wrote last."""
        while wait_for([self.master], timeout=0.05)[0]:
            try:
                data = os.read(self.master, MAX_CHUNK)
            except OSError:
                return
            if not data:
                return
            send_frame(self.sock, STDOUT, data)

    def hang_up(self):
        """The client has gone: end the session as a lost terminal would."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGHUP if self.master is not None else signal.SIGTERM)
        self.outputs = {}


def controlling_terminal():
    """A preexec step: make the PTY on stdin the new session's terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def devpts_problem():
    """Why an sshd that runs as a job's owner gets no terminal here, or
    None: it must give its PTY to the tty group, which a devpts mounted
    without gid=5 (as in many containers) refuses."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
        options = next((m[3].split(",") for m in mounts if m[1:3] == ["/dev/pts", "devpts"]), None)
        tty = grp.getgrnam("tty").gr_gid
    except (OSError, KeyError):
        return None
    if options is None or "gid=%d" % tty in options:
        return None
    return "this node's /dev/pts is mounted without gid=%d (the tty group), so sshd gets no terminal for " \
           "an ordinary user" % tty


def sshd_terminals():
    """(why sshd gets no terminal for an ordinary user here, or None; the
    preexec step that gives it one, or None).  Where /dev/pts lacks the tty
    group, a root starter gives each sshd private terminals of its own, and
    an ordinary user's sshd gets a user namespace whose tty group is the
    user's own group; where neither is possible, sshd refuses terminals
    (see sshd_config) and an interactive `sshjob client` takes the built-in
    transport's PTY."""
    problem = devpts_problem()
    if problem is None:
        return None, None
    try:
        uid = os.geteuid()
        terminals = private_terminals() if uid == 0 else tty_group_namespace(uid, os.getegid(),
                                                                             grp.getgrnam("tty").gr_gid)
        subprocess.run(["true"], preexec_fn=terminals, check=True)
    except (OSError, KeyError, subprocess.SubprocessError) as e:
        log.warning("%s, and no way around it here (%s): sshd refuses terminals, and interactive sessions of "
                    "sshjob client take the built-in transport", problem, describe(e))
        return problem, None
    log.info("%s: sshd sessions get %s", problem, "a devpts instance of their own" if uid == 0 else
             "a user namespace whose tty group is the user's own group")
    return None, terminals


def builtin_request(session):
    """(command, terminal, client environment) of a built-in session,
    checked before anything is allocated for it.  terminal is None, or
    (rows, columns, TERM) for a PTY."""
    command = session.get("command")
    if command is not None and (not isinstance(command, str) or "\0" in command):
        raise ProtocolError("the command is malformed")
    terminal = session.get("pty")
    if terminal is not None:
        if not isinstance(terminal, dict):
            raise ProtocolError("the terminal is malformed")
        rows, columns = field(terminal, "rows", int, 24), field(terminal, "columns", int, 80)
        term = field(terminal, "term", str, "xterm")
        if not (0 < rows < 65536 and 0 < columns < 65536) or "\0" in term:
            raise ProtocolError("the terminal is malformed")
        terminal = (rows, columns, term)
    env = session.get("env") if isinstance(session.get("env"), dict) else {}
    env = {k: v for k, v in env.items() if CLIENT_VARIABLES.fullmatch(k) and isinstance(v, str) and "\0" not in v}
    return command, terminal, env


class JobContext(collections.namedtuple("JobContext",
                                        "name owner env workdir pids tag node index payload notice")):
    """What a session needs of the job it enters, wherever the job lives:
    its name as users type it, its owner (a passwd entry), its environment
    and working directory, its processes (the first one first, numbered as
    the session sees them), the tag that every process of the job carries,
    where it runs (the node's host name and its index among the job's
    nodes), the Payload whose container the session enters (None: the
    node itself), and a notice for the session's stderr, if any."""

    def __new__(cls, name, owner, env, workdir, pids, tag, node, index, payload=None, notice=None):
        return super().__new__(cls, name, owner, env, workdir, pids, tag, node, index, payload, notice)

    def marks(self, part):
        """The variables that make the processes of session `part` the job's."""
        return {TAG_VAR: self.tag, PIDS_VAR: " ".join(str(pid) for pid in self.pids), SESSION_VAR: part,
                "SSHJOB_JOB_ID": self.name, "SSHJOB_NODE": self.node, "SSHJOB_NODE_INDEX": str(self.index)}

    def welcome(self):
        inside = "You are inside its %s.\n" % self.payload.describe() if self.payload else ""
        return "Welcome to job %s on %s!\n%sYour job is running with pid(s) %s.\n" % (
            self.name, self.node, inside, " ".join(str(pid) for pid in self.pids))


def write_tally(path, live):
    """Say in a file that the job may read (an allocation's holder does) how
    many of its sessions live, and since when."""
    write_atomically(path, json.dumps({"live": live, "ended": time.time()}), mode=0o644)


class SessionHost:
    """The node's side of every session, wherever the job lives: the pool's
    starter and a Slurm step each have one, as OpenSSH's session.c serves
    every kind of session with one do_child.  It says why this node cannot
    run sshd or give it a terminal, writes the files of a one-off `sshd -i`
    and starts it on the client's connection, or runs a built-in session
    itself and relays it; and it keeps count of the sessions that live.

    What differs between the places jobs live comes in as arguments: where
    the sessions' files go (`files`) and to whom they belong (`file_owner`:
    (uid, gid), for a root starter), the job's host key, where sshd writes
    its complaints (`sshd_log`, else the inherited stderr), the job's
    ProcessFamily (where the starter keeps one: a session's processes join
    it), and the steps a new process takes before it runs (`become()`: the
    owner's privileges; `terminals`: private terminals for sshd), and why
    sshd gets no terminal for an ordinary user (`terminal_problem`)."""

    def __init__(self, config, files, host_key, family=None, become=lambda: None, file_owner=None,
                 terminals=None, sshd_log=None, terminal_problem=None, memory=None, tally=None):
        self.config = config
        self.memory = memory  # a file that names the payload that the job's sessions last entered
        self.recalled = None  # another host's such file (the starter's, for a pool job's agent)
        self.tally = tally  # told how many sessions live whenever that changes (an allocation's idle clock)
        self.files = files
        self.host_key = host_key
        self.family = family
        self.terminal_problem = terminal_problem  # why sshd gets no terminal for an ordinary user here
        self.become = become
        self.file_owner = file_owner
        self.terminals = terminals
        self.sshd_log = sshd_log
        self.sessions = set()  # the processes of the sessions that live: sshd, or a built-in session's shell
        self.connections = {}  # those of them that are sshd: when each started
        self.targets = {}  # and the payload (a container) that each one's sessions enter, if any
        self.changed = threading.Condition()
        self.count = 0

    def part(self):
        """A name for a new session: its cgroup's, its files' directory's."""
        with self.changed:
            self.count += 1
            return "session-%d" % self.count

    # -- OpenSSH -----------------------------------------------------------------

    def prepare_sshd(self, context, key, shells):
        """The files of an sshd session for `key` only; returns its directory.
        Made before the client hears yes, so that a full disk is a sentence.
        The directory stays the host's (root's, for a root starter): the
        owner's sshd reads the files, and the owner can swap none."""
        sdir = os.path.join(self.files, self.part())
        try:
            os.mkdir(sdir, 0o711)
            files = {"authorized_keys": key + "\n",
                     "session.sh": session_script(context, shells, os.path.basename(sdir)),
                     "sshd_config": sshd_config(self.config, self.host_key, sdir, context.owner,
                                                terminals=not self.terminal_problem_of(context))}
            for name, text in files.items():
                write_private(os.path.join(sdir, name), text, self.file_owner)
        except OSError as e:
            shutil.rmtree(sdir, ignore_errors=True)
            raise StorageError("node %s cannot prepare the session (%s)" % (context.node, e)) from None
        return sdir

    def start_sshd(self, context, sdir, connection):
        """`sshd -i` on `connection` (a socket, or the pair of descriptors
        srun's pipe gives), as the job's owner, with the files in `sdir`;
        the directory goes when the session ends."""
        sshd = find_program(self.config, "sshd", "node " + context.node)
        part = os.path.basename(sdir)
        ends = (connection.fileno(), connection.fileno()) if hasattr(connection, "fileno") else connection
        if os.geteuid() == 0 and context.owner.pw_uid == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        errors = self.sshd_log and os.open(self.sshd_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                                           0o600)
        terminals = self.terminals if context.owner.pw_uid and not self.terminal_problem_of(context) else None
        try:
            proc = subprocess.Popen(
                [sshd, "-i", "-e", "-f", os.path.join(sdir, "sshd_config")],
                stdin=ends[0], stdout=ends[1], stderr=errors or None, close_fds=True, cwd="/",
                env={"PATH": os.defpath, TAG_VAR: context.tag, SESSION_VAR: part},
                preexec_fn=child_setup(self.joined(), terminals, self.become()), start_new_session=True)
        finally:
            if errors:
                os.close(errors)
        with self.changed:
            self.connections[proc] = time.monotonic()
            self.targets[proc] = context.payload
            if len(self.connections) == 1:
                threading.Thread(target=self.watch_connections, daemon=True).start()
        self.track(proc)
        threading.Thread(target=self.end, args=(proc, sdir), daemon=True).start()
        log.info("job %s: %s started, sshd pid %d", context.name, part, proc.pid)
        return proc

    def terminal_problem_of(self, context):
        """Why sshd gives no terminal to a session of this context, or None.
        An ordinary user's sshd that gets its terminals from a user namespace
        of its own (see sshd_terminals) runs sessions that can enter no
        other user namespace: a session in a container goes without."""
        if not context.owner.pw_uid:
            return None
        if self.terminal_problem:
            return self.terminal_problem
        if context.payload and self.terminals and os.geteuid() != 0:
            return "sshd's terminals on this node come from a user namespace of its own, from which no session " \
                   "can enter the job's container"
        return None

    # -- the built-in transport --------------------------------------------------

    def run_builtin(self, context, channel, session, shells, ending=lambda: None, accepted=lambda: None):
        """Run the session's shell or command as the job's owner, in its
        working directory and environment, on a PTY if the client has a
        terminal, and relay it over `channel` until it ends; returns its
        exit status.  `accepted()` tells the client yes once the session
        runs; `ending()` says, as the session ends, whether the job's end
        ended it (see ENDINGS)."""
        import pty
        command, terminal, client_env = builtin_request(session)
        part = self.part()
        argv, env = builtin_session(context, client_env, part, shells, command)
        steps = [self.joined(), self.become()]
        master = slave = None
        try:
            if terminal:
                master, slave = pty.openpty()
                set_window_size(master, terminal[0], terminal[1])
                if self.file_owner:
                    os.fchown(slave, *self.file_owner)
                env["TERM"] = terminal[2]
                streams = {"stdin": slave, "stdout": slave, "stderr": slave}
                steps.insert(0, controlling_terminal)
            else:
                streams = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
            proc = subprocess.Popen(argv, env=env, cwd="/", start_new_session=True,
                                    preexec_fn=child_setup(*steps), **streams)
        except BaseException as e:
            for fd in (master, slave):
                if fd is not None:
                    os.close(fd)
            if isinstance(e, (OSError, subprocess.SubprocessError)):
                raise StorageError("node %s cannot start the session (%s)" % (context.node, describe(e))) from None
            raise
        self.track(proc)
        log.info("job %s: built-in %s started, pid %d%s", context.name, part, proc.pid, " on a PTY" * bool(master))
        try:
            accepted()
            if master is not None:
                os.close(slave)
                if command is None:
                    send_frame(channel, STDOUT, context.welcome().replace("\n", "\r\n").encode())
            return BuiltinSession(channel, proc, master, context.name, ending).run()
        except (OSError, SshjobError) as e:
            log.info("job %s: built-in %s lost its client: %s", context.name, part, e)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGHUP)
            return None
        finally:
            if master is not None:
                os.close(master)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream:
                    stream.close()
            self.end(proc)

    # -- where a session runs ----------------------------------------------------

    def place(self, context, request, again):
        """`context`, the job as its script started it, for the session that
        `request` asks for: inside the job's first payload unless it asks
        for another or none ("container": auto, none, or a payload's pid or
        name), with the environment and working directory of the payload,
        or of the job's script ("job_env": payload or script).  A container
        that is still starting is waited for, with the job's processes read
        `again()` (a JobContext): its `podman run` may not have begun yet.
        Returns (the context, where it is, in a line for the client's -debug)."""
        choice = field(request, "container", str, "auto")
        env_from = field(request, "job_env", str, "payload")
        if env_from not in ("payload", "script"):
            raise UsageError("unknown -job-env %r: payload or script" % env_from)
        payloads, orphans = find_payloads(self.config, context.pids, self.become) if choice != "none" else ([], [])
        deadline = time.monotonic() + CONTAINER_START_WAIT
        while choice != "none" and not payloads and (orphans or image_to_come(context.pids)) and \
                time.monotonic() < deadline:  # a container that is still starting
            time.sleep(0.25)
            context = again()
            payloads, orphans = find_payloads(self.config, context.pids, self.become)
        payload = choose_payload(payloads, choice, context.name)
        if payload is None and choice == "auto":
            context = context._replace(notice=self.payload_gone(context, orphans))
        elif payload:
            self.remember(payload.describe())
        if payload:
            where = "inside its " + payload.describe()
            members = payload_members(payload)
            context = context._replace(payload=payload, pids=[inside for _, inside in members] or [payload.pid])
        else:
            where = "on the node" + (", outside its containers" if payloads else "")
        source = None
        if env_from == "payload":
            source = (payload.pid, process_stat(payload.pid)[2]) if payload else newest_long_lived(context.pids)
        if source:
            with contextlib.suppress(OSError):
                env = process_environment(source[0])
                if not payload:  # the script's bash functions, which a /bin/sh between them (dash) drops
                    env = dict({k: v for k, v in context.env.items() if EXPORTED_FUNCTION.fullmatch(k)}, **env)
                context = context._replace(env=env, workdir=os.readlink("/proc/%d/cwd" % source[0]))
                return context, "%s; with the environment and directory of pid %d (%s)" % (where, *source)
        return context, where + "; with the environment and directory of the job's script"

    def remember(self, text):
        """Remember the payload that a session entered: readable by all, it
        names a container, which the job's agent (another user) reads too."""
        if self.memory:
            with contextlib.suppress(OSError):
                write_atomically(self.memory, text, mode=0o644)

    def payload_gone(self, context, orphans):
        """A sentence for a session that finds no payload where one was: a
        `podman run` of the job's without a container, an allocation's
        container that is not up in time, or a container that an earlier
        session entered; else None."""
        job = context.name
        if orphans:
            return "job %s's podman (pid %d) has no container running, so this session runs on the node, outside " \
                   "it" % (job, orphans[0])
        if image_to_come(context.pids):
            return "job %s's container is not up after %d s, so this session runs on the node, outside it" % (
                job, CONTAINER_START_WAIT)
        for memory in (self.memory, self.recalled):
            with contextlib.suppress(OSError), open(memory or "") as f:
                return "job %s's %s has ended, so this session runs on the node, outside it" % (job, f.read(200))
        return None

    # -- the sessions that live --------------------------------------------------

    def joined(self):
        """A preexec step that puts a new process in the job's family, if it has one."""
        return self.family.enter("sessions") if self.family else None

    def track(self, proc):
        if self.family:
            self.family.leaders.append(proc)
        with self.changed:
            self.sessions.add(proc)
            self.count_sessions()

    def live(self):
        """How many sessions are in use.  A built-in session is, while it
        runs; an sshd is while it serves a channel, and in its first second
        (its first channel is yet to open).  The connection of an ssh master
        that ControlPersist keeps between sessions (the warm path) serves
        none, and is no one's session: an allocation's idle clock runs, and
        a pool job whose processes have ended completes, ending it."""
        now = time.monotonic()
        return sum(1 for proc in list(self.sessions) if proc not in self.connections or
                   now - self.connections[proc] < CONNECTION_GRACE or serves_a_channel(proc.pid))

    def watch_connections(self):
        """While sshd connections live, say when the count of sessions in
        use changes (a channel opens or closes on a connection that stays),
        and end the idle ones whose sessions would enter a container that
        has ended: a client's ssh master then goes, and its next session
        goes the cold way, which finds where the job runs now."""
        said = None
        while True:
            time.sleep(CONNECTION_GRACE / 2)
            with self.changed:
                if not self.connections:
                    return
                for proc, payload in list(self.targets.items()):  # its connection's, while it lives (end)
                    if payload and process_state(payload.pid, payload.started) is None and not \
                            serves_a_channel(proc.pid):
                        del self.targets[proc]
                        with contextlib.suppress(OSError):
                            proc.terminate()
                live = self.live()
                if live != said:
                    said = live
                    self.count_sessions()
                    self.changed.notify_all()

    def count_sessions(self):
        if self.tally:
            with contextlib.suppress(OSError):
                self.tally(self.live())

    def end(self, proc, sdir=None):
        """Wait for a session's process; then it is gone, and its files."""
        proc.wait()
        if sdir:
            shutil.rmtree(sdir, ignore_errors=True)
        if self.family and proc in self.family.leaders:
            self.family.leaders.remove(proc)  # reaped: its pid may be anyone's soon
        with self.changed:
            self.sessions.discard(proc)
            self.connections.pop(proc, None)
            self.targets.pop(proc, None)
            self.count_sessions()
            self.changed.notify_all()
        log.debug("a session ended (pid %d)", proc.pid)

    def wait_for_sessions(self):
        """Until no session is in use (see live)."""
        with self.changed:
            while self.live():
                self.changed.wait(CONNECTION_GRACE)


DIRECT_BACKLOG = 128  # connections the kernel queues on a step's direct listener, or an agent's

WARM_WAIT = 1.0  # seconds a client gives a job's agent (the warm path) to answer before it goes the cold way

WARM_PENDING = 64  # connections a job's agent takes at once before they bring the secret; more are closed

WARM_SECRET_WAIT = 3.0  # seconds a connection to a job's agent has for TLS and the secret

SIOCGIFCONF = 0x8912  # netdevice(7): a node's addresses, each in a struct ifreq of IFREQ_SIZE bytes

IFREQ_SIZE = 40 if struct.calcsize("P") == 8 else 32

WARM_KEY = re.compile(r"[\w.-]{1,64}")  # what names a job's agent in the user's warm records: the client's job


def node_addresses():
    """This node's IPv4 addresses, loopback last: where a client on another
    host may reach a listener bound to them all."""
    size = 8192
    buffer = array.array("B", bytes(size))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        said = fcntl.ioctl(probe.fileno(), SIOCGIFCONF, struct.pack("iL", size, buffer.buffer_info()[0]))
    length = struct.unpack("iL", said)[0]
    data = buffer.tobytes()[:length]
    step = IFREQ_SIZE
    addresses = [socket.inet_ntoa(data[at + 20:at + 24]) for at in range(0, length - step + 1, step)]
    return sorted(set(addresses), key=lambda address: (address.startswith("127."), addresses.index(address)))


def address_facing(peer):
    """This node's address on the way to `peer` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((peer, 9))
            return probe.getsockname()[0]
        except OSError:
            return None


def private_node_directory():
    """The user's own private directory in this node's temporary directory
    (made if missing), or None where a link or another user's is there."""
    import tempfile
    base = os.path.join(tempfile.gettempdir(), "sshjob-%d" % os.getuid())
    with contextlib.suppress(FileExistsError):
        os.mkdir(base, 0o700)
    info = os.lstat(base)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return base


def request_shells(request):
    """The shells a session's request offers, in order."""
    return [shell for shell in field(request, "shells", list, []) if isinstance(shell, str)]


def warm_directory():
    """Where the user's records of jobs' agents (the warm path) are: in the
    user's private sshjob directory, which the login nodes share with the
    compute nodes where home directories are shared."""
    directory = os.path.join(sshjob_home(), "warm")
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    return directory


def warm_record(name):
    """The user's record of a job's agent, by the name that the client gives
    the job (slurm-JOB, pool-POOL-JOB)."""
    return os.path.join(warm_directory(), "%s.json" % name)


class JobSide:
    """What serves a job's sessions on a node, as its agent sees it: a
    Slurm step (NodeStep) or a pool job's agent (PoolAgent).  Each has its
    configuration, the job's owner (this process's user), node, name and
    id (`job_id`, as the node knows it), a private directory `tmp`, and its
    SessionHost (`host`)."""

    def job_context(self):
        """The job as a session sees it, now."""
        raise NotImplementedError

    def prepare_sshd(self, request, context):
        """(the session's files, the public host key)."""
        raise NotImplementedError

    def refusal(self):
        """Why the job takes no new session now, as an error; or None."""
        return None

    def transport_for(self, request, context):
        """(transport, why), as for a pool's job: no TLS is needed, Slurm
        and the agent's TLS carry the built-in transport."""
        problem = sshd_problem(self.config, self.node) or login_shell_problem(self.owner)
        terminal_problem = self.host.terminal_problem_of(context) if request.get("interactive") is True else None
        return choose_transport(request, self.owner.pw_uid, problem, terminal_problem)

    def serve_warm(self, tls, request):
        """A later session through the job's agent (the warm path): as a
        cold one, but on the agent's TLS connection, which both ends unwrap
        for sshd (ssh authenticates both ends), and with no srun, no ticket,
        no new interpreter and no new privileges."""
        refusal = self.refusal()
        if refusal:
            raise refusal
        context, where = self.host.place(self.job_context(), request, self.job_context)
        transport, why = self.transport_for(request, context)
        reply = {"ok": True, "transport": transport, "why": why, "user": self.owner.pw_name, "node": self.node,
                 "where": where, "warm": True}
        if transport == "openssh":
            sdir, hostkey = self.prepare_sshd(request, context)
            send_msg(tls, dict(reply, hostkey=hostkey))
            with tls.unwrap() as sock:
                self.host.start_sshd(context, sdir, sock)
            return
        send_msg(tls, reply)
        session = recv_msg(tls, "the client")
        if session.get("op") != "builtin":
            raise ProtocolError("expected the built-in session's request")
        self.host.run_builtin(context, tls, session, request_shells(request),
                              accepted=lambda: send_msg(tls, {"ok": True}))


# A client's ping: whether a job's agent runs (and is not stopped with its job); the agent's answer, and its answer
# when the job takes no new session (its command has exited): the cold way then says why.
WARM_PING, WARM_PONG, WARM_REFUSES = b"?", b"!", b"-"

PING_WAIT = 0.5  # seconds a client gives a job's agent to answer WARM_PING


class JobAgent:
    """A job's agent on a node: the warm path's node side.  It serves the
    owner's later sessions itself, over TLS with a certificate of its own:
    no srun, no ticket, no new interpreter, no new job context, no new
    privileges.  What admits a connection is a secret that only the owner
    can read: the agent writes it, with its addresses and its certificate's
    fingerprint, into a record in the owner's private sshjob directory,
    where the client looks first (on any login node that shares the home
    directory), one record per name that clients know the job by.  Every
    entry is logged in the owner's private directory on the node.  It is
    stopped with the job, and a client's WARM_PING tells whether it runs:
    one byte, before TLS, that says nothing else but whether the job takes
    new sessions.  The agent goes with the job, warm_idle after the last
    session, or when asked (sshjob warm stop); a client that finds it gone
    goes the cold way."""

    def __init__(self, side, idle, hosts=()):
        self.side, self.idle_time = side, idle
        self.hosts = list(hosts)  # those that a client most likely reaches the node by, first
        self.paths = []
        self.record = None  # what the records say, once the certificate is made
        self.lock = threading.Lock()
        self.secret = token_hex(32)
        self.last = time.monotonic()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("", 0))
        self.listener.listen(DIRECT_BACKLOG)
        self.log_path = os.path.join(private_node_directory() or side.tmp, "agent-%s.log" % side.job_id)
        self.unproven = threading.BoundedSemaphore(WARM_PENDING)  # connections yet to bring the secret
        threading.Thread(target=self.serve, daemon=True).start()

    def add_record(self, name):
        """Be found by clients that know the job as `name` too."""
        try:
            path = warm_record(name)
        except ConfigError as e:
            self.note("no record for %s: %s" % (name, e))
            return
        with self.lock:
            if path not in self.paths:
                self.paths.append(path)
                if self.record:
                    write_atomically(path, json.dumps(self.record))

    def serve(self):
        """Make the certificate (after the first session has started: it
        costs tens of milliseconds), say where the agent is, then serve."""
        side = self.side
        try:
            cert, key, fingerprint = make_certificate(os.path.join(side.tmp, "agent"), lambda: find_program(
                side.config, "openssl", "node " + side.node))
            self.tls = server_tls_context(cert, key)
            hosts = self.hosts + [address for address in node_addresses() if address not in self.hosts]
            with self.lock:
                self.record = {"job": side.job_id, "name": side.name, "node": side.node, "hosts": hosts,
                               "port": self.listener.getsockname()[1], "fingerprint": fingerprint,
                               "secret": self.secret, "pid": os.getpid()}
                for path in self.paths:
                    write_atomically(path, json.dumps(self.record))
        except (OSError, SshjobError, subprocess.CalledProcessError) as e:
            self.note("no warm path: %s" % describe(e))
            return
        while True:
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return  # stopped
            if not self.unproven.acquire(blocking=False):
                sock.close()  # a flood: its client goes the cold way
                continue
            threading.Thread(target=self.enter, args=(sock, peer), daemon=True).start()

    def enter(self, sock, peer):
        """One connection: a ping, or the secret and then a session as the client asks."""
        import hmac
        proven, tls = False, None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a reply held back waits for an ACK: 40 ms
            sock.settimeout(WARM_SECRET_WAIT)
            first = sock.recv(1, socket.MSG_PEEK)
            if first in (WARM_PING, b""):  # a ping; or a client that reached the node by another address first
                sock.sendall(first and (WARM_REFUSES if self.side.refusal() else WARM_PONG))
                return
            tls = self.tls.wrap_socket(sock, server_side=True)
            request = recv_msg(tls, "a client")
            if not hmac.compare_digest(str(request.get("secret", "")).encode(), self.secret.encode()):
                self.note("refused a connection from %s: no secret" % peer[0])
                return
            proven = True
            self.unproven.release()
            tls.settimeout(IO_TIMEOUT)
            self.last = time.monotonic()
            if request.get("op") == "stop":
                send_msg(tls, {"ok": True})
                self.note("stopped, as %s asked" % peer[0])
                self.stop()
                return
            if request.get("op") != "session":
                raise ProtocolError("expected a session's request")
            self.note("warm entry: user %s, job %s, %s transport, from %s" % (
                self.side.owner.pw_name, self.side.name, field(request, "transport", str, "auto"), peer[0]))
            tls.settimeout(None)
            self.side.serve_warm(tls, request)
        except Exception as e:  # the owner's client hears it as one sentence, anyone else nothing; the agent serves on
            error = e if isinstance(e, SshjobError) else Unreachable(describe(e))
            self.note("a warm session failed: %s" % error if proven else "closed a connection from %s: %s" % (
                peer[0], error))
            if proven:
                with contextlib.suppress(OSError):
                    send_msg(tls, error_reply(error))
        finally:
            if not proven:
                self.unproven.release()
            (tls or sock).close()

    def idle(self):
        return time.monotonic() - self.last > self.idle_time

    def note(self, text):
        with contextlib.suppress(OSError), open(os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                                                        os.O_NOFOLLOW, 0o600), "a") as f:
            f.write("%s %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), text))

    def stop(self):
        """Listen no more, and take the records away, but those that another agent wrote since."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for path in self.paths:
                with contextlib.suppress(OSError, ValueError), open(path) as f:
                    if json.load(f).get("secret") == self.secret:
                        os.unlink(path)


# ---------------------------------------------------------------------------
# The schedd: the durable job queue, the authority on who may enter which
# job, and the issuer of tickets.  Local users reach it on a Unix socket and
# are known by their kernel peer credentials; others over TLS, by a token.
# ---------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    cluster INTEGER NOT NULL,
    proc INTEGER NOT NULL,
    node INTEGER NOT NULL,
    nodes INTEGER NOT NULL,
    owner TEXT NOT NULL,
    uid INTEGER NOT NULL,
    state TEXT NOT NULL,
    cmd TEXT NOT NULL,
    env TEXT NOT NULL,
    workdir TEXT NOT NULL,
    output TEXT NOT NULL,
    error TEXT NOT NULL,
    starter TEXT,
    hostkey TEXT,
    ssh_problem TEXT,
    secret TEXT,
    pids TEXT,
    exit_status INTEGER,
    note TEXT,
    submitted REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (cluster, proc, node)
);
"""

ACTIVE_STATES = ("starting", "running", "suspended")

SESSIONS_NOTE = "sessions"  # a running job's note in the queue, as its starter's news says: "sessions: 2"

MAX_SUBMIT = 10000  # node rows one submit may queue

INTERACTIVE_PLACEHOLDER = 86400 * 7  # seconds of `sleep` in an interactive job without a command

# What a user may do to a job: the states it acts on (None: any unfinished one), and what it has done.
JOB_ACTIONS = {"rm": (None, "marked for removal"),
               "suspend": (("running",), "suspended"),
               "continue": (("suspended",), "continued"),
               "vacate": (ACTIVE_STATES, "vacated: it goes back to idle"),
               "hold": (ACTIVE_STATES + ("idle",), "held: it stays in the queue until released"),
               "release": (("held",), "released: it goes back to idle")}


def check_job_spec(cmd, env, *paths):
    """What a starter cannot start, refused at submit rather than on the node."""
    size = len(json.dumps([cmd, env, paths]))
    if size > MAX_JOB_SPEC:
        raise UsageError("the job's command and environment take %d KiB, and a job may bring %d KiB: give it "
                         "the variables it needs with --env NAME=VALUE rather than --getenv"
                         % (size // 1024, MAX_JOB_SPEC // 1024))
    texts = list(cmd) + list(env) + list(env.values()) + list(paths)
    if any("\0" in text for text in texts):
        raise UsageError("the job's command, environment or paths hold a NUL byte")
    bad = next((name for name in env if not name or "=" in name), None)
    if bad is not None:
        raise UsageError("%r is not a valid name for an environment variable" % bad)
    if not all(os.path.isabs(path) for path in paths):
        raise UsageError("the job's working directory and output files must be absolute paths")


def run_generation(secret):
    """Tells one run of a node row from the next: a job requeued may go to
    the same starter again, and news or commands of the old run must not
    touch the new one."""
    import hashlib
    return hashlib.sha256((secret or "").encode()).hexdigest()[:12]


def row_id(row):
    """A node row's id as users see it: cluster.proc, with .node for a
    multi-node job."""
    name = job_name(row["cluster"], row["proc"])
    return name if row["nodes"] == 1 else "%s.%d" % (name, row["node"])


def run_id(row):
    """A node row's id between schedd and starter: always cluster.proc.node."""
    return "%d.%d.%d" % (row["cluster"], row["proc"], row["node"])


class Identity:
    """Who asks: a local user known by peer credentials, or a remote one
    known by a token (`claims`).  `starter` says whether it may act as a
    starter, `is_user` whether as a user; `runs_for`, whose jobs such a
    starter may run ("root": all)."""

    def __init__(self, name, starter=False, is_user=True, claims=None, runs_for=None):
        self.name = name
        self.starter = starter
        self.is_user = is_user
        self.claims = claims
        self.runs_for = runs_for

    @property
    def uid(self):
        try:
            return pwd.getpwnam(self.name).pw_uid
        except KeyError:
            return -1


class StarterRecord:
    """What the schedd knows of one connected starter."""

    def __init__(self, name):
        self.name = name
        self.address = None
        self.user = None
        self.enable_ssh = True
        self.ssh_problem = None  # why this node cannot start sshd, if it cannot
        self.pty_problem = None  # why sshd as an ordinary user gets no terminal there, if it gets none
        self.tls_fingerprint = None  # its certificate, for the built-in transport
        self.builtin_problem = None  # why it offers no built-in transport, if it does not
        self.reachable = True  # False: behind a firewall, reached through the schedd
        self.slots = 1
        self.last_poll = 0.0
        self.waiting = 0  # its polls waiting at the schedd now: while one waits, it is heard from
        self.warned = 0.0  # when the log last said that its token expires soon
        self.commands = []
        self.credential = {}  # the claims of the token it speaks with; none on the Unix socket
        self.stopping = set()  # (run, generation) it was told to stop

    def silence(self, now=None):
        """Seconds since the starter was last heard from."""
        return 0.0 if self.waiting else (now or time.time()) - self.last_poll


class Schedd:
    """The queue holds one row per node of each job; a job of one node has
    one row.  Every acknowledged change is committed before the reply."""

    def __init__(self, config):
        self.config = config
        self.name = config["schedd_name"]
        self.uid = os.geteuid()
        self.super_users = set(config.names("queue_super_users")) | {user_name(self.uid)}
        self.ticket_lifetime = config.number("ticket_lifetime")
        self.enable_ssh = config.flag("schedd_enable_ssh_to_job")
        self.tokens = Tokens(config["signing_key"], config["revoked_tokens"])
        self.lease = config.number("job_lease")
        self.max_jobs = config.number("max_jobs_per_user")
        self.requeue_lost = config.flag("requeue_lost_jobs")
        self.started = time.time()
        self.starters = {}
        self.relays = {}  # id: the client's connection, waiting for its starter to connect back
        self.relaying = {}  # user: relayed sessions open
        self.changed = threading.Condition()
        self.db_lock = threading.RLock()
        import sqlite3  # the schedd's alone: every other role starts without it

        with self.storage():
            self.db = sqlite3.connect(config["schedd_db"], check_same_thread=False, isolation_level=None)
            os.chmod(config["schedd_db"], 0o600)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            if "ssh_problem" not in {column[1] for column in self.db.execute("PRAGMA table_info(jobs)")}:
                self.db.execute("ALTER TABLE jobs ADD COLUMN ssh_problem TEXT")  # a queue of sshjob 0.1.0
            self.db.row_factory = sqlite3.Row

    # -- storage ---------------------------------------------------------

    @contextlib.contextmanager
    def storage(self):
        """The queue's database, locked; a sentence if it cannot be used."""
        import sqlite3

        try:
            with self.db_lock:
                yield
        except (sqlite3.Error, OSError) as e:
            raise StorageError("the schedd cannot use its queue %s (%s): free space there, or make it writable"
                               % (self.config["schedd_db"], e)) from None

    def query(self, sql, args=()):
        with self.storage():
            return self.db.execute(sql, args).fetchall()

    def update_row(self, row, **values):
        values["updated"] = time.time()
        assignments = ", ".join("%s = ?" % key for key in values)
        with self.storage():
            self.db.execute(
                "UPDATE jobs SET %s WHERE cluster = ? AND proc = ? AND node = ?" % assignments,
                list(values.values()) + [row["cluster"], row["proc"], row["node"]],
            )
        with self.changed:
            self.changed.notify_all()

    def find_rows(self, text):
        """The node rows of a job id; only the named node's if it names one."""
        cluster, proc, node = parse_job_id(text)
        rows = self.query("SELECT * FROM jobs WHERE cluster = ? AND proc = ? ORDER BY node", (cluster, proc))
        name = job_name(cluster, proc)
        if not rows:
            raise NotFound("job %s is not in the queue" % name)
        if node is None:
            return rows
        if node >= len(rows):
            raise NotFound("job %s has no node %d: its nodes are 0 to %d" % (name, node, len(rows) - 1))
        return [rows[node]]

    # -- requests ----------------------------------------------------------

    OPS = receives("schedd")
    NEWS = frozenset(op for op, sender, _, what in MESSAGES if sender == "starter" and what.startswith("news:"))
    STARTER_OPS = NEWS | {"ping", "poll", "relay_accept"}
    TAKEOVER_OPS = ("relay", "relay_accept")  # these keep the connection, and send their own reply

    def answer(self, message, sock):
        op = field(message, "op", str)
        if op not in self.OPS:
            raise ProtocolError("unknown request %r" % op)
        who = self.identify(message, sock)
        if op not in self.STARTER_OPS and not who.is_user:
            raise Refused("a starter's token is not a user's: %s may not %s" % (who.name, op))
        if op in JOB_ACTIONS:
            return self.act(op, message, who)
        if op in self.NEWS:
            self.take_news(message, self.starter_name(message, who))
            return {"ok": True}
        if op in self.TAKEOVER_OPS:
            sock.settimeout(None)
            return getattr(self, "op_" + op)(message, who, sock)
        return getattr(self, "op_" + op)(message, who)

    def identify(self, message, sock):
        """Local users by the kernel's peer credentials; remote ones by their
        token, never by what a message claims."""
        if sock.family == socket.AF_UNIX:
            uid = peer_credentials(sock)[1]
            return Identity(user_name(uid), starter=uid in (0, self.uid), runs_for=user_name(uid))
        claims = self.tokens.verify(field(message, "token", str))
        if claims["scope"] == "starter":
            return Identity(claims["sub"], starter=True, is_user=False, claims=claims, runs_for=claims.get("user"))
        return Identity(claims["sub"], claims=claims)

    def op_ping(self, message, who):
        now = time.time()
        live = [s.name for s in self.starters.values() if s.silence(now) < 3 * POLL_WAIT]
        return {"ok": True, "name": self.name, "version": __version__, "starters": live}

    def op_status(self, message, who):
        """The pool's starters, as condor_status shows them: for anyone."""
        now = time.time()
        with self.storage():
            used = dict(self.db.execute("SELECT starter, COUNT(*) FROM jobs WHERE state IN (?, ?, ?) GROUP BY"
                                        " starter", ACTIVE_STATES).fetchall())
        starters = []
        for record in sorted(self.starters.values(), key=lambda r: r.name):
            problems = [p for p in (record.ssh_problem, record.builtin_problem, self.token_warning(record, now))
                        if isinstance(p, str) and p]
            if record.silence(now) > self.lease:
                problems.insert(0, "not heard from for longer than its lease")
            starters.append({"name": record.name, "address": record.address, "user": record.user,
                             "slots": record.slots, "used": used.get(record.name, 0),
                             "heard": round(record.silence(now), 1), "reachable": record.reachable,
                             "token_expires": record.credential.get("exp"), "problems": problems})
        return {"ok": True, "schedd": self.name, "lease": self.lease, "starters": starters}

    @staticmethod
    def token_warning(record, now):
        """A sentence if the starter's token expires within a week."""
        expires = record.credential.get("exp")
        if expires is not None and expires - now < TOKEN_WARNING:
            return "its token expires in %s: issue a new one (sshjob token create --for starter --name %s)" % (
                "%.1f days" % ((expires - now) / 86400.0) if expires > now else "the past", record.name)
        return None

    def op_submit(self, message, who):
        import sqlite3  # loaded already: the schedd's queue
        cmd = field(message, "cmd", list)
        env = field(message, "env", dict)
        if not cmd or not all(isinstance(a, str) for a in cmd):
            raise UsageError("the job's command is empty")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ProtocolError("the job's environment is malformed")
        workdir = field(message, "workdir", str)
        output = field(message, "output", str, "/dev/null")
        error = field(message, "error", str, "/dev/null")
        check_job_spec(cmd, env, workdir, output, error)
        count = field(message, "count", int, 1)
        nodes = field(message, "nodes", int, 1)
        if count < 1 or nodes < 1 or count * nodes > MAX_SUBMIT:
            raise UsageError("one submit queues at most %d node rows (jobs times nodes)" % MAX_SUBMIT)
        now = time.time()
        with self.storage():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                (queued,) = self.db.execute("SELECT COUNT(*) FROM jobs WHERE owner = ? AND state NOT IN"
                                            " ('completed', 'removed')", (who.name,)).fetchone()
                if queued + count * nodes > self.max_jobs:
                    raise Refused("user %s has %d node rows in the queue, and may have %d at most (max_jobs_per_user)"
                                  % (who.name, queued, self.max_jobs))
                (cluster,) = self.db.execute("SELECT COALESCE(MAX(cluster), 0) + 1 FROM jobs").fetchone()
                self.db.executemany(
                    "INSERT INTO jobs (cluster, proc, node, nodes, owner, uid, state, cmd, env, workdir,"
                    " output, error, submitted, updated)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'idle', ?, ?, ?, ?, ?, ?, ?)",
                    ((cluster, proc, node, nodes, who.name, who.uid, json.dumps(cmd), json.dumps(env),
                      workdir, output, error, now, now) for proc in range(count) for node in range(nodes)))
                self.db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already (a full disk)
                    self.db.execute("ROLLBACK")
                raise
        log.info("user %s submitted cluster %d (%d jobs of %d nodes)", who.name, cluster, count, nodes)
        with self.changed:
            self.changed.notify_all()
        return {"ok": True, "cluster": cluster, "count": count}

    def op_q(self, message, who):
        """One page of the queue, in order, after the row `after` names; a
        page stays well inside the frame limit, and "more" says if one follows."""
        after = field(message, "after", list, [0, 0, -1])
        if len(after) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) for n in after):
            raise ProtocolError("field 'after' is malformed")
        where = "(cluster > ? OR (cluster = ? AND (proc > ? OR (proc = ? AND node > ?))))"
        args = [after[0], after[0], after[1], after[1], after[2]]
        if not message.get("all"):
            where += " AND state NOT IN ('completed', 'removed')"
        if message.get("job") is not None:
            cluster, proc, _ = parse_job_id(field(message, "job", str))
            where += " AND cluster = ? AND proc = ?"
            args += [cluster, proc]
        jobs, size, more = [], 0, False
        with self.storage():
            cursor = self.db.execute("SELECT * FROM jobs WHERE %s ORDER BY cluster, proc, node" % where, args)
            for r in cursor:
                job = {"id": row_id(r), "owner": r["owner"], "state": r["state"], "starter": r["starter"] or "",
                       "cmd": json.loads(r["cmd"]), "exit_status": r["exit_status"], "note": r["note"] or "",
                       "gen": run_generation(r["secret"]), "key": [r["cluster"], r["proc"], r["node"]]}
                size += len(json.dumps(job))
                if jobs and size > MAX_FRAME // 2:
                    more = True
                    break
                jobs.append(job)
        return {"ok": True, "jobs": jobs, "more": more}

    def authorize(self, row, who, what):
        """Only the job's owner and the queue super users may touch a job."""
        requester = who.name
        if requester != row["owner"] and requester not in self.super_users:
            raise Refused(
                "user %s may not %s job %s: it belongs to %s, and only its owner or a queue "
                "super user may" % (requester, what, job_name(row["cluster"], row["proc"]), row["owner"])
            )

    def act(self, action, message, who):
        """rm, suspend, continue, vacate, hold or release every node of a job."""
        text = field(message, "job", str)
        rows = self.find_rows(text)
        name = job_name(rows[0]["cluster"], rows[0]["proc"])
        self.authorize(rows[0], who, {"rm": "remove"}.get(action, action))
        states = {row["state"] for row in rows}
        if states <= {"completed", "removed"}:
            raise JobGone("job %s has already %s" % (name, "been removed" if "removed" in states else "finished"))
        wanted, done = JOB_ACTIONS[action]
        if wanted and not states & set(wanted):
            raise NotRunning("job %s is %s: it cannot be %s" % (name, "/".join(sorted(states)), done))
        for row in rows:
            if (wanted and row["state"] not in wanted) or row["state"] in ("completed", "removed"):
                continue
            if action == "rm":
                self.update_row(row, state="removed", note="removed by " + who.name)
            elif action in ("vacate", "hold"):
                self.update_row(row, state="idle" if action == "vacate" else "held", starter=None, hostkey=None,
                                note="%s by %s" % ("vacated" if action == "vacate" else "held", who.name))
            elif action == "release":
                self.update_row(row, state="idle", note=None)
            else:
                self.update_row(row, state="suspended" if action == "suspend" else "running")
            if row["starter"] and row["state"] in ACTIVE_STATES:
                self.send_command(row["starter"], {"op": "vacate" if action == "hold" else action, "run": run_id(row),
                                                   "gen": run_generation(row["secret"])})
        log.info("user %s: %s %s", who.name, action, name)
        return {"ok": True, "job": name}

    def send_command(self, starter, command):
        with self.changed:
            record = self.starters.get(starter)
            if record is not None:
                record.commands.append(command)
            self.changed.notify_all()

    # -- ssh to job --------------------------------------------------------

    def ssh_target(self, message, who):
        """The node a user asks to enter, once every check has passed."""
        rows = self.find_rows(field(message, "job", str))
        row = rows[0]
        name = row_id(row)
        self.authorize(row, who, "enter")
        if not self.enable_ssh:
            raise Refused("ssh to jobs is disabled on schedd %s (schedd_enable_ssh_to_job = false)" % self.name)
        state = row["state"]
        if state in ("completed", "removed"):
            raise JobGone("job %s has %s%s: there is nothing to enter" % (
                name, "finished" if state == "completed" else "been removed",
                " (%s)" % row["note"] if state == "completed" and row["note"] else ""))
        if state == "held":
            raise Held("job %s is held (%s): it will not run until it is released (sshjob release %s)" % (
                name, row["note"] or "no reason given", name))
        if state != "running":
            raise NotRunning("job %s is %s, not running yet" % (name, state))
        starter = self.starters.get(row["starter"])
        if starter is None or starter.silence() > 3 * POLL_WAIT:
            raise NotRunning("the starter of job %s (%s) is not connected to the schedd" % (name, row["starter"]))
        if not starter.enable_ssh:
            raise Refused("ssh to jobs is disabled on %s (enable_ssh_to_job = false)" % starter.name)
        return row, starter

    @staticmethod
    def choose_transport(message, row, starter):
        why_no_sshd = starter.ssh_problem or row["ssh_problem"] or (None if row["hostkey"] else (
            "job %s has no ssh host key: ssh-keygen was missing on %s when it started" % (row_id(row), starter.name)))
        why_no_builtin = starter.builtin_problem or (None if starter.tls_fingerprint else "no transport")
        return choose_transport(message, row["uid"], why_no_sshd, starter.pty_problem, why_no_builtin)

    def audit(self, who, message, granted, reason=""):
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "user": who.name, "job": message.get("job"),
                 "granted": granted, "reason": reason, "command": message.get("command")}
        try:
            with self.db_lock, open_log(self.config["audit_log"]) as f:
                f.write(json.dumps(entry) + "\n")
        except OSError as e:  # no record, no session
            raise StorageError("the schedd cannot write its audit log %s (%s)" % (self.config["audit_log"],
                                                                                e.strerror)) from None

    def op_ticket(self, message, who):
        try:
            row, starter = self.ssh_target(message, who)
            key = message.get("key") and parse_public_key(field(message, "key", str))
            transport, why = self.choose_transport(message, row, starter)
            if transport == "openssh" and not key:
                raise ProtocolError("a ticket for OpenSSH needs the client's public key")
            if transport == "builtin" and not isinstance(message.get("holder"), str):
                raise ProtocolError("a ticket for the built-in transport needs a holder")
        except SshjobError as e:
            self.audit(who, message, False, str(e))
            raise
        shells = [s for s in field(message, "shells", list, []) if isinstance(s, str)]
        claims = {"run": run_id(row), "key": key and key_fingerprint(key), "holder": message.get("holder"),
                  "user": who.name, "shells": shells}
        self.audit(who, message, True, "transport " + transport)
        return {"ok": True, "job": row_id(row), "run": run_id(row), "gen": run_generation(row["secret"]),
                "user": row["owner"], "hostkey": row["hostkey"],
                "starter": starter.name, "address": starter.address, "reachable": starter.reachable,
                "transport": transport, "why": why,
                "tls_fingerprint": starter.tls_fingerprint,
                "ticket": make_ticket(row["secret"], claims, self.ticket_lifetime)}

    def op_relay(self, message, who, sock):
        """Reach a starter that takes no inbound connections (HTCondor's CCB):
        ask it to connect back, then splice the two connections.  What they
        carry is authenticated end to end: the ticket, then ssh or TLS."""
        row, starter = self.ssh_target(message, who)
        with self.changed:
            if self.relaying.get(who.name, 0) >= MAX_RELAYS_PER_USER:
                raise Refused("user %s has %d relayed sessions open, the most one user may have"
                              % (who.name, MAX_RELAYS_PER_USER))
            self.relaying[who.name] = self.relaying.get(who.name, 0) + 1
        try:
            self.relay(row, starter, who, sock)
        finally:
            with self.changed:
                self.relaying[who.name] -= 1

    def relay(self, row, starter, who, sock):
        relay = {"id": token_hex(16), "ready": threading.Event(), "done": threading.Event(), "sock": None,
                 "starter": starter.name}
        self.relays[relay["id"]] = relay
        try:
            self.send_command(starter.name, {"op": "connect_back", "id": relay["id"]})
            if not relay["ready"].wait(POLL_WAIT + IO_TIMEOUT):
                raise Unreachable("the starter of job %s did not connect back to the schedd" % row_id(row))
        finally:
            del self.relays[relay["id"]]
        try:
            send_msg(sock, {"ok": True})
            client = without_tls(sock)
            log.info("relaying a session of %s to job %s on %s", who.name, row_id(row), starter.name)
            splice(client, relay["sock"])
        except OSError as e:
            log.info("a relayed session ended: %s", e)
        finally:
            relay["done"].set()

    def op_relay_accept(self, message, who, sock):
        """A starter's connection back, for the relay that names it."""
        name = self.starter_name(message, who)
        relay = self.relays.get(field(message, "id", str))
        if relay is None or relay["ready"].is_set() or relay["starter"] != name:
            raise NotFound("no relay waits for this connection")
        send_msg(sock, {"ok": True})
        relay["sock"] = without_tls(sock)
        relay["ready"].set()
        relay["done"].wait()

    # -- starters ----------------------------------------------------------

    @staticmethod
    def starter_name(message, who):
        """The starter a request comes from: the one its token speaks for;
        a local starter (root, or the schedd's own user) names itself."""
        if not who.starter:
            raise Refused("%s may not act as a starter of this pool" % who.name)
        name = field(message, "name", str)
        if who.claims is not None and name != who.name:
            raise Refused("this token speaks for starter %s, not for %s: set starter_name = %s or ask the "
                          "pool's admin for a token of %s" % (who.name, name, who.name, name))
        return name

    def claim_record(self, name, who):
        """The record of starter `name`, for `who`: refused while another
        token that still holds speaks for a connected starter of that name.
        A local starter (root, or the schedd's user) is trusted outright."""
        record = self.starters.get(name)
        if record is None:
            record = self.starters[name] = StarterRecord(name)
        elif who.claims is not None and record.credential.get("jti") != who.claims["jti"] and self.holds(record):
            raise Refused("starter %s is already connected with another token" % name)
        record.credential = who.claims or {}
        return record

    def holds(self, record):
        """Whether a starter's record stands for a connected starter whose
        credential is still good."""
        if record.silence() >= 3 * POLL_WAIT:
            return False
        if not record.credential:
            return True
        try:
            self.tokens.check_current(record.credential)
        except Refused:
            return False
        return True

    def op_poll(self, message, who):
        """A starter's long poll: it reports, and waits for work or commands."""
        name = self.starter_name(message, who)
        with self.changed:
            record = self.claim_record(name, who)
        for news in field(message, "news", list, []):
            try:
                if not isinstance(news, dict) or news.get("op") not in self.NEWS:
                    raise ProtocolError("news of an unknown kind")
                self.take_news(news, name)
            except SshjobError as e:
                log.warning("ignored news from %s: %s", name, e)
        with self.changed:
            record.address = field(message, "address", str)
            # whose jobs it runs: what its credential allows, narrowed by what it says
            claimed = field(message, "user", str)
            record.user = claimed if who.runs_for in (None, "root") else who.runs_for
            record.enable_ssh = field(message, "enable_ssh", bool, True)
            record.ssh_problem = message.get("ssh_problem")
            record.pty_problem = message.get("pty_problem")
            record.tls_fingerprint = message.get("tls_fingerprint")
            record.builtin_problem = message.get("builtin_problem")
            record.reachable = field(message, "reachable", bool, True)
            record.slots = field(message, "slots", int, 1)
            record.last_poll = time.time()
            warning = self.token_warning(record, record.last_poll)
            if warning and record.last_poll - record.warned > 3600:
                record.warned = record.last_poll
                log.warning("starter %s: %s", name, warning)
        running = field(message, "jobs", dict, {})
        if not all(isinstance(gen, str) for gen in running.values()):
            raise ProtocolError("field 'jobs' is malformed")
        self.reconcile(record, running)
        deadline = time.time() + min(field(message, "wait", (int, float), POLL_WAIT), POLL_WAIT)
        with self.changed:
            record.waiting += 1
            try:
                while True:
                    commands, record.commands = record.commands, []
                    commands += self.match(record, running)
                    remaining = deadline - time.time()
                    if commands or remaining <= 0:
                        break
                    self.changed.wait(remaining)
            finally:
                record.waiting -= 1
                record.last_poll = time.time()
        return {"ok": True, "commands": commands, "lease": self.lease}

    def reconcile(self, record, running):
        """Make the queue and a starter agree on what the starter runs
        (`running`: {run: generation}): runs the starter no longer knows go
        back to idle (it restarted, or a reply was lost); runs it has that
        the queue gave elsewhere or ended, it must stop, once (it was cut
        off, and its jobs were given up for lost)."""
        assigned = {}
        for row in self.query("SELECT * FROM jobs WHERE starter = ? AND state IN (?, ?, ?)",
                              (record.name,) + ACTIVE_STATES):
            assigned[run_id(row)] = run_generation(row["secret"])
            if running.get(run_id(row)) != assigned[run_id(row)]:
                log.warning("starter %s no longer runs job %s: it goes back to idle", record.name, row_id(row))
                self.update_row(row, state="idle", starter=None, hostkey=None, pids=None, note="its starter lost it")
        strays = {(run, gen) for run, gen in running.items() if assigned.get(run) != gen}
        for run, gen in strays - record.stopping:
            log.warning("starter %s runs job %s, which the queue gave up: it must stop", record.name, run)
            record.commands.append({"op": "rm", "run": run, "gen": gen})
        record.stopping = strays

    def reap_lost_starters(self):
        """Jobs of a starter that has not renewed its lease, for the lease and
        a margin, are lost: requeued (or held, by policy).  The starter has
        stopped them by then (see keep_lease), so a job runs at most once."""
        give_up_after = self.lease + LEASE_MARGIN
        while True:
            time.sleep(min(POLL_WAIT, self.lease / 4))
            try:
                now = time.time()
                for row in self.query("SELECT * FROM jobs WHERE state IN (?, ?, ?)", ACTIVE_STATES):
                    record = self.starters.get(row["starter"])
                    if (record.silence(now) if record else now - self.started) > give_up_after:
                        log.warning("starter %s is lost; job %s with it", row["starter"], row_id(row))
                        self.update_row(row, state="idle" if self.requeue_lost else "held", starter=None,
                                        hostkey=None, pids=None, note="its starter %s was lost" % row["starter"])
            except Exception as e:
                log.error("could not look for lost starters (%s); trying again", describe(e))

    def match(self, record, running):
        """Give idle node rows to a starter with free slots, except those it
        is still ending a run of; called with `changed` held."""
        busy = self.query("SELECT COUNT(*) FROM jobs WHERE starter = ? AND state IN (?, ?, ?)",
                          (record.name,) + ACTIVE_STATES)[0][0]
        free = record.slots - busy
        if free <= 0:
            return []
        rows = self.query("SELECT * FROM jobs WHERE state = 'idle' AND (? OR owner = ?)"
                          " ORDER BY cluster, proc, node LIMIT ?", (record.user == "root", record.user, free))
        commands, size = [], 0
        for row in rows:
            if run_id(row) in running:
                continue
            size += len(row["cmd"]) + len(row["env"])
            if commands and size > MAX_FRAME // 2:  # the rest go with the next poll: a reply fits a frame
                break
            secret = token_hex(32)
            self.update_row(row, state="starting", starter=record.name, secret=secret, note=None)
            commands.append({
                "op": "start", "run": run_id(row), "gen": run_generation(secret), "job": row_id(row),
                "node": row["node"], "nodes": row["nodes"],
                "owner": row["owner"], "cmd": json.loads(row["cmd"]), "env": json.loads(row["env"]),
                "workdir": row["workdir"], "output": row["output"], "error": row["error"], "secret": secret,
            })
        return commands

    def take_news(self, news, starter):
        """A starter's news of one of its own runs (see MESSAGES)."""
        op = field(news, "op", str)
        run = field(news, "run", str)
        if not JOB_ID.fullmatch(run) or parse_job_id(run)[2] is None:
            raise ProtocolError("news must name a run (cluster.proc.node)")
        row = self.find_rows(run)[0]
        if row["starter"] != starter:
            raise Refused("job %s does not run on %s" % (run, starter))
        if news.get("gen") != run_generation(row["secret"]):
            raise Refused("news of an earlier run of job %s" % run)
        why = news.get("why") if isinstance(news.get("why"), str) else None
        if op == "started":
            hostkey = news.get("hostkey")
            if row["state"] == "starting":
                problem = news.get("ssh_problem")
                self.update_row(row, state="running", hostkey=hostkey if isinstance(hostkey, str) else None,
                                pids=" ".join(str(p) for p in field(news, "pids", list)),
                                ssh_problem=problem if isinstance(problem, str) else None)
        elif op == "sessions_open":
            self.update_row(row, note="its command exited; waiting for its ssh sessions to close")
        elif op == "sessions" and row["state"] == "running" and (row["note"] or SESSIONS_NOTE).startswith(
                SESSIONS_NOTE):
            live = field(news, "live", int)
            self.update_row(row, note=SESSIONS_NOTE + (": %d" % live if live else ": none since %s" % time.strftime(
                "%H:%M:%S")))
        elif op == "exited" and row["state"] in ACTIVE_STATES:
            self.update_row(row, state="completed", exit_status=news.get("status"), hostkey=None, note=why)
        elif op == "failed":  # held, unless trying again elsewhere or later may help
            state = "idle" if news.get("transient") else "held"
            self.update_row(row, state=state, starter=None, hostkey=None, note="could not start: %s" % why)
        elif op == "lost" and row["state"] in ACTIVE_STATES:  # the starter stopped the job: it runs again
            self.update_row(row, state="idle" if self.requeue_lost else "held", starter=None, hostkey=None,
                            pids=None, note="its starter %s lost its lease" % starter)
        log.info("job %s: %s", run, op)


class TLSRequestHandler(RequestHandler):
    """The schedd's TCP endpoint: TLS first, then a request with its token."""

    def handle(self):
        self.request.settimeout(IO_TIMEOUT)
        try:
            self.request = self.server.tls.wrap_socket(self.request, server_side=True)
        except OSError as e:  # ssl.SSLError included
            log.warning("refused a connection from %s: no TLS (%s)", self.client_address[0], e)
            return
        super().handle()


def serve_schedd(config):
    schedd = Schedd(config)
    family, path = parse_address(config["schedd_address"])
    if family != "unix":
        raise ConfigError("schedd_address must be the schedd's Unix socket; schedd_tls_address is for TCP")
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            probe_stale_socket(path)
    server = listen(UnixServer, path, RequestHandler)
    os.chmod(path, 0o666)  # everyone may ask; peer credentials say who asks
    server.app = schedd
    if config["schedd_tls_address"]:
        cert, key, fingerprint = make_certificate(os.path.join(config["pool_dir"], "private"),
                                                  lambda: find_program(config, "openssl", "node " + schedd.name))
        remote = listen(TCPServer, parse_address(config["schedd_tls_address"])[1], TLSRequestHandler)
        remote.app, remote.tls = schedd, server_tls_context(cert, key)
        start_vital(remote.serve_forever, "the schedd's TLS endpoint")
        log.info("schedd %s listening on %s:%d with TLS, certificate SHA-256 %s", schedd.name,
                 *remote.server_address[:2], fingerprint)
    start_vital(schedd.reap_lost_starters, "the search for lost starters")
    log.info("schedd %s listening on %s", schedd.name, path)
    run_until_signalled(server)


def probe_stale_socket(path):
    """Remove a socket left by a dead schedd; refuse to start beside a live one."""
    try:
        call(path, {"op": "ping"}, "the schedd", timeout=2)
    except (Unreachable, ProtocolError):
        os.unlink(path)
        return
    raise ConfigError("a schedd is already running on %s" % path)


# ---------------------------------------------------------------------------
# The starter: runs the jobs the schedd gives it, and opens ssh sessions
# inside them.  A starter running as root runs each job as its owner; one
# running as an ordinary user runs only that user's jobs.
# ---------------------------------------------------------------------------


class Job:
    """One job on the starter: its process, its sessions, its private directory.

    The job's directory and everything under it belong to root (a root
    starter) and only files in it are handed to the job's owner, by
    descriptor: so that no operation as root ever follows a path through a
    directory that the owner controls."""

    def __init__(self, starter, spec):
        self.starter = starter
        self.run = field(spec, "run", str)  # cluster.proc.node, between schedd and starter
        self.gen = field(spec, "gen", str, "")  # which run of that node row
        if not JOB_ID.fullmatch(self.run) or parse_job_id(self.run)[2] is None or not GENERATION.fullmatch(self.gen):
            raise ProtocolError("the job's id is malformed")
        self.name = field(spec, "job", str)  # the id users see
        self.node = field(spec, "node", int, 0)
        self.nodes = field(spec, "nodes", int, 1)
        self.owner = pwd.getpwnam(field(spec, "owner", str))
        self.cmd = field(spec, "cmd", list)
        self.env = field(spec, "env", dict)
        workdir = field(spec, "workdir", str)
        self.output = field(spec, "output", str)
        self.error = field(spec, "error", str)
        if not all(isinstance(a, str) for a in self.cmd) or not all(isinstance(v, str) for v in self.env.values()):
            raise ProtocolError("the job's command or environment is malformed")
        check_job_spec(self.cmd, self.env, workdir, self.output, self.error)
        self.workdir = workdir if self.nodes == 1 else os.path.join(workdir, "node%d" % self.node)
        self.secret = field(spec, "secret", str)
        self.dir = os.path.join(starter.dir, "%s-%s" % (self.run, self.gen) if self.gen else self.run)
        self.family = None
        self.process = None
        self.hostkey = None
        self.ending = None  # "rm" or "vacate" once the schedd ends it (see ENDINGS)
        self.host = None  # its SessionHost, once it runs
        self.why = None  # the pipe on which the job's shell says why it could not start (see start)
        self.agent = None  # its agent's process (see PoolAgent), once a client asks for one
        self.agent_live = 0  # how many of the agent's sessions are in use
        self.agent_lock = threading.Lock()

    # -- the job's own processes -------------------------------------------

    def start(self):
        """Start the job's command: in its working directory (made if
        missing), with its environment, as its owner, in its own session and
        process family.  On failure, nothing of it is left."""
        os.mkdir(self.dir, 0o711)
        try:
            tag = token_hex(8)
            write_private(os.path.join(self.dir, "tag"), tag)  # for the clean-up after a starter crash
            self.family = ProcessFamily(self.starter.cgroup_base, "job-" + os.path.basename(self.dir), tag)
            self.hostkey = self.make_host_key()
            env = dict(self.env)
            env.setdefault("HOME", self.owner.pw_dir)
            env.setdefault("USER", self.owner.pw_name)
            env.setdefault("LOGNAME", self.owner.pw_name)
            env.setdefault("PATH", os.defpath)
            env.update({TAG_VAR: tag, "SSHJOB_JOB_ID": self.name, "SSHJOB_NODE": socket.gethostname(),
                        "SSHJOB_NODE_INDEX": str(self.node), TALLY_VAR: os.path.join(self.dir, "sessions")})
            # The job's shell says on a pipe (its stderr, until the job's command has its own) why it could not
            # start, if it could not: its working directory, its output files.
            self.why, says = os.pipe()
            wrapper = ('mkdir -p -- "$1" || exit 126; [ -x "$1" ] || { echo "Permission denied" >&2; exit 126; }; '
                       'cd -- "$1" || exit 126; o=$2; e=$3; shift 3; export %s=$$; '
                       'exec %s"$@" <"/dev/null" >>"$o" 2>>"$e"' % (PIDS_VAR, with_exported_functions(env)))
            try:
                self.process = subprocess.Popen(
                    ["/bin/sh", "-c", wrapper, "sshjob-job", self.workdir, self.output, self.error] + self.cmd,
                    env=env, cwd="/", start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=says, preexec_fn=child_setup(self.family.enter("main"), privileges_of(self.owner.pw_name)))
            finally:
                os.close(says)
        except BaseException:
            self.discard()
            raise
        self.family.leaders.append(self.process)
        self.host = SessionHost(self.starter.config, self.dir, self.host_key_path(), self.family, self.become,
                                self.file_owner(), self.starter.terminals, os.path.join(self.dir, "sshd.log"),
                                self.starter.pty_problem, os.path.join(self.dir, "payload"),
                                self.count_sessions)
        self.host.count_sessions()
        log.info("job %s started as pid %d, user %s", self.name, self.process.pid, self.owner.pw_name)

    def discard(self):
        """Remove what a start that failed made."""
        if self.family is not None:
            self.family.remove()
        if self.why is not None:
            os.close(self.why)
        shutil.rmtree(self.dir, ignore_errors=True)

    def why_it_ended(self, status):
        """Why the job ended before its command ran, if it did, as its shell
        said so: its working directory could not be made or entered, or an
        output file could not be opened."""
        with os.fdopen(self.why, errors="replace") as f:
            said = f.read(4096).strip().splitlines()
        self.why = None
        if not said:
            return None
        if status == 126:
            return "its working directory %s cannot be made: %s" % (self.workdir, said[-1].rpartition(": ")[2])
        return "it could not start: %s" % said[-1]

    def make_host_key(self):
        """The job's sshd host key; None on a node without ssh-keygen, where
        the job runs all the same, without ssh sessions."""
        try:
            keygen = find_program(self.starter.config, "ssh_keygen")
        except MissingProgram as e:
            log.warning("job %s gets no ssh host key: %s", self.name, e)
            return None
        path = self.host_key_path()
        os.mkdir(os.path.dirname(path), 0o711)
        failure = finish_keygen(start_keygen(keygen, path, "sshjob-job-" + self.name))
        if failure:
            raise StorageError("ssh-keygen cannot make job %s's host key: %s" % (self.name, failure))
        with open(path + ".pub") as f:
            public = parse_public_key(f.read())
        if self.file_owner():
            os.chown(path, *self.file_owner(), follow_symlinks=False)  # for the sshd that runs as the owner
        return public

    def host_key_path(self):
        return os.path.join(self.dir, "hostkey", "ssh_host_ed25519_key")

    def file_owner(self):
        """(uid, gid) to give the session's files to, when the starter is root."""
        return (self.owner.pw_uid, self.owner.pw_gid) if os.geteuid() == 0 else None

    def pids(self):
        """The job's pids, its first process first; session processes excluded."""
        others = [pid for pid in self.family.pids("main") if pid != self.process.pid]
        return [self.process.pid] + others if self.process.poll() is None else others

    def terminate(self, reason):
        """End the job and its sessions: "rm", "vacate" or "lease" says why.
        Its containers first, through their runtime where it keeps records
        of them (its helpers, such as podman's conmon, are of the job's
        family and would go with it, too soon to clean up after them)."""
        self.ending = reason
        payloads = self.payloads()
        if stop_containers(payloads, self.become, int(KILL_GRACE)):
            deadline = time.time() + KILL_GRACE  # `podman run --rm` removes its container, then ends
            while self.process.poll() is None and time.time() < deadline:
                time.sleep(0.05)
        self.family.companions = self.strays(payloads)
        end_families([self.family])

    def payloads(self):
        try:
            return find_payloads(self.starter.config, self.pids(), self.become)[0]
        except SshjobError as e:
            log.warning("job %s: its containers cannot be found (%s): they are left to their runtime", self.name, e)
            return []

    def strays(self, payloads=()):
        """(pid, start time) of the job's processes that its family does not
        find: those in its containers, which podman's conmon takes out of
        it, and the sshd that its agent starts, whose process title hides
        the tag (where no cgroup holds them): rm, vacate and suspend reach
        them too."""
        members = [pid for payload in payloads for pid, _ in payload_members(payload)]
        agent = self.agent
        if agent and agent.poll() is None:
            members += descendants(agent.pid)
        return [(pid, stat[1]) for pid, stat in ((pid, process_stat(pid)) for pid in members) if stat]

    def count_sessions(self, _host_live=None):
        """Tell the job (an allocation's holder reads the tally) and the queue
        (q says it) how many sessions are in use: the starter's and its agent's."""
        live = self.sessions_in_use()
        write_tally(os.path.join(self.dir, "sessions"), live)
        if allocation_profile(self.cmd):
            news = {"op": "sessions", "run": self.run, "gen": self.gen, "live": live}
            threading.Thread(target=self.starter.report, args=(news,), daemon=True).start()

    def supervise(self):
        """Wait for the job; keep it alive while sessions are open; report."""
        status = exit_status(self.process.wait())
        ended_by_keeper = self.ended_by_keeper()
        why = self.why_it_ended(status)
        self.tell_agent("exited")
        if self.sessions_in_use() and not self.ending:
            self.starter.report({"op": "sessions_open", "run": self.run, "gen": self.gen})
        with self.host.changed:
            while self.sessions_in_use():
                self.host.changed.wait(CONNECTION_GRACE)
        self.family.companions = self.strays()
        self.family.remove()  # what the job left behind goes with it, its agent too
        shutil.rmtree(self.dir, ignore_errors=True)
        news = ENDINGS[self.ending or ended_by_keeper][0]
        log.info("job %s %s with status %d%s", self.name, news, status, ": " + why if why else "")
        self.starter.finish(self, {"op": news, "run": self.run, "gen": self.gen, "status": status, "why": why})

    def ended_by_keeper(self):
        """How the job ended by itself, as far as the starter saw: "lease"
        where the lease's keeper ended it (keep_lease), which the starter, if
        it was stopped meanwhile, did not; else "exit"."""
        return "lease" if os.path.exists(os.path.join(self.dir, LEASE_ENDED)) else "exit"

    # -- ssh sessions ------------------------------------------------------

    def become(self):
        """The preexec step that turns a child of a root starter into the
        job's owner, who must still exist."""
        try:
            return privileges_of(self.owner.pw_name)
        except KeyError:
            raise Refused("the owner of job %s, %s, no longer exists on %s" % (
                self.name, self.owner.pw_name, self.starter.name)) from None

    def context(self):
        """The job as a session sees it, now."""
        return JobContext(self.name, self.owner, self.env, self.workdir, self.pids(), self.family.tag,
                          socket.gethostname(), self.node)

    def sessions_in_use(self):
        return self.host.live() + self.agent_live

    # -- its agent: the warm path ------------------------------------------

    def want_agent(self, name):
        """The job's agent, known to clients as `name` (see PoolAgent); started
        first where it runs no more, or never did.  Nothing is said to the
        client: without an agent its later sessions go the cold way."""
        if not (isinstance(name, str) and WARM_KEY.fullmatch(name)) or not self.starter.warm_idle or self.ending:
            return
        with self.agent_lock:
            try:
                if self.agent is None or self.agent.poll() is not None:
                    self.agent = self.start_agent()
                self.tell_agent("warm " + name)
            except (OSError, SshjobError) as e:
                log.warning("job %s gets no agent: %s", self.name, describe(e))

    def start_agent(self):
        """Start the job's agent in its family (neither the job's own process
        nor a session: SESSION_VAR, its own part of the family), told the job
        as a session sees it.  It becomes the job's owner itself, once it
        has loaded this module, which a root starter keeps where only root
        reads it."""
        config = self.starter.config
        argv = self_command() + (["--config", config.path] if config.path else []) + ["pool-agent"]
        env = {"PATH": os.defpath, "HOME": self.owner.pw_dir, TAG_VAR: self.family.tag, SESSION_VAR: "agent"}
        self.become()  # its owner still exists
        errors = os.open(os.path.join(self.dir, "agent.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                         0o600)
        try:
            agent = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, cwd="/",
                                     env=env, start_new_session=True, close_fds=True,
                                     preexec_fn=child_setup(self.family.enter("agent")))
        finally:
            os.close(errors)
        self.family.leaders.append(agent)
        spec = {"owner": self.owner.pw_name, "run": self.run, "job": self.name, "node": self.starter.name,
                "index": self.node, "env": self.env, "workdir": self.workdir, "tag": self.family.tag,
                "cgroup": self.family.cgroup, "pid": self.process.pid, "host_key": self.host_key_path(),
                "idle": self.starter.warm_idle, "memory": self.host.memory}
        agent.stdin.write(json.dumps(spec).encode() + b"\n")
        agent.stdin.flush()
        threading.Thread(target=self.hear_agent, args=(agent,), daemon=True).start()
        log.info("job %s: its agent started, pid %d", self.name, agent.pid)
        return agent

    def tell_agent(self, line):
        agent = self.agent
        if agent and agent.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                agent.stdin.write(line.encode() + b"\n")
                agent.stdin.flush()
            if self.process.poll() is not None and line != "exited":
                self.tell_agent("exited")

    def hear_agent(self, agent):
        """How many of the agent's sessions are in use, as it says, until it ends."""
        for line in agent.stdout:
            words = line.split()
            if words[:1] == [b"live"] and len(words) == 2 and words[1].isdigit():
                with self.host.changed:
                    self.agent_live = int(words[1])
                    self.host.count_sessions()
                    self.host.changed.notify_all()
        agent.wait()
        if agent in self.family.leaders:
            self.family.leaders.remove(agent)
        with self.host.changed:
            if self.agent is agent or self.agent is None:
                self.agent_live = 0
                self.host.count_sessions()  # the job may have ended meanwhile: nothing is told then
                self.host.changed.notify_all()


class Starter:
    def __init__(self, config):
        self.config = config
        self.name = config["starter_name"]
        self.dir = os.path.abspath(config["starter_dir"])
        self.uid = os.geteuid()
        slots = int(config.number("starter_slots"))
        self.slots = slots if slots > 0 else os.cpu_count() or 1
        self.enable_ssh = config.flag("enable_ssh_to_job")
        self.warm_idle = config.seconds("warm_idle")
        self.reachable = config.flag("starter_reachable")
        self.schedd = config.schedd()
        self.jobs = {}
        self.pending = []  # news the schedd has not acknowledged yet
        self.lock = threading.RLock()
        self.tickets = TicketBook()
        self.stopping = threading.Event()
        self.address = None
        self.cgroup_base = cgroup_base(self.name, self.dir) if config.flag("use_cgroups") else None
        self.tls = self.tls_fingerprint = self.builtin_problem = None
        self.lease = config.number("job_lease")
        self.lease_expiry = time.time() + self.lease
        self.lease_path = os.path.join(self.dir, ".lease")
        self.keeper = None
        self.gate = None  # the server's, once it listens: relayed connections pass it too
        self.pty_problem, self.terminals = sshd_terminals()

    def offer_builtin_transport(self):
        """The built-in transport needs a TLS certificate, made with openssl."""
        try:
            cert, key, self.tls_fingerprint = make_certificate(
                os.path.join(self.dir, ".tls"), lambda: find_program(self.config, "openssl", "node " + self.name))
            self.tls = server_tls_context(cert, key)
        except (MissingProgram, subprocess.CalledProcessError, OSError) as e:  # ssl.SSLError is an OSError
            self.builtin_problem = "the built-in transport is off on %s: %s" % (self.name, e)
            log.warning("%s", self.builtin_problem)

    # -- talking to the schedd ---------------------------------------------

    def report(self, news):
        """Tell the schedd; if it is away, the next poll carries the news."""
        try:
            self.schedd.call(dict(news, name=self.name))
        except (Unreachable, ProtocolError) as e:
            log.warning("schedd unreachable (%s); the news waits for the next poll", e)
            with self.lock:
                self.pending.append(news)
        except SshjobError as e:  # the queue moved on (the job was vacated or removed meanwhile)
            log.info("the schedd declined news of job %s: %s", news.get("run"), e)

    def finish(self, job, news):
        with self.lock:
            self.report(news)
            if self.jobs.get(job.run) is job:
                del self.jobs[job.run]

    def poll_forever(self):
        """Report and take work until the starter stops.  Nothing a schedd
        answers or a command holds may end this loop: any failure is logged
        in one line and retried after a growing pause."""
        backoff = 1.0
        while not self.stopping.is_set():
            with self.lock:
                news, self.pending = self.pending, []
                running = {run: job.gen for run, job in self.jobs.items()}
            request = {"op": "poll", "name": self.name, "user": user_name(self.uid), "address": self.address,
                       "enable_ssh": self.enable_ssh, "pty_problem": self.pty_problem,
                       "reachable": self.reachable, "ssh_problem": sshd_problem(self.config, self.name),
                       "tls_fingerprint": self.tls_fingerprint,
                       "builtin_problem": self.builtin_problem, "slots": self.slots, "jobs": running,
                       "news": news, "wait": min(POLL_WAIT, self.lease / 4)}
            asked = time.time()
            try:
                reply = self.schedd.call(request, timeout=max(2.0, min(request["wait"] + IO_TIMEOUT,
                                                                       self.lease_expiry - asked)))
            except Exception as e:
                with self.lock:
                    self.pending[:0] = news
                pause = min(backoff, max(1.0, self.lease_expiry - time.time()))  # and check the lease on time
                log.warning("%s; retrying in %.0f s", describe(e), pause)
                self.check_lease()
                self.stopping.wait(pause)
                backoff = min(backoff * 2, 30.0)
                self.schedd = self.reread_link()
                continue
            self.renew_lease(asked, reply.get("lease"))
            backoff = 1.0
            for command in reply.get("commands", []):
                try:
                    self.execute(command if isinstance(command, dict) else {})
                except Exception:
                    log.exception("could not carry out the schedd's command %.200r", command)

    def reread_link(self):
        """How to reach the schedd, from the configuration as it is now: an
        admin may have fixed the fingerprint or the token file meanwhile."""
        try:
            return Config(self.config.path).schedd() if self.config.path else self.schedd
        except SshjobError as e:
            log.warning("keeping the previous way to the schedd: %s", e)
            return self.schedd

    def execute(self, command):
        """One command of the schedd's (see MESSAGES)."""
        action = command.get("op")
        if action == "start":
            self.run_job(command)
            return
        if action == "connect_back":
            threading.Thread(target=self.connect_back, args=(command.get("id"),), daemon=True).start()
            return
        job = self.jobs.get(command.get("run"))
        if job is None or command.get("gen", "") != job.gen:  # none, or a command for an earlier run
            return
        if action == "suspend":
            job.family.companions = job.strays(job.payloads())
            job.family.suspend()
        elif action == "continue":
            job.family.signal(signal.SIGCONT)
        elif action in ("rm", "vacate") and not job.ending:
            threading.Thread(target=job.terminate, args=(action,), daemon=True).start()

    def run_job(self, spec):
        news = {"op": "failed", "run": spec.get("run"), "gen": spec.get("gen", "")}
        if spec.get("run") in self.jobs:
            self.report(dict(news, transient=True, why="its previous run is still ending"))
            return
        try:
            job = Job(self, spec)
            if self.uid != 0 and job.owner.pw_uid != self.uid:
                raise Refused("this starter runs as %s and cannot run jobs of %s" % (
                    user_name(self.uid), job.owner.pw_name))
            job.start()
        except KeyError:
            self.report(dict(news, why="user %s does not exist on %s" % (spec.get("owner"), self.name)))
            return
        except Exception as e:
            log.error("cannot start job %s: %s", spec.get("job"), describe(e))
            self.report(dict(news, why=describe(e)))
            return
        with self.lock:
            self.jobs[job.run] = job
        self.report({"op": "started", "run": job.run, "gen": job.gen, "hostkey": job.hostkey, "pids": job.pids(),
                     "ssh_problem": login_shell_problem(job.owner)})
        threading.Thread(target=job.supervise, daemon=True).start()

    # -- ssh requests ------------------------------------------------------

    def answer(self, message, sock):
        """Check a ticket; then start sshd on the connection, or run a
        built-in session over it (inside TLS only)."""
        op = field(message, "op", str)
        if op not in ("ssh", "builtin"):
            raise ProtocolError("unknown request %r" % op)
        if not self.enable_ssh:
            raise Refused("ssh to jobs is disabled on %s (enable_ssh_to_job = false)" % self.name)
        run = field(message, "run", str)
        if op == "builtin":
            if not is_tls(sock):
                raise Refused("the built-in transport runs inside TLS only")
            key, holder = None, field(message, "holder", str)
        else:
            key, holder = parse_public_key(field(message, "key", str)), None
        job = self.jobs.get(run)
        # The ticket first, checked against a secret of nobody's where there is no such job: so the answer
        # tells no one without a ticket which runs are live here.
        claims = self.tickets.redeem(job.secret if job else token_hex(32), message.get("ticket"), run, key=key,
                                     holder=holder)
        if job is None or job.ending:
            raise NotRunning("job %s is not running on %s" % (run, self.name))
        if job.process.poll() is not None:
            raise JobGone("job %s has exited; only its open sessions remain" % job.name)
        shells = [s for s in claims.get("shells") or [] if isinstance(s, str)]
        job.become()  # its owner still exists, or one sentence before the client hears yes
        if message.get("warm"):
            threading.Thread(target=job.want_agent, args=(message["warm"],), daemon=True).start()
        context, where = job.host.place(job.context(), message, job.context)
        if op == "builtin":
            sock.settimeout(None)
            job.host.run_builtin(context, sock, message, shells, ending=lambda: job.ending,
                                 accepted=lambda: send_msg(sock, {"ok": True, "where": where}))
            return
        sdir = job.host.prepare_sshd(context, key, shells)
        send_msg(sock, {"ok": True, "where": where})
        sock.settimeout(None)
        job.host.start_sshd(context, sdir, sock)

    def connect_back(self, relay_id):
        """A client reaches us through the schedd: connect out to it, and
        serve what comes as if the client had connected here."""
        try:
            sock, _ = self.schedd.stream({"op": "relay_accept", "id": relay_id, "name": self.name})
        except SshjobError as e:
            log.warning("could not connect back to the schedd for a relay: %s", e)
            return
        try:
            self.gate.enter(sock, "the schedd's relay")  # the request that comes has a deadline, as any
            self.serve_connection(sock, "the schedd's relay", admitted=lambda: self.gate.leave(sock))
        except Exception as e:
            log.error("could not serve a relayed connection: %s", describe(e))
        finally:
            self.gate.leave(sock)

    def serve_connection(self, sock, peer, admitted=lambda: None):
        """A ticket, then the ssh protocol itself (or TLS for the built-in
        transport).  `admitted` is called once the request is in."""
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(IO_TIMEOUT)
        try:
            if sock.recv(1, socket.MSG_PEEK) == b"\x16" and self.tls:  # a TLS handshake
                sock = self.tls.wrap_socket(sock, server_side=True)
            message = recv_msg(sock, "its sender")
            admitted()
            self.answer(message, sock)
        except SshjobError as e:
            log.warning("refused an ssh request from %s: %s", peer, e)
            with contextlib.suppress(OSError):
                send_msg(sock, error_reply(e))
        except OSError as e:  # ssl.SSLError included
            log.debug("dropped a connection: %s", e)
        except Exception:
            log.exception("internal error while serving a connection from %s", peer)
        finally:
            sock.close()

    def clean_up_after_crash(self):
        """A previous starter here died without ending its jobs: end what is
        left of them, processes and files."""
        for path, family in job_families(self.dir, self.cgroup_base):
            if family is not None:
                log.warning("ending the orphaned processes of job %s", os.path.basename(path))
                family.remove()
            shutil.rmtree(path, ignore_errors=True)

    # -- the lease -----------------------------------------------------------

    def renew_lease(self, asked, lease):
        """The schedd answered a poll sent at `asked`: the lease runs from
        then (never from later, so that it ends before the schedd's does)."""
        if isinstance(lease, (int, float)) and not isinstance(lease, bool) and lease > 0:
            self.lease = float(lease)
        self.lease_expiry = asked + self.lease
        try:
            write_atomically(self.lease_path, "%.3f %d\n" % (self.lease_expiry, os.getpid()))
        except OSError as e:
            log.warning("cannot record the lease in %s (%s)", self.lease_path, e.strerror)

    def check_lease(self):
        """The schedd has not answered: past the lease, stop the jobs, which
        the schedd will run again elsewhere."""
        if time.time() <= self.lease_expiry:
            return
        with self.lock:
            ending = [job for job in self.jobs.values() if not job.ending]
        if ending:
            log.error("the schedd has not renewed this starter's lease for %.0f s: its %d job(s) stop, and will "
                      "run again", self.lease, len(ending))
        for job in ending:
            threading.Thread(target=job.terminate, args=("lease",), daemon=True).start()

    def start_lease_keeper(self):
        """Fork keep_lease(); before any thread starts, as fork wants."""
        self.renew_lease(time.time(), None)
        pid = os.fork()
        if pid == 0:
            try:
                keep_lease(self.dir, self.cgroup_base, os.getppid())
            finally:
                os._exit(0)
        self.keeper = pid

    def stop(self):
        """End every job (the schedd requeues them) and leave nothing behind."""
        self.stopping.set()
        if self.keeper:
            with contextlib.suppress(OSError):
                os.kill(self.keeper, signal.SIGTERM)
                os.waitpid(self.keeper, 0)
        enders = [threading.Thread(target=job.terminate, args=("vacate",)) for job in list(self.jobs.values())]
        for ender in enders:
            ender.start()
        for ender in enders:
            ender.join()
        deadline = time.time() + KILL_GRACE
        while self.jobs and time.time() < deadline:
            time.sleep(0.05)
        if self.cgroup_base:
            with contextlib.suppress(OSError):
                os.rmdir(self.cgroup_base)


class StarterHandler(RequestHandler):
    """The starter's ssh endpoint: a ticket, then the ssh protocol itself."""

    def handle(self):
        self.server.app.serve_connection(self.request, self.client_address[0],
                                         admitted=lambda: self.server.gate.leave(self.admission))


def serve_starter(config):
    starter = Starter(config)
    own_directory(starter.dir, 0o755)
    starter.clean_up_after_crash()
    starter.offer_builtin_transport()
    starter.start_lease_keeper()
    try:
        server = listen(TCPServer, parse_address(config["starter_address"])[1], StarterHandler)
    except SshjobError:
        starter.stop()  # and its lease keeper with it
        raise
    if starter.cgroup_base:
        log.info("process tracking: one cgroup v2 per job, under %s", starter.cgroup_base)
    else:
        log.info("process tracking: environment tag and process groups (no cgroup v2 for this starter, "
                 "or use_cgroups = false)")
    server.app = starter
    starter.gate = server.gate
    host, port = server.server_address[:2]
    starter.address = "%s:%d" % (socket.getfqdn() if host in ("0.0.0.0", "::") else host, port)
    log.info("starter %s (user %s, %d slots) listening on %s", starter.name, user_name(starter.uid),
             starter.slots, starter.address)
    start_vital(starter.poll_forever, "the starter's poll of the schedd")
    run_until_signalled(server, on_stop=starter.stop)


class PoolAgent(JobSide):
    """A pool job's agent: the warm path's node side in a pool.  The starter
    starts it in the job, as the job's owner, when a client first asks for
    it (`sshjob pool-agent`), and tells it the job; it serves the owner's
    later sessions itself (JobAgent), which so pay no ticket, no privilege
    drop and no cgroup migration on the starter.  It is of the job's family
    (stopped, continued and ended with the job) but neither one of the
    job's own processes nor a session: it tells the starter how many of its
    sessions are in use, which the job counts as its own (a pool job
    completes when its last session ends), and once the job's command has
    exited it takes no new session.  It ends warm_idle after its last
    session, or when the starter goes."""

    def __init__(self, config, spec):
        import tempfile
        self.config = config
        self.owner = pwd.getpwuid(os.getuid())
        self.job_id, self.name = field(spec, "run", str), field(spec, "job", str)
        self.node, self.index = field(spec, "node", str), field(spec, "index", int, 0)
        self.env, self.workdir = field(spec, "env", dict), field(spec, "workdir", str)
        self.tag, self.first_pid = field(spec, "tag", str), field(spec, "pid", int)
        cgroup = spec.get("cgroup")
        self.family = ProcessFamily(os.path.dirname(cgroup) if isinstance(cgroup, str) else None,
                                    os.path.basename(cgroup) if isinstance(cgroup, str) else None, self.tag,
                                    adopt=True)
        self.host_key = field(spec, "host_key", str)
        self.idle = field(spec, "idle", (int, float))
        self.exited = False
        self.starter_gone = threading.Event()
        self.tmp = tempfile.mkdtemp(prefix="sshjob-agent-")
        problem, terminals = sshd_terminals()
        self.said = None  # how many sessions in use the starter was last told of
        self.saying = threading.Lock()
        self.host = SessionHost(config, self.tmp, self.host_key, terminals=terminals, terminal_problem=problem,
                                memory=os.path.join(self.tmp, "payload"), tally=self.tell_starter)
        self.host.recalled = spec.get("memory")

    def job_context(self):
        pids = self.family.pids("main")
        if self.first_pid in pids:
            pids = [self.first_pid] + [pid for pid in pids if pid != self.first_pid]
        return JobContext(self.name, self.owner, self.env, self.workdir, pids, self.tag, self.node, self.index)

    def prepare_sshd(self, request, context):
        key = parse_public_key(field(request, "key", str))
        sdir = self.host.prepare_sshd(context, key, request_shells(request))
        with open(self.host_key + ".pub") as f:
            return sdir, parse_public_key(f.read())

    def refusal(self):
        return JobGone("job %s has exited; only its open sessions remain" % self.name) if self.exited else None

    def hear_starter(self, agent):
        """The starter's word: another name for the job, or that its command exited."""
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["warm"] and len(words) == 2 and WARM_KEY.fullmatch(words[1]):
                agent.add_record(words[1])
            elif words == ["exited"]:
                self.exited = True
        self.starter_gone.set()

    def tell_starter(self, live):
        """Say how many sessions are in use, when that changes: as a session
        starts (the job must not end under it) and ends, and as a channel
        opens or closes on an ssh master's connection."""
        with self.saying:
            if live != self.said:
                sys.stdout.write("live %d\n" % live)
                sys.stdout.flush()
                self.said = live

    def serve(self):
        """Serve until the starter goes, or warm_idle after the last session."""
        agent = JobAgent(self, self.idle)
        threading.Thread(target=self.hear_starter, args=(agent,), daemon=True).start()
        try:
            while not self.starter_gone.is_set():
                live = self.host.live()
                self.tell_starter(live)
                if live:
                    agent.last = time.monotonic()
                elif not self.host.sessions and agent.idle():
                    return
                self.starter_gone.wait(0.2)
        finally:
            agent.stop()


# What a pool job's agent and its sessions import as they go: loaded while it is root.
AGENT_MODULES = ("base64", "configparser", "ctypes", "glob", "grp", "hashlib", "hmac", "json", "logging", "pty",
                 "shlex", "shutil", "ssl", "string", "subprocess", "tempfile", "termios", "tty")


def run_pool_agent(config_path):
    """`sshjob pool-agent`: a pool job's agent, which its starter starts (see PoolAgent)."""
    spec = json.loads(sys.stdin.readline() or "{}")
    become = privileges_of(field(spec, "owner", str))
    if become:
        for name in AGENT_MODULES:  # loaded while root: a root starter's Python may be closed to the owner
            __import__(name)
        for function in (serve_sftp, container_session):  # what its sessions run in a job's container
            source_of(function)
        become()
        prctl(PR_SET_DUMPABLE, 1)  # the owner's again, as user namespaces want it
    config = Config(config_path if config_path and os.path.exists(config_path) else None)
    agent = PoolAgent(config, spec)
    try:
        agent.serve()
    finally:
        shutil.rmtree(agent.tmp, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------
# Slurm, on the node: a session is a job step (srun --jobid J --overlap)
# that the user starts, which Slurm authenticates and refuses in other
# users' jobs.  The step runs this module on the node (`sshjob
# slurm-step`, started by slurm_boot): it finds the job's batch script,
# takes its environment and working directory, and starts sshd -i as the
# user on a TCP connection that the client makes to it directly (a
# one-time secret admits it, ssh authenticates both ends), else on the
# srun pipe.  A guardian that outlives the step ends whatever the session
# left behind, double-forked processes included, and stops them while
# Slurm suspends the job.
# ---------------------------------------------------------------------------

DIRECT_TAKEN = b"\x01"  # the node's answer to the secret on a direct connection that it takes

DIRECT_PENDING = 64  # connections a step reads secrets from at once; past that the oldest goes

DIRECT_SECRET_WAIT = 0.5  # seconds a connection to a step's listener has to bring the secret


def slurm_boot():
    """What srun runs on the node, as `python3 -I -S -c SOURCE PROGRAM DIGEST`:
    its source is sent, not imported.  It finds this module (cached by its
    hash, at the client's path, or shipped by the client, compressed, after
    saying "need"), says "have HOW", and runs the step.

    Exactly the bytes whose SHA-256 the client sent run: the module is
    compiled from the bytes that were hashed, never imported by path, and
    its compiled code is cached beside it under a hash keyed with that
    digest.  The cache is walked with directory descriptors from the home
    directory down, each level owned by the user and writable by no one
    else, and every file is checked by its descriptor (owned by the user):
    nothing can be swapped in between a check and its use.  Reads are
    unbuffered: what follows on stdin is the step's."""
    import hashlib
    import marshal
    import os
    import sys
    import types

    program, digest = sys.argv[1], sys.argv[2]
    uid = os.getuid()
    code_name = "code-%s" % (sys.implementation.cache_tag or "python")

    def owned(fd, kind):
        info = os.fstat(fd)
        return info.st_uid == uid and not info.st_mode & 0o022 and (info.st_mode & 0o170000) == kind

    def private_directory(parent, name):
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        try:
            try:
                fd = os.open(name, flags, dir_fd=parent)
            except FileNotFoundError:
                os.mkdir(name, 0o700, dir_fd=parent)
                fd = os.open(name, flags, dir_fd=parent)
        except OSError:
            return None
        if owned(fd, 0o040000):
            return fd
        os.close(fd)
        return None

    def cache_directory():
        try:
            fd = os.open(os.path.expanduser("~"), os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None
        if not owned(fd, 0o040000):
            os.close(fd)
            return None
        for name in (".cache", "sshjob", digest):
            inner = private_directory(fd, name)
            os.close(fd)
            if inner is None:
                return None
            fd = inner
        return fd

    def read_own(directory, name):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read() if owned(fd, 0o100000) else None

    def write_own(directory, name, data):
        temporary = ".%s.%d" % (name, os.getpid())
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=directory)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
        except OSError:
            return

    def code_key(data):
        return hashlib.sha256(digest.encode() + code_name.encode() + data).hexdigest().encode()

    def cached_code(directory):
        stored = read_own(directory, code_name) or b""
        key, _, data = stored.partition(b"\n")
        if not data or key != code_key(data):
            return None
        try:
            return marshal.loads(data)
        except (EOFError, ValueError, TypeError):
            return None

    def inside(path):
        if path.endswith(".py"):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError:
                return None
        try:
            import zipfile

            with zipfile.ZipFile(path) as z:
                return z.read("site-packages/sshjob.py")
        except Exception:
            return None

    def fits(data):
        return data is not None and hashlib.sha256(data).hexdigest() == digest

    def take(size):
        data = b""
        while len(data) < size:
            chunk = os.read(0, size - len(data))
            if not chunk:
                sys.exit(1)
            data += chunk
        return data

    def shipped():
        os.write(1, b"need\n")
        text = b""
        while not text.endswith(b"\n") and len(text) < 20:
            text += take(1)
        if not text.strip().isdigit() or not int(text):
            sys.exit(3)
        import zlib

        try:
            return zlib.decompress(take(int(text)))
        except zlib.error:
            sys.exit(3)

    cache = cache_directory()
    where = os.path.join(os.path.expanduser("~"), ".cache", "sshjob", digest)
    code = cached_code(cache) if cache is not None else None
    how = "cached in " + where
    if code is None:
        data = read_own(cache, "sshjob.py") if cache is not None else None
        if not fits(data):
            data, how = inside(program), "read from " + program
            if not fits(data):
                data, how = shipped(), "shipped by the client"
                if not fits(data):
                    sys.exit(3)
            if cache is not None:
                write_own(cache, "sshjob.py", data)
        code = compile(data, os.path.join(where, "sshjob.py"), "exec")
        if cache is not None:
            packed = marshal.dumps(code)
            write_own(cache, code_name, code_key(packed) + b"\n" + packed)
        else:
            how += ", run from memory (no private cache directory)"
    os.write(1, ("have " + how + "\n").encode())
    sshjob = sys.modules["sshjob"] = types.ModuleType("sshjob")
    sshjob.__file__ = os.path.join(where, "sshjob.py")
    exec(code, sshjob.__dict__)
    sys.exit(sshjob.main(sys.argv[3:] + ["slurm-step"]))


class PipeChannel:
    """The step's end of srun's pipes, as the little of a socket that the
    protocol uses."""

    def __init__(self, read_fd, write_fd):
        self.read_fd, self.write_fd = read_fd, write_fd

    def fileno(self):
        return self.read_fd

    def recv(self, size, flags=0):
        return os.read(self.read_fd, size)

    def sendall(self, data):
        write_all(self.write_fd, data)

    @staticmethod
    def pending():
        return 0


def slurm_job_context(job_id, own_step):
    """(pids, environment, working directory) of the job on this node: its
    processes, the batch script's first, and the first one's environment
    and directory; (pids, None, None) if none of them can be read."""
    result = subprocess.run(["scontrol", "listpids", job_id], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, universal_newlines=True)
    rows = [line.split() for line in result.stdout.splitlines()]
    rows = [row for row in rows if len(row) >= 4 and row[0].isdigit() and row[2] not in (own_step, "extern")]
    rows.sort(key=lambda row: (row[2] != "batch", row[3] != "0", not row[2].isdigit(), row[2].zfill(9), row[3]))
    found = []
    for row in rows:
        with contextlib.suppress(OSError):
            found.append((row[2], int(row[0]), process_environment(int(row[0])), os.readlink("/proc/%s/cwd" % row[0])))
    sessions = {step for step, _, env, _ in found if SESSION_VAR in env}  # sshjob's steps: none is the job's own
    own = [(pid, env, cwd) for step, pid, env, cwd in found if step not in sessions]
    return ([pid for pid, _, _ in own],) + (own[0][1:] if own else (None, None))


def guard_step(step_pid, started, tag, tmp):
    """The guardian: while the step lives, stop the session's processes
    when Slurm stops the step (suspend) and continue them after; when it
    ends, however it ends, end them all, wherever they have forked to.
    Those below the step are stopped too: sshd, whose environment (where
    the tag is) its process title overwrites, would open new sessions on
    its connection (an ssh master's) in a suspended job."""
    family = ProcessFamily(None, "session", tag)  # found by its tag: the step's cgroup is Slurm's
    stopped = None  # the pids stopped with the step, while it is stopped
    while True:
        state = process_state(step_pid, started)
        if state is None:
            break
        if state in "Tt" and stopped is None:
            stopped = sorted(set(family.pids() + descendants(step_pid)))
            signal_pids(stopped, signal.SIGSTOP)
        elif state not in "Tt" and stopped is not None:
            signal_pids(stopped, signal.SIGCONT)
            stopped = None
        time.sleep(0.2)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        family.signal(signal.SIGCONT)
        family.signal(signum)
        deadline = time.time() + 2
        while family.pids() and time.time() < deadline:
            time.sleep(0.1)
    shutil.rmtree(tmp, ignore_errors=True)


def start_guardian(tag, tmp):
    """Fork the guardian away from the step (its own session, no parent in
    the step), so that it outlives whatever ends the step."""
    with open("/proc/self/stat") as f:
        started = f.read().rpartition(")")[2].split()[19]
    step_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.closerange(3, 65536)
                guard_step(step_pid, started, tag, tmp)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


JOB_KEYS_KEPT = 7 * 86400.0  # seconds a Slurm job's host key stays on a node after its last session


def session_activity(job):
    """The file whose time says when a session of Slurm job `job` last ended
    on this node: an allocation's idle clock (run_allocation) starts there,
    so that no session is missed between two of its looks."""
    base = private_node_directory()
    return base and os.path.join(base, "activity-%s" % job)


def held_marker(job, step):
    """The file that says step `step` of `job` holds what a session left running, and no session."""
    base = private_node_directory()
    return base and step and os.path.join(base, "held-%s.%s" % (job, step))


def become_subreaper():
    """Whether this process is now its descendants' reaper (Linux 3.4):
    what they leave running when their parent exits stays its own."""
    return prctl(PR_SET_CHILD_SUBREAPER, 1)


def touch(path):
    """Make `path` if missing (never through a link) and set its time to now."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        os.utime(path)


def mark_held(marker, held):
    if marker and held:
        touch(marker)
    elif marker:
        with contextlib.suppress(OSError):
            os.unlink(marker)


def leftover_children(sessions):
    """Whether this process has children other than the sessions' own
    processes (`sessions`, Popen objects, which their threads reap): what
    the sessions left running, reparented to the step, its subreaper.
    Those that ended are reaped here, by pid."""
    own = {proc.pid for proc in sessions}
    alive = False
    for pid in children_of(os.getpid()):
        if pid in own:
            continue
        if process_state(pid) == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        else:
            alive = True
    return alive


def mark_session_end(job):
    path = session_activity(job)
    if path:
        touch(path)


def job_key_directory(job, started):
    """Where the host key of Slurm job `job`, which started at `started`,
    is kept on this node for its later sessions: under a directory of the
    user's own in the temporary directory, private, not a link.  None where
    there is no such directory.  Keys of jobs whose last session is over a
    week old go."""
    base = private_node_directory()
    if not base or not job:
        return None
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            if entry.name.startswith("hostkey-") and time.time() - entry.stat().st_mtime > JOB_KEYS_KEPT:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)  # what the job's sessions last entered (SessionHost.memory)
    return os.path.join(base, "hostkey-%s-%s" % (job, re.sub(r"\W", "", started or "")))


class NodeStep(JobSide):
    """A session's step on the node: the job's context, read from Slurm and
    /proc, the guardian, the job's host key on this node, the direct
    connection; the session itself is its SessionHost's."""

    def __init__(self, config, request):
        import tempfile
        self.config = config
        self.request = request
        self.owner = pwd.getpwuid(os.getuid())
        self.job_id = os.environ.get("SLURM_JOB_ID", "")
        self.name = field(request, "job", str, self.job_id)
        self.node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.shells = request_shells(request)
        self.tag = token_hex(8)
        self.keep = job_key_directory(self.job_id, request.get("started"))
        self.tmp = tempfile.mkdtemp(prefix="sshjob-step-")
        start_guardian(self.tag, self.tmp)
        self.subreaper = become_subreaper()  # after the guardian, which must not be ours to wait for
        self.making = self.host_key = None  # made while the job's context is read: an OpenSSH session needs it
        if request.get("transport") != "builtin":
            with contextlib.suppress(MissingProgram):  # transport() says so, and chooses the built-in one
                self.making = self.start_host_key()
        pids, env, cwd = slurm_job_context(self.job_id, os.environ.get("SLURM_STEP_ID"))
        deadline, holder = time.monotonic() + 5, request.get("allocation") is True
        while (env is None or (holder and not holder_runs(pids))) and request.get("batch_host") == self.node and \
                time.monotonic() < deadline:
            time.sleep(0.05)  # Slurm says RUNNING a moment before the batch script starts (and it becomes Python)
            pids, env, cwd = slurm_job_context(self.job_id, os.environ.get("SLURM_STEP_ID"))
        workdir = field(request, "workdir", str, "") or cwd or self.owner.pw_dir  # where the script started
        self.terminal_problem, terminals = sshd_terminals()
        self.host = SessionHost(config, self.tmp, self.host_key, terminals=terminals,
                                terminal_problem=self.terminal_problem,
                                memory=self.keep and self.keep + ".payload",
                                tally=lambda live: mark_session_end(self.job_id))
        self.slurm_context = JobContext(self.name, self.owner, env if env is not None else dict(os.environ),
                                        workdir, pids, self.tag, self.node, field(request, "index", int, 0))
        self.context, self.where = self.host.place(self.slurm_context, request, self.job_context)
        self.keying = threading.Lock()  # the first OpenSSH session of the step makes the host key
        self.agent = None

    def start_host_key(self):
        """The job's host key on this node, as its earlier sessions had it:
        every session of a job shows the one key that clients pin for the
        job's name.  It is kept in a private directory of the user's on the
        node (job_key_directory), where there is one; else the key is the
        session's own.  Returns ssh-keygen making a key (see
        finish_host_key), or None when the job has one already."""
        keep = self.keep
        self.host_key = os.path.join(keep or os.path.join(self.tmp, "hostkey"), "ssh_host_ed25519_key")
        if keep and os.path.isfile(self.host_key + ".pub"):
            os.utime(keep)
            return None
        keygen = find_program(self.config, "ssh_keygen", "node " + self.node)
        os.mkdir(os.path.join(self.tmp, "hostkey"), 0o700)
        return start_keygen(keygen, os.path.join(self.tmp, "hostkey", "ssh_host_ed25519_key"),
                            "sshjob-job-" + self.name)

    def finish_host_key(self, making):
        """Wait for the key that `making` makes, and keep it for the job's
        later sessions, unless another session of the job was first."""
        failure = finish_keygen(making) if making else None
        if failure:
            raise StorageError("ssh-keygen cannot make the session's host key on %s: %s" % (self.node, failure))
        made = os.path.join(self.tmp, "hostkey")
        keep = os.path.dirname(self.host_key)
        if making and keep != made:
            with contextlib.suppress(OSError):
                os.rename(made, keep)
            if not os.path.isfile(self.host_key + ".pub"):
                self.host_key = os.path.join(made, "ssh_host_ed25519_key")

    def transport(self, request=None, context=None):
        return self.transport_for(request or self.request, context or self.context)

    def job_context(self):
        """The job as its first session found it, with its processes now."""
        pids, _, _ = slurm_job_context(self.job_id, os.environ.get("SLURM_STEP_ID"))
        return self.slurm_context._replace(pids=pids or self.slurm_context.pids)

    def prepare_sshd(self, request=None, context=None):
        """(the session's files, the public host key)."""
        request = request or self.request
        key = parse_public_key(field(request, "key", str))
        with self.keying:
            making = self.making if self.host_key else self.start_host_key()
            self.making = None
            try:
                sshd_version(find_program(self.config, "sshd", "node " + self.node))  # found while the key is made
            finally:
                self.finish_host_key(making)
        self.host.host_key = self.host_key
        shells = request_shells(request)
        sdir = self.host.prepare_sshd(context or self.context, key, shells)
        with open(self.host_key + ".pub") as f:
            return sdir, parse_public_key(f.read())

    def listen(self):
        """A listener for the client's direct connection, on the address
        that faces the client; None where there is none, or the client
        wants none (slurm_direct = false)."""
        client = os.environ.get("SLURM_LAUNCH_NODE_IPADDR")
        host = client and address_facing(client)
        if not host or self.request.get("direct") is False:
            return None
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((host, 0))
        listener.listen(DIRECT_BACKLOG)
        listener.setblocking(False)
        return listener

    @staticmethod
    def await_client(channel, listener, secret, timeout=IO_TIMEOUT):
        """The client's direct connection, with the secret; or None when the
        client asks for the srun pipe instead (the channel is read in the
        same pass as the listener).  Another user on the client's host or on
        this node may flood the listener: connections from elsewhere than
        the client's address are closed unread, those that do not bring the
        secret within DIRECT_SECRET_WAIT are closed, their secrets are read
        side by side, and the whole wait ends at its deadline, whatever
        the listener does."""
        deadline = time.monotonic() + timeout
        pending = {}  # connection: (its deadline, what it sent so far)
        waits = ([listener] if listener else []) + [channel]
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise Unreachable("the client did not connect within %.0f s" % timeout)
                for sock in [s for s, (due, _) in pending.items() if due <= now]:
                    del pending[sock]
                    sock.close()
                wait = min([deadline] + [due for due, _ in pending.values()]) - now
                ready = wait_for(waits + list(pending), timeout=max(0.0, wait))[0]
                if channel in ready:
                    try:
                        message = recv_msg(channel, "the client")
                    except ProtocolError:  # the pipe's end: a proxy hands its socket to ssh and exits
                        waits.remove(channel)
                        message = None
                    if message is not None:
                        if field(message, "op", str) != "pipe":
                            raise ProtocolError("expected the client's choice of path")
                        return None
                if listener in ready:
                    sock = NodeStep.accept_some(listener, pending, secret)
                    if sock:
                        return sock
                for sock in [s for s in ready if s in pending]:
                    if NodeStep.read_secret(sock, pending, secret):
                        del pending[sock]
                        return sock
        finally:
            for sock in pending:
                sock.close()

    @staticmethod
    def accept_some(listener, pending, secret):
        """Accept what waits on the listener, from the client's address (or,
        the client being on this node, from our own) only, keeping at most
        DIRECT_PENDING unproven connections: the oldest goes first.  The
        client sends the secret as it connects, so it is read at once:
        returns the connection that brought it, if one did."""
        allowed = (os.environ.get("SLURM_LAUNCH_NODE_IPADDR"), listener.getsockname()[0])
        for _ in range(DIRECT_PENDING):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return None
            if peer[0] not in allowed:
                sock.close()
                continue
            sock.setblocking(False)
            if len(pending) >= DIRECT_PENDING:
                for waiting in list(pending):  # before one must go: whichever brought the secret meanwhile is in
                    if NodeStep.read_secret(waiting, pending, secret):
                        del pending[waiting]
                        sock.close()
                        return waiting
            if len(pending) >= DIRECT_PENDING:
                oldest = next(iter(pending))
                del pending[oldest]
                oldest.close()
            pending[sock] = (time.monotonic() + DIRECT_SECRET_WAIT, b"")
            if NodeStep.read_secret(sock, pending, secret):
                del pending[sock]
                return sock
        return None

    @staticmethod
    def read_secret(sock, pending, secret):
        """Whether `sock` has brought the whole secret; one that brings
        another, or ends, is closed.  (Nothing is said of a part: a
        prefix's answer would let a flood learn the secret byte by byte.)"""
        import hmac
        due, got = pending[sock]
        try:
            got += sock.recv(len(secret) - len(got))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            got = b""
        if got and len(got) < len(secret):
            pending[sock] = (due, got)
            return False
        if got and hmac.compare_digest(got, secret):
            sock.setblocking(True)
            sock.sendall(DIRECT_TAKEN)
            return True
        del pending[sock]
        sock.close()
        return False

    def serve_sshd(self, channel):
        sdir, hostkey = self.prepare_sshd()
        listener = self.listen()
        secret = os.urandom(32)
        send_msg(channel, {"ok": True, "transport": "openssh", "why": self.why, "user": self.owner.pw_name,
                           "node": self.node, "where": self.where, "hostkey": hostkey, "secret": secret.hex(),
                           "direct": list(listener.getsockname()) if listener else None})
        sock = self.await_client(channel, listener, secret)
        if listener:
            listener.close()
        log.debug("sshd -i on %s", "a direct connection" if sock else "srun's pipe")
        proc = self.host.start_sshd(self.context, sdir, sock or (0, 1))
        self.host.wait_for_sessions()
        return proc.returncode

    def serve_builtin(self, channel):
        send_msg(channel, {"ok": True, "transport": "builtin", "why": self.why, "user": self.owner.pw_name,
                           "node": self.node, "where": self.where})
        session = recv_msg(channel, "the client")
        if session.get("op") != "builtin":
            raise ProtocolError("expected the built-in session's request")
        return self.host.run_builtin(self.context, channel, session, self.shells,
                                     accepted=lambda: send_msg(channel, {"ok": True}))

    def start_agent(self):
        """The job's agent on this node, if the client asks for one and no
        other step of the job here is it already."""
        key = self.request.get("warm")
        idle = self.config.seconds("warm_idle")
        if not (self.subreaper and idle > 0 and isinstance(key, str) and WARM_KEY.fullmatch(key)):
            return
        client = os.environ.get("SLURM_LAUNCH_NODE_IPADDR")
        facing = client and address_facing(client)
        try:
            self.agent = JobAgent(self, idle, [facing] if facing else [])
            self.agent.add_record("slurm-" + key)
        except (OSError, SshjobError, subprocess.CalledProcessError) as e:
            log.debug("no warm path for job %s: %s", self.name, describe(e))

    def linger(self):
        """After its first session the step stays: as the job's agent on
        this node while sessions come through it and for warm_idle after
        the last, and, the step's subreaper, while what sessions left
        running lives (tmux, nohup, an editor's server), which so stays in
        the step, where Slurm suspends and ends it with the job, as a pool
        keeps it in the job.  srun's pipes are let go first, so that the
        client's srun sees the first session's end; a marker says when the
        step holds no session (an allocation's idle clock)."""
        if not self.subreaper:
            return
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        marker = held_marker(self.job_id, os.environ.get("SLURM_STEP_ID", ""))
        try:
            while True:
                live = self.host.live() > 0
                mark_held(marker, not live)
                if live and self.agent:
                    self.agent.last = time.monotonic()
                if self.agent and not live and self.agent.idle():
                    self.agent.stop()
                    self.agent = None
                if not (live or self.agent or self.host.sessions or leftover_children(())):
                    return
                time.sleep(0.2)
        finally:
            if self.agent:
                self.agent.stop()
            mark_held(marker, False)

    def serve(self, channel):
        self.transport_name, self.why = self.transport()
        if self.transport_name == "openssh":
            return self.serve_sshd(channel)
        if self.making:  # a host key that no sshd will use
            self.making.kill()
            self.making.wait()
            self.making = None
        return self.serve_builtin(channel)


def run_slurm_step(config_path):
    """`sshjob slurm-step`: what slurm_boot runs on the node, on srun's pipes."""
    channel = PipeChannel(0, 1)
    step = None
    try:
        config = Config(config_path if config_path and os.path.exists(config_path) else None)
        request = recv_msg(channel, "the client")
        if request.get("op") != "session":
            raise ProtocolError("a step's first message must ask for a session")
        step = NodeStep(config, request)
        step.start_agent()
        status = step.serve(channel)
        step.linger()
        return status
    except Exception as e:  # whatever it is, the client hears it as one sentence
        error = e if isinstance(e, SshjobError) else Unreachable(describe(e))
        with contextlib.suppress(OSError):
            send_msg(channel, error_reply(error))
        log.warning("%s", error)
        return error.status
    finally:
        if step:  # the guardian would too, but a cgroup may end it with the step
            shutil.rmtree(step.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# Sites: where jobs live, as the client sees them.  A site is the client's
# one seam to a batch system: a ticket for a job, a connection to the job's
# sshd, a channel for a built-in session, the job's state, its removal, the
# queue's rows.  PoolSite asks an sshjob pool's schedd; SlurmSite starts a
# step with srun, with no sshjob daemon anywhere.
# ---------------------------------------------------------------------------


class SessionRequest(collections.namedtuple("SessionRequest", "job key holder transport interactive shells command "
                                                              "container job_env")):
    """What the client asks a site for: a session in `job` (as the user
    typed it) for the public `key` (OpenSSH) or for whoever knows the
    secret whose hash is `holder` (the built-in transport), over
    `transport` (auto, openssh or builtin), with or without a terminal, in
    the first of `shells` that the node has, running `command` (None: an
    interactive shell), in the job's `container` (auto: its first, none:
    on the node, or a container's pid or name), with the environment of
    the job's payload or of its script (`job_env`)."""

    def __new__(cls, job, key=None, holder=None, transport="auto", interactive=False, shells=(), command=None,
                container="auto", job_env="payload"):
        return super().__new__(cls, job, key, holder, transport, interactive, list(shells), command, container,
                               job_env)

    def place(self):
        """What the node needs to know of where the session is to run."""
        return {"container": self.container, "job_env": self.job_env}


# A site's yes to a SessionRequest: the job as the site names it, the user it runs as, the node, the transport and
# why, and the grant that the site connects with (the schedd's signed ticket and the starter's address; a Slurm step).
Ticket = collections.namedtuple("Ticket", "job user node transport why grant")


class Site:
    """Where jobs live, as the client sees them: the client's one seam to a
    batch system.  The client, its sessions and every guarantee of them are
    the same for all sites: a site only answers what is below.  An adapter
    for another engine (HTCondor, PBS, LSF, a container runtime) is one
    subclass and one line in SITES.

    A site is made for one configuration and one job; what it starts for
    the job (a Slurm step) it holds until close()."""

    name = None  # in SITES, -scheduler, `scheduler =`, "NAME:JOB" and host names (JOB.NAME.sshjob)
    job_pattern = None  # its job ids, a regular expression
    agent_silent = False  # whether the job's agent failed to answer a ping (agent_runs): no use trying it again

    def job(self, text):
        """The job that `text` names, as the site names it; UsageError if
        `text` is not one of its job ids."""
        raise NotImplementedError

    def ticket(self, request):
        """A Ticket for `request`; NotRunning while the job may yet run
        (-auto-retry waits), Held, JobGone, NotFound or Refused otherwise."""
        raise NotImplementedError

    def connect_ssh(self, request, ticket=None):
        """(a socket that the job's sshd answers, the host key it shows), on
        `ticket`, or on a fresh one: scp, sftp and rsync connect more than
        once in one session."""
        raise NotImplementedError

    def open_builtin(self, ticket, session):
        """A channel to a built-in session inside the job, once the node has
        taken `session` (the command, the terminal, the client's variables)."""
        raise NotImplementedError

    def state(self, job, ticket=None):
        """The job's state in the pool's words (running, idle, held,
        completed, removed...), or, given a session's ticket, the state of
        the run that the session was in; None where the site does not know."""
        raise NotImplementedError

    def remove(self, job):
        raise NotImplementedError

    def queue(self, everyone=False):
        """The rows of `sshjob q`, a header first: (ID, OWNER, STATE, NODE,
        COMMAND); this user's jobs, or everyone's."""
        raise NotImplementedError

    def allocations(self, profile):
        """The user's live allocations of profile `profile` (sshjob new), oldest first."""
        raise UsageError("allocations on demand (sshjob new) are not made for a %s site" % self.name)

    def submit_allocation(self, profile, workdir):
        """A new allocation of `profile` (a Profile), its sessions in `workdir`: its job."""
        raise UsageError("allocations on demand (sshjob new) are not made for a %s site" % self.name)

    def close(self):
        """End what the site started for the job and no session holds."""

    # -- the warm path: the job's agent, where the site has one ---------------

    def warm_name(self):
        """The job's name in the user's records of agents (warm_record), or
        None where the site has no warm path, or warm_idle = 0."""
        return None

    def warm_step(self, request):
        """A WarmStep through the job's agent, where the user's record names
        one that answers; else None, and the cold way goes on.  A record
        whose agent is gone (its port closed, another certificate, the
        secret refused) goes too; one that does not answer in time stays
        (its job may be suspended, which the cold way says)."""
        name = not self.agent_silent and self.warm_name()
        if not name:
            return None
        try:
            step = WarmStep(self, read_warm_record(warm_record(name)))
        except (OSError, ValueError, TypeError, KeyError, ConfigError):  # no record, or nowhere to keep one
            return None
        try:
            step.begin(request)
        except (OSError, SshjobError) as e:
            step.close()
            log.debug("job %s's agent on %s does not answer (%s): the cold way", self.spec, step.record["node"],
                      describe(e))
            if isinstance(e, (ConnectionRefusedError, Refused, ProtocolError)):
                with contextlib.suppress(OSError):
                    os.unlink(warm_record(name))
            return None
        log.debug("the warm path: job %s's agent on %s", self.spec, step.record["node"])
        return step

    def agent_runs(self):
        """Whether the job's agent answers a ping: it runs, and is not
        stopped with a suspended job (an ssh master's sessions would wait)."""
        name = self.warm_name()
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError, ConfigError):
            state = name and ping_agent(read_warm_record(warm_record(name)))
            self.agent_silent = state == "silent"  # so that the cold way does not wait for it again
            return state == "runs"
        return False


def pool_key(config, schedd_name=None):
    """What names a pool (its configuration, its schedd) in the user's warm
    records: a name, no secret (a CRC: hashlib costs a warm client 4 ms)."""
    import zlib
    return "%08x" % zlib.crc32(json.dumps([config.path, schedd_name]).encode())


class PoolSite(Site):
    """Where a job of an sshjob pool lives: its schedd hands out tickets,
    its starter takes them."""

    name = "pool"
    job_pattern = JOB_ID.pattern

    def __init__(self, config, opts):
        self.config = config
        self.schedd = config.schedd(opts.name)
        self.pool = pool_key(config, opts.name)
        self.spec = self.node = None
        self.steps = []

    def job(self, text):
        cluster, proc, node = parse_job_id(text)
        self.spec = job_name(cluster, proc)
        self.node = node  # of a job of several nodes, the one named
        return self.spec

    def warm_name(self):
        if self.spec and self.config.seconds("warm_idle"):
            return "pool-%s-%s%s" % (self.pool, self.spec, "" if self.node is None else ".%d" % self.node)
        return None

    def ticket(self, request):
        """The schedd's ticket; or a WarmStep where the job's agent answers (the warm path)."""
        warm = self.warm_step(request)
        if warm:
            reply = warm.reply
            return Ticket(self.spec, reply["user"], reply["node"], reply["transport"], reply["why"], warm)
        reply = self.schedd.call({"op": "ticket", "job": request.job, "key": request.key,
                                  "holder": request.holder, "transport": request.transport,
                                  "interactive": request.interactive, "shells": request.shells,
                                  "command": request.command})
        return Ticket(reply["job"], reply["user"], reply["starter"], reply["transport"], reply["why"], reply)

    def connect_ssh(self, request, ticket=None):
        grant = (ticket or self.ticket(request)).grant
        if isinstance(grant, WarmStep):
            grant.expect("openssh")
            return grant.connect(), grant.reply["hostkey"]
        sock = self.present(self.reach_starter(grant), dict(
            request.place(), op="ssh", run=grant["run"], key=request.key, ticket=grant["ticket"],
            warm=self.warm_name()), grant["job"])
        sock.settimeout(None)
        log.debug("the starter accepted the ticket for job %s", grant["job"])
        return sock, grant["hostkey"]

    def open_builtin(self, ticket, session):
        """TLS to the starter, its certificate pinned by the fingerprint that the schedd vouches for."""
        grant = ticket.grant
        if isinstance(grant, WarmStep):
            grant.expect("builtin")
            return grant.open_builtin(session)
        tls = pinned_tls_connection(self.reach_starter(grant), grant["tls_fingerprint"],
                                    "the starter of job %s" % grant["job"])
        return self.present(tls, dict(session, op="builtin", run=grant["run"], ticket=grant["ticket"],
                                      warm=self.warm_name()), grant["job"])

    @staticmethod
    def present(sock, message, job):
        """`message` (a ticket) to the job's starter on `sock`, which is
        returned once the starter says yes, and closed on any failure."""
        try:
            send_msg(sock, message)
            reply = raise_for_reply(recv_msg(sock, "the starter of job %s" % job))
            log.debug("the session in job %s runs %s", job, reply.get("where", "on the node"))
        except OSError as e:
            sock.close()
            raise Unreachable("the starter of job %s did not answer (%s)" % (job, e)) from None
        except SshjobError:
            sock.close()
            raise
        return sock

    def reach_starter(self, grant):
        """A connection to the job's starter: direct, the fast path; or relayed
        by the schedd where the starter takes no inbound connections, as it
        says, or as a failed direct connection shows."""
        what = "the starter of job %s" % grant["job"]
        if grant.get("reachable", True):
            try:
                sock = connect(grant["address"], what, timeout=5)
                sock.settimeout(IO_TIMEOUT)
                return sock
            except Unreachable as e:
                log.debug("%s; asking the schedd to relay", e)
        sock, _ = self.schedd.stream({"op": "relay", "job": grant["job"]})
        log.debug("the schedd relays the connection to %s", what)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(IO_TIMEOUT)
        return sock

    def rows(self, everything=False, job=None):
        """The queue's rows as the schedd sends them, page after page."""
        request = {"op": "q", "all": everything, "job": job}
        while True:
            reply = self.schedd.call(request)
            yield from reply["jobs"]
            if not reply["jobs"] or not reply.get("more"):
                return
            request["after"] = reply["jobs"][-1]["key"]

    def state(self, job, ticket=None):
        """A run that a session was in and that another run of the node
        follows, in whatever state, was vacated (or its starter lost it)."""
        grant = ticket.grant if ticket and isinstance(ticket.grant, dict) else None  # not a warm one
        name = grant["job"] if grant else job
        row = next((row for row in self.rows(True, job) if row["id"] == name), None)
        if row and grant and row["gen"] != grant.get("gen") and row["state"] in ACTIVE_STATES + ("idle",):
            return "idle"
        return row and row["state"]

    def remove(self, job):
        self.schedd.call({"op": "rm", "job": job})

    def close(self):
        for step in list(self.steps):
            step.close()

    def allocations(self, profile):
        me = pwd.getpwuid(os.getuid()).pw_name
        return [row["id"] for row in self.rows() if row["owner"] == me and allocation_profile(row["cmd"]) == profile
                and row["state"] in ACTIVE_STATES + ("idle",)]

    def submit_allocation(self, profile, workdir):
        """A pool job whose command is this module's `allocation` role, on
        --nodes nodes, with --env variables: a pool's profile knows no others."""
        nodes, env = 1, {"PATH": os.environ.get("PATH", os.defpath)}
        words = list(profile.options)
        while words:
            word = words.pop(0)
            name, _, value = word.partition("=")
            if name in ("--nodes", "-N", "--env") and not value and words:
                value = words.pop(0)
            if name in ("--nodes", "-N") and value.isdigit() and int(value) > 0:
                nodes = int(value)
            elif name == "--env" and "=" in value:
                env[value.partition("=")[0]] = value.partition("=")[2]
            else:
                raise UsageError("profile %s: a pool's allocation takes --nodes N and --env NAME=VALUE, not %r"
                                 % (profile.name, word))
        cmd = [sys.executable, os.path.abspath(sys.argv[0]), "allocation", profile.name,
               "none" if profile.idle is None else "%ds" % profile.idle] + (
            [profile.image] + profile.podman if profile.image else [])
        reply = self.schedd.call({"op": "submit", "cmd": cmd, "env": env, "workdir": workdir, "count": 1,
                                  "nodes": nodes, "output": "/dev/null", "error": "/dev/null"})
        return job_name(reply["cluster"], 0)

    def queue(self, everyone=False):
        table = [("ID", "OWNER", "STATE", "NODE", "COMMAND")]
        for row in self.rows(everyone):
            state = row["state"]
            if state == "completed":
                state = "completed (%s)" % row["exit_status"]
            command = " ".join(shlex.quote(a) for a in row["cmd"])
            note = row["note"]
            if allocation_profile(row["cmd"]):  # as a Slurm allocation's holder says it
                command, note = "sshjob new %s" % allocation_profile(row["cmd"]), None
                live = row["note"][len(SESSIONS_NOTE) + 2:] if (row["note"] or "").startswith(SESSIONS_NOTE) else ""
                idle = duration(allocation_args(row["cmd"])[1])
                if live:
                    command += ": %s; given back %s" % (
                        "%s session(s)" % live if live.isdigit() else "idle since " + live.split()[-1],
                        "after %s idle" % describe_duration(idle) if idle is not None else "at its removal")
                elif row["note"]:
                    note = row["note"]
            table.append((row["id"], row["owner"], state, row["starter"] or "-",
                          command + ("  [%s]" % note if note else "")))
        return table


SLURM_PROGRAMS = ("srun", "scontrol", "squeue", "scancel")  # sbatch only for sshjob new

ALLOCATION_PREFIX = "sshjob-new-"  # the name of an allocation's job (sshjob new): this and the profile's name

TASK_EXITED = re.compile(r"task \d+: Exited with exit code|\*\*\* STEP .* CANCELLED")

SLURM_FINISHED = {"COMPLETED": "completed", "CANCELLED": "removed", "FAILED": "completed", "TIMEOUT": "completed",
                  "NODE_FAIL": "completed", "PREEMPTED": "idle", "BOOT_FAIL": "completed", "DEADLINE": "completed",
                  "OUT_OF_MEMORY": "completed"}

SLURM_HELD = ("JobHeldAdmin", "JobHeldUser")  # reasons of a pending job that waits for a release

SLURM_NEVER = {  # reasons of a pending job that will never run, and what to do
    "DependencyNeverSatisfied": "a job it depends on can never satisfy its dependency; cancel it and submit it again",
    "BadConstraints": "no node can ever satisfy its constraints; cancel it and submit it again",
    "PartitionDown": "its partition is down; ask the cluster's admins",
}

SLURM_ERRORS = (  # what srun and scontrol say, and the sentence a user reads
    ("Access/permission denied", Refused, "Slurm refuses a session in job {job}: it is not yours"),
    ("Unable to contact slurm controller", Unreachable, "Slurm's controller (slurmctld) does not answer"),
    ("Invalid job id", NotFound, "job {job} is unknown to Slurm"),
    ("Job is pending execution", NotRunning, "job {job} is pending in Slurm"),
    ("Job has already finished", JobGone, "job {job} has finished"),
    ("Requested node configuration is not available", UsageError, "job {job} has no node {node}"),
)


def slurm_command(name):
    path = shutil.which(name)
    if not path:
        raise MissingProgram("Slurm's client commands are not on PATH (%s was not found)" % name)
    return path


def slurm_error(text, job, node=None):
    """An SshjobError from what a Slurm command printed."""
    for needle, kind, sentence in SLURM_ERRORS:
        if needle in text:
            return kind("%s (%s)" % (sentence.format(job=job, node=node), needle))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not TASK_EXITED.search(line)]
    ours = [line for line in lines if line.startswith("sshjob: ")]
    if ours:
        return Unreachable("on node %s: %s" % (node, ours[-1][len("sshjob: "):]))
    missing = next((line for line in lines if "execve():" in line), None)
    if missing:
        return MissingProgram("node %s cannot run %s: set remote_python to an interpreter it has (Python 3.6 "
                              "or newer)" % (node, missing.split("execve():", 1)[1].split(":")[0].strip()))
    return Unreachable("Slurm could not start a session in job %s: %s" % (job, (lines or ["no message"])[-1]))


def run_slurm(job, *argv):
    """A Slurm client command's output; its complaint as one sentence."""
    try:
        result = subprocess.run([slurm_command(argv[0])] + list(argv[1:]), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise Unreachable("Slurm's %s did not answer within a minute" % argv[0]) from None
    if result.returncode != 0:
        raise slurm_error(result.stderr or result.stdout, job)
    return result.stdout


def slurm_fields(line):
    """scontrol's one-line records: Key=Value pairs, values that may hold spaces."""
    return dict(re.findall(r"(?:^| )([A-Za-z:/]+)=(.*?)(?= [A-Za-z:/]+=|$)", line))


def slurm_jobs(spec):
    return [slurm_fields(line) for line in run_slurm(spec, "scontrol", "show", "job", "-o", spec).splitlines()
            if line.startswith("JobId=")]


class SlurmSite(Site):
    """Where a job of the cluster's Slurm lives: a session is a step of its
    own, started with srun, that hands the client the connection to an sshd
    it starts for the session, or runs a built-in session over srun's pipe."""

    name = "slurm"
    job_pattern = SLURM_JOB_ID.pattern

    def __init__(self, config, opts):
        self.config = config
        for name in SLURM_PROGRAMS:
            slurm_command(name)
        self.spec = self.node = self.request = None
        self.batch_host = ""  # the name of the node that runs the batch script
        self.allocation = False  # whether the job is one of sshjob new's, whose holder sessions wait for
        self.pending = False  # whether the job was found not running yet
        self.target = None  # (job id, node, working directory) once the job runs
        self.started = ""  # when it started: a job's host key on a node is kept for its id and this
        self.index = 0  # the node's index among the job's nodes
        self.steps = []
        self.fresh = []  # the steps of tickets that no connection has used yet
        self.program = os.path.abspath(sys.argv[0])

    @property
    def source(self):
        """This module's bytes, which a step's node runs (read once, and
        only for a cold step: a warm session needs none of it)."""
        return module_bytes()

    @property
    def digest(self):
        import hashlib
        return hashlib.sha256(module_bytes()).hexdigest()

    def job(self, text):
        match = SLURM_JOB_ID.fullmatch(text)
        if not match or match.group(2) not in (None, "0"):
            raise UsageError("malformed Slurm job id %r: expected JOB, JOB_TASK (a task of an array) or JOB.0.NODE "
                             "(a node of the job, by index or name)" % text)
        self.spec, _, self.node = match.groups()
        return self.spec

    def warm_key(self):
        """What names this job (and node) in the user's records of agents."""
        key = self.spec + ("." + self.node if self.node else "")
        return key if WARM_KEY.fullmatch(key) else None

    def warm_name(self):
        key = self.warm_key()
        return "slurm-" + key if key and self.config.seconds("warm_idle") else None

    def warm_step(self, request):
        step = super().warm_step(request)
        if step:
            self.target = (step.record["job"], step.record["node"], "")
        return step

    def ticket(self, request):
        """What the job is and how to reach it, with the session's step
        started (through the job's agent where one answers: the warm path);
        NotRunning while the job is not running."""
        self.request = request
        warm = self.warm_step(request)
        if warm:
            self.fresh.append(warm)
            return Ticket(self.spec, warm.reply["user"], warm.reply["node"], warm.reply["transport"],
                          warm.reply["why"], warm)
        step = None
        if self.node is None and self.spec.isdigit() and not self.pending:
            step = SlurmStep(self, None)  # srun starts while scontrol reads the job: its first node is the one
        try:
            job = self.running_job()
            self.target = (job["JobId"], self.pick_node(job), job.get("WorkDir", ""))
            self.started = job.get("StartTime", "")
            self.batch_host = job.get("BatchHost", "")
            self.allocation = job.get("JobName", "").startswith(ALLOCATION_PREFIX)
            step = step or SlurmStep(self, self.target[1])
            step.begin(request)
        except BaseException:
            if step:
                step.close()
            raise
        job_id, node, workdir = self.target
        self.target = (job_id, step.reply.get("node") or node, workdir)  # where srun put an early step
        self.fresh.append(step)
        return Ticket(self.spec, step.reply["user"], self.target[1], step.reply["transport"], step.reply["why"], step)

    def running_job(self):
        """The job's scontrol record, if it runs; else why not, as one sentence."""
        jobs = slurm_jobs(self.spec)
        if not jobs:
            raise NotFound("job %s is unknown to Slurm" % self.spec)
        if len(jobs) != 1:
            first = min(jobs, key=lambda j: int(re.match(r"\d*", j.get("ArrayTaskId", "")).group() or 0))
            raise UsageError("job %s is an array of %d tasks: name one, as %s_%s" % (
                self.spec, len(jobs), self.spec, re.match(r"\d*", first.get("ArrayTaskId", "")).group() or 0))
        job = jobs[0]
        state = job.get("JobState", "")
        if state in SLURM_FINISHED:
            raise JobGone("job %s has finished (%s)" % (self.spec, state))
        reason = job.get("Reason", "")
        if reason in SLURM_HELD:
            raise Held("job %s is held in Slurm (%s): it will not run until it is released (scontrol release %s)"
                       % (self.spec, reason, self.spec))
        if reason in SLURM_NEVER:
            raise JobGone("job %s will never run in Slurm (%s): %s" % (self.spec, reason, SLURM_NEVER[reason]))
        if state != "RUNNING":
            self.pending = True  # -auto-retry asks again: with scontrol alone until it runs
            expected = job.get("StartTime", "") if state == "PENDING" else ""
            expected = ", expected to start at %s" % expected.replace("T", " ") if expected[:1].isdigit() else ""
            why = ", ".join(word for word in (reason if reason != "None" else "", expected[2:]) if word)
            raise NotRunning("job %s is %s in Slurm%s" % (self.spec, state.lower(), " (%s)" % why if why else ""))
        return job

    def pick_node(self, job):
        nodes = job.get("NodeList", "")
        names = run_slurm(self.spec, "scontrol", "show", "hostnames", nodes).split() if "[" in nodes else \
            nodes.split(",")
        if self.node is None:
            chosen = job.get("BatchHost") or names[0]
        elif self.node.isdigit():
            if int(self.node) >= len(names):
                raise UsageError("job %s runs on %d node(s): node index %s is out of range (0 to %d)" % (
                    self.spec, len(names), self.node, len(names) - 1))
            chosen = names[int(self.node)]
        elif self.node not in names:
            raise UsageError("job %s does not run on node %s (its nodes: %s)" % (self.spec, self.node, nodes))
        else:
            chosen = self.node
        self.index = names.index(chosen) if chosen in names else 0
        return chosen

    def step_for(self, ticket, transport):
        """The step of `ticket`, the first time; a new one for each later connection."""
        step = ticket.grant if ticket and ticket.grant in self.fresh else None
        if step is not None:
            self.fresh.remove(step)
        else:
            step = self.warm_step(self.request._replace(transport=transport))
            if step is None:
                step = SlurmStep(self, self.target[1])
                step.begin(self.request._replace(transport=transport))
        step.expect(transport)
        return step

    def connect_ssh(self, request, ticket=None):
        step = self.step_for(ticket, "openssh")
        return step.connect(), step.reply["hostkey"]

    def open_builtin(self, ticket, session):
        return self.step_for(ticket, "builtin").open_builtin(session)

    def state(self, job, ticket=None):
        jobs = slurm_jobs(job)
        state = jobs[0].get("JobState", "") if jobs else "COMPLETED"
        return SLURM_FINISHED.get(state, state.lower())

    def remove(self, job):
        run_slurm(job, "scancel", job)

    def queue(self, everyone=False):
        """The user's Slurm jobs (everyone's)."""
        options = [] if everyone else ["--user", pwd.getpwuid(os.getuid()).pw_name]
        output = run_slurm("", "squeue", "--noheader", "--format=%i|%u|%T|%N|%r|%j|%k|%o", *options)
        rows = [("ID", "OWNER", "STATE", "NODE", "COMMAND")]
        for line in output.splitlines():
            job, user, state, nodes, reason, name, comment, command = (line.split("|", 7) + [""] * 8)[:8]
            if command in ("", "(null)"):  # sbatch --wrap: Slurm keeps no command, only the job's name
                command = "(%s)" % name
            if name.startswith(ALLOCATION_PREFIX):  # sshjob new's: its holder says its sessions and idle clock
                command = comment if comment.startswith("sshjob new ") else "sshjob new %s" % name[
                    len(ALLOCATION_PREFIX):]
            note = "  [%s]" % reason if state == "PENDING" and reason not in ("", "None") else ""
            rows.append((job, user, state.lower(), nodes or "-", command + note))
        return rows

    def allocations(self, profile):
        me = pwd.getpwuid(os.getuid()).pw_name
        output = run_slurm("", "squeue", "--noheader", "--user", me, "--name", ALLOCATION_PREFIX + profile,
                           "--states=PENDING,CONFIGURING,RUNNING,SUSPENDED,REQUEUED,RESIZING", "--format=%i")
        return sorted(output.split(), key=int)

    def submit_allocation(self, profile, workdir):
        """sbatch with this module as the batch script (`sshjob allocation`)."""
        import tempfile
        with tempfile.TemporaryDirectory(prefix="sshjob-") as tmp:
            script = os.path.join(tmp, "sshjob-allocation")
            body = self.source.split(b"\n", 1)[1] if self.source.startswith(b"#!") else self.source
            with open(script, "wb") as f:
                f.write(b"#!/usr/bin/env python3\n" + body)
            argv = [slurm_command("sbatch"), "--parsable", "--job-name=" + ALLOCATION_PREFIX + profile.name,
                    "--output=/dev/null", "--error=/dev/null", "--chdir=" + workdir] + profile.options + [
                script, "allocation", profile.name, "none" if profile.idle is None else "%d" % profile.idle] + (
                [profile.image] + profile.podman if profile.image else [])
            env = {name: value for name, value in os.environ.items() if name not in (SESSION_VAR, TAG_VAR, PIDS_VAR)}
            try:  # made in a session of another job, the allocation is still nobody's session
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      universal_newlines=True, timeout=60, env=env)
            except subprocess.TimeoutExpired:
                raise Unreachable("Slurm's sbatch did not answer within a minute") from None
        if done.returncode != 0:
            said = [line.split("error:", 1)[-1].strip() for line in done.stderr.splitlines() if line.strip()]
            raise Refused("Slurm refuses an allocation of profile %s: %s" % (
                profile.name, said[-1] if said else "sbatch failed (exit status %d)" % done.returncode))
        return done.stdout.strip().split(";")[0]

    def close(self):
        for step in list(self.steps):
            step.close()


class Step:
    """What a session goes through to the node, from the client's side: a
    channel to what serves it there, and its `reply` to the session's
    request.  SlurmStep starts a step with srun; WarmStep reaches the job's
    agent."""

    def expect(self, transport):
        if self.reply["transport"] != transport:
            raise ProtocolError("node %s chose the %s transport" % (self.reply.get("node"), self.reply["transport"]))

    def open_builtin(self, session):
        """The channel of a built-in session, once the node has taken `session`."""
        try:
            send_msg(self.channel, dict(session, op="builtin"))
            raise_for_reply(recv_msg(self.channel, "node %s" % self.reply.get("node")))
        except (OSError, ProtocolError):
            raise self.failure() from None
        return self.channel

    def failure(self):
        """Why the node's side went away, as an error."""
        raise NotImplementedError


class SlurmStep(Step):
    """One job step, from the client's side: srun runs slurm_boot on the
    node, with stdin and stdout on a socket pair whose other end is ours."""

    def __init__(self, site, node):
        """Start srun on `node`; on the job's first node where None."""
        import tempfile
        self.site = site
        where = ["--jobid", site.spec] if node is None else ["--jobid", site.target[0], "-w", node]
        argv = [slurm_command("srun")] + where + ["--overlap", "-N1", "-n1", "--quiet", "-u",
                                                   site.config["remote_python"], "-I", "-S", "-c",
                                                   source_of(slurm_boot) + "slurm_boot()\n",
                                                   site.program, site.digest]
        if log.debugging():
            argv.append("--debug")
        env = {k: v for k, v in os.environ.items()  # not another allocation's sizes, which srun would obey
               if not (k.startswith("SLURM_") and k != "SLURM_CONF") and k != "XDG_CACHE_HOME"}
        env[SESSION_VAR] = "step"  # the step is sshjob's, not the job's own (slurm_job_context)
        self.channel, theirs = socket.socketpair()
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close(); a file: srun outlives a proxy)
        log.debug("starting the session's step: %s BOOT", " ".join(map(shlex.quote, argv[:argv.index("-c") + 1])))
        with theirs:
            self.proc = subprocess.Popen(argv, stdin=theirs, stdout=theirs, stderr=self.errors, env=env,
                                         start_new_session=True)
        site.steps.append(self)  # from now on, close() ends it, whatever happens

    def begin(self, request):
        """Bring the node the module, and ask the step for the session."""
        self.channel.settimeout(60)
        try:
            self.boot()
            send_msg(self.channel, dict(request.place(), op="session", key=request.key, transport=request.transport,
                                        interactive=request.interactive, workdir=self.site.target[2],
                                        shells=request.shells, job=self.site.spec,
                                        direct=self.site.config.flag("slurm_direct"),
                                        batch_host=self.site.batch_host, allocation=self.site.allocation,
                                        started=self.site.started, index=self.site.index, warm=self.site.warm_key()))
            self.reply = raise_for_reply(recv_msg(self.channel, "the step on node %s" % self.site.target[1]))
            log.debug("the session in job %s runs %s", self.site.spec, self.reply.get("where", "on the node"))
        except (OSError, ProtocolError):
            raise self.failure() from None

    def stderr(self):
        """What srun and the step have said on stderr so far."""
        self.errors.seek(0)
        text = self.errors.read()[-65536:].decode(errors="replace")
        for line in text.splitlines():
            log.debug("job step: %s", line)
        return text

    def boot(self):
        """The node has the module, or asks for it, which we ship unless told not to."""
        said = self.read_line()
        if said == "need":
            if not self.site.config.flag("ship_program"):
                self.channel.sendall(b"0\n")
                raise ConfigError("node %s cannot read %s, and ship_program = false: put sshjob.pyz on a file "
                                  "system that the nodes share" % (self.site.target[1], self.site.program))
            import zlib  # shipping's alone, and that is rare

            packed = zlib.compress(self.site.source, 9)
            self.channel.sendall(b"%d\n" % len(packed) + packed)
            said = self.read_line()
        if not said.startswith("have "):
            raise ProtocolError("the step said %r" % said[:100])
        log.debug("the node has sshjob: %s", said[5:])

    def read_line(self):
        text = b""
        while not text.endswith(b"\n") and len(text) < 4096:
            byte = self.channel.recv(1)
            if not byte:
                raise ProtocolError("the step ended")
            text += byte
        return text.decode(errors="replace").strip()

    def failure(self):
        """Why the step did not answer, from what srun printed."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        return slurm_error(self.stderr(), self.site.spec, self.site.target[1])

    def connect(self):
        """A socket to the step's sshd: a direct connection to the node where
        it takes one, the fast path; else the srun pipe itself."""
        host, port = self.reply.get("direct") or (None, None)
        if host:
            try:
                sock = socket.create_connection((host, port), timeout=3)
            except OSError as e:
                log.debug("cannot reach the node at %s:%d (%s): the session goes through srun", host, port, e)
            else:
                if self.taken(sock):
                    log.debug("connected to the job's sshd directly, at %s:%d", host, port)
                    return sock
                log.debug("the node at %s:%d did not take the direct connection (it came from another address "
                          "than srun's, as through NAT): the session goes through srun", host, port)
        send_msg(self.channel, {"op": "pipe"})
        self.channel.settimeout(None)
        log.debug("the session goes through srun's pipe")
        return self.channel

    def taken(self, sock):
        """Whether the node took `sock` for the session: it answers the
        secret with one byte, or closes a connection that comes from
        another address than srun's."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(bytes.fromhex(self.reply["secret"]))
            sock.settimeout(IO_TIMEOUT)
            if sock.recv(1) == DIRECT_TAKEN:
                sock.settimeout(None)
                return True
        except OSError:
            pass
        sock.close()
        return False

    def close(self):
        """Let srun end by itself once its step has answered (the step ends
        with its session: waiting would only add Slurm's teardown to every
        session); where the step never answered, end srun (SIGTERM, then
        SIGKILL after 5 s)."""
        if self not in self.site.steps:
            return  # closed already
        self.site.steps.remove(self)
        self.channel.close()
        if hasattr(self, "reply"):
            self.errors.close()
            return
        for signum, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.stderr()
        self.errors.close()


SITES = {site.name: site for site in (PoolSite, SlurmSite)}
ANY_JOB_ID = re.compile("(?:(?:%s):)?(?:%s)" % ("|".join(SITES), "|".join(
    "(?:%s)" % site.job_pattern for site in SITES.values())))


def first_to_answer(hosts, port, timeout):
    """A connection to `port` on the first of `hosts` to take one, all tried
    at once (a client on another host reaches a node by another address
    than one on the node does); ConnectionRefusedError if none does."""
    trying = {}
    for host in hosts:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if sock.connect_ex((host, port)) in (0, errno.EINPROGRESS):
            trying[sock] = host
        else:
            sock.close()
    deadline = time.monotonic() + timeout
    try:
        while trying and time.monotonic() < deadline:
            for sock in wait_for([], list(trying), deadline - time.monotonic())[1]:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    del trying[sock]
                    sock.setblocking(True)
                    return sock
                del trying[sock]
                sock.close()
    finally:
        for sock in trying:
            sock.close()
    raise ConnectionRefusedError(errno.ECONNREFUSED, "no answer at %s, port %d" % (", ".join(hosts), port))


def ping_agent(record):
    """How the agent of a user's record is: "runs"; "refuses" new sessions
    (its job's command has exited); "gone" (nothing listens there); or
    "silent" (no answer in time: stopped with a suspended job, or out of reach)."""
    try:
        sock = first_to_answer([str(host) for host in record["hosts"]], int(record["port"]), PING_WAIT)
    except ConnectionRefusedError:
        return "gone"
    except OSError:
        return "silent"
    with sock:
        try:
            sock.settimeout(PING_WAIT)
            sock.sendall(WARM_PING)
            return {WARM_PONG: "runs", WARM_REFUSES: "refuses"}.get(sock.recv(1), "silent")
        except OSError:
            return "silent"


def read_warm_record(path):
    with open(path) as f:
        record = json.load(f)
    if not isinstance(record, dict):
        raise ValueError("not a record")
    return record


class WarmStep(Step):
    """A session through a job's agent, from the client's side: TLS to the
    agent at the address of the user's record, its certificate pinned, the
    record's secret first; then the session goes as through a cold step."""

    def __init__(self, site, record):
        self.site = site
        self.record = record
        self.hosts, self.port = [str(host) for host in record["hosts"]], int(record["port"])
        self.channel = None
        site.steps.append(self)

    def ask(self, message):
        """Send the agent `message`, with the record's secret, on a new TLS
        connection with the certificate pinned; returns its reply."""
        sock = first_to_answer(self.hosts, self.port, WARM_WAIT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(WARM_WAIT)
        self.channel = pinned_tls_connection(sock, str(self.record["fingerprint"]),
                                             "job %s's agent" % self.site.spec)
        send_msg(self.channel, dict(message, secret=self.record["secret"]))
        self.channel.settimeout(IO_TIMEOUT)
        return raise_for_reply(recv_msg(self.channel, "job %s's agent" % self.site.spec))

    def begin(self, request):
        self.reply = self.ask(dict(request.place(), op="session", key=request.key, transport=request.transport,
                                   interactive=request.interactive, shells=request.shells, job=self.site.spec))
        log.debug("the session in job %s runs %s", self.site.spec, self.reply.get("where", "on the node"))

    def connect(self):
        """The connection, out of its TLS: sshd authenticates both ends."""
        sock = without_tls(self.channel)
        sock.settimeout(None)
        return sock

    def failure(self):
        return Unreachable("job %s's agent on %s closed the connection" % (self.site.spec, self.record["node"]))

    def close(self):
        if self in self.site.steps:
            self.site.steps.remove(self)
        if self.channel:
            with contextlib.suppress(OSError):
                self.channel.close()


def find_site(config_path, opts):
    """(configuration, site, job) for the job that `opts` name (None where
    they name none, as for `sshjob q`).  The site is
    the one named by a prefix of the job id (slurm:1234), -scheduler,
    SSHJOB_SCHEDULER or `scheduler` in sshjob.conf; with none of these,
    Slurm where no pool is configured and its squeue is on PATH, else the
    pool."""
    name, _, text = opts.job.rpartition(":")
    name = name or opts.scheduler
    if opts.pool:
        config_path = find_config_path(opts.pool)
    try:
        path, missing = find_config_path(config_path), None
    except ConfigError as e:
        if config_path or os.environ.get("SSHJOB_CONFIG"):
            raise  # a configuration named but missing is a mistake to report, not a reason to guess
        path, missing = None, e
    config = Config(path)
    name = name or config["scheduler"] or ("slurm" if missing and shutil.which("squeue") else "pool")
    if name not in SITES:
        raise UsageError("unknown scheduler %r: %s" % (name, " or ".join(SITES)))
    if name == "pool" and missing:
        raise missing
    site = SITES[name](config, opts)
    return config, site, site.job(text) if text else None

# ---------------------------------------------------------------------------
# The client: condor_ssh_to_job's command line.  It makes the session's key,
# gets a ticket from the job's site and runs ssh with a ProxyCommand, the
# bridge, that hands ssh the connection to the job's sshd; or relays a
# built-in session itself.
# ---------------------------------------------------------------------------


def bridge(desk):
    """The bridge, ssh's ProxyCommand: it takes the connected socket from the
    client's ticket desk `desk` and passes it on to ssh (ProxyUseFdpass).
    ssh runs it as `python3 -I -S -c SOURCE DESK` (see source_of); it
    imports nothing but `_socket`, the C half of `socket` (whose Python half
    costs as much again as the interpreter's start), so that it starts in
    some 10 ms.  Returns the exit status: 1 when the desk closed, the client
    having said why."""
    import _signal
    import _socket as s

    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # Ctrl-C ends ssh, and the client, which closes the desk
    try:
        channel = s.socket(s.AF_UNIX, s.SOCK_STREAM)
        channel.connect("\0" + desk)
        _, ancillary, _, _ = channel.recvmsg(1, s.CMSG_SPACE(4))
        if not ancillary or ancillary[0][:2] != (s.SOL_SOCKET, s.SCM_RIGHTS):
            return 1
        ssh = s.socket(s.AF_UNIX, s.SOCK_STREAM, 0, 1)
        ssh.sendmsg([b"\n"], [(s.SOL_SOCKET, s.SCM_RIGHTS, ancillary[0][2][:4])])
    except (OSError, KeyboardInterrupt):
        return 1
    return 0


def pass_socket(channel, sock):
    """Send `sock` over the Unix socket `channel`.  The byte that carries it
    is a newline: a client that reads it as data instead of taking the
    socket (see hand_over) reads an empty line, which SSH allows before the
    server's version."""
    channel.sendmsg([b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))])


class TicketDesk:
    """The client's half of the bridge: a Unix socket in the abstract
    namespace (no path, so no limit on the length of $TMPDIR), which serves
    its own uid only, by peer credentials.  For each connection ssh makes
    (scp, sftp and rsync make one per transfer, and tickets are single-use)
    the desk gets a ticket, connects to the job and presents it, and passes
    the connected socket to the bridge, which passes it on to ssh.  A
    connection may come with a host key of its own: it is added to ssh's
    known_hosts before ssh gets the socket."""

    def __init__(self, site, request, known_hosts, alias):
        self.site = site
        self.request = request
        self.known_hosts = known_hosts
        self.alias = alias
        self.hostkeys = set()
        self.error = None
        self.name = "sshjob-desk-%s" % token_hex(16)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind("\0" + self.name)
        self.listener.listen(8)
        self.ready = None
        self.prepared = threading.Event()
        self.serving = True
        threading.Thread(target=self.serve, daemon=True).start()

    def connect_to_job(self, ticket=None):
        """A socket that the job's sshd answers, its host key known to ssh."""
        sock, hostkey = self.site.connect_ssh(self.request, ticket)
        if hostkey not in self.hostkeys:  # written whole: another client's master may read the same file
            self.hostkeys.add(hostkey)
            write_atomically(self.known_hosts, "".join("%s %s\n" % (self.alias, key) for key in sorted(self.hostkeys)))
        return sock

    def prepare(self, ticket):
        """Connect with the client's first ticket while ssh starts: ssh gets
        its connection only once this is done.  On failure the desk stays
        shut until close(), so that the caller stops ssh first, before ssh
        can say anything: the failure is one sentence, the caller's."""
        self.ready = self.connect_to_job(ticket)
        self.prepared.set()

    def serve(self):
        while True:
            try:
                channel, _ = self.listener.accept()
            except OSError:
                return  # closed
            with channel:
                if peer_credentials(channel)[1] != os.getuid():
                    continue
                self.prepared.wait()
                if not self.serving:
                    return
                try:
                    sock, self.ready = self.ready or self.connect_to_job(), None
                except SshjobError as e:
                    self.error = e
                    continue
                with sock:
                    pass_socket(channel, sock)

    def close(self):
        self.serving = False
        self.prepared.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        if self.ready:
            self.ready.close()

    def proxy_command(self):
        """The bridge role, run by ssh without importing this module, with
        SIGINT ignored from its start: Ctrl-C goes to ssh's whole process
        group, and an interpreter interrupted as it starts would print a
        traceback (the client closes the desk, which ends the bridge)."""
        code = source_of(bridge) + "import sys\nsys.exit(bridge(sys.argv[1]))\n"
        argv = [sys.executable, "-I", "-S", "-c", code, self.name]
        started = "trap '' INT; exec " + " ".join(shlex.quote(a) for a in argv)
        return ("/bin/sh -c " + shlex.quote(started)).replace("%", "%%")


def run_bridge(argv):
    """`sshjob bridge DESK`: the bridge as a role of its own."""
    if len(argv) != 1:
        raise UsageError("usage: sshjob bridge DESK (ssh runs it; the client makes DESK)")
    return bridge(argv[0])


CLIENT_USAGE = """\
usage: sshjob client [-help] [-debug] [-name schedd-name] [-pool pool-name]
                     [-ssh ssh-command] [-keygen-options ssh-keygen-options]
                     [-shells shell1,shell2,...] [-auto-retry] [-remove-on-interrupt]
                     [-X] [-transport t] [-scheduler pool|slurm]
                     [-container none|name|pid] [-job-env payload|script]
                     cluster | cluster.proc | cluster.proc.node [remote-command]

Open an ssh session inside a running job: same user, working directory and
environment as the job.  Without remote-command, an interactive shell.

  -help                 show this help and exit
  -debug                say on stderr what happens, step by step
  -name schedd-name     the schedd to ask, if not the pool's own
  -pool pool-name       the pool: a pool directory or its sshjob.conf
  -ssh ssh-command      run this instead of ssh, e.g. "sftp" or "scp"; quote it
                        as one argument if it has arguments of its own
  -keygen-options opts  extra arguments to ssh-keygen for the session's key
  -shells a,b,...       shells to try in the job, first that exists wins
                        (default: $SHELL, then /bin/sh)
  -auto-retry           if the job is not running yet, wait until it is
  -remove-on-interrupt  remove the job if a signal (Ctrl-C, hang-up, SIGTERM)
                        interrupts the wait or the session
  -X                    enable X11 forwarding
  -transport t          openssh, builtin (no OpenSSH needed) or auto (the
                        default: openssh where both ends have it)
  -scheduler s          pool (this sshjob pool's jobs) or slurm (the cluster's
                        Slurm: JOB, JOB_TASK, JOB.0.NODE; a slurm: prefix does
                        the same); default: $SSHJOB_SCHEDULER, the configuration,
                        else slurm where no pool is configured and squeue runs
  -container c          where the job's payload runs in a container (podman, an
                        Apptainer-style user namespace, a chroot), the session
                        enters it: the first one, or the one with this name or
                        pid; none: stay on the node, outside it
  -job-env e            payload (the default): the environment and directory of
                        the program the job runs; script: those the job's
                        script started with

Options take one dash or two.  The exit status is the remote command's, or
non-zero with a sentence on stderr when no session could be set up.
"""

CLIENT_DEFAULTS = {"ssh": None, "name": None, "pool": None, "keygen_options": "", "shells": None, "transport": "auto",
                   "scheduler": None, "debug": False, "auto_retry": False, "remove_on_interrupt": False, "x11": False,
                   "container": "auto", "job_env": "payload", "help": False, "job": None, "command": ()}


class ClientOptions:
    """What the client is asked to do: condor_ssh_to_job's options, the job
    and the remote command (a list of words, joined with spaces as ssh
    joins them).  cp, proxy, submit -i and demo make one as they need it."""

    def __init__(self, **values):
        unknown = set(values) - set(CLIENT_DEFAULTS)
        if unknown:
            raise TypeError("no client options %s" % ", ".join(sorted(unknown)))
        vars(self).update(CLIENT_DEFAULTS, **values)
        self.command = list(self.command)

    def replace(self, **values):
        return ClientOptions(**dict(vars(self), **values))


# condor_ssh_to_job's options: the name on the command line, the attribute, whether a value follows
CLIENT_OPTIONS = {"ssh": ("ssh", True), "name": ("name", True), "pool": ("pool", True),
                  "keygen-options": ("keygen_options", True), "shells": ("shells", True),
                  "transport": ("transport", True), "scheduler": ("scheduler", True), "debug": ("debug", False),
                  "auto-retry": ("auto_retry", False), "remove-on-interrupt": ("remove_on_interrupt", False),
                  "X": ("x11", False), "container": ("container", True), "job-env": ("job_env", True),
                  "help": ("help", False)}


def parse_client_args(argv):
    """ClientOptions from the command line, HTCondor style: options (one dash
    or two) before the job id, and everything after the job id is the
    remote command, untouched."""
    values = {}
    args = list(argv)
    while args and args[0].startswith("-") and args[0] != "-":
        arg = args.pop(0)
        if arg == "--":
            break
        name, has_value, value = arg.lstrip("-").partition("=")
        if name not in CLIENT_OPTIONS:
            raise UsageError("unknown option %s (sshjob client -help lists them)" % arg)
        attribute, takes_value = CLIENT_OPTIONS[name]
        if takes_value and not has_value:
            if not args:
                raise UsageError("option %s needs a value" % arg)
            value = args.pop(0)
        values[attribute] = value if takes_value else True
    if values.get("help"):
        return ClientOptions(**values)
    if not args:
        raise UsageError("no job given: sshjob client [options] cluster[.proc[.node]] [remote-command]")
    if not ANY_JOB_ID.fullmatch(args[0]):
        raise UsageError("malformed job id %r: expected cluster, cluster.proc or cluster.proc.node (or a Slurm job: "
                         "JOB, JOB_TASK, JOB.0.NODE)" % args[0])
    if values.get("job_env", "payload") not in ("payload", "script"):
        raise UsageError("-job-env is payload or script, not %r" % values["job_env"])
    if not values.get("container", "auto").strip():
        raise UsageError("-container needs a container's name or pid, or none")
    return ClientOptions(job=args[0], command=args[1:], **values)


@contextlib.contextmanager
def signals_raise(*signums):
    """Turn the given signals into Interrupted, so that `finally` blocks
    (the removal of the temporary key directory) run on them too."""

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def private_tempdir():
    """The session's key directory, under $TMPDIR, mode 0700, removed on
    every exit.  The client holds a lock in it for as long as it lives, so
    that a later client can tell one whose client was killed outright
    (SIGKILL, the OOM killer) and remove it."""
    import tempfile
    path = tempfile.mkdtemp(prefix=KEY_DIR_PREFIX)
    lock = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: ours cannot be told from an orphan
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(lock)
        log.debug("removed %s", path)
        remove_orphaned_tempdirs(os.path.dirname(path))


def remove_orphaned_tempdirs(parent):
    """Remove this user's key directories whose lock no client holds: their
    clients were killed, on this host or on another that shares $TMPDIR.
    One made less than a minute ago may be a client's that has yet to take
    its lock."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(KEY_DIR_PREFIX):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or time.time() - info.st_mtime < 60:
                continue
            lock = os.open(os.path.join(entry.path, "lock"), os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            continue  # its client lives (or this file system has no locks)
        shutil.rmtree(entry.path, ignore_errors=True)
        os.close(lock)
        log.debug("removed %s, left by a client that was killed", entry.path)


def split_words(text, what):
    """The words of a command line the user gave, as a shell splits them."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise UsageError("%s %r cannot be split into words (%s): quote it as a shell would"
                         % (what, text, str(e).lower())) from None


KEYGEN_VALUES = ("-t", "-b", "-a", "-C", "-N", "-O", "-Z")  # what -keygen-options may set: the key's kind and cost

KEYGEN_FLAGS = ("-q", "-v")


def keygen_arguments(text):
    """The words of -keygen-options, refused unless each only shapes the
    key: -f would write the private key outside sshjob's private directory,
    and others make ssh-keygen do something else altogether."""
    words = split_words(text, "-keygen-options")
    index = 0
    while index < len(words):
        word = words[index]
        value = next((option for option in KEYGEN_VALUES if word.startswith(option)), None)
        if value and word == value:
            index += 1  # its value follows
        elif not value and word not in KEYGEN_FLAGS:
            raise UsageError("-keygen-options may not hold %s: it takes %s and %s, as the session's key must stay in "
                             "sshjob's private directory" % (word, ", ".join(KEYGEN_VALUES), " ".join(KEYGEN_FLAGS)))
        index += 1
    if index > len(words):
        raise UsageError("-keygen-options: %s needs a value" % words[-1])
    return words


def make_session_key(config, path, keygen_options):
    keygen = find_program(config, "ssh_keygen", "this machine")
    failure = finish_keygen(start_keygen(keygen, path, "sshjob-session", keygen_arguments(keygen_options)))
    if failure or not os.path.exists(path + ".pub"):
        raise UsageError("ssh-keygen failed with options %r: %s" % (keygen_options, failure or "it made no key"))
    os.chmod(path + ".pub", 0o600)
    with open(path + ".pub") as f:
        kind = (f.read().split() or ["nothing"])[0]
    if kind not in KEY_TYPES:
        raise UsageError("-keygen-options %r made a %s key, which OpenSSH's sshd no longer accepts: use -t "
                         "ed25519, rsa or ecdsa" % (keygen_options, kind))
    return path


def ssh_command(config, opts, alias, user, known_hosts, key, proxy, master=None, cold=True):
    """The ssh (or scp, sftp, rsync...) command line that reaches the job:
    through `master` (an SshMaster) where one is given, made by this
    command when `cold`."""
    program = split_words(opts.ssh, "-ssh") if opts.ssh else split_words(config["ssh"], "the setting ssh")
    if not program:
        raise UsageError("the -ssh command is empty")
    base = os.path.basename(program[0])
    program[0] = shutil.which(program[0]) or program[0]
    if not os.path.isfile(program[0]):
        raise MissingProgram("%s was not found on this machine: %s" % (base, how_to_install(base)))
    options = {
        "IdentitiesOnly": "yes", "IdentityAgent": "none", "IdentityFile": openssh_quoted(key),
        "UserKnownHostsFile": openssh_quoted(known_hosts, percent_expanded=None), "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes", "HostKeyAlias": alias, "UpdateHostKeys": "no",
        "CheckHostIP": "no", "BatchMode": "yes", "ControlMaster": "no", "ControlPath": "none",
        "ProxyCommand": proxy, "ProxyUseFdpass": "yes", "User": user, "LogLevel": "ERROR",
        "SendEnv": "LANG LANGUAGE LC_*",  # the client's locale, as plain ssh sends it (TERM, DISPLAY come anyway)
    }
    if master:
        options.update(master.options(cold))
    argv = program + ["-F", "/dev/null"]
    for name, value in options.items():
        argv += ["-o", "%s=%s" % (name, value)]
    argv += split_words(config["ssh_options"], "the setting ssh_options")
    if base == "ssh" and opts.x11:
        argv.append("-X")
    if base == "scp":
        return argv + opts.command  # the user names the host ("remote:file"); any name does
    if base == "sftp":
        return argv + opts.command + [alias]
    return argv + [alias] + opts.command


def run_client(config_path, argv):
    opts = parse_client_args(argv)
    if opts.help:
        sys.stdout.write(CLIENT_USAGE)
        return 0
    return enter_job(config_path, opts)


def enter_job(config_path, opts, streams=(0, 1, 2), on_ticket=None):
    """Reach the job as `opts` say, over OpenSSH (ssh, or the -ssh command)
    where both ends have it, else over the built-in transport, with the
    remote command's stdin, stdout and stderr on `streams`; `on_ticket` is
    called with the ticket before the session starts (with None for one
    through an ssh master, which needs none).  Returns the exit
    status."""
    if opts.debug:
        log.set_level(Log.DEBUG)
    if opts.transport not in ("auto", "openssh", "builtin"):
        raise UsageError("unknown transport %r: openssh, builtin or auto" % opts.transport)
    config, site, job = find_site(config_path, opts)
    if opts.x11 and not os.environ.get("DISPLAY"):
        sys.stderr.write("sshjob: warning: -X, but DISPLAY is not set: there is no X display to forward\n")
    try:
        return enter_job_at(site, config, opts, job, streams, on_ticket)
    except (Interrupted, KeyboardInterrupt):
        if opts.remove_on_interrupt:
            with contextlib.suppress(SshjobError, OSError):
                site.remove(job)
                sys.stderr.write("sshjob: job %s removed, as -remove-on-interrupt asks\n" % job)
        raise
    finally:
        site.close()


def enter_job_at(site, config, opts, job, streams, on_ticket):
    command = " ".join(opts.command) if opts.command else None
    openssh = wants_openssh(config, opts)
    master = SshMaster.of(config, site, opts, job) if openssh else None
    if master and master.answers():
        if site.agent_runs():
            if on_ticket:
                on_ticket(None)  # no ticket is needed
            status = master.run(config, opts, streams)
            if status == 255:
                explain_lost_session(site, job, None)
            return status
        log.debug("job %s's agent does not answer: the cold way, without its ssh master", job)
        master = None  # its job may be suspended: the cold way says so
    elif master and not master.can_listen():
        master = None
    with contextlib.ExitStack() as stack:
        ssh = None
        if openssh:  # the built-in transport needs no key, so no directory for one
            ssh = stack.enter_context(OpenSsh(config, opts, site, stack.enter_context(private_tempdir()), job,
                                              streams, master))
        key = make_session_key(config, ssh.key, opts.keygen_options) if ssh else None
        holder = token_hex(32)
        request = SessionRequest(opts.job.rpartition(":")[2], key=key and read_public_key(key),
                                 holder=holder_hash(holder), transport=opts.transport,
                                 interactive=command is None and not opts.ssh and os.isatty(0) and os.isatty(1),
                                 shells=offered_shells(opts.shells), command=command,
                                 container=opts.container, job_env=opts.job_env)
        ticket = wait_for_ticket(site, request, opts.auto_retry)
        log.debug("job %s runs as %s on %s; transport: %s (%s)", job, ticket.user, ticket.node, ticket.transport,
                  ticket.why)
        if on_ticket:
            on_ticket(ticket)
        if ticket.transport == "openssh":
            status = ssh.run(request._replace(transport="openssh"), ticket)
        else:
            if ssh:
                ssh.close()  # before the session: it is on the terminal
            if opts.ssh:
                raise MissingProgram("%s needs OpenSSH on both ends, and job %s has the built-in transport only "
                                     "(%s): sshjob cp, and rsync -e 'sshjob client', copy files without it"
                                     % (opts.ssh, ticket.job, ticket.why))
            if opts.x11:
                raise MissingProgram("-X needs OpenSSH on both ends, and job %s has the built-in transport only "
                                     "(%s): X11 forwarding needs sshd on the node and ssh here"
                                     % (ticket.job, ticket.why))
            try:
                status = enter_builtin(site, ticket, holder, request, streams)
            except Unreachable:
                explain_lost_session(site, job, ticket)
                raise
    if status == 255:
        explain_lost_session(site, job, ticket)
    return status


def offered_shells(option):
    """The shells the job's node tries, in order, the first it has winning:
    those of -shells, then $SHELL, unless it is one that refuses logins (a
    service account's nologin, run by sudo -u or runuser)."""
    shells = [shell for shell in (option or "").split(",") if shell]
    mine = os.environ.get("SHELL")
    if mine and os.path.basename(mine) in NO_LOGIN_SHELLS:
        log.debug("$SHELL is %s, which refuses logins: not offered to the job", mine)
    elif mine:
        shells.append(mine)
    log.debug("shells offered to the job, in order: %s, then /bin/sh", ", ".join(shells) or "none")
    return shells


def wants_openssh(config, opts):
    """Whether the session may use OpenSSH: not where the built-in transport
    is asked for, or where this machine has no ssh client (it needs none)."""
    if opts.transport == "builtin":
        return False
    try:
        find_program(config, "ssh", "this machine")
    except MissingProgram:
        if opts.transport == "openssh" or opts.ssh:
            raise
        log.debug("this machine has no ssh client: the built-in transport it is")
        return False
    return True


def read_public_key(key):
    with open(key + ".pub") as f:
        return parse_public_key(f.read())


def wait_for_ticket(site, request, auto_retry, abandoned=lambda: False):
    """A ticket for the job; with -auto-retry, wait while the job is not
    running yet, saying so, until it runs or never will (a held job will
    not run until someone releases it: that ends the wait with a sentence).
    On a terminal one line says how long, updated; elsewhere a line is
    written when the reason changes, and once a minute."""
    started = time.time()
    said, last, tries = None, 0.0, 0
    on_terminal = sys.stderr.isatty()
    try:
        while True:
            try:
                ticket = site.ticket(request)
                if on_terminal and said:
                    sys.stderr.write("\n")
                return ticket
            except NotRunning as e:
                if not auto_retry:
                    raise NotRunning("%s: use -auto-retry to wait for it" % e) from None
                now = time.time()
                line = "sshjob: %s; waiting (%d s)..." % (e, now - started)
                if on_terminal:
                    sys.stderr.write("\r\033[K" + line)
                elif str(e) != said or now - last >= 60:
                    sys.stderr.write(line + "\n")
                    last = now
                said = str(e)
                sys.stderr.flush()
                pause = min(2.0, 0.1 * 2 ** tries)  # a job that starts at once is entered at once
                tries += 1
                while pause > 0:
                    if abandoned():
                        raise Interrupted(signal.SIGHUP) from None  # as ssh's hang-up would say
                    time.sleep(min(pause, 0.2))
                    pause -= 0.2
    except BaseException:
        if on_terminal and said:
            sys.stderr.write("\n")
        raise


MASTER_PREFIX = "cm-"  # the client's ssh master sockets (SshMaster) in its private directory


class SshMaster:
    """The warm path of the OpenSSH transport: ssh's own multiplexing.  A
    cold session's ssh stays as the master of its connection to the job's
    sshd (ControlMaster, with ControlPersist for warm_idle after its last
    session), and later sessions of the same user into the same job, with
    the same choices, go through it: no ticket, no step, no handshake.

    Its socket is in the user's private sshjob directory, where ssh itself
    serves only its own uid, named after the job as its site names it for
    agents (Site.warm_name) and a hash of this host's name (login nodes
    that share a home directory make their own) and what the session chose
    (configuration, job, container, environment, shells, X11).  The job's
    host key is kept beside it, for the master's later key exchanges.  On
    the job's side the master's sshd counts as a session only while it
    serves one (see SessionHost.live).  A job that ends takes the
    connection with it; a master whose socket no longer answers is the
    cold way again."""

    def __init__(self, path, alias, persist=0):
        self.path = path
        self.alias = alias
        self.known_hosts = path + ".hosts"
        self.persist = persist  # seconds ssh keeps the master after its last session (a master this client makes)

    @staticmethod
    def name_of(path):
        """The job's name for agents, which the socket's name starts with."""
        return os.path.basename(path)[len(MASTER_PREFIX):].rpartition("-")[0]

    @classmethod
    def of(cls, config, site, opts, job):
        """The master for this session's choices, or None where there is
        none to be (warm_idle = 0, the built-in transport, no private
        directory, or one too deep for a Unix socket's name)."""
        import zlib
        name = site.warm_name()  # None where warm_idle = 0
        if not name or opts.transport == "builtin":
            return None
        try:
            directory = sshjob_home()
        except ConfigError:
            return None
        choices = [socket.gethostname(), config.path or "", opts.job, opts.container, opts.job_env,
                   opts.shells or "", os.environ.get("SHELL", ""), opts.x11 and os.environ.get("DISPLAY", "")]
        path = os.path.join(directory, "%s%s-%08x" % (MASTER_PREFIX, name, zlib.crc32(json.dumps(choices).encode())))
        if len(os.fsencode(path)) + len(".XXXXXXXXXXXXXXXX") >= 108:  # sun_path; ssh binds a longer name first
            log.debug("no ssh master: its socket's path would be too long for a Unix socket (%s)", path)
            return None
        return cls(path, "job-" + job, config.seconds("warm_idle"))

    def can_listen(self):
        """Whether a Unix socket can be made where the master's goes: where
        it cannot (a home directory on a file system without them), ssh
        would fail the session rather than go without."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.bind(self.path + ".probe")
            os.unlink(self.path + ".probe")
            return True
        except OSError as e:
            log.debug("no ssh master: no Unix socket can be made at %s (%s)", self.path, e.strerror)
            return False
        finally:
            probe.close()

    def answers(self):
        """Whether a master serves the socket (ssh removes a stale one)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
            return True
        except OSError:
            return False
        finally:
            sock.close()

    def options(self, cold):
        """ssh's options: the first session's ssh becomes the master, later
        ones only go through it (a master that has just gone leaves them
        nothing to connect with: they fail, saying so, and are not
        retried, having maybe run)."""
        options = {"ControlPath": openssh_quoted(self.path), "ControlMaster": "auto" if cold else "no"}
        if cold:
            options["ControlPersist"] = "%ds" % self.persist
        else:
            options["ProxyCommand"] = "/bin/sh -c %s" % shlex.quote(
                "echo 'sshjob: the ssh master connection to %s ended as the session started: run it again' >&2"
                % self.alias[4:])
            options["UserKnownHostsFile"] = "/dev/null"
        return options

    def run(self, config, opts, streams):
        """A session through the master: ssh's exit status.  ssh hands the
        master its stdin, stdout and stderr; the master holds stderr until
        the remote command ends, even when ssh (and the client) were
        interrupted before: so ssh gets a pipe that the client relays to
        stderr, whose other end goes with the client, and a caller that
        waits for the end of stderr does not wait for the remote command."""
        argv = ssh_command(config, opts, self.alias, user_name(os.getuid()), os.devnull, os.devnull, None,
                           self, cold=False)
        log.debug("the warm path: ssh's master connection to %s, at %s", self.alias[4:], self.path)
        read_end, write_end = os.pipe()
        try:
            child = start_foreground(argv, (streams[0], streams[1], write_end))
        finally:
            os.close(write_end)
        relay = threading.Thread(target=copy_until_end, args=(read_end, streams[2]), daemon=True)
        relay.start()
        status = wait_foreground(child)
        relay.join(IO_TIMEOUT)  # the master closes its end as the session's channel closes
        return status

    def stop(self):
        """Ask the master to end (ssh -O exit); whether one answered."""
        if not self.answers():
            return False
        subprocess.run([shutil.which("ssh") or "ssh", "-F", "/dev/null", "-o", "ControlPath=" + openssh_quoted(
            self.path), "-O", "exit", self.alias], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return True

    @staticmethod
    def all_of_user():
        """The user's masters that answer here."""
        directory = sshjob_home()
        found = []
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if not name.startswith(MASTER_PREFIX) or "." in name.rpartition("-")[2]:
                continue
            with contextlib.suppress(OSError, IndexError):  # a master that ends meanwhile takes its files along
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    with open(path + ".hosts") as f:
                        master = SshMaster(path, f.read().split()[0])
                    if master.answers():
                        found.append(master)
        return found


class OpenSsh:
    """ssh (or the -ssh program) reaching a job through a ticket desk.

    ssh itself starts before the client has its key and ticket, so that its
    start overlaps theirs: as the caller, whose job it mostly is, and named
    after the job as the client found it.  Until the desk hands it its
    connection it prints nothing, and it is stopped, unseen, if the ticket
    goes another way; started again, at a new desk, if the job runs as
    another user.  A -ssh program (scp, sftp, rsync...) starts only once the
    desk holds its connection: stopping it would leave its own ssh behind,
    which would then speak."""

    def __init__(self, config, opts, site, tmp, job, streams=(0, 1, 2), master=None):
        self.config = config
        self.opts = opts
        self.site = site
        self.streams = streams
        self.master = master  # the SshMaster that this session's ssh becomes
        self.key = os.path.join(tmp, "id")
        self.known_hosts = master.known_hosts if master else os.path.join(tmp, "known_hosts")
        if not master:
            write_private(self.known_hosts, "")
        self.desk = TicketDesk(site, None, self.known_hosts, "job-" + job)
        self.user = user_name(os.getuid())
        self.proc = None
        if not opts.ssh:
            self.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        argv = ssh_command(self.config, self.opts, self.desk.alias, self.user, self.known_hosts, self.key,
                           self.desk.proxy_command(), self.master)
        log.debug("running %s", " ".join(shlex.quote(a) for a in argv))
        self.proc = start_foreground(argv, self.streams)

    def stop(self):
        if self.proc and self.proc.returncode is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def run(self, request, ticket):
        """Hand ssh its connection on `ticket`; ssh's exit status."""
        alias = "job-" + ticket.job
        if (ticket.user, alias) != (self.user, self.desk.alias):
            self.close()
            self.user, self.desk = ticket.user, TicketDesk(self.site, None, self.known_hosts, alias)
        self.desk.request = request
        try:
            self.desk.prepare(ticket)
        except BaseException:
            self.stop()
            raise
        if self.proc is None:
            self.start()
        status = wait_foreground(self.proc)
        if status == 255 and self.desk.error:
            raise self.desk.error
        return status

    def close(self):
        self.stop()
        self.desk.close()


def enter_builtin(site, ticket, holder, request, streams=(0, 1, 2)):
    """A session over the built-in transport, on the given stdin, stdout and
    stderr, as `request` asks; returns the remote exit status."""
    interactive = request.command is None and os.isatty(streams[0]) and os.isatty(streams[1])
    session = dict(request.place(), holder=holder, command=request.command, env={
        k: v for k, v in os.environ.items() if CLIENT_VARIABLES.fullmatch(k)})
    if interactive:
        rows, columns = window_size(0)
        session["pty"] = {"term": os.environ.get("TERM", "xterm"), "rows": rows, "columns": columns}
    channel = site.open_builtin(ticket, session)
    with channel, contextlib.ExitStack() as stack:
        channel.settimeout(None)
        if interactive:
            stack.enter_context(raw_terminal(0))
        try:
            return relay_to_job(channel, interactive, streams)
        except OSError as e:
            raise Unreachable("the connection to job %s broke (%s)" % (ticket.job, e)) from None


def start_foreground(argv, streams=(0, 1, 2)):
    """ssh, on the given stdin, stdout and stderr; it runs its ProxyCommand with $SHELL."""
    stdin, stdout, stderr = (None if fd == n else fd for n, fd in enumerate(streams))
    return subprocess.Popen(argv, env=dict(os.environ, SHELL="/bin/sh"), stdin=stdin, stdout=stdout, stderr=stderr)


def wait_foreground(child):
    """ssh's exit status; a signal to us ends it too."""
    try:
        return child.wait()
    except BaseException:
        child.terminate()
        child.wait()
        raise


def explain_lost_session(site, job, ticket):
    """ssh failed: if the end of the job's run is why, say so in a sentence."""
    try:
        state = site.state(job, ticket)
    except Unreachable as e:
        raise JobGone("the session ended, and %s: its pool may have been stopped" % e) from None
    except SshjobError:
        return
    if state in ENDED:
        raise JobGone("the session ended because job %s %s" % (job, ENDED[state]))


@contextlib.contextmanager
def raw_terminal(fd):
    """The local terminal in raw mode, restored on every way out."""
    import tty
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSADRAIN)  # as ssh does: what was typed ahead stays
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def session_end(news):
    """The remote exit status; a sentence instead if the job's end ended the session."""
    ending = news.get("ending")
    if ending in ENDINGS and ending != "exit":
        raise JobGone("the session ended because job %s %s" % (news.get("job"), ENDINGS[ending][2]))
    return field(news, "status", int)


def sent(sock, kind, payload):
    """Whether a frame reached the job.  A session that has ended, its last
    frames on their way, no longer reads what the client sends: the client
    goes on reading, to the exit frame."""
    try:
        send_frame(sock, kind, payload)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def relay_to_job(sock, interactive, streams):
    """The client's half: stdin to the job, its output to stdout and stderr
    (`streams`, three fds), window changes on a terminal; returns the remote
    exit status.  The window's size is checked before each keystroke goes,
    too: SIGWINCH may come after the keys typed after the change, and a
    command typed then must find the new size."""
    stdin, stdout, stderr = streams
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    previous = size = None
    if interactive:
        previous = signal.signal(signal.SIGWINCH, lambda signum, frame: None)
        signal.set_wakeup_fd(wakeup_write)
        size = window_size(stdin)

    def follow_window():
        nonlocal size
        now = window_size(stdin) if interactive else size
        if now != size:
            size = now
            sent(sock, RESIZE, WINSIZE.pack(*size))

    inputs = [stdin, wakeup_read]
    try:
        while True:
            for source in readable(sock, inputs):
                if source is sock:
                    kind, payload = recv_frame(sock)
                    if kind is None:
                        raise Unreachable("the connection to the job closed before the session ended")
                    if kind == EXIT:
                        return session_end(json.loads(payload.decode()))
                    write_all(stdout if kind == STDOUT else stderr, payload)
                elif source == stdin:
                    data = os.read(stdin, MAX_CHUNK)
                    follow_window()
                    if not data or not sent(sock, STDIN if data else STDIN_EOF, data):
                        inputs.remove(stdin)
                        sent(sock, STDIN_EOF, b"")
                else:
                    os.read(wakeup_read, 512)
                    follow_window()
    finally:
        if interactive:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGWINCH, previous)
        os.close(wakeup_read)
        os.close(wakeup_write)


# ---------------------------------------------------------------------------
# Files: sshjob cp JOB:PATH LOCAL and sshjob cp LOCAL JOB:PATH.  A tar
# stream (tar on the node, the tarfile module here) over either transport,
# modes kept; what comes from a job is extracted as data (as_data).
# ---------------------------------------------------------------------------

REMOTE_PATH = re.compile(r"(?P<job>%s):(?P<path>.*)" % ANY_JOB_ID.pattern, re.DOTALL)

# sshjob cp's upload, as a shell runs it; its first line names the path and the name (hex of their UTF-8) for
# container_session, which does the same where the image has no shell.
UPLOAD_SCRIPT = """\
# sshjob-put %(hex_path)s %(hex_name)s
p=%(path)s; n=%(name)s
if [ -d "$p" ]; then cd -- "$p" && exec tar -xpf -; fi
cd -- "$(dirname -- "$p")" && tar -xpf - && { [ "$n" = "$(basename -- "$p")" ] || mv -f -- "$n" "$(basename -- "$p")"; }
"""


def run_cp(config_path, argv):
    import argparse
    parser = argparse.ArgumentParser(prog="sshjob cp", description="Copy files and directories to or from a job.",
                                     add_help=False)
    parser.add_argument("--help", "-help", "-h", action="help", help="show this help and exit")
    parser.add_argument("--transport", "-transport", default="auto", choices=("auto", "openssh", "builtin"))
    parser.add_argument("--auto-retry", "-auto-retry", action="store_true",
                        help="if the job is not running yet, wait until it is")
    parser.add_argument("--debug", "-debug", action="store_true")
    parser.add_argument("source")
    parser.add_argument("target")
    args = parser.parse_args(argv)
    remote = [REMOTE_PATH.fullmatch(a) for a in (args.source, args.target)]
    if (remote[0] is None) == (remote[1] is None):
        raise UsageError("name exactly one side as JOB:PATH, e.g. sshjob cp 1.0:results.dat . ")
    download = remote[0] is not None
    job, path = (remote[0] if download else remote[1]).group("job", "path")
    local = args.target if download else args.source
    if not download and not os.path.exists(local):
        raise UsageError("%s does not exist" % local)
    opts = parse_client_args([job]).replace(transport=args.transport, debug=args.debug, auto_retry=args.auto_retry)
    return (download_tree if download else upload_tree)(config_path, opts, path, local)


def download_tree(config_path, opts, path, local):
    """The job's tar of PATH, extracted here as data (see as_data): into
    LOCAL if it is a directory, else as LOCAL.  It is unpacked aside first,
    and put in place only whole.  The same stream on either transport, so
    that what a job hands back is checked the same way whatever carries it
    (scp, the legacy protocol above all, would keep set-id bits)."""
    import tarfile  # sshjob cp's alone
    import tempfile

    parent, name = os.path.split(path.rstrip("/") or "/")
    opts = opts.replace(ssh=None, command=["tar -C %s -cf - -- %s" % (shlex.quote(parent or "."), shlex.quote(name))])
    target = os.path.join(local, name) if is_directory(local) else local
    staging = tempfile.mkdtemp(prefix=".sshjob-cp-", dir=os.path.dirname(os.path.abspath(target)))
    read_end, write_end = os.pipe()
    owners, refusals, failures = [], [], []

    def extract():
        with os.fdopen(read_end, "rb") as incoming:  # closed when done: a job still writing stops
            try:
                with tarfile.open(fileobj=Progress(incoming, "received"), mode="r|") as archive:
                    links = set()
                    shared = owners != [user_name(os.getuid())]
                    for member in archive:
                        archive.extract(as_data(member, name, links, shared), staging, set_attrs=True,
                                        **as_filtered(tarfile))
                while incoming.read(65536):  # tar's padding after its end: unread, it would break the relay
                    pass
            except Refused as e:
                refusals.append(e)
            except (tarfile.TarError, OSError) as e:
                failures.append(UsageError("the copy from the job failed: %s" % e))

    extractor = threading.Thread(target=extract)
    extractor.start()
    try:
        with open(os.devnull, "rb") as nothing:
            try:
                status = enter_job(config_path, opts, (nothing.fileno(), write_end, 2),
                                   on_ticket=lambda ticket: owners.append(ticket and ticket.user))
            except SshjobError:
                os.close(write_end)
                write_end = None
                extractor.join()
                if refusals:  # the extractor refused what came and stopped reading: that, not the relay, is why
                    raise refusals[0] from None
                raise
            finally:
                if write_end is not None:
                    os.close(write_end)
        extractor.join()
        if refusals:
            raise refusals[0]
        if status:  # the job's tar failed, and said why on stderr
            return status
        if failures or not os.path.lexists(os.path.join(staging, name)):
            raise failures[0] if failures else UsageError("the copy from the job failed")
        put_in_place(os.path.join(staging, name), target)
        return 0
    finally:
        extractor.join()
        shutil.rmtree(staging, ignore_errors=True)


def is_directory(path):
    """Whether `path` is a directory to copy into.  A link is followed only
    if it is the caller's or root's: another user's link in a sticky /tmp
    must not steer a copy (what fs.protected_symlinks does, where it is on)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode) and info.st_uid not in (0, os.getuid()):
        raise Refused("%s is a link that %s made: sshjob cp does not follow it" % (path, user_name(info.st_uid)))
    return os.path.isdir(path)


def put_in_place(source, target):
    """Move a downloaded file or tree to `target`, merging a tree into a
    directory that is there already."""
    if not (os.path.isdir(source) and not os.path.islink(source) and is_directory(target)):
        os.replace(source, target)
        return
    for entry in os.listdir(source):
        put_in_place(os.path.join(source, entry), os.path.join(target, entry))


def upload_tree(config_path, opts, path, local):
    """A tar stream of LOCAL, unpacked in the job at PATH (into it, if it is a directory)."""
    import tarfile  # sshjob cp's alone

    name = os.path.basename(os.path.abspath(local))
    opts = opts.replace(ssh=None, command=[UPLOAD_SCRIPT % {
        "path": shlex.quote(path), "name": shlex.quote(name), "hex_path": os.fsencode(path).hex(),
        "hex_name": os.fsencode(name).hex()}])
    read_end, write_end = os.pipe()

    def pack():
        with os.fdopen(write_end, "wb") as outgoing, contextlib.suppress(BrokenPipeError), tarfile.open(
                fileobj=Progress(outgoing, "sent"), mode="w|") as archive:
            archive.add(local, arcname=name, filter=without_owner)

    packer = threading.Thread(target=pack, daemon=True)
    packer.start()
    try:
        return enter_job(config_path, opts, (read_end, 1, 2))
    finally:
        os.close(read_end)
        packer.join(timeout=5)


def without_owner(member):
    """What an upload carries of a file: its data and its permissions, no
    owner and no set-id bits."""
    member.mode &= 0o777
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    return member


def as_filtered(tarfile):
    """as_data() below filters every member, on every Python; where tarfile
    has filters of its own (3.12, and security releases of 3.8 to 3.11), it
    is told so, and keeps directories' modes, which its "data" filter drops."""
    return {"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}


def as_data(member, name, links, shared=True):
    """A member of a job's archive, made safe to extract here, as data: it
    must be `name` or under it, a file, directory or link that stays
    inside; it comes out owned by whoever copies, without set-id or sticky
    bits, and, where the job is another user's (`shared`), writable by no
    one but the copier: a job cannot plant files for a super user who
    copies from it.  `links` holds the symlinks the archive made so far: no member may
    pass through one, since the text of a path says nothing of where those
    lead.  Anything else ends the copy with Refused."""
    path = member.name.rstrip("/")
    inside = not path.startswith("/") and stays_inside(path.split("/"), name, links)
    if member.issym():
        inside = inside and not member.linkname.startswith("/") and stays_inside(
            path.split("/")[:-1] + member.linkname.split("/"), name, links, to_a_link=True)
        links.add(path)
    elif member.islnk():
        inside = inside and stays_inside(member.linkname.split("/"), name, links)
    elif not (member.isfile() or member.isdir()):
        inside = False
    if not inside:
        raise Refused("the job sent %s, which is not a plain file, directory or link inside %s: the copy stops"
                      % (member.name, name))
    member.mode &= 0o755 if shared else 0o777
    member.uid, member.gid = os.getuid(), os.getgid()
    member.uname = member.gname = ""
    return member


def stays_inside(parts, name, links, to_a_link=False):
    """Whether the path of `parts` (relative, "." and ".." resolved in
    order) stays under `name` and neither is nor passes through one of
    `links`; with `to_a_link`, it may end at one (a link to a link inside)."""
    resolved = []
    for i, part in enumerate(parts):
        if part in ("", "."):
            continue
        if part == "..":
            if len(resolved) <= 1:
                return False
            resolved.pop()
            continue
        resolved.append(part)
        if "/".join(resolved) in links and not (to_a_link and i == len(parts) - 1):
            return False
    return bool(resolved) and resolved[0] == name


class Progress:
    """A file wrapper that counts bytes, shown on stderr when it is a terminal."""

    def __init__(self, stream, verb):
        self.stream = stream
        self.verb = verb
        self.count = 0
        self.shown = 0.0
        self.visible = sys.stderr.isatty()

    def read(self, size=-1):
        return self.tally(self.stream.read(size))

    def write(self, data):
        self.stream.write(data)
        self.tally(data)
        return len(data)

    def tally(self, data):
        self.count += len(data)
        if self.visible and (time.time() - self.shown > 0.2 or not data):
            self.shown = time.time()
            sys.stderr.write("\r%s %.1f MiB " % (self.verb, self.count / 1048576.0) + ("\n" if not data else ""))
            sys.stderr.flush()
        return data


# ---------------------------------------------------------------------------
# Allocations on demand: `sshjob new PROFILE`, `ssh PROFILE.new.sshjob`.  A
# profile ([profile NAME] in the configuration) names the scheduler's
# resource options and how long an allocation may stay idle.  `new` finds
# the user's live allocation of that profile by its job name and owner,
# through the scheduler (a second login node finds it too), or submits one,
# waits for it saying why, and enters it as the client does.  The
# allocation's batch script is this module (the `allocation` role): it holds
# the allocation, and gives it back `idle` after its last session ended, so
# no daemon on the login node is needed and a vanished laptop cannot keep
# an allocation past its idle time.
# ---------------------------------------------------------------------------

# A profile's name is an ssh host label (PROFILE.new.sshjob) that no job id and no container prefix can be taken for.
PROFILE_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")

DEFAULT_IDLE = "30m"

ALLOCATION_CHECK = 5  # seconds between the holder's looks at the allocation's sessions

END_WARNING = 300  # seconds before its time limit that the allocation's open sessions are warned

# Options of the holder job that are the holder's to choose: a profile that names one is refused.
HOLDER_OPTIONS = {
    "--wrap": "the allocation's batch script is sshjob's",
    "-a": "an allocation is one job, not an array", "--array": "an allocation is one job, not an array",
    "-H": "an allocation must run when it can", "--hold": "an allocation must run when it can",
    "-o": "the allocation's output is sshjob's", "--output": "the allocation's output is sshjob's",
    "-e": "the allocation's output is sshjob's", "--error": "the allocation's output is sshjob's",
    "-i": "the allocation's input is sshjob's", "--input": "the allocation's input is sshjob's",
    "-J": "the allocation's name is how sshjob finds it again",
    "--job-name": "the allocation's name is how sshjob finds it again",
    "--export": "sessions need the job's environment (leave --export out)",
    "--parsable": "sshjob reads sbatch's answer itself", "-W": "sshjob waits for the allocation itself",
    "--wait": "sshjob waits for the allocation itself", "--test-only": "an allocation must be submitted",
    "-D": "a session's directory is where `sshjob new` runs",
    "--chdir": "a session's directory is where `sshjob new` runs",
}

Profile = collections.namedtuple("Profile", "name options idle image podman")  # podman: its command and run options


def idle_time(text, profile):
    """Seconds of a profile's `idle` (a bare number is minutes); None for none."""
    text = text.strip().lower()
    if text in ("none", "never"):
        return None
    seconds = duration(text, bare=60)
    if seconds is None:
        raise ConfigError("idle = %r of profile %s is not a duration: e.g. 20m, 90s, 4h, or none" % (text, profile))
    return seconds


def check_profile_name(name):
    if not PROFILE_NAME.fullmatch(name):
        raise UsageError("%r is not a profile name: lower-case letters, digits and single dashes, starting with "
                         "a letter (it is an ssh host name: NAME.new.sshjob)" % name)


def holder_option_problem(options):
    """Why the profile's `options` cannot be the holder job's, or None.  A
    word that is no option is a value only right after an option that has
    none of its own (-c 8, not --mem=4G 8)."""
    takes = False
    for word in options:
        name = word.split("=", 1)[0]
        if not word.startswith("-"):
            if not takes:
                return "%r, which is no option: a profile gives options only (the batch script is sshjob's)" % word
            takes = False
            continue
        takes = "=" not in word
        if name in HOLDER_OPTIONS:
            return "%s: %s" % (name, HOLDER_OPTIONS[name])
        if name[:2] != "--" and len(name) > 2 and name[:2] in HOLDER_OPTIONS:  # -afoo, -Jname
            return "%s: %s" % (name[:2], HOLDER_OPTIONS[name[:2]])
    return None


def find_profile(config, name, options=None):
    """The profile `name`: the configuration's, or one made on the command
    line from `options` (a string of the scheduler's options)."""
    check_profile_name(name)
    settings = config.profile_options(name)
    if options is None and settings is None:
        known = config.profile_names()
        raise UsageError("there is no profile %r in %s (%s); or give its options: sshjob new --options '...' %s"
                         % (name, config.path or "the configuration",
                            "its profiles: " + ", ".join(known) if known else "it has none", name))
    settings = dict(settings or {})
    if options is not None:
        settings["options"] = options
    try:
        words = shlex.split(settings.get("options", ""))
    except ValueError as e:
        raise ConfigError("the options of profile %s do not parse: %s" % (name, e)) from None
    problem = holder_option_problem(words)
    if problem:
        raise UsageError("profile %s cannot ask for %s" % (name, problem))
    image = settings.get("image", "").strip()
    podman = [settings.get("podman", "podman"), settings.get("podman_options", "")] if image else []
    try:
        [shlex.split(text) for text in podman]
    except ValueError as e:
        raise ConfigError("the podman settings of profile %s do not parse: %s" % (name, e)) from None
    return Profile(name, words, idle_time(settings.get("idle", DEFAULT_IDLE), name), image, podman)


# -- the client's side ---------------------------------------------------------


def allocation_of(site, profile, workdir):
    """(job, whether it was just submitted): the user's live allocation of
    `profile`, or a new one.  A lock keeps an editor's several clients on
    this machine from submitting one each; a second login node's race is
    settled by keeping the oldest."""
    with locked(os.path.join(sshjob_home(), ".new-%s.lock" % profile.name)):
        jobs = site.allocations(profile.name)
        if jobs:
            return jobs[0], False
        job = site.submit_allocation(profile, workdir)
    oldest = (site.allocations(profile.name) or [job])[0]
    if oldest != job:
        site.remove(job)
        return oldest, False
    return job, True


class Waiter:
    """This process's wait for a pending allocation: a file of the user's
    that it holds locked while it waits.  When a waiter gives up (Ctrl-C,
    its ssh client gone) the pending job is removed only if no other
    waiter's file is held (an editor waits in several processes at once,
    and a second login node's waiters count too where home directories are
    shared); `q` counts them."""

    def __init__(self, job):
        self.job = job
        name = ".waiting-%s.%d-%s" % (job, os.getpid(), token_hex(4))
        making = os.path.join(sshjob_home(), ".making" + name)  # locked before waiters() can see it
        self.lock = open(os.open(making, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))  # noqa: SIM115
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.path = os.path.join(sshjob_home(), name)
        os.rename(making, self.path)

    def done(self, *_):
        """Waiting is over (the allocation runs, or this waiter gave up)."""
        if self.lock:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.lock.close()
            self.lock = None

    def last_to_give_up(self):
        """Whether no one else waits: then this waiter removes the job."""
        if not self.lock:
            return False
        with locked(os.path.join(sshjob_home(), ".waiting-%s.lock" % self.job)):
            self.done()
            return waiters(self.job) == 0


def waiters(job):
    """How many of the user's clients wait for allocation `job` (files whose
    waiter died go)."""
    import glob
    count = 0
    for path in glob.glob(os.path.join(sshjob_home(), ".waiting-%s.*-*" % glob.escape(job))):
        try:
            with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW)) as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(path)  # its waiter is gone
        except BlockingIOError:
            count += 1
        except OSError:
            pass
    return count


def give_up_pending(site, job, waiter):
    """The caller stopped waiting for allocation `job`: remove it if it is
    still pending and nobody else waits for it."""
    with contextlib.suppress(SshjobError, OSError):
        if waiter.last_to_give_up() and site.state(job) in ("pending", "idle"):
            site.remove(job)
            sys.stderr.write("sshjob: allocation %s removed: it had not started, and nobody else waits for it\n"
                             % job)


NEW_USAGE = """\
usage: sshjob new [--options OPTIONS] [--scheduler pool|slurm] [-transport t] PROFILE [command...]

Enter the allocation of PROFILE: the one that runs for you, or a new one
(wait for it, saying why).  Without a command, an interactive shell.  The
allocation is given back `idle` after its last session ended (sshjob rm
PROFILE gives it back now).  PROFILE is a [profile NAME] section of the
configuration; --options makes one on the command line.
"""


def run_new(config_path, argv):
    """`sshjob new PROFILE [command]`: allocate (or reuse), wait, enter."""
    options, scheduler, transport = None, None, "auto"
    while argv[:1] and argv[0].startswith("-"):
        flag, argv = argv[0], argv[1:]
        if flag in ("-h", "--help", "-help"):
            sys.stdout.write(NEW_USAGE)
            return 0
        if flag not in ("--options", "--scheduler", "-scheduler", "-transport", "--transport") or not argv:
            raise UsageError("unknown option %r, or its value is missing\n%s" % (flag, NEW_USAGE.splitlines()[0]))
        value, argv = argv[0], argv[1:]
        if flag == "--options":
            options = value
        elif flag.endswith("scheduler"):
            scheduler = value
        else:
            transport = value
    if not argv:
        raise UsageError("name a profile: %s" % NEW_USAGE.splitlines()[0])
    config, site, _ = find_site(config_path, ClientOptions(job="", scheduler=scheduler))
    profile = find_profile(config, argv[0], options)
    job, fresh = allocation_of(site, profile, os.getcwd())
    if fresh:
        sys.stderr.write("sshjob: submitted allocation %s for profile %s\n" % (job, profile.name))
    waiter = Waiter(job)
    opts = ClientOptions(job=job, command=argv[1:], auto_retry=True, scheduler=site.name, transport=transport)
    try:
        return enter_job(config_path, opts, on_ticket=waiter.done)
    except (Interrupted, KeyboardInterrupt):
        give_up_pending(site, job, waiter)
        raise
    finally:
        waiter.done()


def give_back(config_path, name):
    """`sshjob rm PROFILE`: give the user's allocation of PROFILE back now."""
    check_profile_name(name)
    _, site, _ = find_site(config_path, ClientOptions(job=""))
    jobs = site.allocations(name)
    if not jobs:
        raise NotFound("you have no allocation of profile %s" % name)
    for job in jobs:
        site.remove(job)
        print("Allocation %s (profile %s) given back." % (job, name))
    return 0


# -- the holder, inside the allocation -----------------------------------------


def run_allocation(config_path, argv):
    """`sshjob allocation PROFILE IDLE`: the allocation's batch script (a
    pool job's command).  It holds the allocation while sessions come and
    go, says its state (in a Slurm job's comment, which `q` shows), warns
    open sessions before the time limit, and ends, which gives the
    allocation back, `idle` seconds after the last session ended (IDLE
    "none": at the time limit)."""
    if len(argv) not in (2, 5) or not (argv[1] == "none" or duration(argv[1]) is not None):
        raise UsageError("usage: sshjob allocation PROFILE IDLE [IMAGE PODMAN PODMAN_OPTIONS] (an allocation's "
                         "batch script; sshjob new submits it)")
    profile, idle = argv[0], None if argv[1] == "none" else duration(argv[1])
    job = os.environ.get("SLURM_JOB_ID")
    if len(argv) == 5:  # first: sessions wait for the container (image_to_come)
        with run_container(profile, job or os.environ.get("SSHJOB_JOB_ID", "0"), *argv[2:]):
            return run_allocation(config_path, argv[:2])
    if job:
        ends = slurm_end_time(job)
        census = lambda: (len(slurm_sessions(job)), last_session_end(job))  # noqa: E731
        publish = lambda state: run_slurm(job, "scontrol", "update", "JobId=" + job,  # noqa: E731
                                          "Comment=sshjob new %s: %s" % (profile, state))
    elif os.environ.get(TALLY_VAR):
        job, ends, publish = os.environ.get("SSHJOB_JOB_ID", "?"), None, lambda state: None
        census = functools.partial(pool_sessions, os.environ[TALLY_VAR])
    else:
        raise UsageError("sshjob allocation runs as an allocation's batch script (sshjob new submits it)")
    return hold_allocation(job, profile, idle, ends, census, publish)


@contextlib.contextmanager
def run_container(profile, job, image, podman, options):
    """A container of the profile's image, the allocation's payload, while
    the holder holds it: its sessions land inside (find_payloads)."""
    name = "%s%s-%s" % (ALLOCATION_PREFIX, profile, re.sub(r"[^\w.-]", "-", job))
    podman = shlex.split(podman)
    container = subprocess.Popen(podman + ["run", "--rm", "--name", name] + shlex.split(options) + [
        image, "sleep", "31536000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        yield
    finally:  # the container's first process ignores SIGTERM, as a pid 1 does: podman stops it
        subprocess.run(podman + ["stop", "--ignore", "--time", "1", name], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        container.wait()


def hold_allocation(job, profile, idle, ends, census, publish):
    quiet_since, said, warned = time.time(), None, set()  # warned: the terminals told of the time limit
    while True:
        sessions, last_end = census()
        now = time.time()
        quiet_since = None if sessions else max(quiet_since or now, last_end)
        state = "%d session(s)" % sessions if sessions else "idle since %s" % time.strftime(
            "%H:%M:%S", time.localtime(quiet_since))
        state += "; given back %s" % ("at the time limit" if idle is None else "after %s idle" % describe_duration(
            idle))
        if state != said:
            with contextlib.suppress(SshjobError):
                publish(state)
            said = state
        if quiet_since is not None and idle is not None and now - quiet_since >= idle:
            return 0
        if sessions and ends and ends - now <= END_WARNING:  # each session's terminal, once it has one
            warned |= warn_sessions(job, "sshjob: allocation %s (profile %s) ends at %s, its time limit: save your "
                                    "work" % (job, profile, time.strftime("%H:%M", time.localtime(ends))), warned)
        time.sleep(ALLOCATION_CHECK)


def pool_sessions(tally):
    """(live sessions, when the last one ended) of this pool job, as its starter tallies them."""
    try:
        with open(tally) as f:
            said = json.load(f)
        return int(said["live"]), float(said["ended"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0.0


def slurm_sessions(job):
    """The steps of `job` that are sessions: all but its batch and extern steps, and those that hold
    only what a session left running (NodeStep.linger) on this node."""
    steps = run_slurm(job, "squeue", "--noheader", "--steps", "--jobs", job, "--format=%i").split()
    return [step for step in steps if step.split(".")[-1] not in ("batch", "extern", "interactive")
            and not os.path.exists(held_marker(job, step.split(".")[-1]) or "")]


def last_session_end(job):
    try:
        return os.stat(session_activity(job) or "").st_mtime
    except OSError:
        return 0.0


def slurm_end_time(job):
    """When `job` reaches its time limit, in seconds since the epoch, or None."""
    jobs = slurm_jobs(job)
    end = jobs[0].get("EndTime", "") if jobs else ""
    try:
        return time.mktime(time.strptime(end, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def warn_sessions(job, message, warned):
    """Write `message` on the terminals of the job's sessions on this node
    but those `warned` already; returns those written to, each a (terminal,
    session id): a terminal that a later session reuses is its own."""
    terminals = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            pid = int(entry)
            if process_environment(pid).get("SLURM_JOB_ID") == job:
                target, sid = os.readlink("/proc/%d/fd/0" % pid), os.getsid(pid)
                if target.startswith("/dev/pts/") and (target, sid) not in warned:
                    terminals[target] = sid
    for terminal in terminals:
        with contextlib.suppress(OSError), open(terminal, "w") as f:
            f.write("\r\n%s\r\n" % message)
    return set(terminals.items())


# ---------------------------------------------------------------------------
# Jobs as ssh hosts: `ssh 1.0.sshjob`, for every ssh tool.  One Host block
# (sshjob ssh-config) makes each name under .sshjob a job, and under
# .slurm.sshjob a Slurm job.  Its ProxyCommand, `sshjob proxy %h %r`, gets a
# ticket for the user's own sshjob key exactly as the client does, writes
# the job's host key, as the schedd or the Slurm step vouches for it, into
# sshjob's known_hosts before ssh reads it, and hands ssh the connected
# socket (ProxyUseFdpass): no trust on first use, nothing in the data path.
# ---------------------------------------------------------------------------

HOST_SUFFIX = ".sshjob"

CONTAINER_SEPARATOR = "--"  # between a container's name and the job in a host name: analysis--1.0.sshjob

NEW_SITE = "new"  # PROFILE.new.sshjob: the user's allocation of PROFILE (sshjob new)


BLOCK_BEGIN = "# >>> sshjob: jobs as ssh hosts (sshjob ssh-config --install) >>>"

BLOCK_END = "# <<< sshjob <<<"


def persistent_key(config):
    """The private key of the user's sshjob key pair, made on first use."""
    home = sshjob_home()
    path = os.path.join(home, "id_ed25519")
    with locked(os.path.join(home, ".lock")):
        if not (os.path.exists(path) and os.path.exists(path + ".pub")):
            keygen = find_program(config, "ssh_keygen", "this machine")
            for stale in (path, path + ".pub"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)
            failure = finish_keygen(start_keygen(keygen, path, "sshjob@" + socket.gethostname()))
            if failure:
                raise StorageError("ssh-keygen cannot make the sshjob key %s: %s" % (path, failure))
            log.debug("made the sshjob key %s", path)
    return path


def pinned_keys(config_path):
    """sshjob's known_hosts for the jobs of one configuration: job names are
    a pool's own, and another pool's job 1.0 has another key."""
    import hashlib
    if not config_path:
        return os.path.join(sshjob_home(), "known_hosts")
    return os.path.join(sshjob_home(), "known_hosts-%s" % hashlib.sha256(config_path.encode()).hexdigest()[:16])


def remember_host_key(path, host, key):
    """Pin `key` as the one host key of `host` in sshjob's known_hosts.  The
    schedd or the Slurm step vouches for it; the key the name had before
    goes, so that an old job's key (its owner could read it) is not trusted
    for a new job of the same name (a new pool, a Slurm whose ids
    restarted).  A Slurm job shows one key on each node to all its
    sessions (see NodeStep.start_host_key), so that concurrent connections
    agree on it."""
    with locked(path + ".lock"):
        try:
            with open(path) as f:
                lines = [line.rstrip("\n") for line in f if line.strip()]
        except FileNotFoundError:
            lines = []
        others = [known for known in lines if known.split(" ", 1)[0] != host]
        write_atomically(path, "\n".join(others + ["%s %s" % (host, parse_public_key(key))]) + "\n")


def job_of_host(host):
    """(site or None, job id, container) that a name under .sshjob stands
    for: JOB.sshjob, or JOB.SITE.sshjob for a site named in SITES
    (1234.slurm.sshjob); CONTAINER--JOB... for a session in the job's
    container of that name or pid, or none--JOB... for one on the node."""
    if not host.endswith(HOST_SUFFIX):
        raise UsageError("%s is not a job's host name: JOB.sshjob, e.g. 1.0.sshjob (or 1234.slurm.sshjob, or "
                         "CONTAINER--1.0.sshjob)" % host)
    container, _, name = host[:-len(HOST_SUFFIX)].rpartition(CONTAINER_SEPARATOR)
    job, _, site = name.rpartition(".")
    return (site, job, container or "auto") if site in SITES or site == NEW_SITE else (None, name, container or "auto")


PROXY_USAGE = "usage: sshjob proxy [--relay] [--key TYPE:BASE64] HOST USER (a Host block of sshjob ssh-config runs it)"


def run_proxy(config_path, argv):
    """`sshjob proxy [--relay] [--key KEY] HOST USER`: the ProxyCommand of
    the Host block.  A laptop's block (ssh-config --via) runs it on the
    login node through the user's ssh: --relay, as ssh's stdout there is no
    client that takes sockets, and --key, the laptop's public key, which the
    ticket is for."""
    relay, key = False, None
    while argv[:1] in (["--relay"], ["--key"]):
        if argv[0] == "--relay":
            relay, argv = True, argv[1:]
        elif len(argv) > 1:
            key, argv = parse_public_key(argv[1].replace(":", " ", 1)), argv[2:]
        else:
            break
    if len(argv) != 2 or argv[0].startswith("-"):
        raise UsageError(PROXY_USAGE)
    host, user = argv
    try:
        return proxy_connection(config_path, host, user, key, relay)
    except SshjobError as e:
        if relay or not is_unix_socket(1):
            remember_proxy_failure(host, e)
        raise


def proxy_connection(config_path, host, user, key, relay):
    scheduler, job_id, container = job_of_host(host)
    waiter = None
    if scheduler == NEW_SITE:  # the allocation of a profile: found or made, and waited for, saying why on stderr
        scheduler, job_id, waiter = allocation_for_proxy(config_path, job_id)
    opts = parse_client_args([job_id]).replace(scheduler=scheduler)
    config, site, job = find_site(config_path, opts)
    request = SessionRequest(job_id, key=key or read_public_key(persistent_key(config)), transport="openssh",
                             shells=offered_shells(None), container=container,
                             holder=token_hex(32))  # no holder is ever shown: a random one stands for its hash
    try:
        if waiter:
            try:
                ticket = wait_for_ticket(site, request, auto_retry=True, abandoned=lambda: peer_gone(1))
            except (Interrupted, KeyboardInterrupt):
                give_up_pending(site, job, waiter)
                raise
            waiter.done()
        else:
            ticket = site.ticket(request)
        if user != ticket.user:
            raise Refused("job %s runs as %s: connect as %s (ssh %s@%s, or User in the Host block)" % (
                job, ticket.user, ticket.user, ticket.user, host))
        sock, hostkey = site.connect_ssh(request, ticket)
        remember_host_key(pinned_keys(config_path and os.path.abspath(config_path)), host, hostkey)
    except BaseException:
        site.close()  # no session: its Slurm step goes too
        raise
    with sock:
        if relay:
            log.debug("relaying the connection to job %s", job)
            relay_stdio(sock)
        else:
            hand_over(sock, "job %s" % job)
    return 0  # the site is not closed: a Slurm step lives on with the session


def peer_gone(fd):
    """Whether the other end of `fd` (the ssh client, for the proxy) has gone."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


def allocation_for_proxy(config_path, profile_name):
    """(site name, job, Waiter) of the user's allocation of a profile, for PROFILE.new.sshjob."""
    config, site, _ = find_site(config_path, ClientOptions(job=""))
    profile = find_profile(config, profile_name)
    job, fresh = allocation_of(site, profile, os.path.expanduser("~"))
    if fresh:
        sys.stderr.write("sshjob: submitted allocation %s for profile %s\n" % (job, profile.name))
    return site.name, job, Waiter(job)


def run_known_hosts(config_path, argv):
    """`sshjob known-hosts HOST`: the host key that the proxy pinned for
    HOST, as a known_hosts line: a laptop's KnownHostsCommand.  The proxy
    pins the key before it relays a byte, so the laptop's ssh, which asks
    when the job's sshd shows its key, gets the key of this connection."""
    if len(argv) != 1:
        raise UsageError("usage: sshjob known-hosts HOST (a laptop's Host block runs it)")
    job_of_host(argv[0])
    try:
        with open(pinned_keys(config_path and os.path.abspath(config_path))) as f:
            sys.stdout.write("".join(line for line in f if line.split(" ", 1)[0] == argv[0]))
    except FileNotFoundError:
        pass
    return 0


PROXY_LOG = "proxy.log"  # in sshjob_home(): why the last connections failed, for clients that hide stderr

PROXY_LOG_LINES = 100


def remember_proxy_failure(host, error):
    """Keep why a connection failed where its user can read it: paramiko
    discards a ProxyCommand's stderr, and asyncssh reads it as the server's
    bytes, so their users see only that the SSH banner never came."""
    path = os.path.join(sshjob_home(), PROXY_LOG)
    with contextlib.suppress(OSError), locked(path + ".lock"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[-(PROXY_LOG_LINES - 1):]
        except FileNotFoundError:
            lines = []
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        write_atomically(path, "\n".join(lines + ["%s %s: sshjob: %s" % (stamp, host, error)]) + "\n")


# How long a client that read the passed socket's carrier as data may stay
# silent before the proxy relays for it (OpenSSH closes its end at once).
SILENT_CLIENT = 1.0


def hand_over(sock, what):
    """Give the ssh client that runs the proxy its connection to the job.

    OpenSSH (ProxyUseFdpass) takes a passed socket, and then nothing is in
    the data path; other clients (paramiko, asyncssh, JetBrains') read the
    Host block's ProxyCommand too, but expect it to carry the bytes on its
    stdin and stdout.  The proxy does not guess the client from the kind of
    descriptor it was given: it passes the socket when its stdout is a Unix
    socket, lets ssh go on (OpenSSH waits for the proxy to exit before it
    takes the socket), and relays unless the socket was taken."""
    if not is_unix_socket(1):
        log.debug("relaying the connection to %s (the client's stdout is no socket)", what)
        return relay_stdio(sock)
    with socket.fromfd(1, socket.AF_UNIX, socket.SOCK_STREAM) as client:
        pass_socket(client, sock)
        if os.fork():
            log.debug("passed the connection to %s", what)
            return 0  # ssh goes on when we exit
        taken = taken_by_client(client)
    if not taken:
        relay_stdio(sock)
    os._exit(0)


def is_unix_socket(fd):
    try:
        with socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_UNIX
    except OSError:
        return False


def taken_by_client(client):
    """Whether the client took the passed socket: OpenSSH receives it, then
    closes its end (EOF); a client that speaks SSH itself sends its version
    instead, or, if it waits for the server's, reads the carrier and stays
    silent."""
    read_at = None
    while True:
        readable, _ = wait_for([client], timeout=0.05)
        if readable:
            try:
                return not client.recv(1, socket.MSG_PEEK)
            except OSError:
                return True  # gone: nobody to relay for
        if read_at is None and unread_bytes(client) == 0:
            read_at = time.monotonic()
        if read_at is not None and time.monotonic() - read_at > SILENT_CLIENT:
            return False


def unread_bytes(sock):
    """Bytes sent on `sock` that its peer has not read yet (0 where the system cannot tell)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0


def relay_stdio(sock):
    """Carry a connection's bytes over stdin and stdout until both directions
    end, or the client ends the relay as it ends the session (OpenSSH with
    SIGHUP, paramiko with SIGTERM): that is no failure to speak of."""
    for number in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)

    def inbound():
        with contextlib.suppress(OSError):
            for data in iter(lambda: sock.recv(256 * 1024), b""):
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view):]
        end_output(1)

    sock.settimeout(None)
    receiving = threading.Thread(target=inbound, daemon=True)
    receiving.start()
    with contextlib.suppress(OSError):
        for data in iter(lambda: os.read(0, 256 * 1024), b""):
            sock.sendall(data)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    receiving.join()
    return 0


def end_output(fd):
    """Say end of file on `fd`: a socket's write half is shut, anything else closed."""
    with contextlib.suppress(OSError), socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.shutdown(socket.SHUT_WR)
    os.close(fd)


def ssh_config_block(config_path):
    """The Host block, with absolute paths: it works from any directory."""
    home = sshjob_home()
    here = os.path.abspath(sys.argv[0])
    command = [sys.executable, here] + (["--config", os.path.abspath(config_path)] if config_path else [])
    proxy = " ".join(shlex.quote(a) for a in command).replace("%", "%%") + " proxy '%h' '%r'"
    return "\n".join([
        BLOCK_BEGIN,
        "Host *%s" % HOST_SUFFIX,
        "    ProxyCommand %s" % proxy,
        "    ProxyUseFdpass yes",
        "    IdentityFile %s" % openssh_quoted(os.path.join(home, "id_ed25519")),
        "    IdentitiesOnly yes",
        "    UserKnownHostsFile %s" % openssh_quoted(pinned_keys(config_path and os.path.abspath(config_path)),
                                                 percent_expanded=None),
        "    GlobalKnownHostsFile /dev/null",
        "    StrictHostKeyChecking yes",
        "    CheckHostIP no",
        "    UpdateHostKeys no",
        "Host *",  # what follows in the file applies to every host again, as it did before the block
        BLOCK_END,
    ]) + "\n"


LAPTOP_BLOCK_BEGIN = "# >>> sshjob: jobs as ssh hosts, through %s (sshjob ssh-config --via) >>>"


def laptop_block(config_path, login, key, identity, ssh):
    """The Host block for the user's laptop: its ssh reaches a job through
    the user's own ssh to `login`, where the proxy relays (ProxyCommand) and
    says which host key the job has (KnownHostsCommand, OpenSSH 8.5 and
    later).  The ticket is for the laptop's public key `key`: its private
    half never leaves the laptop.  The laptop needs nothing but OpenSSH."""
    here = [sys.executable, os.path.abspath(sys.argv[0])]
    here += ["--config", os.path.abspath(config_path)] if config_path else []

    def on_login(*words):
        """A command line that the laptop's ssh runs on `login`: quoted for
        the login shell, and again for the laptop's only where it must be
        (Windows runs a ProxyCommand without a shell)."""
        line = " ".join(shlex.quote(word) for word in here + list(words[:-1])).replace("%", "%%")
        line += " " + words[-1]
        if re.search(r"[^\w@%+=:,./ -]", line):
            line = shlex.quote(line)
        return "%s -T -a -x -o ClearAllForwardings=yes %s %s" % (ssh, login, line)

    return "\n".join([
        LAPTOP_BLOCK_BEGIN % login,
        "Host *%s" % HOST_SUFFIX,
        "    User %s" % pwd.getpwuid(os.getuid()).pw_name,
        "    ProxyCommand %s" % on_login("proxy", "--relay", "--key", key.replace(" ", ":"), "%h %r"),
        "    KnownHostsCommand %s" % on_login("known-hosts", "%H"),
        "    IdentityFile %s" % identity,
        "    IdentitiesOnly yes",
        "    UserKnownHostsFile none",
        "    GlobalKnownHostsFile none",
        "    StrictHostKeyChecking yes",
        "    CheckHostIP no",
        "    UpdateHostKeys no",
        "Host *",
        BLOCK_END,
    ]) + "\n"


def laptop_key(text):
    """The laptop's public key, given as the key or as a file holding it."""
    if os.path.isfile(text):
        try:
            with open(text) as f:
                text = f.read()
        except OSError as e:
            raise UsageError("cannot read the public key in %s (%s)" % (text, e.strerror)) from None
    try:
        return parse_public_key(text.strip())
    except TicketInvalid:
        raise UsageError("--key takes your laptop's public key (its ~/.ssh/id_ed25519.pub, the file or the "
                         "line in it), not %r" % text[:40]) from None


def run_ssh_config(config_path, argv):
    import argparse
    parser = argparse.ArgumentParser(
        prog="sshjob ssh-config", description="Print the Host block that makes jobs ssh hosts (ssh 1.0.sshjob).")
    parser.add_argument("--install", action="store_true",
                        help="add it to ~/.ssh/config, or bring the block there up to date")
    parser.add_argument("--via", metavar="LOGIN",
                        help="print the block for your laptop instead, which reaches jobs through ssh LOGIN "
                             "(the login node's name in the laptop's ~/.ssh/config)")
    parser.add_argument("--key", metavar="PUBLIC_KEY", help="with --via: the laptop's public key (a file or the line)")
    parser.add_argument("--identity", default="~/.ssh/id_ed25519", metavar="PATH",
                        help="with --via: the laptop's private key, as the laptop names it (default: %(default)s)")
    parser.add_argument("--ssh", default="/usr/bin/ssh", metavar="PATH",
                        help="with --via: the laptop's ssh, an absolute path (default: %(default)s; Windows: "
                             "C:/Windows/System32/OpenSSH/ssh.exe)")
    args = parser.parse_args(argv)
    config_path = config_path or os.environ.get("SSHJOB_CONFIG")
    if args.via:
        if args.install:
            raise UsageError("--via prints the block for your laptop: paste it into the laptop's ~/.ssh/config "
                             "(leave out --install)")
        if not args.key:
            raise UsageError("--via needs the laptop's public key: --key id_ed25519.pub (copied from the laptop) "
                             "or --key 'ssh-ed25519 AAAA...'")
        if not re.match(r"^[\w.@-]+$", args.via):
            raise UsageError("--via takes the login node's host name, as the laptop's ssh knows it, not %r" % args.via)
        if not os.path.isabs(args.ssh.replace("\\", "/")) and not re.match(r"^[A-Za-z]:[/\\]", args.ssh):
            raise UsageError("--ssh takes the laptop's ssh as an absolute path (OpenSSH runs KnownHostsCommand "
                             "only so), not %r" % args.ssh)
        sys.stdout.write(laptop_block(config_path, args.via, laptop_key(args.key), args.identity, args.ssh))
        return 0
    block = ssh_config_block(config_path)
    if not args.install:
        sys.stdout.write(block)
        return 0
    ssh_dir = os.path.join(os.path.expanduser("~"), ".ssh")
    path = os.path.realpath(os.path.join(ssh_dir, "config"))  # a dotfile manager's link stays a link
    try:
        os.makedirs(ssh_dir, 0o700, exist_ok=True)
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        if BLOCK_BEGIN in text and BLOCK_END in text:
            before, _, rest = text.partition(BLOCK_BEGIN)
            text = before + rest.partition(BLOCK_END)[2].lstrip("\n")
        write_atomically(path, block + ("\n" + text if text.strip() else ""))  # first: its settings win
    except OSError as e:
        raise ConfigError("cannot write the Host block into %s (%s): set HOME to your home directory, or print the "
                          "block (sshjob ssh-config) and add it yourself" % (path, e.strerror)) from None
    sys.stderr.write("sshjob: the Host block is in %s: ssh JOB.sshjob (e.g. ssh 1.0.sshjob) reaches a job\n" % path)
    return 0


# ---------------------------------------------------------------------------
# Queue commands: submit, q, status, rm, suspend, continue, vacate, hold,
# release.
# ---------------------------------------------------------------------------


def schedd_of(config_path):
    return Config(find_config_path(config_path)).schedd()


def run_submit(config_path, argv):
    import argparse
    parser = argparse.ArgumentParser(prog="sshjob submit", description="Queue a job; print its id.")
    parser.add_argument("--workdir", default=os.getcwd(), help="working directory (default: this one)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="set a variable")
    parser.add_argument("--getenv", action="store_true", help="give the job this whole environment")
    parser.add_argument("--output", default="/dev/null", help="file for the job's stdout")
    parser.add_argument("--error", default="/dev/null", help="file for the job's stderr")
    parser.add_argument("--count", type=int, default=1, help="number of jobs in the cluster")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of each job (cluster.proc.node picks one)")
    parser.add_argument("-i", "--interactive", "-interactive", action="store_true",
                        help="an interactive job (condor_submit -i): wait until it runs, open a shell inside it, "
                             "remove it when the shell ends; the command defaults to a placeholder")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.interactive:
        command = command or ["sleep", str(INTERACTIVE_PLACEHOLDER)]
        if args.count != 1:
            raise UsageError("an interactive job is one job: leave out --count")
    if not command:
        raise UsageError("no command given: sshjob submit [options] -- command [args]")
    env = dict(os.environ) if args.getenv else {"PATH": os.environ.get("PATH", os.defpath)}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError("--env %r is not NAME=VALUE" % item)
        env[name] = value
    workdir = os.path.abspath(args.workdir)
    paths = {name: os.path.join(workdir, getattr(args, name)) for name in ("output", "error")}
    check_job_spec(command, env, workdir, *paths.values())
    schedd = schedd_of(config_path)
    reply = schedd.call(dict(
        op="submit", cmd=command, env=env, workdir=workdir, count=args.count, nodes=args.nodes, **paths))
    jobs = [job_name(reply["cluster"], proc) for proc in range(reply["count"])]
    if not args.interactive:
        print("\n".join(jobs))
        return 0
    sys.stderr.write("sshjob: submitted interactive job %s; waiting for it to run...\n" % jobs[0])
    try:
        return enter_job(config_path, ClientOptions(job=jobs[0], auto_retry=True, remove_on_interrupt=True))
    finally:
        with contextlib.suppress(SshjobError):
            schedd.call({"op": "rm", "job": jobs[0]})


def run_q(config_path, argv):
    import argparse
    parser = argparse.ArgumentParser(prog="sshjob q", description="List the jobs in the queue.")
    parser.add_argument("--all", action="store_true", help="include finished and removed jobs (Slurm: every "
                        "user's jobs)")
    parser.add_argument("--scheduler", "-scheduler", choices=sorted(SITES),
                        help="whose queue: the pool's or Slurm's (default: as for client)")
    args = parser.parse_args(argv)
    _, site, _ = find_site(config_path, ClientOptions(job="", scheduler=args.scheduler))
    rows = site.queue(args.all)
    for number, row in enumerate(rows[1:], 1):
        if row[4].startswith("sshjob new ") and row[2] in ("pending", "idle"):
            count = waiters(row[0])
            rows[number] = row[:4] + (row[4] + "; %d client(s) waiting" % count if count else row[4],)
    print_table(rows)
    return 0


def print_table(rows):
    """Rows in aligned columns; the last column runs on."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def run_warm(config_path, argv):
    """`sshjob warm list`, `sshjob warm stop JOB`: the user's warm paths into
    jobs (of Slurm, and of this configuration's pool), the jobs' agents and
    ssh's master connections to them, as `ssh -O` handles a ControlMaster."""
    if argv[:1] == ["list"] and len(argv) == 1:
        print_table([("JOB", "NODE", "WAY", "WHERE")] + warm_paths(config_path))
        return 0
    if argv[:1] != ["stop"] or len(argv) != 2:
        raise UsageError("usage: sshjob warm list | sshjob warm stop JOB")
    _, site, _ = find_site(config_path, parse_client_args([argv[1]]))
    name, said = site.warm_name(), []
    try:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            step = WarmStep(site, read_warm_record(warm_record(name or "-")))
            step.ask({"op": "stop"})
            said.append("Job %s's agent on %s stopped." % (argv[1], step.record["node"]))
    finally:
        site.close()
    for master in SshMaster.all_of_user():
        if SshMaster.name_of(master.path) == name and master.stop():
            said.append("Job %s's ssh master connection stopped." % argv[1])
    if not said:
        raise NotFound("job %s has no agent or ssh master connection of yours that answers (sshjob warm list "
                       "names them)" % argv[1])
    print("\n".join(said))
    return 0


def warm_paths(config_path):
    """The rows of `sshjob warm list`: the agents that the user's records
    name (records of agents that are gone go), then ssh's masters."""
    try:
        pool = "pool-%s-" % pool_key(Config(find_config_path(config_path)))
    except ConfigError:
        pool = None
    directory = warm_directory()
    ways = {"runs": "agent", "refuses": "agent (its job has exited)", "silent": "agent (not answering: suspended?)"}

    def job_of(name):
        return next((name[len(prefix):] for prefix in ("slurm-", pool) if prefix and name.startswith(prefix)), None)

    rows = []
    for name in sorted(os.listdir(directory)):
        path, job = os.path.join(directory, name), job_of(name[:-len(".json")])
        if not job:
            continue
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = read_warm_record(path)
            state = ping_agent(record)
            if state == "gone":
                os.unlink(path)
                continue
            rows.append((job, record["node"], ways[state], "%s, port %d" % (" ".join(record["hosts"]),
                                                                            record["port"])))
    masters = [(job_of(SshMaster.name_of(master.path)), master) for master in SshMaster.all_of_user()]
    return rows + [(job, "-", "ssh master", master.path) for job, master in masters if job]


def run_status(config_path, argv):
    import argparse
    parser = argparse.ArgumentParser(prog="sshjob status", description="The pool's starters and their problems.")
    parser.add_argument("--json", action="store_true", help="print the schedd's answer as JSON, for scripts")
    args = parser.parse_args(argv)
    reply = schedd_of(config_path).call({"op": "status"})
    if args.json:
        print(json.dumps({key: reply[key] for key in ("schedd", "lease", "starters")}, indent=2, sort_keys=True))
        return 0
    rows = [("STARTER", "ADDRESS", "USER", "SLOTS", "HEARD")]
    for starter in reply["starters"]:
        rows.append((starter["name"], starter["address"] or "-", starter["user"] or "-",
                     "%d/%d" % (starter["used"], starter["slots"]), "%.0f s ago" % starter["heard"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for starter in reply["starters"]:
        for problem in starter["problems"]:
            print("%s: %s" % (starter["name"], problem))
    return 0


def run_action(action, config_path, argv):
    import argparse
    parser = argparse.ArgumentParser(prog="sshjob " + action)
    parser.add_argument("jobs", nargs="+", metavar="JOB")
    args = parser.parse_args(argv)
    if action == "rm" and len(args.jobs) == 1 and PROFILE_NAME.fullmatch(args.jobs[0]):
        return give_back(config_path, args.jobs[0])
    schedd = schedd_of(config_path)
    for text in args.jobs:
        parse_job_id(text)
    for text in args.jobs:
        reply = schedd.call({"op": action, "job": text})
        print("Job %s %s." % (reply["job"], JOB_ACTIONS[action][1]))
    return 0


# ---------------------------------------------------------------------------
# Pools: a personal one on this machine (pool start / stop, the demo), and
# one across hosts (init, token).
# ---------------------------------------------------------------------------


def start_daemon(config_path, role, pool_dir):
    with open_log(os.path.join(pool_dir, role + ".log"), "ab") as log_file:
        proc = subprocess.Popen(self_command() + ["--config", config_path, role], stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=log_file, start_new_session=True)
    with open(os.path.join(pool_dir, role + ".pid"), "w") as f:
        f.write("%d\n" % proc.pid)
    return proc


def pool_start(pool_dir, quiet=False):
    pool_dir = os.path.abspath(pool_dir)
    config_path = write_pool_config(pool_dir)
    config = Config(config_path)
    schedd = config.schedd()
    missing = [role for role in ("schedd", "starter") if daemon_pid(pool_dir, role, config_path) is None]
    if not missing:
        raise UsageError("a pool is already running in %s" % pool_dir)
    procs = {}
    if "schedd" in missing:
        procs["schedd"] = start_daemon(config_path, "schedd", pool_dir)
        wait_until(lambda: ping_quietly(schedd), procs, "the schedd", pool_dir)
    if "starter" in missing:
        procs["starter"] = start_daemon(config_path, "starter", pool_dir)
    wait_until(lambda: (ping_quietly(schedd) or {}).get("starters"), procs, "the starter", pool_dir)
    if not quiet:
        print("export SSHJOB_CONFIG=%s" % shlex.quote(config_path))
    return config_path


def ping_quietly(schedd):
    try:
        return schedd.call({"op": "ping"}, timeout=2)
    except (Unreachable, ProtocolError):
        return None


def wait_until(ready, procs, what, pool_dir, timeout=20.0):
    """Wait for `ready()` while the daemons `procs` ({role: Popen}) live;
    if one exits, say the sentence it exited with."""
    deadline = time.time() + timeout
    while not ready():
        exited = [role for role, proc in procs.items() if proc.poll() is not None]
        if exited or time.time() > deadline:
            said = "".join(": " + (daemon_sentence(pool_dir, role) or "") for role in exited[:1])
            raise Unreachable("%s did not start%s; see the logs in %s" % (what, said.rstrip(": "), pool_dir))
        time.sleep(0.05)


def daemon_sentence(pool_dir, role):
    """The sentence a pool's daemon exited with, from the end of its log."""
    try:
        with open(os.path.join(pool_dir, role + ".log"), errors="replace") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            tail = f.read().splitlines()
    except OSError:
        return None
    last = tail[-1] if tail else ""
    return last[len("sshjob: "):] if last.startswith("sshjob: ") else None


def daemon_pid(pool_dir, role, config_path):
    """The pid of a pool's daemon, if it runs (its pid file names a live
    process of this pool's, not a recycled pid)."""
    try:
        with open(os.path.join(pool_dir, role + ".pid")) as f:
            pid = int(f.read())
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if config_path.encode() in argv and role.encode() in argv and process_alive(pid) else None


# Seconds a daemon has to stop before `pool stop` kills it: a starter ends a job in a container by podman
# stop (its grace, and podman's own wait), waits for `podman run`, then ends the job's processes.
STOP_GRACE = 3 * KILL_GRACE + PODMAN_WAIT + 5


def pool_stop(pool_dir):
    config_path = os.path.join(pool_dir, "sshjob.conf")
    pids = [daemon_pid(pool_dir, role, config_path) for role in ("starter", "schedd")]
    if pids == [None, None]:
        raise NotFound("no pool is running in %s" % pool_dir)
    for pid in filter(None, pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.time() + STOP_GRACE
            while time.time() < deadline and process_alive(pid):
                time.sleep(0.05)
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
    for role in ("starter", "schedd"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(pool_dir, role + ".pid"))


def run_pool(config_path, argv):
    import argparse
    parser = argparse.ArgumentParser(prog="sshjob pool", description="A personal pool on this machine.")
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--dir", required=True, help="the pool's directory")
    args = parser.parse_args(argv)
    if args.action == "start":
        pool_start(args.dir)
    else:
        pool_stop(os.path.abspath(args.dir))
    return 0


def run_demo(config_path, argv):
    """A personal pool, a job, and a session inside it, all in one command."""
    import tempfile
    base = tempfile.mkdtemp(prefix="sshjob-demo-")
    pool_dir = os.path.join(base, "pool")
    workdir = os.path.join(base, "job")
    os.mkdir(workdir)
    with open(os.path.join(workdir, "outputfile.dat"), "w") as f:
        f.write("results of the demo job\n")
    try:
        config_path = pool_start(pool_dir, quiet=True)
        os.environ["SSHJOB_CONFIG"] = config_path
        print("sshjob demo: a personal pool runs in %s" % pool_dir)
        opts = ClientOptions(job="1.0", command=argv or (
            [] if sys.stdin.isatty() else ['echo "$DEMO: $(id -un) in $(pwd), pids $%s"' % PIDS_VAR]))
        _, site, _ = find_site(config_path, opts)
        site.schedd.call({"op": "submit", "cmd": ["sleep", "3600"], "workdir": workdir, "output": "/dev/null",
                          "error": "/dev/null", "env": {"PATH": os.environ.get("PATH", os.defpath),
                                                       "DEMO": "hello from the job"}})
        wait_until(lambda: site.state("1.0") == "running", {}, "the demo job", pool_dir)
        print("sshjob demo: job 1.0 runs; entering it with: sshjob client 1.0 %s" % " ".join(opts.command))
        status = enter_job(config_path, opts)
        print("sshjob demo: the session ended with status %d; stopping the pool" % status)
        return status
    finally:
        with contextlib.suppress(SshjobError):
            pool_stop(pool_dir)
        shutil.rmtree(base, ignore_errors=True)


def run_init(config_path, argv):
    """A pool that starters and users on other hosts can join."""
    import argparse
    parser = argparse.ArgumentParser(prog="sshjob init", description="Set up a pool's credentials and configuration.")
    parser.add_argument("--dir", required=True, help="the pool's directory")
    parser.add_argument("--listen", default="0.0.0.0:9618", help="the schedd's TLS address (default 0.0.0.0:9618)")
    args = parser.parse_args(argv)
    pool_dir = os.path.abspath(args.dir)
    config = Config(write_pool_config(pool_dir, {"schedd_tls_address": args.listen}))
    _, _, fingerprint = make_certificate(os.path.join(pool_dir, "private"),
                                         lambda: find_program(config, "openssl", "this host"))
    if not os.path.exists(config["signing_key"]):
        write_private(config["signing_key"], token_hex(32))
    host, port = parse_address(args.listen)[1]
    print("pool configuration: %s" % config.path)
    print("schedd certificate SHA-256: %s" % fingerprint)
    print("A starter or a user on another host needs the pyz, a token (sshjob token create --for USER,\n"
          "or --for starter --name STARTER_NAME for a starter)\n"
          "and in its sshjob.conf:\n[sshjob]\nschedd_address = %s:%d\nschedd_fingerprint = %s\n"
          "token_file = /path/to/the.token" % (socket.getfqdn() if host in ("0.0.0.0", "") else host, port,
                                              fingerprint))
    return 0


def run_token(config_path, argv):
    import argparse
    parser = argparse.ArgumentParser(
        prog="sshjob token", description="Issue or revoke identity tokens of this pool.",
        epilog="A starter's token speaks for that one starter: token create --for starter --name starter@node7. "
               "If a token leaks: token revoke --for starter@node7 (or the user), then issue a new one.")
    parser.add_argument("action", choices=("create", "revoke"))
    parser.add_argument("--for", dest="subject", required=True, metavar="starter|USER",
                        help="a starter's token, or a user's; with revoke, the starter's name or the user")
    parser.add_argument("--name", help="the name of the starter the token speaks for (its starter_name)")
    parser.add_argument("--user", help="a starter's token only: the one user whose jobs it may run")
    parser.add_argument("--expires", default="30d", help="lifetime: N seconds, or Ns, Nm, Nh, Nd (default 30d)")
    parser.add_argument("--output", help="write it to this file (0600) instead of stdout")
    args = parser.parse_args(argv)
    config = Config(find_config_path(config_path))
    tokens = Tokens(config["signing_key"], config["revoked_tokens"])
    try:
        if args.action == "revoke":
            tokens.revoke(args.subject)
            print("Every token of %s issued until now is revoked." % args.subject)
            return 0
        lifetime = duration(args.expires)
        if lifetime is None:
            raise UsageError("--expires %r is not a duration such as 3600, 90m, 12h or 30d" % args.expires)
        lifetime = int(lifetime)
        if args.subject == "starter":
            if not args.name:
                raise UsageError("a starter's token speaks for one starter: add --name and the starter's "
                                 "starter_name, e.g. --name starter@node7")
            token = tokens.create(args.name, "starter", lifetime, user=args.user)
        else:
            if args.name or args.user:
                raise UsageError("--name and --user are for starters' tokens (--for starter)")
            token = tokens.create(args.subject, "user", lifetime)
    except PermissionError:
        raise Refused("only the pool's admin may use its signing key %s" % config["signing_key"]) from None
    except OSError as e:
        raise ConfigError("cannot record the revocation in %s (%s)" % (config["revoked_tokens"], e.strerror)) from None
    if args.output:
        write_private(args.output, token + "\n")
    else:
        print(token)
    return 0


# ---------------------------------------------------------------------------
# The command line: the roles, one sentence per failure, and the launcher
# that the built pyz runs first.
# ---------------------------------------------------------------------------

ROLES = """\
roles:
  client [options] JOB [command]   an ssh session inside a running job (client -help)
  cp JOB:PATH LOCAL | LOCAL JOB:PATH   copy files and directories to or from a job
  submit [options] -- COMMAND      queue a job; prints its id
  q [--all]                        list the queue (or your Slurm jobs)
  status [--json]                  the pool's starters: slots, last heard from, problems
  rm | suspend | continue | vacate | hold | release JOB...
  submit -i [options] [-- COMMAND] an interactive job: a shell inside it, removed when the shell ends
  new [--options O] PROFILE [cmd]  enter your allocation of PROFILE, made if you have none
  rm PROFILE                       give that allocation back now
  warm list | warm stop JOB        your warm paths into jobs (agents, ssh masters): later sessions are fast
  pool start|stop --dir DIR        a personal pool (schedd and starter) in DIR
  init --dir DIR [--listen H:P]    a pool that starters and users on other hosts can join
  token create --for USER | --for starter --name NAME   an identity token for them
  token revoke --for USER|NAME     void every token of a user or starter issued until now
  demo [command]                   a personal pool, a job and a session inside it
  schedd                           the job queue daemon
  starter                          the execute node daemon
  ssh-config [--install]           the Host block that makes jobs ssh hosts: ssh 1.0.sshjob
  ssh-config --via LOGIN --key PUB the Host block for your laptop, through LOGIN
  proxy HOST USER                  that block's ProxyCommand
  known-hosts HOST                 a job's pinned host key (a laptop's KnownHostsCommand)
  bridge DESK                      ssh's ProxyCommand (the client starts it)
  slurm-step                       a session's step on a Slurm node (srun starts it)
  pool-agent                       a pool job's agent (its starter starts it)
  allocation PROFILE IDLE          an allocation's batch script (sshjob new submits it)

The pool's configuration comes from --config, else $SSHJOB_CONFIG, else
%s.
""" % DEFAULT_CONFIG


def raise_fd_limit():
    """A daemon may hold many connections: take all the fds it may have."""
    import resource  # the daemons' only use of it

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def dispatch(config_path, debug, role, rest):
    global ROLE
    ROLE = {"slurm-step": "Slurm step", "pool-agent": "job agent"}.get(role, role)
    if role in ("help", "version"):
        sys.stdout.write(USAGE + ROLES if role == "help" else "sshjob %s\n" % __version__)
        return 0
    if role == "client":
        return run_client(config_path, rest)
    simple = {"submit": run_submit, "q": run_q, "pool": run_pool, "demo": run_demo, "cp": run_cp,
              "init": run_init, "token": run_token, "status": run_status, "ssh-config": run_ssh_config,
              "proxy": run_proxy, "known-hosts": run_known_hosts, "new": run_new, "allocation": run_allocation,
              "warm": run_warm}
    if role in simple:
        return simple[role](config_path, rest)
    if role in JOB_ACTIONS:
        return run_action(role, config_path, rest)
    if role == "bridge":
        return run_bridge(rest)
    if role == "slurm-step":
        return run_slurm_step(config_path)
    if role == "pool-agent":
        return run_pool_agent(config_path)
    if role in DAEMONS:
        log.set_level(Log.DEBUG if debug else Log.INFO)
        raise_fd_limit()
        config = Config(find_config_path(config_path))
        (serve_schedd if role == "schedd" else serve_starter)(config)
        return 0
    raise UsageError("unknown role %r (sshjob --help lists them)" % role)


USAGE = """\
usage: sshjob [--config FILE] [--debug] [--version] [--help] ROLE [args...]

An ssh session inside a running batch job.

options:
  --config FILE   the pool's sshjob.conf (default: $SSHJOB_CONFIG)
  --debug, -debug log what happens to stderr
  --version       print sshjob's version
  --help, -h      print this text

"""


def parse_main_args(argv):
    """(config, debug, role, the role's arguments): sshjob's own options come
    before the role; --help and --version are the roles "help" and
    "version".  Parsed here, not by argparse, which costs more to import
    than --help may take."""
    config, debug, args = None, False, list(argv)
    while args and args[0].startswith("-"):
        arg = args.pop(0)
        name, has_value, value = arg.partition("=")
        if arg in ("--help", "-h", "-help"):
            return config, debug, "help", []
        if arg == "--version":
            return config, debug, "version", []
        if arg in ("--debug", "-debug"):
            debug = True
        elif name == "--config":
            if not has_value:
                if not args:
                    raise UsageError("--config needs a file")
                value = args.pop(0)
            config = value
        else:
            raise UsageError("unknown option %s (sshjob --help lists them)" % arg)
    if not args:
        raise UsageError("no role given (sshjob --help lists them)")
    return config, debug, args[0], args[1:]


def main(argv=None):
    """Play the role that argv names; exit with its status."""
    role, status = run_role(sys.argv[1:] if argv is None else argv)
    if role not in DAEMONS:
        exit_at_once(status)
    return status


DAEMONS = ("schedd", "starter")


def run_role(argv):
    """(the role, its exit status); every failure that a user may see is
    said here, as one sentence."""
    role = None
    try:
        config, debug, role, rest = parse_main_args(argv)
        log.set_level(Log.DEBUG if debug else Log.WARNING)
        with signals_raise(signal.SIGTERM, signal.SIGHUP):
            return role, dispatch(config, debug, role, rest)
    except SshjobError as e:
        sys.stderr.write("sshjob: %s\n" % e)
        return role, e.status
    except OSError as e:  # a file or directory of the user's that we cannot use: say which
        where = " (%s)" % e.filename if e.filename else ""
        sys.stderr.write("sshjob: %s%s\n" % (e.strerror or e, where))
        return role, 1
    except KeyboardInterrupt:
        sys.stderr.write("sshjob: interrupted\n")
        return role, 130


def exit_at_once(status):
    """Exit without the interpreter's teardown, which frees every object of
    every module: some 10 ms that a client would add to each session.  By
    now every file of the role is closed and every temporary directory gone;
    only the standard streams may still hold output."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def pyz_launcher(build_id):
    """The first code that sshjob.pyz runs: build.py puts its source ahead
    of shiv's bootstrap.  It runs this very build from the copy that shiv
    unpacked, some 40 ms sooner than shiv's bootstrap would; where there is
    no copy to trust, it points shiv at a private place to unpack one and
    lets the bootstrap go on.

    A copy is trusted only if every level of it (the root, the build's
    directory, site-packages, sshjob.py) belongs to the effective user and
    is writable by no one else, and sshjob.py holds the bytes of this build
    (the build id is their hash).  Root takes its home from the password
    database where HOME is not root's own, and SHIV_ROOT only if root owns
    it: `sudo -E` and sudo setups that keep HOME must not make root run a
    module that a user planted.
    Jobs often run with HOME unset, missing or read-only: the copy then
    lives in a private directory under the temporary directory."""
    import os
    import stat
    import sys

    try:
        from _sha2 import sha256  # the C module alone: hashlib costs some 3 ms more at every start
    except ImportError:
        from _sha256 import sha256  # Python 3.11 and older
    euid = os.geteuid()
    name = "%s_%s" % (os.path.basename(os.path.realpath(sys.argv[0])), build_id)

    def ours(path, kind):
        try:
            info = os.lstat(path)
        except OSError:
            return False
        return info.st_uid == euid and not info.st_mode & 0o022 and stat.S_IFMT(info.st_mode) == kind

    def writable(directory):
        """Tried, not guessed: os.access says yes to root for /proc and read-only mounts."""
        import tempfile

        try:
            os.makedirs(directory, 0o700, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError:
            return False
        return ours(directory, stat.S_IFDIR)

    def trusted_copy(root):
        site = os.path.join(root, name, "site-packages")
        module = os.path.join(site, "sshjob.py")
        levels = ((root, stat.S_IFDIR), (os.path.dirname(site), stat.S_IFDIR), (site, stat.S_IFDIR),
                  (module, stat.S_IFREG))
        if not all(ours(path, kind) for path, kind in levels):
            return None
        with open(module, "rb") as f:
            if sha256(f.read() + b"sshjob.py").hexdigest() != build_id:
                return None
        return site

    def compiled_once(site):
        """Compile the copy in place, even where PYTHONDONTWRITEBYTECODE says
        not to write bytecode (containers often set it): else every start
        would compile it again, some 60 ms."""
        import importlib.util  # loaded already: runpy needs it

        module = os.path.join(site, "sshjob.py")
        if not os.path.exists(importlib.util.cache_from_source(module)):
            import py_compile

            try:
                py_compile.compile(module, doraise=True)
            except (OSError, py_compile.PyCompileError):
                pass  # a read-only copy: it runs all the same, compiled at each start

    def private_temporary_root():
        import tempfile

        root = os.path.join(tempfile.gettempdir(), "sshjob-shiv-%d" % euid)
        try:
            os.mkdir(root, 0o700)
        except OSError:
            pass
        return root if ours(root, stat.S_IFDIR) else tempfile.mkdtemp(prefix="sshjob-shiv-")

    for variable in ("SHIV_INTERPRETER", "SHIV_ENTRY_POINT", "SHIV_CONSOLE_SCRIPT", "SHIV_MODULE",
                     "SHIV_PREPEND_PYTHONPATH", "SHIV_EXTEND_PYTHONPATH"):
        os.environ.pop(variable, None)  # what to run is this build's to say, not the environment's
    home = os.path.expanduser("~")
    if euid == 0 and not ours(home, stat.S_IFDIR):  # a user's HOME, kept by sudo: root's own, then
        import pwd

        home = pwd.getpwuid(0).pw_dir
    chosen = os.environ.get("SHIV_ROOT")
    roots = [chosen] if chosen else ([os.path.join(home, ".shiv")] if home != "~" else [])
    roots = [root for root in roots if trusted_copy(root) or writable(root)] or [private_temporary_root()]
    site = trusted_copy(roots[0])
    if site:
        compiled_once(site)
        sys.path.insert(0, site)
        import sshjob

        sys.exit(sshjob.main())
    os.environ["SHIV_ROOT"] = roots[0]
    if os.path.exists(os.path.join(roots[0], name)):
        os.environ["SHIV_FORCE_EXTRACT"] = "1"  # a copy that is not this build's, or not ours alone: anew


if __name__ == "__main__":
    sys.exit(main())
