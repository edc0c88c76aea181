#!/usr/bin/env python3
"""Benchmark of sessions in Slurm jobs, against srun and plain OpenSSH, in one run.

    python3 bench/bench_slurm.py [--runs 20] [--gib 1] [--python /usr/bin/python3]

Starts the single-node Slurm of the tests (tests/slurm.py), submits a batch
job, and prints medians and ratios:

- `sshjob client --scheduler slurm J true` (OpenSSH transport) against plain
  `ssh 127.0.0.1 true` to a listening sshd (target: <= 1.0);
- `client -transport builtin J true` against `srun --jobid J --overlap true`
  (target: <= 1.5);
- --gib GiB through `client J 'cat > /dev/null'` against plain ssh (target:
  >= 0.9), and through srun's pipe (slurm_direct = false) for comparison.

Needs root and a built pyz (python3 build.py).  Slurm keeps running
afterwards; `python3 tests/slurm.py stop` stops it.
"""

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import slurm

from bench import PYZ, SSH_ISOLATION, bench_parser, start_plain_sshd, throughput, timed


def main():
    parser = bench_parser(__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--gib", type=int, default=1)
    args = parser.parse_args()
    slurm.start()
    scratch = tempfile.mkdtemp(prefix="sshjob-bench-")
    os.chmod(scratch, 0o755)
    sshd, port, key = start_plain_sshd(scratch)
    job = subprocess.run(["sbatch", "--parsable", "-D", scratch, "-o", "/dev/null", "--wrap", "sleep 3600"],
                         check=True, stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    try:
        while subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], stdout=subprocess.PIPE,
                             universal_newlines=True).stdout.strip() != "RUNNING":
            time.sleep(0.2)
        time.sleep(1)
        env = dict(os.environ, SSHJOB_SCHEDULER="slurm")
        plain = ["ssh"] + SSH_ISOLATION + ["-i", key, "-p", str(port), "127.0.0.1"]
        srun = ["srun", "--jobid", job, "--overlap", "-N1", "-n1", "--quiet"]
        client = [args.python, PYZ, "client", job]
        builtin = [args.python, PYZ, "client", "-transport", "builtin", job]
        for argv in (plain, srun, client, builtin):
            timed(argv + ["true"], 2, env=env)
        t = {name: timed(argv + ["true"], args.runs, env=env)
             for name, argv in (("plain", plain), ("srun", srun), ("client", client), ("builtin", builtin))}
        print("python: %s; Slurm job %s" % (args.python, job))
        print("time to run `true` (median of %d): plain ssh %.0f ms, srun --overlap %.0f ms, "
              "sshjob client %.0f ms (openssh), %.0f ms (builtin)"
              % (args.runs, t["plain"] * 1000, t["srun"] * 1000, t["client"] * 1000, t["builtin"] * 1000))
        print("  client (openssh) / plain ssh: %.2f   (target <= 1.0)" % (t["client"] / t["plain"]))
        print("  client (builtin) / srun --overlap: %.2f   (target <= 1.5)" % (t["builtin"] / t["srun"]))

        quoted = lambda argv: " ".join(shlex.quote(a) for a in argv)  # noqa: E731
        g_plain = throughput(quoted(plain + ["cat > /dev/null"]), args.gib)
        g_client = throughput("SSHJOB_SCHEDULER=slurm " + quoted(client + ["cat > /dev/null"]), args.gib)
        g_pipe = throughput("SSHJOB_SCHEDULER=slurm SSHJOB_SLURM_DIRECT=false " + quoted(client + ["cat > /dev/null"]),
                            args.gib)
        print("throughput of %d GiB: plain ssh %.0f MiB/s, sshjob client %.0f MiB/s (direct), %.0f MiB/s (srun's pipe)"
              % (args.gib, g_plain * 1024, g_client * 1024, g_pipe * 1024))
        print("  client (direct) / plain ssh: %.2f   (target >= 0.9); through srun: %.2f"
              % (g_client / g_plain, g_pipe / g_plain))
    finally:
        subprocess.run(["scancel", job])
        sshd.terminate()
        sshd.wait()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
