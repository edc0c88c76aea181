#!/usr/bin/env python3
"""How fast `sshjob rm` ends a job with an open session, and what it leaves.

    python3 bench/bench_lifecycle.py [--cycles 100] [--python /usr/bin/python3]

Each cycle submits a job, opens a session in it that double-forks a
`setsid nohup sleep` and then waits, and removes the job.  Prints the median
time from `rm` until the job's last process (its own, the session's sshd and
shell, the double-forked sleep) is gone, and how many processes outlived
their job over all cycles (must be 0).  Needs a built dist/sshjob.pyz.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import PYZ, bench_parser


def processes_in(directory):
    """Pids whose working directory lies in `directory` (jobs and sessions)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and (os.readlink("/proc/%s/cwd" % entry) + "/").startswith(directory + "/"):
                found.append(int(entry))
        except OSError:
            pass
    return found


def main():
    parser = bench_parser(__doc__)
    parser.add_argument("--cycles", type=int, default=100)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="sshjob-bench-")
    pool_dir = os.path.join(scratch, "pool")
    os.makedirs(pool_dir)
    with open(os.path.join(pool_dir, "sshjob.conf"), "w") as f:
        f.write("[sshjob]\nstarter_slots = 4\n")
    sshjob = [args.python, PYZ]
    env = dict(os.environ, SSHJOB_CONFIG=os.path.join(pool_dir, "sshjob.conf"))
    run = lambda *a, **k: subprocess.run(sshjob + list(a), env=env, stdout=subprocess.PIPE,  # noqa: E731
                                         universal_newlines=True, **k)
    subprocess.run(sshjob + ["pool", "start", "--dir", pool_dir], check=True, stdout=subprocess.DEVNULL)
    times, left_behind = [], 0
    try:
        for cycle in range(args.cycles):
            workdir = os.path.join(scratch, "job%d" % cycle)
            os.mkdir(workdir)
            job = run("submit", "--workdir", workdir, "--", "sleep", "600").stdout.strip()
            while "running" not in run("q").stdout:
                time.sleep(0.02)
            session = subprocess.Popen(sshjob + ["client", job, "setsid nohup sleep 1000 >/dev/null 2>&1 "
                                                 "</dev/null & echo ready; sleep 300"],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            session.stdout.readline()
            while len(processes_in(workdir)) < 3:  # the job, the setsid sleep, the session shell (now sleep)
                time.sleep(0.01)
            start = time.perf_counter()
            run("rm", job, check=True)
            while processes_in(workdir) and time.perf_counter() - start < 30:
                time.sleep(0.005)
            times.append(time.perf_counter() - start)
            session.wait()
            time.sleep(0.2)
            left_behind += len(processes_in(workdir))
        print("rm until the last process of the job and its session is gone: median %.0f ms over %d cycles "
              "(min %.0f, max %.0f)" % (statistics.median(times) * 1000, len(times), min(times) * 1000,
                                        max(times) * 1000))
        print("processes left behind over %d remove cycles: %d" % (args.cycles, left_behind))
    finally:
        subprocess.run(sshjob + ["pool", "stop", "--dir", pool_dir], stdout=subprocess.DEVNULL)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
