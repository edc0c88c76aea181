"""A real single-node Slurm on this machine: munged, slurmctld and slurmd
from Debian's packages, started and stopped by the tests and the benchmarks
(`python3 tests/slurm.py start|stop`).  Needs root.

The configuration goes where Slurm's client commands look for it,
/etc/slurm/slurm.conf, so that users type plain `sbatch` and `srun`; a
slurm.conf that these tests did not write is never overwritten."""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time

CONF = "/etc/slurm/slurm.conf"
MARK = "# written by sshjob's tests (tests/slurm.py)"
STATE = "/var/lib/sshjob-test-slurm"
PROGRAMS = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "squeue", "scontrol")


class SlurmError(Exception):
    pass


def run(argv, **kwargs):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=60, **kwargs)


def missing_programs():
    return [p for p in PROGRAMS if not shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]


def node_line():
    """The node as slurmd sees it (CPUs, memory), first line of `slurmd -C`."""
    lines = run(["slurmd", "-C"]).stdout.splitlines()
    line = next((line for line in lines if line.startswith("NodeName=")), None)
    if not line:
        raise SlurmError("slurmd -C printed no node line: %s" % lines)
    return line


def memory_of(line):
    return next(word for word in line.split() if word.startswith("RealMemory=")).split("=")[1]


def write_config(host):
    if os.path.exists(CONF):
        with open(CONF) as f:
            if MARK not in f.read():
                raise SlurmError("%s exists and was not written by these tests: not touching it" % CONF)
    os.makedirs(os.path.dirname(CONF), exist_ok=True)
    slurm = pwd.getpwnam("slurm")
    for sub in ("ctld", "d", "log"):
        path = os.path.join(STATE, sub)
        os.makedirs(path, exist_ok=True)
        os.chown(path, slurm.pw_uid, slurm.pw_gid)
    lines = [
        MARK,
        "ClusterName=sshjobtest",
        "SlurmctldHost=%s" % host,
        "SlurmUser=slurm",
        "AuthType=auth/munge",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "ReturnToService=2",
        "MpiDefault=none",
        "SlurmdParameters=config_overrides",  # more CPUs than this machine has: many small test jobs at once
        "KillWait=5",
        "StateSaveLocation=%s/ctld" % STATE,
        "SlurmdSpoolDir=%s/d" % STATE,
        "SlurmctldPidFile=%s/log/slurmctld.pid" % STATE,
        "SlurmdPidFile=%s/log/slurmd.pid" % STATE,
        "SlurmctldLogFile=%s/log/slurmctld.log" % STATE,
        "SlurmdLogFile=%s/log/slurmd.log" % STATE,
        "NodeName=%s CPUs=32 Boards=1 SocketsPerBoard=1 CoresPerSocket=32 ThreadsPerCore=1 RealMemory=%s State=UNKNOWN"
        % (host, memory_of(node_line())),
        "PartitionName=debug Nodes=%s Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" % host,
    ]
    with open(CONF, "w") as f:
        f.write("\n".join(lines) + "\n")


def start_munge():
    if run(["sh", "-c", "munge -n | unmunge"]).returncode == 0:
        return
    munge = pwd.getpwnam("munge")
    key = "/etc/munge/munge.key"
    if not os.path.exists(key):
        os.makedirs("/etc/munge", exist_ok=True)
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
    os.chown(key, munge.pw_uid, munge.pw_gid)
    os.chmod(key, 0o400)
    for path in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        os.makedirs(path, exist_ok=True)
        os.chown(path, munge.pw_uid, munge.pw_gid)
    result = run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force",
                  "--pid-file=/run/munge/munged.pid"])
    if result.returncode != 0:
        raise SlurmError("munged did not start: %s" % result.stdout)
    wait(lambda: run(["sh", "-c", "munge -n | unmunge"]).returncode == 0, "munge to answer")


def wait(ready, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise SlurmError("timed out waiting for %s" % what)


def node_state(host):
    return run(["sinfo", "-h", "-n", host, "-o", "%T"]).stdout.strip()


def start():
    """Start (or restart) Slurm; returns the node's name."""
    missing = missing_programs()
    if missing:
        raise SlurmError("Slurm is not installed (missing %s): apt-get install slurmctld slurmd slurm-client munge"
                         % ", ".join(missing))
    host = socket.gethostname().split(".")[0]
    stop()
    write_config(host)
    start_munge()
    for daemon in ("slurmctld", "slurmd"):  # -c: no jobs of a machine that restarted under a running Slurm
        result = run(["/usr/sbin/" + daemon] + (["-c"] if daemon == "slurmctld" else []))
        if result.returncode != 0:
            raise SlurmError("%s did not start: %s" % (daemon, result.stdout))
    wait(lambda: node_state(host) not in ("", "unknown", "unknown*"), "slurmd to register", 60)
    if node_state(host).rstrip("*") not in ("idle", "mixed", "allocated"):
        run(["scontrol", "update", "nodename=%s" % host, "state=resume"])
    wait(lambda: node_state(host) == "idle", "node %s to be idle (is %s)" % (host, node_state(host)), 60)
    return host


def start_controller():
    """Start slurmctld again after a test stopped it; the jobs live on."""
    result = run(["/usr/sbin/slurmctld"])
    if result.returncode != 0:
        raise SlurmError("slurmctld did not start: %s" % result.stdout)
    host = socket.gethostname().split(".")[0]
    wait(lambda: node_state(host) in ("idle", "mixed", "allocated"), "slurmctld to answer", 60)


def daemon_pid(daemon):
    """The pid of a running slurmctld or slurmd of these tests, or None."""
    try:
        with open("%s/log/%s.pid" % (STATE, daemon)) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def stop():
    """Cancel every job, stop slurmd and slurmctld (munged stays: it is harmless)."""
    if daemon_pid("slurmctld") and shutil.which("scancel"):  # else scancel would wait a minute for it
        for user in ["root"] + sorted(p.pw_name for p in pwd.getpwall() if p.pw_name.startswith("sshjob-")):
            run(["scancel", "--full", "--quiet", "--user", user])
    for daemon in ("slurmd", "slurmctld"):
        pid = daemon_pid(daemon)
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 20
        while time.time() < deadline and os.path.exists("/proc/%d" % pid):
            time.sleep(0.1)


if __name__ == "__main__":
    if sys.argv[1:] == ["start"]:
        print(start())
    elif sys.argv[1:] == ["stop"]:
        stop()
    else:
        sys.exit("usage: python3 tests/slurm.py start|stop")
