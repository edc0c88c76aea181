#!/usr/bin/env python3
"""Every figure of sshjob's speed in one table, as ratios to its peers
measured in the same run (issue 11).

    python3 bench/run.py [--runs 15] [--gib 1] [--sessions 100] [--user sshjob-bench]
                         [--python /usr/bin/python3] [--only pool|copies|ssh-hosts|slurm ...]

Starts a personal pool with the built dist/sshjob.pyz, a plain sshd on
127.0.0.1, and (where Slurm is installed) the tests' single-node Slurm, then
prints one row per figure: sshjob's value, its peer's, the ratio and the
target.  Every session, sshjob's and plain ssh's, is that of --user, an
ordinary user made if missing, whose shell starts as a new account's does
(--user root measures root's, whatever its ~/.bashrc costs).  Needs root
and a built pyz (python3 build.py).  The other scripts in bench/ measure
single things at more length.
"""

import fcntl
import os
import pty
import pwd
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

from bench import PYZ, SSH_ISOLATION, bench_parser, start_plain_sshd, throughput_pair, timed, timed_pair

ROWS = []

POOL_WARM = {}  # later sessions into the pool's job, set beside srun's figures once Slurm's part has timed srun
SECTIONS = ["pool", "copies", "ssh-hosts", "slurm"]


def row(what, ours, peer_name, peer, unit, target, higher_is_better=False):
    ratio = ours / peer if peer else float("nan")
    ROWS.append((what, "%.1f %s" % (ours, unit), "%s: %.1f %s" % (peer_name, peer, unit), "%.2f" % ratio, target))
    print("  %s: %.1f %s against %.1f %s (%s): %.2f" % (what, ours, unit, peer, unit, peer_name, ratio), flush=True)


def ms(seconds):
    return seconds * 1000


def first_prompt(argv, env, runs=5, **who):
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
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, **who,
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


def pool_job(args, env, who):
    """A running job of the personal pool, the user's."""
    sshjob = [args.python, PYZ]
    job = subprocess.run(sshjob + ["submit", "--", "sleep", "3600"], env=env, **who, check=True,
                         stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    wait_for(lambda: "running" in subprocess.run(sshjob + ["q"], env=env, **who, stdout=subprocess.PIPE,
                                                 universal_newlines=True).stdout, "job %s to run" % job)
    return job


def wait_for(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("waited %d s for %s" % (timeout, what))
        time.sleep(0.1)


def warmed(client, env, who):
    """Sessions until one takes the warm path (the job's agent writes its record as the first session ends)."""
    wait_for(lambda: "the warm path" in subprocess.run(client[:-1] + ["-debug", client[-1], "true"], env=env, **who,
                                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                       universal_newlines=True).stderr, "the warm path")


def pool_figures(args, scratch, plain, env, who, job):
    sshjob = [args.python, PYZ]
    client = sshjob + ["client", job]
    builtin = sshjob + ["client", "-transport", "builtin", job]
    cold = dict(env, SSHJOB_WARM_IDLE="0")  # no agent, no ssh master: every session a first one
    for argv in (plain, client, builtin):
        timed(argv + ["true"], 2, env=cold, **who)
    ours, peer = timed_pair(client + ["true"], plain + ["true"], args.runs, env=cold, **who)
    row("client JOB true, openssh (first session)", ms(ours), "plain ssh", ms(peer), "ms", "<= 1.0")
    ours, peer = timed_pair(builtin + ["true"], [args.python, "-c", "pass"], args.runs, env=cold, **who)
    row("client -transport builtin JOB true (first session)", ms(ours), "python3 -c pass", ms(peer), "ms", "<= 4.0")
    for argv in (builtin, client):
        warmed(argv, env, who)
    POOL_WARM["openssh"], POOL_WARM["mux"] = timed_pair(client + ["true"], plain_mux(plain, scratch, env, who)
                                                        + ["true"], args.runs, env=env, **who)
    POOL_WARM["builtin"] = timed(builtin + ["true"], args.runs, env=env, **who)
    quoted = " ".join(shlex.quote(a) for a in client + ["true"])
    POOL_WARM["twenty"] = timed(["bash", "-c", "for i in $(seq 20); do %s; done" % quoted], max(3, args.runs // 5),
                                env=env, **who)
    ours, peer = timed_pair(sshjob + ["--help"], [args.python, "-c", "pass"], args.runs, env=env, **who)
    row("sshjob.pyz --help", ms(ours), "python3 -c pass", ms(peer), "ms", "<= 25 ms")

    terminal_env = dict(env, TERM="xterm", SHELL="/bin/sh", PS1="$ ")
    t_prompt_plain = first_prompt(plain + ["-tt"], terminal_env, **who)
    for transport in ("openssh", "builtin"):
        t = first_prompt(sshjob + ["client", "-transport", transport, job], terminal_env, **who)
        row("first prompt, %s" % transport, ms(t), "plain ssh -tt", ms(t_prompt_plain), "ms", "report")

    quoted = lambda argv: " ".join(shlex.quote(a) for a in argv)  # noqa: E731
    prefix = "SSHJOB_CONFIG=%s " % shlex.quote(env["SSHJOB_CONFIG"])
    for transport, target in (("openssh", ">= 0.95"), ("builtin", ">= 1.5")):
        argv = sshjob + ["client", "-transport", transport, job, "cat > /dev/null"]
        ours, peer = throughput_pair(prefix + quoted(argv), quoted(plain + ["cat > /dev/null"]), args.gib, env=env,
                                     **who)
        row("throughput %d GiB, %s" % (args.gib, transport), ours * 1024, "plain ssh", peer * 1024, "MiB/s", target)

    starter = int(open(os.path.join(scratch, "pool", "starter.pid")).read())  # noqa: SIM115
    for count in (1, args.sessions):
        start = time.perf_counter()
        sessions = [subprocess.Popen(client + ["sleep 3"], env=cold, **who, stdout=subprocess.DEVNULL,
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


def copy_figures(args, scratch, port, key, env, who, job):
    """The setup of each copying tool as the README shows it, on a 4 KiB
    file, against the same tool over plain ssh."""
    sshjob = [args.python, PYZ]
    source = os.path.join(scratch, "small.dat")
    with open(source, "wb") as f:
        f.write(os.urandom(4096))
    os.chmod(source, 0o644)
    target = tempfile.mkdtemp(prefix="copies-", dir=scratch)
    if who:
        os.chown(target, who["user"], who["group"])
    out = os.path.join(target, "out.dat")
    batch = os.path.join(scratch, "sftp-batch")
    with open(batch, "w") as f:
        f.write("get %s %s\n" % (source, out))
    os.chmod(batch, 0o644)
    plain_ssh = " ".join(shlex.quote(a) for a in ["ssh"] + SSH_ISOLATION + ["-i", key, "-p", str(port)])
    plain = SSH_ISOLATION + ["-i", key, "-P", str(port)]
    pairs = [
        ("sshjob cp JOB:F .", sshjob + ["cp", job + ":" + source, out], "plain scp",
         ["scp"] + plain + ["127.0.0.1:" + source, out]),
        ("client -ssh scp JOB remote:F .", sshjob + ["client", "-ssh", "scp", job, "remote:" + source, out],
         "plain scp", ["scp"] + plain + ["127.0.0.1:" + source, out]),
        ("rsync -e 'sshjob client' JOB:F .", ["rsync", "-I", "-e", " ".join(sshjob + ["client"]), job + ":" + source,
                                              out], "plain rsync", ["rsync", "-I", "-e", plain_ssh,
                                                                    "127.0.0.1:" + source, out]),
        ("client -ssh sftp JOB -b batch", sshjob + ["client", "-ssh", "sftp", job, "-b", batch], "plain sftp",
         ["sftp"] + plain + ["-b", batch, "127.0.0.1"]),
    ]
    for what, ours, peer_name, peer in pairs:
        timed(ours, 1, env=env, **who)
        ours, peer = timed_pair(ours, peer, args.runs, env=env, **who)
        row(what, ms(ours), peer_name, ms(peer), "ms", "<= 1.0")


def ssh_host_figures(args, scratch, plain, env, job, who):
    config = os.path.join(scratch, "ssh_config")
    with open(config, "w") as f:
        f.write(subprocess.run([args.python, PYZ, "ssh-config"], env=env, **who, check=True, stdout=subprocess.PIPE,
                               universal_newlines=True).stdout)
    host = ["ssh", "-F", config, job + ".sshjob"]
    timed(host + ["true"], 2, env=env, **who)
    ours, peer = timed_pair(host + ["true"], plain + ["true"], args.runs, env=env, **who)
    row("ssh JOB.sshjob true", ms(ours), "plain ssh", ms(peer), "ms", "<= 1.0")
    control = tempfile.mkdtemp(prefix="cm-", dir="/tmp")
    if who:
        os.chown(control, who["user"], who["group"])
    multiplexed = ["-o", "ControlMaster=auto", "-o", "ControlPath=%s/%%C" % control, "-o", "ControlPersist=60"]
    ours, peer = host[:-1] + multiplexed + host[-1:], plain[:-1] + multiplexed + plain[-1:]
    for argv in (ours, peer):
        subprocess.run(argv + ["true"], env=env, **who, check=True, stdout=subprocess.DEVNULL)
    second, plain_second = timed_pair(ours + ["true"], peer + ["true"], args.runs, env=env, **who)
    row("a second command on a ControlMaster", ms(second), "plain ssh's", ms(plain_second), "ms", "<= 10 ms")
    in_a_row = ["bash", "-c", "for i in $(seq 20); do %s; done" % " ".join(shlex.quote(a) for a in ours + ["true"])]
    plain_row = ["bash", "-c", "for i in $(seq 20); do %s; done" % " ".join(shlex.quote(a) for a in peer + ["true"])]
    twenty, plain_twenty = timed_pair(in_a_row, plain_row, max(3, args.runs // 5), env=env, **who)
    row("20 x ssh JOB.sshjob true, ControlPersist", ms(twenty), "20 x plain ssh, ControlMaster", ms(plain_twenty),
        "ms", "<= 1.5")
    for argv in (ours, peer):
        subprocess.run(argv[:-1] + ["-O", "exit", argv[-1]], env=env, **who, stderr=subprocess.DEVNULL)
    shutil.rmtree(control, ignore_errors=True)
    relay_figures(args, scratch, plain, env, job, who, config)


def relay_figures(args, scratch, plain, env, job, who, config):
    """The proxy relaying (clients that are not OpenSSH; a laptop's block)
    against its passing the socket, and against plain ssh -J."""
    relayed = os.path.join(scratch, "ssh_config_relay")
    with open(config) as f, open(relayed, "w") as out:
        out.write(f.read().replace("ProxyUseFdpass yes", "ProxyUseFdpass no").replace(" proxy ", " proxy --relay "))
    passed, relay = ["ssh", "-F", config, job + ".sshjob"], ["ssh", "-F", relayed, job + ".sshjob"]
    hop = " ".join(shlex.quote(a) for a in plain[:-1]) + " -W %h:%p " + plain[-1]
    jump = plain[:-1] + ["-o", "ProxyCommand=" + hop, plain[-1]]
    timed(relay + ["true"], 2, env=env, **who)
    ours, peer = timed_pair(relay + ["true"], passed + ["true"], args.runs, env=env, **who)
    row("ssh JOB.sshjob true, relayed", ms(ours), "socket passed", ms(peer), "ms", "report")
    ours, peer = timed_pair(relay + ["true"], jump + ["true"], args.runs, env=env, **who)
    row("ssh JOB.sshjob true, relayed", ms(ours), "plain ssh -J", ms(peer), "ms", "report")
    quoted = lambda argv: " ".join(shlex.quote(a) for a in argv)  # noqa: E731
    for name, peer_argv in (("socket passed", passed), ("plain ssh -J", jump)):
        ours, peer = throughput_pair(quoted(relay + ["cat > /dev/null"]), quoted(peer_argv + ["cat > /dev/null"]),
                                     args.gib, env=env, **who)
        row("throughput %d GiB, relayed" % args.gib, ours * 1024, name, peer * 1024, "MiB/s", "report")


def slurm_figures(args, scratch, plain, env, who):
    if slurm.missing_programs():
        ROWS.append(("Slurm", "not installed", "-", "-", "-"))
        return
    slurm.start()  # restarted: what it ran before is cancelled
    env = dict(env, SSHJOB_SCHEDULER="slurm")
    env.pop("SSHJOB_CONFIG", None)
    job = subprocess.run(["sbatch", "--parsable", "-D", scratch, "-o", "/dev/null", "--wrap", "sleep 3600"], env=env,
                         **who, check=True, stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    try:
        state = ["squeue", "-h", "-j", job, "-o", "%T"]
        wait_for(lambda: subprocess.run(state, stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
                 == "RUNNING", "Slurm job %s to run" % job)
        time.sleep(1)
        srun = ["srun", "--jobid", job, "--overlap", "-N1", "-n1", "--quiet"]
        client = [args.python, PYZ, "client", job]
        builtin = [args.python, PYZ, "client", "-transport", "builtin", job]
        cold = dict(env, SSHJOB_WARM_IDLE="0")  # no agent: every session a first one
        for argv in (srun, client, builtin):
            timed(argv + ["true"], 2, env=cold, **who)
        srun_true, plain_true = timed_pair(srun + ["true"], plain + ["true"], args.runs, env=env, **who)
        first, first_builtin = timed_pair(client + ["true"], builtin + ["true"], args.runs, env=cold, **who)
        row("Slurm first session: client J true, openssh", ms(first), "srun --overlap true + plain ssh true",
            ms(srun_true + plain_true), "ms", "<= 1.1")
        row("Slurm first session: client -transport builtin J true", ms(first_builtin), "srun --overlap true",
            ms(srun_true), "ms", "<= 2.0")
        warm_figures(args, scratch, plain, env, who, client, builtin, srun, srun_true)
        floor = [args.python, "-I", "-S", "-c", "pass"]  # the least that a step running Python costs
        ours, peer = timed_pair(srun + floor, srun + ["true"], args.runs, env=env, **who)
        row("  floor: srun --overlap python3 -c pass", ms(ours), "srun --overlap true", ms(peer), "ms", "report")
        quoted = lambda argv: " ".join(shlex.quote(a) for a in argv)  # noqa: E731
        plain_cat = quoted(plain + ["cat > /dev/null"])
        paths = (("direct", "", ">= 0.9"), ("srun's pipe", "SSHJOB_WARM_IDLE=0 SSHJOB_SLURM_DIRECT=false ", "report"))
        for path, prefix, target in paths:
            ours, peer = throughput_pair(prefix + quoted(client + ["cat > /dev/null"]), plain_cat, args.gib, env=env,
                                         **who)
            row("Slurm: throughput %d GiB, %s" % (args.gib, path), ours * 1024, "plain ssh", peer * 1024, "MiB/s",
                target)
        new_figures(args, env, who, srun)
    finally:
        slurm.stop()


def plain_mux(plain, scratch, env, who):
    """Plain ssh through a ControlMaster of its own, made here."""
    control = tempfile.mkdtemp(prefix="cm-", dir=scratch)
    if who:
        os.chown(control, who["user"], who["group"])
    mux = plain[:-1] + ["-o", "ControlMaster=auto", "-o", "ControlPath=%s/%%C" % control, "-o",
                        "ControlPersist=60", plain[-1]]
    subprocess.run(mux + ["true"], env=env, **who, check=True)
    return mux


def warm_figures(args, scratch, plain, env, who, client, builtin, srun, srun_true):
    """Later sessions through the job's agent and the client's ssh master,
    against srun and plain ssh's own multiplexing; the pool's, timed before."""
    mux = plain_mux(plain, scratch, env, who)
    for argv in (builtin, client):
        warmed(argv, env, who)
    try:
        warm, mux_true = timed_pair(client + ["true"], mux + ["true"], args.runs, env=env, **who)
        row("Slurm later session (warm): client J true, openssh", ms(warm),
            "srun --overlap true + plain ssh multiplexed true", ms(srun_true + mux_true), "ms", "<= 1.0")
        warm_builtin, peer = timed_pair(builtin + ["true"], srun + ["true"], args.runs, env=env, **who)
        row("Slurm later session (warm): client -transport builtin J true", ms(warm_builtin), "srun --overlap true",
            ms(peer), "ms", "<= 1.0")
        quoted = " ".join(shlex.quote(a) for a in client + ["true"])
        twenty = ["bash", "-c", "for i in $(seq 20); do %s; done" % quoted]
        srun_twenty = ["bash", "-c", "for i in $(seq 20); do %s; done" % " ".join(srun + ["true"])]
        ours, peer = timed_pair(twenty, srun_twenty, max(3, args.runs // 5), env=env, **who)
        row("Slurm: 20 client J true in a row (warm)", ms(ours), "20 srun --overlap true", ms(peer), "ms", "<= 1.0")
        if POOL_WARM:
            row("Pool later session (warm): client J true, openssh", ms(POOL_WARM["openssh"]),
                "srun --overlap true + plain ssh multiplexed true", ms(srun_true + POOL_WARM["mux"]), "ms", "<= 1.0")
            row("Pool later session (warm): client -transport builtin J true", ms(POOL_WARM["builtin"]),
                "srun --overlap true", ms(srun_true), "ms", "<= 1.0")
            row("Pool: 20 client J true in a row (warm)", ms(POOL_WARM["twenty"]), "20 srun --overlap true", ms(peer),
                "ms", "<= 1.0")
    finally:
        subprocess.run(mux[:-1] + ["-O", "exit", mux[-1]], env=env, **who, stderr=subprocess.DEVNULL)


def new_figures(args, env, who, srun):
    """sshjob new to a prompt, against salloc + srun --pty bash typed by hand (a node free)."""
    options = "-c 1 --time=00:10:00"
    new = [args.python, PYZ, "new", "--options", options, "bench"]
    give_back = ["scancel", "--user", env.get("USER", "root"), "--name", "sshjob-new-bench"]
    salloc = ["salloc", "-c", "1", "--time=00:10:00", "srun", "--pty", "bash"]
    cold, by_hand = [], []
    for _ in range(max(3, args.runs // 3)):
        cold.append(first_prompt(new, env, runs=1, **who))
        subprocess.run(give_back, env=env, **who, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        by_hand.append(first_prompt(salloc, env, runs=1, **who))
    row("Slurm: new PROFILE to a prompt, first", ms(statistics.median(cold)), "salloc + srun --pty bash",
        ms(statistics.median(by_hand)), "ms", "report")
    subprocess.run(new + ["true"], env=env, **who, check=True, stdout=subprocess.DEVNULL)
    job = subprocess.run(["squeue", "-h", "--name", "sshjob-new-bench", "-o", "%i"], env=env, **who,
                         stdout=subprocess.PIPE, universal_newlines=True).stdout.split()[0]
    again = first_prompt(new, env, runs=max(3, args.runs // 3), **who)
    step = first_prompt(srun + ["--pty", "bash"], env, runs=max(3, args.runs // 3), **who)
    row("Slurm: new PROFILE to a prompt, reused (job %s)" % job, ms(again), "srun --overlap --pty bash", ms(step),
        "ms", "report")
    subprocess.run(give_back, env=env, **who, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bench_user(name, scratch, key):
    """(environment, subprocess arguments, key) for running as user `name`:
    made if missing, with a copy of the plain sshd's key of its own."""
    if name == "root":
        return dict(os.environ, HOME=scratch), {}, key
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
        subprocess.run(["usermod", "-p", "*", name], check=True)  # no password, yet not locked: plain sshd lets it in
        user = pwd.getpwnam(name)
    own = os.path.join(scratch, "id-" + name)
    shutil.copy(key, own)
    os.chown(own, user.pw_uid, user.pw_gid)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": user.pw_dir, "USER": name, "LOGNAME": name,
           "SHELL": user.pw_shell, "LANG": os.environ.get("LANG", "C.UTF-8")}
    return env, {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}, own


def main():
    parser = bench_parser(__doc__)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--gib", type=int, default=1)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--user", default="sshjob-bench", help="whose sessions to time (default: %(default)s)")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="time only these parts (repeatable)")
    args = parser.parse_args()
    sections = args.only or SECTIONS
    scratch = tempfile.mkdtemp(prefix="sshjob-bench-")
    os.chmod(scratch, 0o755)
    pool_dir = os.path.join(scratch, "pool")
    sshd, port, key = start_plain_sshd(scratch)
    env, who, key = bench_user(args.user, scratch, key)
    env["SSHJOB_CONFIG"] = os.path.join(pool_dir, "sshjob.conf")
    plain = ["ssh"] + SSH_ISOLATION + ["-i", key, "-p", str(port), "127.0.0.1"]
    print("python: %s, user %s, %s" % (args.python, args.user, socket.gethostname()), flush=True)
    try:
        subprocess.run([args.python, PYZ, "pool", "start", "--dir", pool_dir], check=True, stdout=subprocess.DEVNULL)
        job = pool_job(args, env, who)
        if "pool" in sections:
            pool_figures(args, scratch, plain, env, who, job)
        if "copies" in sections:
            copy_figures(args, scratch, port, key, env, who, job)
        if "ssh-hosts" in sections:
            ssh_host_figures(args, scratch, plain, env, job, who)
        if "slurm" in sections:
            slurm_figures(args, scratch, plain, env, who)
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
