"""What new users hit first (issue 8): a shell for every job owner, deep
temporary directories, a fresh machine, and messages that say what to do."""

import os
import pwd
import socket
import subprocess
import sys

import pytest
from conftest import ALICE, INTERPRETERS, ROOT, USER_PYTHON, Pool, drive_terminal, make_user, run

CAROL = "sshjob-carol"  # a batch account: her login shell is nologin


@pytest.fixture(scope="module")
def carol(users):
    make_user(CAROL, "/usr/sbin/nologin")
    return CAROL


def test_an_ordinary_owner_gets_an_interactive_shell_by_default(pool, users):
    workdir = pool.workdir(ALICE)
    job = pool.running_job("sleep", "600", user=ALICE, workdir=workdir)
    status, output = drive_terminal(
        pool.argv("client", "-debug", job, user=ALICE, env={"SHELL": "/bin/bash", "TERM": "xterm"}),
        [("pid(s)", "echo who-$(id -un)-$(pwd); tty\n"), ("who-%s-%s" % (ALICE, workdir), "exit 3\n")])
    assert status == 3, output
    assert "/dev/pts/" in output
    with open("/proc/self/mounts") as f:
        devpts = [line.split()[3] for line in f if line.split()[1:3] == ["/dev/pts", "devpts"]]
    with open(os.path.join(pool.dir, "starter.log")) as f:
        starter_log = f.read()
    if devpts and "gid=5" not in devpts[0].split(",") and "private terminals are not possible" in starter_log:
        assert "transport: builtin" in output  # this kernel gives no devpts instance of its own: the fallback
    else:  # where devpts lacks gid=5, the root starter gives sshd terminals of its own
        assert "transport: openssh" in output
        if devpts and "gid=5" not in devpts[0].split(","):
            assert "sshd sessions get a devpts instance of their own" in starter_log
    command = pool.sshjob("client", "-debug", job, "echo plain", user=ALICE)  # no terminal: sshd serves it
    assert command.stdout == "plain\n" and "transport: openssh" in command.stderr


def test_bashrc_is_read_once_by_the_sessions_own_shell(pool, users):
    """As plain ssh does: not also by the login shell through which sshd runs
    the session's forced command (that doubled the start of every session).
    A user of its own: every session of alice's, in other tests, reads hers."""
    reader = "sshjob-rc"
    make_user(reader)
    home = pwd.getpwnam(reader).pw_dir
    bashrc, reads = os.path.join(home, ".bashrc"), os.path.join(home, "bashrc-reads")
    with open(bashrc) as f:
        original = f.read()
    job = pool.running_job("sleep", "600", user=reader, workdir=pool.workdir(reader))
    try:
        with open(bashrc, "w") as f:
            f.write('echo "$SHLVL" >> ~/bashrc-reads; export FROM_BASHRC=yes\n' + original)
        command = pool.sshjob("client", job, 'echo "$FROM_BASHRC $SHLVL"', user=reader, env={"SHELL": "/bin/bash"})
        assert command.returncode == 0 and command.stdout == "yes 1\n", command.stderr
        with open(reads) as f:
            assert f.read() == "1\n"
        os.unlink(reads)
        status, output = drive_terminal(
            pool.argv("client", job, user=reader, env={"SHELL": "/bin/bash", "TERM": "xterm"}),
            [("pid(s)", "echo level-$SHLVL-$FROM_BASHRC; exit 4\n"), ("level-1-yes", None)])
        assert status == 4, output
        with open(reads) as f:
            assert f.read() == "1\n"  # the login shell reads it through ~/.profile
    finally:
        with open(bashrc, "w") as f:
            f.write(original)
        if os.path.exists(reads):
            os.unlink(reads)


@pytest.mark.parametrize("login_shell", ["/bin/bash", "/bin/dash", "/usr/bin/tcsh"])
def test_any_login_shell_and_a_jobs_stale_shell_state(pool, users, login_shell):
    """sshd runs each session through the owner's login shell: bash and dash
    read the session's script themselves, another (tcsh) hands it to
    /bin/sh.  The job's bash state (set -e exported in SHELLOPTS, a
    read-only UID) and the ssh connection it was submitted from (an
    SSH_ORIGINAL_COMMAND) are not the session's."""
    assert os.access(login_shell, os.X_OK), "%s is missing: .ci/run installs it" % login_shell
    name = "sshjob-" + os.path.basename(login_shell)
    make_user(name, login_shell)
    workdir = pool.workdir(name)
    job = pool.running_job("sleep", "600", user=name, workdir=workdir, options=(
        "--env", "SHELLOPTS=braceexpand:errexit:hashall", "--env", "UID=0", "--env", "FROM_JOB=yes",
        "--env", "SSH_ORIGINAL_COMMAND=echo stale"))
    for transport in ("openssh", "builtin"):
        command = pool.sshjob("client", "-transport", transport, job, 'false; echo "survived $FROM_JOB $(id -un)"; pwd',
                              user=name, env={"SHELL": "/bin/bash"})
        assert (command.returncode, command.stdout, command.stderr) == (0, "survived yes %s\n%s\n" % (name, workdir),
                                                                        ""), transport
        status, output = drive_terminal(
            pool.argv("client", "-transport", transport, job, user=name, env={"SHELL": "/bin/bash", "TERM": "xterm"}),
            [("pid(s)", "false; echo inside-$FROM_JOB\n"), ("inside-yes", "exit 7\n")])
        assert status == 7 and "stale" not in output, (transport, output)


def test_a_nologin_owner_gets_commands_shells_and_files(pool, carol, tmp_path):
    workdir = pool.workdir(CAROL)
    with open(os.path.join(workdir, "out.dat"), "w") as f:
        f.write("carol's results\n")
    job = pool.running_job("sleep", "600", user=CAROL, workdir=workdir)
    command = pool.sshjob("client", "-debug", job, "id -un; pwd", user=CAROL)
    assert command.stdout == "%s\n%s\n" % (CAROL, workdir), command.stderr
    assert "login shell is /usr/sbin/nologin" in command.stderr

    scp = pool.sshjob("client", "-ssh", "scp", job, "remote:out.dat", str(tmp_path), user=CAROL)
    assert scp.returncode == 1 and scp.stderr.count("\n") == 1
    assert "sshjob cp, and rsync -e 'sshjob client', copy files without it" in scp.stderr

    mine = pool.workdir(CAROL)  # a directory of carol's on this machine
    closed = pool.sshjob("cp", job + ":out.dat", str(tmp_path / "cp.dat"), user=CAROL)
    assert closed.returncode == 1 and closed.stderr.startswith("sshjob: Permission denied (")
    copied = pool.sshjob("cp", job + ":out.dat", os.path.join(mine, "cp.dat"), user=CAROL)
    assert copied.returncode == 0, copied.stderr
    rsync = run(["runuser", "-u", CAROL, "--", "env", "SSHJOB_CONFIG=" + pool.config, "rsync", "-e",
                 "%s %s client" % (USER_PYTHON, pool.pyz), job + ":out.dat", os.path.join(mine, "rsync.dat")])
    assert rsync.returncode == 0, rsync.stderr
    for name in ("cp.dat", "rsync.dat"):
        with open(os.path.join(mine, name)) as f:
            assert f.read() == "carol's results\n"

    status, output = drive_terminal(
        pool.argv("client", job, user=CAROL, env={"SHELL": "/bin/bash", "TERM": "xterm"}),
        [("pid(s)", "echo inside-$(id -un)\n"), ("inside-" + CAROL, "exit 4\n")])
    assert status == 4, output


def test_a_temporary_directory_deeper_than_a_socket_path(pool, tmp_path):
    deep = str(tmp_path / ("d" * 60) / ("e" * 60) / ("f" * 60))
    os.makedirs(deep)
    env = {"TMPDIR": deep}
    workdir = pool.workdir()
    with open(os.path.join(workdir, "out.dat"), "w") as f:
        f.write("deep\n")
    job = pool.running_job(workdir=workdir)
    assert pool.sshjob("client", job, "echo fine", env=env).stdout == "fine\n"
    scp = pool.sshjob("client", "-ssh", "scp", job, "remote:out.dat", str(tmp_path / "scp.dat"), env=env)
    assert scp.returncode == 0, scp.stderr
    cp = pool.sshjob("cp", job + ":out.dat", str(tmp_path / "cp.dat"), env=env)
    assert cp.returncode == 0, cp.stderr
    assert (tmp_path / "scp.dat").read_text() == (tmp_path / "cp.dat").read_text() == "deep\n"
    assert os.listdir(deep) == []  # and nothing is left behind


def test_a_pool_and_a_temporary_directory_with_spaces_and_percent_signs(base, tmp_path):
    """sshd and ssh read paths from configuration lines, where a space ends
    a value and % starts a token: a pool in "My Pools/100%" still works, and
    a $TMPDIR that ssh's versions would read differently is one sentence."""
    pool = Pool(base, INTERPRETERS[-1], "a pool 100%").start()
    try:
        temporary = tmp_path / "my tmp"
        temporary.mkdir()
        env = {"TMPDIR": str(temporary)}
        job = pool.running_job()
        for transport in ("openssh", "builtin"):
            result = pool.sshjob("client", "-transport", transport, job, "echo fine", env=env)
            assert (result.returncode, result.stdout) == (0, "fine\n"), result.stderr
        (tmp_path / "in.dat").write_text("spaced\n")
        cp = pool.sshjob("cp", str(tmp_path / "in.dat"), job + ":in.dat", env=env)
        assert cp.returncode == 0, cp.stderr
        scp = pool.sshjob("client", "-ssh", "scp", job, "remote:in.dat", str(temporary / "out.dat"), env=env)
        assert scp.returncode == 0, scp.stderr
        assert (temporary / "out.dat").read_text() == "spaced\n"
        assert os.listdir(str(temporary)) == ["out.dat"]  # no key directory left behind
        percent = tmp_path / "100%"  # ssh expands % in UserKnownHostsFile from 8.4 on, not before
        percent.mkdir()
        refused = pool.sshjob("client", job, "true", env={"TMPDIR": str(percent), "SSHJOB_WARM_IDLE": "0"})  # cold
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert refused.stderr == ("sshjob: OpenSSH cannot be given the path %s/sshjob-keys-%s/known_hosts: versions "
                                  "of it read %% differently; use a directory without it (for a client, set "
                                  "TMPDIR)\n" % (percent, refused.stderr.split("sshjob-keys-")[1][:8]))
        assert os.listdir(str(percent)) == []
    finally:
        pool.stop()


def test_build_without_shiv_says_what_to_install():
    result = run([sys.executable, "-S", os.path.join(ROOT, "build.py")])  # -S: no site-packages, no shiv
    assert result.returncode == 1
    assert result.stderr == (
        "build.py: shiv is not installed; install it in a virtual environment and build with that: python3 -m venv "
        "/tmp/shiv && /tmp/shiv/bin/pip install shiv==1.0.8 && /tmp/shiv/bin/python build.py (only building needs "
        "it; `python3 sshjob.py` runs without building)\n")


@pytest.mark.parametrize("python", INTERPRETERS)
def test_the_pyz_runs_with_a_home_that_cannot_be_written(base, python):
    result = run([python, os.path.join(base, "sshjob.pyz"), "--version"], env={"HOME": "/proc", "PATH": "/usr/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "sshjob 0.2.0\n"


def test_messages_name_the_cause(pool):
    job = pool.running_job()
    missing = pool.sshjob("client", "-ssh", "nosuchprog", job)
    assert missing.stderr == "sshjob: nosuchprog was not found on this machine: check its name, or install it\n"
    dsa = pool.sshjob("client", "-keygen-options", "-t dsa", job, "true")
    assert dsa.returncode == 2
    assert dsa.stderr == ("sshjob: -keygen-options '-t dsa' made a ssh-dss key, which OpenSSH's sshd no longer "
                          "accepts: use -t ed25519, rsa or ecdsa\n")


def test_an_interactive_job_as_condor_submit_i(pool):
    workdir = pool.workdir()
    status, output = drive_terminal(
        pool.argv("submit", "-i", "--workdir", workdir, "--env", "FOO=interactive", env={"SHELL": "/bin/bash"}),
        [("Welcome to job", None), ("pid(s)", "echo in-$FOO-$(pwd)\n"), ("in-interactive-" + workdir, "exit 6\n")])
    assert status == 6, output
    job = output.split("submitted interactive job ")[1].split(";")[0]
    pool.wait_state(job, "removed")


def test_remove_on_interrupt_and_hold_release(make_pool):
    pool = make_pool({"starter_slots": "1"})
    pool.running_job()
    job = pool.submit("sleep", "600")  # idle: the one slot is taken
    waiting = subprocess.Popen(pool.argv("client", "-auto-retry", "-remove-on-interrupt", job, "true"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    line = waiting.stderr.readline()
    assert "is idle, not running yet; waiting" in line, line
    waiting.send_signal(2)  # Ctrl-C
    assert waiting.wait(timeout=30) == 130
    assert "job %s removed, as -remove-on-interrupt asks" % job in waiting.stderr.read()
    assert pool.state(job) == "removed"
    other = pool.submit("sleep", "600")
    held = pool.sshjob("hold", other)
    assert held.stdout == "Job %s held: it stays in the queue until released.\n" % other
    assert "[held by root]" in pool.sshjob("q").stdout
    released = pool.sshjob("release", other)
    assert released.stdout == "Job %s released: it goes back to idle.\n" % other
    assert pool.state(other) == "idle"
    again = pool.sshjob("release", other)
    assert again.returncode == 1 and "cannot be released" in again.stderr


def test_a_held_job_is_said_at_once_and_not_waited_for(pool):
    job = pool.running_job()
    assert pool.sshjob("hold", job).returncode == 0
    for args in (["client", "-auto-retry", job, "true"], ["cp", "--auto-retry", job + ":x", "/tmp/x"]):
        result = pool.sshjob(*args, timeout=20)
        assert (result.returncode, result.stderr) == (1, "sshjob: job %s is held (held by root): it will not run until "
                                                         "it is released (sshjob release %s)\n" % (job, job))


def test_remove_on_interrupt_when_the_session_is_interrupted(pool):
    job = pool.running_job()
    session = subprocess.Popen(pool.argv("client", "-remove-on-interrupt", job, "echo in; sleep 60"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert session.stdout.readline() == "in\n"
    session.terminate()  # SIGTERM, as a batch system or a closing terminal would send
    assert session.wait(timeout=30) == 143
    assert "job %s removed, as -remove-on-interrupt asks" % job in session.stderr.read()
    pool.wait_state(job, "removed")


@pytest.mark.parametrize("args", [["-ssh", "scp -o 'x"], ["-keygen-options", "'"], ["-ssh", 'ssh "']],
                         ids=["ssh-scp", "keygen", "ssh"])
def test_bad_quoting_is_one_sentence(pool, args):
    job = pool.running_job()
    result = pool.sshjob("client", *(args + [job, "true"]))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "cannot be split into words (no closing quotation): quote it as a shell would" in result.stderr


def test_keygen_options_cannot_move_the_key_out_of_the_private_directory(pool, tmp_path):
    job = pool.running_job()
    target = tmp_path / "stolen"
    for options in ("-f %s" % target, "-t ed25519 -f%s" % target, "-y", "-R host"):
        result = pool.sshjob("client", "-keygen-options", options, job, "true")
        assert result.returncode == 2 and result.stderr.startswith("sshjob: -keygen-options may not hold -"), (
            options, result.stderr)
        assert "the session's key must stay in sshjob's private directory" in result.stderr
    assert not target.exists() and not os.path.exists(str(target) + ".pub")
    fine = pool.sshjob("client", "-keygen-options", "-t rsa -b 3072 -C note", job, "echo rsa")
    assert fine.stdout == "rsa\n", fine.stderr


def test_the_clients_locale_reaches_the_session_over_openssh(pool):
    job = pool.running_job(options=["--env", "LANG=C", "--env", "LC_TIME=C"])
    for transport in ("openssh", "builtin"):
        result = pool.sshjob("client", "-transport", transport, job, 'echo "$LANG $LC_TIME $LC_ALL"',
                             env={"LANG": "C.UTF-8", "LC_TIME": "POSIX", "LC_ALL": "C.UTF-8"})
        assert result.stdout == "C.UTF-8 POSIX C.UTF-8\n", (transport, result.stderr)
    untouched = pool.sshjob("client", job, 'echo "$LANG $LC_TIME"', env={"LANG": None})
    assert untouched.stdout == "C C\n", untouched.stderr


def test_a_large_login_environment_is_taken_and_too_large_a_one_is_one_sentence(pool):
    # a login environment with many modules loaded passes 64 KiB (a variable may hold 128 KiB at most)
    login = {"MODULE_%d" % n: "x" * (50 * 1024) for n in range(4)}
    submitted = pool.sshjob("submit", "--getenv", "--", "sleep", "600", env=login)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.split()[0]
    pool.wait_state(job, "running")
    assert pool.sshjob("client", job, "echo ${#MODULE_3}").stdout == "%d\n" % (50 * 1024)
    huge = pool.sshjob("submit", "--getenv", "--", "true", env={"MODULE_%d" % n: "x" * (60 * 1024) for n in range(10)})
    assert huge.returncode == 2 and huge.stderr.count("\n") == 1, huge.stderr
    assert huge.stderr.startswith("sshjob: the job's command and environment take 600 KiB, and a job may bring "
                                  "512 KiB: give it the variables it needs with --env NAME=VALUE rather than --getenv")


def test_a_client_whose_shell_refuses_logins_still_gets_a_shell(pool):
    job = pool.running_job()
    result = pool.sshjob("client", "-debug", job, 'echo "in $SHELL"', env={"SHELL": "/usr/sbin/nologin"})
    assert result.stdout == "in /bin/sh\n", result.stderr
    assert "$SHELL is /usr/sbin/nologin, which refuses logins: not offered to the job" in result.stderr


def test_a_home_that_cannot_hold_sshjobs_files_is_one_sentence(pool):
    job = pool.running_job()
    for args in (["ssh-config", "--install"], ["proxy", job + ".sshjob", "root"]):
        result = pool.sshjob(*args, env={"HOME": "/proc"})
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "(No such file or directory): set HOME" in result.stderr


def test_small_things_a_new_user_sees(pool, tmp_path):
    job = pool.running_job()
    helped = pool.sshjob("cp", "-help")
    assert helped.returncode == 0 and "--auto-retry" in helped.stdout
    warned = pool.sshjob("client", "-X", job, "echo x", env={"DISPLAY": None})
    assert warned.stdout == "x\n"
    assert warned.stderr == "sshjob: warning: -X, but DISPLAY is not set: there is no X display to forward\n"
    demo = pool.sshjob("demo", "true", config=False)
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout.startswith("sshjob demo: a personal pool runs in") and "\n1.0\n" not in demo.stderr


def test_a_job_whose_directory_cannot_be_made_says_why(pool, users):
    result = pool.sshjob("submit", "--workdir", "/root/nope", "--", "sleep", "600", user=ALICE)
    job = result.stdout.strip()
    pool.wait_state(job, "completed")
    row = next(line for line in pool.sshjob("q", "--all").stdout.splitlines() if line.startswith(job + " "))
    assert row.endswith("sleep 600  [its working directory /root/nope cannot be made: Permission denied]"), row
    entered = pool.sshjob("client", job, "true", user=ALICE)
    assert entered.stderr == ("sshjob: job %s has finished (its working directory /root/nope cannot be made: "
                              "Permission denied): there is nothing to enter\n" % job)


def test_a_job_whose_owner_was_deleted_is_one_sentence(pool, users):
    gone = "sshjob-gone"
    make_user(gone)
    try:
        workdir = pool.workdir(gone)
        job = pool.running_job("sleep", "600", user=gone, workdir=workdir)
        subprocess.run(["userdel", "-f", gone], check=True, stderr=subprocess.DEVNULL)
        for transport in ("openssh", "builtin"):
            result = pool.sshjob("client", "-transport", transport, job, "true")
            assert result.returncode == 1, result.stderr
            assert result.stderr == "sshjob: the owner of job %s, %s, no longer exists on %s\n" % (
                job, gone, "starter@" + socket.gethostname())
        with open(os.path.join(pool.dir, "starter.log")) as f:
            logged = f.read()
        assert "Traceback" not in logged, logged[logged.find("Traceback") - 300:][:3000]
        pool.sshjob("rm", job)
    finally:
        subprocess.run(["userdel", "-rf", gone], stderr=subprocess.DEVNULL)
