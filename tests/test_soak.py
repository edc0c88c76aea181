"""A soak: hundreds of sessions of every transport and kind, as an ordinary
user, leave the daemons as they were: descriptors and threads back at their
counts once the pool is quiet, and memory grown by less than 5 MiB."""

import concurrent.futures
import os
import pty
import select
import subprocess
import time

import pytest
from conftest import ALICE, INTERPRETERS, Pool, wait_for

SESSIONS = 300  # of each transport and kind
AT_ONCE = 6


def fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def threads(pid):
    return len(os.listdir("/proc/%d/task" % pid))


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def command_session(argv):
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            timeout=60)
    return result.returncode, result.stdout + result.stderr


def interactive_session(argv):
    """The client on a terminal, told to exit as it starts (typed ahead)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    os.write(master, b"exit 0\n")
    output = b""
    deadline = time.time() + 60
    while time.time() < deadline:
        if select.select([master], [], [], 1)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the client has gone
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=30), output


@pytest.fixture(scope="module")
def soak_pool(base, users):
    pool = Pool(base, INTERPRETERS[-1], "soak", {"ssh_options": "-o KexAlgorithms=curve25519-sha256"}).start()
    yield pool
    pool.stop()


def test_the_daemons_leak_nothing_over_hundreds_of_sessions(soak_pool):
    pool = soak_pool
    job = pool.running_job("sleep", "3600", user=ALICE, workdir=pool.workdir(ALICE))
    kinds = [(transport, interactive) for transport in ("openssh", "builtin") for interactive in (False, True)]

    def session(kind):
        transport, interactive = kind
        argv = pool.argv("client", "-transport", transport, job, *([] if interactive else ["true"]), user=ALICE,
                         env={"TERM": "xterm", "SHELL": "/bin/sh"})
        return (interactive_session if interactive else command_session)(argv)

    def run_all(count):
        work = [kind for kind in kinds for _ in range(count)]
        with concurrent.futures.ThreadPoolExecutor(AT_ONCE) as pool_of_clients:
            for kind, (status, output) in zip(work, pool_of_clients.map(session, work)):
                assert status == 0, (kind, output[-500:])

    daemons = {role: pool.pid(role) for role in ("starter", "schedd")}
    run_all(10)  # what a first session of each kind loads or makes once
    time.sleep(1)
    before = {role: (fds(pid), threads(pid), rss_kib(pid)) for role, pid in daemons.items()}
    run_all(SESSIONS)
    for role, pid in daemons.items():
        wait_for(lambda pid=pid, role=role: (fds(pid), threads(pid)) <= before[role][:2], 20,
                 "the %s's descriptors and threads to come back (%s, was %s)"
                 % (role, (fds(pid), threads(pid)), before[role][:2]))
        grown = rss_kib(pid) - before[role][2]
        assert grown < 5 * 1024, "the %s grew by %d KiB over %d sessions" % (role, grown, SESSIONS * len(kinds))
