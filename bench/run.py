#!/usr/bin/env python3
"""Every figure of sshjob's speed in one table, as ratios to its peers
measured in the same run (issue 11).

    python3 bench/run.py [--runs 15] [--gib 1] [--sessions 100] [--python /usr/bin/python3]

Starts a personal pool with the built dist/sshjob.pyz, a plain sshd on
127.0.0.1, and (where Slurm is installed) the tests' single-node Slurm, then
prints one row per figure: sshjob's value, its peer's, the ratio and the
target.  Needs root and a built pyz (python3 build.py).  The other scripts
in bench/ measure single things at more length.
"""

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import slurm

from bench import PYZ, SSH_ISOLATION, bench_parser, start_plain_sshd, throughput, timed

ROWS = []


def row(what, ours, peer_name, peer, unit, target, higher_is_better=False):
    ratio = ours / peer if peer else float("nan")
    ROWS.append((what, "%.1f %s" % (ours, unit), "%s: %.1f %s" % (peer_name, peer, unit), "%.2f" % ratio, target))
    print("  %s: %.1f %s against %.1f %s (%s): %.2f" % (what, ours, unit, peer, unit, peer_name, ratio), flush=True)


def ms(seconds):
    return seconds * 1000


def first_prompt(argv, env, runs=5):
    """Median seconds from starting argv on a new terminal to the prompt
    of the shell it opens (PS1 is set to a marker by the remote shell)."""
    times = []
    for _ in range(runs):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))

        def controlling_terminal():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                preexec_fn=controlling_terminal)
        os.close(slave)
        seen = b""
        try:
            while not seen.rstrip().endswith((b"$", b"#")):
                if time.perf_counter() - start > 20:
                    raise RuntimeError("no prompt from %s: %r" % (argv[:3], seen[-200:]))
                if select.select([master], [], [], 0.5)[0]:
                    seen += os.read(master, 65536)
            times.append(time.perf_counter() - start)
        finally:
            proc.kill()
            proc.wait()
            os.close(master)
    return statistics.median(times)


def peak_of(pid, sessions):
    """(peak RSS in MiB, peak open fds) of process `pid` while `sessions` run."""
    rss = fds = 0
    while any(s.poll() is None for s in sessions):
        with open("/proc/%d/status" % pid) as f:
            rss = max(rss, next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")))
        fds = max(fds, len(os.listdir("/proc/%d/fd" % pid)))
        time.sleep(0.05)
    return rss / 1024, fds


def pool_figures(args, scratch, plain, env):
    sshjob = [args.python, PYZ]
    job = subprocess.run(sshjob + ["submit", "--", "sleep", "3600"], env=env, check=True, stdout=subprocess.PIPE,
                         universal_newlines=True).stdout.strip()
    while "running" not in subprocess.run(sshjob + ["q"], env=env, stdout=subprocess.PIPE,
                                          universal_newlines=True).stdout:
        time.sleep(0.1)
    client = sshjob + ["client", job]
    builtin = sshjob + ["client", "-transport", "builtin", job]
    for argv in (plain, client, builtin):
        timed(argv + ["true"], 2, env=env)
    t_plain = timed(plain + ["true"], args.runs, env=env)
    row("client JOB true, openssh", ms(timed(client + ["true"], args.runs, env=env)), "plain ssh", ms(t_plain),
        "ms", "<= 1.0")
    t_builtin = timed(builtin + ["true"], args.runs, env=env)
    ROWS.append(("client -transport builtin JOB true", "%.1f ms" % ms(t_builtin), "-", "-", "<= 40 ms"))
    print("  builtin: %.1f ms" % ms(t_builtin), flush=True)
    row("sshjob.pyz --help", ms(timed(sshjob + ["--help"], args.runs)), "python3 -c pass",
        ms(timed([args.python, "-c", "pass"], args.runs)), "ms", "<= 25 ms")

    terminal_env = dict(env, TERM="xterm", SHELL="/bin/sh", PS1="$ ")
    t_prompt_plain = first_prompt(plain + ["-tt"], terminal_env)
    for transport in ("openssh", "builtin"):
        t = first_prompt(sshjob + ["client", "-transport", transport, job], terminal_env)
        row("first prompt, %s" % transport, ms(t), "plain ssh -tt", ms(t_prompt_plain), "ms", "report")

    quoted = lambda argv: " ".join(shlex.quote(a) for a in argv)  # noqa: E731
    prefix = "SSHJOB_CONFIG=%s " % shlex.quote(env["SSHJOB_CONFIG"])
    g_plain = throughput(quoted(plain + ["cat > /dev/null"]), args.gib)
    for transport, target in (("openssh", ">= 0.95"), ("builtin", ">= 1.5")):
        argv = sshjob + ["client", "-transport", transport, job, "cat > /dev/null"]
        row("throughput %d GiB, %s" % (args.gib, transport), throughput(prefix + quoted(argv), args.gib) * 1024,
            "plain ssh", g_plain * 1024, "MiB/s", target)

    starter = int(open(os.path.join(scratch, "pool", "starter.pid")).read())  # noqa: SIM115
    for count in (1, args.sessions):
        start = time.perf_counter()
        sessions = [subprocess.Popen(client + ["sleep 3"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE) for _ in range(count)]
        rss, fds = peak_of(starter, sessions)
        failed = sum(1 for s in sessions if s.wait() != 0)
        wall = time.perf_counter() - start
        if count == 1:
            one = (wall, rss, fds)
            continue
        ROWS.append(("%d x client JOB 'sleep 3'" % count, "%.1f s, %d failed" % (wall, failed), "1 session: %.1f s"
                     % one[0], "%.2f" % (wall / one[0]), "all succeed"))
        ROWS.append(("  starter's peak RSS / fds", "%.0f MiB / %d" % (rss, fds), "1 session: %.0f MiB / %d"
                     % (one[1], one[2]), "%.2f / %.2f" % (rss / one[1], fds / one[2]), "report"))
        print("  %d sessions: %.1f s, %d failed; starter %.0f MiB, %d fds" % (count, wall, failed, rss, fds))
    return job


def ssh_host_figures(args, scratch, plain, env, job):
    config = os.path.join(scratch, "ssh_config")
    with open(config, "w") as f:
        f.write(subprocess.run([args.python, PYZ, "ssh-config"], env=env, check=True, stdout=subprocess.PIPE,
                               universal_newlines=True).stdout)
    host = ["ssh", "-F", config, job + ".sshjob"]
    timed(host + ["true"], 2, env=env)
    row("ssh JOB.sshjob true", ms(timed(host + ["true"], args.runs, env=env)), "plain ssh",
        ms(timed(plain + ["true"], args.runs, env=env)), "ms", "<= 1.0")
    control = tempfile.mkdtemp(prefix="cm-", dir="/tmp")
    mux = ["ssh", "-F", config, "-o", "ControlMaster=auto", "-o", "ControlPath=%s/%%C" % control,
           "-o", "ControlPersist=60", job + ".sshjob"]
    subprocess.run(mux + ["true"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = timed(mux + ["true"], args.runs, env=env)
    ROWS.append(("a second command on a ControlMaster", "%.1f ms" % ms(second), "-", "-", "<= 10 ms"))
    print("  multiplexed: %.1f ms" % ms(second), flush=True)
    subprocess.run(mux[:-1] + ["-O", "exit", job + ".sshjob"], env=env, stderr=subprocess.DEVNULL)
    shutil.rmtree(control, ignore_errors=True)


def slurm_figures(args, scratch, plain):
    if slurm.missing_programs():
        ROWS.append(("Slurm", "not installed", "-", "-", "-"))
        return
    slurm.start()
    job = subprocess.run(["sbatch", "--parsable", "-D", scratch, "-o", "/dev/null", "--wrap", "sleep 3600"],
                         check=True, stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    try:
        while subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], stdout=subprocess.PIPE,
                             universal_newlines=True).stdout.strip() != "RUNNING":
            time.sleep(0.2)
        time.sleep(1)
        env = dict(os.environ, SSHJOB_SCHEDULER="slurm")
        env.pop("SSHJOB_CONFIG", None)
        srun = ["srun", "--jobid", job, "--overlap", "-N1", "-n1", "--quiet"]
        client = [args.python, PYZ, "client", job]
        builtin = [args.python, PYZ, "client", "-transport", "builtin", job]
        for argv in (srun, client, builtin):
            timed(argv + ["true"], 2, env=env)
        t_srun = timed(srun + ["true"], args.runs, env=env)
        row("Slurm: client J true, openssh", ms(timed(client + ["true"], args.runs, env=env)), "plain ssh",
            ms(timed(plain + ["true"], args.runs)), "ms", "<= 1.0")
        row("Slurm: client -transport builtin J true", ms(timed(builtin + ["true"], args.runs, env=env)),
            "srun --overlap true", ms(t_srun), "ms", "<= 1.0 (issue 9: 1.5)")
        quoted = lambda argv: " ".join(shlex.quote(a) for a in argv)  # noqa: E731
        g_plain = throughput(quoted(plain + ["cat > /dev/null"]), args.gib)
        g_direct = throughput("SSHJOB_SCHEDULER=slurm " + quoted(client + ["cat > /dev/null"]), args.gib)
        g_pipe = throughput("SSHJOB_SCHEDULER=slurm SSHJOB_SLURM_DIRECT=false " + quoted(client + ["cat > /dev/null"]),
                            args.gib)
        row("Slurm: throughput %d GiB, direct" % args.gib, g_direct * 1024, "plain ssh", g_plain * 1024, "MiB/s",
            ">= 0.9")
        row("Slurm: throughput %d GiB, srun's pipe" % args.gib, g_pipe * 1024, "plain ssh", g_plain * 1024,
            "MiB/s", "report")
    finally:
        subprocess.run(["scancel", job])


def main():
    parser = bench_parser(__doc__)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--gib", type=int, default=1)
    parser.add_argument("--sessions", type=int, default=100)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="sshjob-bench-")
    os.chmod(scratch, 0o755)
    pool_dir = os.path.join(scratch, "pool")
    env = dict(os.environ, SSHJOB_CONFIG=os.path.join(pool_dir, "sshjob.conf"), HOME=scratch)
    sshd, port, key = start_plain_sshd(scratch)
    plain = ["ssh"] + SSH_ISOLATION + ["-i", key, "-p", str(port), "127.0.0.1"]
    print("python: %s, %s" % (args.python, socket.gethostname()), flush=True)
    try:
        subprocess.run([args.python, PYZ, "pool", "start", "--dir", pool_dir], check=True, stdout=subprocess.DEVNULL)
        job = pool_figures(args, scratch, plain, env)
        ssh_host_figures(args, scratch, plain, env, job)
        slurm_figures(args, scratch, plain)
    finally:
        subprocess.run([args.python, PYZ, "pool", "stop", "--dir", pool_dir], stdout=subprocess.DEVNULL)
        sshd.terminate()
        sshd.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    widths = [max(len(r[i]) for r in ROWS + [("what", "sshjob", "peer", "ratio", "target")]) for i in range(5)]
    print()
    for r in [("what", "sshjob", "peer", "ratio", "target")] + ROWS:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)))


if __name__ == "__main__":
    main()
