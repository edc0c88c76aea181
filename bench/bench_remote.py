#!/usr/bin/env python3
"""Entering a job over the pool's TLS path and through the schedd's relay.

    python3 bench/bench_remote.py [--runs 20] [--gib 1] [--python /usr/bin/python3]

Sets up a pool with `sshjob init` (schedd on TLS at 127.0.0.1), a user token,
and a starter that connects with a starter token; once reachable directly,
once declared unreachable (starter_reachable = false), so that sessions go
through the schedd's relay.  Prints, against plain ssh measured in the same
run: the wall time of `client JOB true` from a remote user's configuration
(TLS and token) on each path, and the relay's throughput against the direct
path's.  Needs root and a built dist/sshjob.pyz.
"""

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import PYZ, SSH_ISOLATION, bench_parser, free_port, start_plain_sshd, throughput, timed


def start_pool(python, scratch, name, reachable):
    """schedd with TLS, a starter that joins with a token, a remote user's config."""
    sshjob = [python, PYZ]
    pool = os.path.join(scratch, name)
    port = free_port()
    init = subprocess.run(sshjob + ["init", "--dir", pool, "--listen", "127.0.0.1:%d" % port],
                          stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
    fingerprint = init.split("schedd certificate SHA-256: ")[1].split()[0]
    config = os.path.join(pool, "sshjob.conf")
    for subject, options in (("starter", ["--name", name]), ("root", [])):
        subprocess.run(sshjob + ["--config", config, "token", "create", "--for", subject, "--output",
                                 os.path.join(scratch, "%s-%s.token" % (name, subject))] + options, check=True)
    remote = {}
    for subject, extra in (("starter", "starter_name = %s\nstarter_reachable = %s\nstarter_dir = %s\n"
                            % (name, "true" if reachable else "false", os.path.join(pool, "execute"))),
                           ("root", "")):
        remote[subject] = os.path.join(scratch, "%s-%s.conf" % (name, subject))
        with open(remote[subject], "w") as f:
            f.write("[sshjob]\nschedd_address = 127.0.0.1:%d\nschedd_fingerprint = %s\ntoken_file = %s\n%s"
                    % (port, fingerprint, os.path.join(scratch, "%s-%s.token" % (name, subject)), extra))
    daemons = [subprocess.Popen(sshjob + ["--config", config, "schedd"], stderr=subprocess.DEVNULL)]
    time.sleep(1)
    daemons.append(subprocess.Popen(sshjob + ["--config", remote["starter"], "starter"], stderr=subprocess.DEVNULL))
    env = dict(os.environ, SSHJOB_CONFIG=remote["root"])
    job = subprocess.run(sshjob + ["submit", "--workdir", scratch, "--", "sleep", "3600"], env=env, check=True,
                         stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    while "running" not in subprocess.run(sshjob + ["q"], env=env, stdout=subprocess.PIPE,
                                          universal_newlines=True).stdout:
        time.sleep(0.1)
    return daemons, env, job


def main():
    parser = bench_parser(__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--gib", type=int, default=1)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="sshjob-bench-")
    sshd, port, key = start_plain_sshd(scratch)
    daemons = []
    try:
        plain = ["ssh"] + SSH_ISOLATION + ["-i", key, "-p", str(port), "127.0.0.1"]
        timed(plain + ["true"], 2)
        results = {}
        for name, reachable in (("direct", True), ("relayed", False)):
            started, env, job = start_pool(args.python, scratch, name, reachable)
            daemons += started
            client = [args.python, PYZ, "client", job]
            timed(client + ["true"], 2, env=env)
            results[name] = (timed(client + ["true"], args.runs, env=env),
                             throughput("SSHJOB_CONFIG=%s %s" % (shlex.quote(env["SSHJOB_CONFIG"]), " ".join(
                                 shlex.quote(a) for a in client + ["cat > /dev/null"])), args.gib))
        t_plain = timed(plain + ["true"], args.runs)
        print("python: %s" % args.python)
        for name in ("direct", "relayed"):
            print("time to run `true` over TLS and a token, %s (median of %d): %.0f ms, plain ssh %.0f ms: ratio %.2f"
                  % (name, args.runs, results[name][0] * 1000, t_plain * 1000, results[name][0] / t_plain))
        print("throughput of %d GiB: relayed %.0f MiB/s, direct %.0f MiB/s: ratio %.2f"
              % (args.gib, results["relayed"][1] * 1024, results["direct"][1] * 1024,
                 results["relayed"][1] / results["direct"][1]))
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()
            daemon.wait()
        sshd.terminate()
        sshd.wait()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
