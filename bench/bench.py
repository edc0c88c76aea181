#!/usr/bin/env python3
"""Benchmarks: sshjob against plain OpenSSH, measured in the same run.

    python3 bench/bench.py [--runs 20] [--gib 1] [--python /usr/bin/python3]

Starts a personal pool with the built dist/sshjob.pyz and, beside it, a plain
listening sshd on 127.0.0.1; then prints, as ratios to plain ssh:

- the wall time of `sshjob client JOB true` (median of --runs) against
  `ssh -i KEY -p PORT 127.0.0.1 true`;
- the throughput of --gib GiB through `client JOB 'cat > /dev/null'` against
  the same through plain ssh;

and the built-in transport (`-transport builtin`) against the OpenSSH one:

- the keystroke echo round trip on an interactive session (median of 200);
- the throughput of --gib GiB.

Needs root (the plain sshd) and a built pyz (python3 build.py).
"""

import argparse
import fcntl
import os
import pty
import select
import shlex
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYZ = os.path.join(ROOT, "dist", "sshjob.pyz")
SSH_ISOLATION = ["-F", "/dev/null", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o",
                 "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                 "-o", "BatchMode=yes"]


def bench_parser(doc):
    """The benchmarks' common command line: --python, the interpreter to time
    (a real one, not the pyenv shim, which adds ~150 ms a start)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--python", default="/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                        else sys.executable)
    return parser


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_plain_sshd(scratch):
    """A listening sshd with its own host key and one authorised key."""
    sshd = shutil.which("sshd", path=os.environ["PATH"] + ":/usr/sbin")
    for name in ("host", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(scratch, name)], check=True)
    port = free_port()
    config = os.path.join(scratch, "sshd_config")
    sftp_server = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                                    "/usr/libexec/sftp-server") if os.path.exists(p)), "internal-sftp")
    with open(config, "w") as f:
        f.write("ListenAddress 127.0.0.1\nPort %d\nHostKey %s/host\nAuthorizedKeysFile %s/id.pub\n"
                "UsePAM no\nStrictModes no\nPidFile none\nLogLevel ERROR\nSubsystem sftp %s\n"
                % (port, scratch, scratch, sftp_server))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", config])
    time.sleep(0.5)
    return proc, port, os.path.join(scratch, "id")


def timed(argv, runs, **kwargs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_pair(ours, peer, runs, **kwargs):
    """(median seconds of `ours`, of `peer`), run in turns: on a busy machine
    a ratio of two medians taken minutes apart measures the machine."""
    times = ([], [])
    for _ in range(runs):
        for argv, sink in zip((ours, peer), times):
            start = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kwargs)
            sink.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def throughput_pair(ours, peer, gib, repeat=3, **kwargs):
    """(median GiB/s of shell command `ours`, of `peer`), run in turns."""
    rates = ([], [])
    for _ in range(repeat):
        for command, sink in zip((ours, peer), rates):
            sink.append(throughput(command, gib, **kwargs))
    return statistics.median(rates[0]), statistics.median(rates[1])


def throughput(command, gib, **kwargs):
    """GiB/s of `head -c` from /dev/zero piped through a command."""
    pipeline = "head -c %dG /dev/zero | %s" % (gib, command)
    start = time.perf_counter()
    subprocess.run(["bash", "-c", pipeline], check=True, **kwargs)
    return gib / (time.perf_counter() - start)


def echo_round_trip(argv, env, keystrokes=200):
    """Median seconds from a keystroke to its echo, on a terminal session."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))

    def controlling_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, preexec_fn=controlling_terminal)
    os.close(slave)

    def read_until(text, timeout=20):
        seen, deadline = b"", time.time() + timeout
        while text not in seen:
            if time.time() > deadline:
                raise RuntimeError("no %r in %r" % (text, seen[-200:]))
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)
        return seen

    try:
        read_until(b"pid(s)")
        os.write(master, b"exec cat\n")
        read_until(b"exec cat\r\n")
        time.sleep(0.5)
        times = []
        for _ in range(keystrokes):
            start = time.perf_counter()
            os.write(master, b"x")
            read_until(b"x")
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def main():
    parser = bench_parser(__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--gib", type=int, default=1)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="sshjob-bench-")
    pool_dir = os.path.join(scratch, "pool")
    sshjob = [args.python, PYZ]
    env = dict(os.environ, SSHJOB_CONFIG=os.path.join(pool_dir, "sshjob.conf"))
    sshd, port, key = start_plain_sshd(scratch)
    try:
        subprocess.run(sshjob + ["pool", "start", "--dir", pool_dir], check=True, stdout=subprocess.DEVNULL)
        job = subprocess.run(sshjob + ["submit", "--", "sleep", "3600"], env=env, check=True,
                             stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
        while "running" not in subprocess.run(sshjob + ["q"], env=env, stdout=subprocess.PIPE,
                                              universal_newlines=True).stdout:
            time.sleep(0.1)
        plain = ["ssh"] + SSH_ISOLATION + ["-i", key, "-p", str(port), "127.0.0.1"]
        client = sshjob + ["client", job]

        timed(plain + ["true"], 2)
        timed(client + ["true"], 2, env=env)
        t_plain = timed(plain + ["true"], args.runs)
        t_client = timed(client + ["true"], args.runs, env=env)
        print("python: %s" % args.python)
        print("time to run `true` (median of %d): plain ssh %.0f ms, sshjob client %.0f ms: ratio %.2f"
              % (args.runs, t_plain * 1000, t_client * 1000, t_client / t_plain))

        quoted = lambda argv: " ".join(shlex.quote(a) for a in argv)  # noqa: E731
        g_plain = throughput(quoted(plain + ["cat > /dev/null"]), args.gib)
        g_client = throughput("SSHJOB_CONFIG=%s %s" % (shlex.quote(env["SSHJOB_CONFIG"]),
                                                       quoted(client + ["cat > /dev/null"])), args.gib)
        print("throughput of %d GiB: plain ssh %.0f MiB/s, sshjob client %.0f MiB/s: ratio %.2f"
              % (args.gib, g_plain * 1024, g_client * 1024, g_client / g_plain))

        transports = {t: client[:-1] + ["-transport", t, job] for t in ("openssh", "builtin")}
        echo = {t: echo_round_trip(argv, dict(env, TERM="xterm", SHELL="/bin/sh")) for t, argv in transports.items()}
        print("keystroke echo (median of 200): openssh %.2f ms, builtin %.2f ms: ratio %.2f"
              % (echo["openssh"] * 1000, echo["builtin"] * 1000, echo["builtin"] / echo["openssh"]))
        rate = {t: throughput("SSHJOB_CONFIG=%s %s" % (shlex.quote(env["SSHJOB_CONFIG"]),
                                                       quoted(argv + ["cat > /dev/null"])), args.gib)
                for t, argv in transports.items()}
        print("throughput of %d GiB: openssh transport %.0f MiB/s, builtin %.0f MiB/s: ratio %.2f"
              % (args.gib, rate["openssh"] * 1024, rate["builtin"] * 1024, rate["builtin"] / rate["openssh"]))
    finally:
        subprocess.run(sshjob + ["pool", "stop", "--dir", pool_dir], stdout=subprocess.DEVNULL)
        sshd.terminate()
        sshd.wait()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
