"""End to end: sessions inside jobs, as a user types them (issue 2).

Each test runs the built pyz against a pool of real daemons, with the real
ssh, sshd, scp, sftp and rsync, under the oldest and the newest interpreter."""

import glob
import os
import signal
import subprocess
import time

from conftest import drive_terminal, run, wait_for, x_display


def proc_cmdline(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return f.read().split(b"\0")


def test_remote_command_gets_job_environment_workdir_pids_and_exit_status(pool):
    workdir = pool.workdir()
    job = pool.running_job("sleep", "600", workdir=workdir, options=["--env", "FOO=bar"])
    result = pool.sshjob("client", job, 'echo $FOO; pwd; echo $_SSHJOB_JOB_PIDS; echo oops >&2; exit 7')
    assert result.returncode == 7, result.stderr
    foo, cwd, pids = result.stdout.splitlines()
    assert (foo, cwd) == ("bar", workdir)
    first = int(pids.split()[0])
    assert proc_cmdline(first)[:2] == [b"sleep", b"600"]
    assert result.stderr == "oops\n"


def test_job_id_forms_and_failures_of_the_remote_command_pass_through(pool):
    job = pool.running_job()
    cluster = job.split(".")[0]
    for form in (cluster, job, job + ".0"):
        assert pool.sshjob("client", form, "exit 3").returncode == 3
    result = pool.sshjob("client", cluster, "no-such-command-here")
    assert result.returncode == 127
    assert "no-such-command-here" in result.stderr
    assert pool.sshjob("client", cluster, "kill -9 $$").returncode == 255  # ssh reports a killed shell so


def test_stdin_streams_to_the_remote_command(pool):
    job = pool.running_job()
    data = "".join("line %d\n" % i for i in range(20000))
    result = pool.sshjob("client", job, "wc -l", input=data)
    assert result.stdout.strip() == "20000"


def test_scp_sftp_and_rsync_as_in_the_manual_page(pool, tmp_path):
    workdir = pool.workdir()
    with open(os.path.join(workdir, "outputfile.dat"), "w") as f:
        f.write("the job's results\n")
    job = pool.running_job(workdir=workdir)
    cluster = job.split(".")[0]

    scp = pool.sshjob("-debug", "client", "-ssh", "scp", cluster, "remote:outputfile.dat", str(tmp_path / "scp.dat"))
    assert scp.returncode == 0, scp.stderr
    assert (tmp_path / "scp.dat").read_text() == "the job's results\n"

    sftp = pool.sshjob("client", "-ssh", "sftp", job, input="get outputfile.dat %s\n" % (tmp_path / "sftp.dat"))
    assert sftp.returncode == 0, sftp.stderr
    assert (tmp_path / "sftp.dat").read_text() == "the job's results\n"

    rsync = run(["rsync", "-v", "-e", " ".join(pool.argv("client")), job + ":outputfile.dat", str(tmp_path / "r.dat")])
    assert rsync.returncode == 0, rsync.stderr
    assert (tmp_path / "r.dat").read_text() == "the job's results\n"

    (tmp_path / "upload.txt").write_text("uploaded\n")
    up = pool.sshjob("client", "--ssh=scp", job, str(tmp_path / "upload.txt"), "anyhost:upload.txt")
    assert up.returncode == 0, up.stderr
    with open(os.path.join(workdir, "upload.txt")) as f:
        assert f.read() == "uploaded\n"


def test_shells_option_and_shell_default(pool):
    job = pool.running_job()
    chosen = pool.sshjob("client", "-shells", "/no/such/shell,/bin/bash,/bin/sh", job, "echo $0")
    assert chosen.stdout.strip() == "/bin/bash"
    default = pool.sshjob("client", job, "echo $0", env={"SHELL": "/bin/bash"})
    assert default.stdout.strip() == "/bin/bash"
    fallback = pool.sshjob("client", "--shells", "/no/such/shell", job, "echo $0", env={"SHELL": "/no/shell"})
    assert fallback.stdout.strip() == "/bin/sh"


def test_keygen_options_make_the_session_key(pool, tmp_path):
    job = pool.running_job()
    result = pool.sshjob("client", "-debug", "-keygen-options", "-t rsa -b 2048", job, 'cat "$SSH_USER_AUTH"',
                         env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("publickey ssh-rsa ")
    assert "-t rsa -b 2048" in result.stderr
    bad = pool.sshjob("client", "-keygen-options", "-t nosuchtype", job, "true",
                      env={"SSHJOB_WARM_IDLE": "0"})  # cold: a session through the first one's ssh makes no key
    assert bad.returncode != 0 and bad.stderr.startswith("sshjob: ssh-keygen failed")
    assert os.listdir(str(tmp_path)) == []


def test_help_debug_and_two_dash_options(pool):
    for flag in ("-help", "--help"):
        result = pool.sshjob("client", flag)
        assert result.returncode == 0 and "-auto-retry" in result.stdout and "-keygen-options" in result.stdout
    job = pool.running_job()
    debug = pool.sshjob("client", "--debug", job, "true")
    assert debug.returncode == 0
    assert "transport: openssh" in debug.stderr
    assert "the starter accepted the ticket" in debug.stderr


def test_name_and_pool_options(pool):
    job = pool.running_job()
    by_pool = pool.sshjob("client", "-pool", pool.dir, job, "echo pooled", config=False)
    assert by_pool.stdout == "pooled\n", by_pool.stderr
    name = run(["hostname"]).stdout.strip()
    by_name = pool.sshjob("client", "-name", name, job, "echo named")
    assert by_name.stdout == "named\n", by_name.stderr
    wrong = pool.sshjob("client", "-name", "elsewhere", job, "true")
    assert wrong.returncode == 1
    assert wrong.stderr == "sshjob: there is no schedd named 'elsewhere' in this pool\n"


def test_x11_forwarding(pool, tmp_path):
    with x_display() as display:
        job = pool.running_job()
        result = pool.sshjob("client", "-X", job, 'echo "$DISPLAY"; xdpyinfo | grep -c "^screen #"',
                             env={"DISPLAY": display, "XAUTHORITY": str(tmp_path / "xauth")})
        assert result.returncode == 0, result.stderr
        remote_display, screens = result.stdout.split()
        assert remote_display.startswith("localhost:") and screens == "1"
        without = pool.sshjob("client", job, 'echo "[$DISPLAY]"', env={"DISPLAY": display})
        assert without.stdout == "[]\n"


def test_interactive_login_shell_on_a_terminal(pool):
    workdir = pool.workdir()
    job = pool.running_job(workdir=workdir, options=["--env", "FOO=bar"])
    status, output = drive_terminal(
        pool.argv("client", job, env={"SHELL": "/bin/bash", "TERM": "xterm"}),
        [("Welcome to job %s" % job, None), ("pid(s)", "echo marker-$FOO-$(pwd) ; tty ; stty size\n"),
         ("marker-bar-" + workdir, None), ("24 80", "exit 5\n")],
    )
    assert status == 5, output
    assert "/dev/pts/" in output
    assert "Your job is running with pid(s)" in output


def test_temporary_key_directory_removed_on_signals(pool, tmp_path):
    job = pool.running_job()
    cold = {"TMPDIR": str(tmp_path), "SSHJOB_WARM_IDLE": "0"}  # each makes a key, none goes through another's ssh
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        proc = subprocess.Popen(pool.argv("client", job, "sleep 60", env=cold),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        deadline = time.time() + 20
        while not glob.glob(str(tmp_path / "sshjob-*" / "id.pub")):
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)  # ssh is connected by now
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 128 + signum, err
        assert "interrupted" in err
        assert os.listdir(str(tmp_path)) == []
    ok = pool.sshjob("client", job, "true", env=cold)
    assert ok.returncode == 0 and os.listdir(str(tmp_path)) == []


def test_a_killed_clients_key_directory_is_removed_by_a_later_client(pool, tmp_path):
    """SIGKILL leaves no chance to clean up: a later client does it, for a
    directory whose client holds no lock in it, and never for a live
    client's, however old (its process may be on another host sharing
    $TMPDIR, where no pid says anything)."""
    job = pool.running_job()
    env = {"TMPDIR": str(tmp_path), "SSHJOB_WARM_IDLE": "0"}  # each makes a key, none goes through another's ssh

    def client_in_session():
        before = set(os.listdir(str(tmp_path)))
        proc = subprocess.Popen(pool.argv("client", job, "sleep 60", env=env), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

        def new_keys():
            return [n for n in set(os.listdir(str(tmp_path))) - before if (tmp_path / n / "id.pub").exists()]

        wait_for(new_keys, what="the client's key")
        (made,) = new_keys()
        an_hour_ago = time.time() - 3600
        os.utime(str(tmp_path / made), (an_hour_ago, an_hour_ago))
        return proc, made

    killed, orphan = client_in_session()
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    living, alive = client_in_session()
    try:
        assert sorted(os.listdir(str(tmp_path))) == sorted([orphan, alive])
        assert pool.sshjob("client", job, "true", env=env).returncode == 0
        assert os.listdir(str(tmp_path)) == [alive]
    finally:
        os.killpg(living.pid, signal.SIGKILL)
        living.wait()


def test_the_jobs_exported_bash_functions_reach_the_job_and_its_sessions(pool):
    """`export -f` (Lmod's `module`) puts a function in a variable that
    /bin/sh cannot name: dash drops it, and must not lose it on the way."""
    greet = {"BASH_FUNC_greet%%": '() {  echo "greetings, $1"\n}'}
    workdir = pool.workdir()
    job = pool.running_job("bash", "-c", "greet job > greet.out; exec sleep 600", workdir=workdir,
                           options=["--env", "%s=%s" % next(iter(greet.items()))])
    greeting = os.path.join(workdir, "greet.out")
    wait_for(lambda: os.path.exists(greeting) and os.path.getsize(greeting), what="the job's greeting")
    with open(greeting) as f:
        assert f.read() == "greetings, job\n"
    for transport in ("openssh", "builtin"):
        result = pool.sshjob("client", "-transport", transport, job, "greet " + transport, env={"SHELL": "/bin/bash"})
        assert (result.returncode, result.stdout) == (0, "greetings, %s\n" % transport), result.stderr


def test_two_sessions_at_once(pool):
    job = pool.running_job()
    first = subprocess.Popen(pool.argv("client", job, "sleep 2; echo first"), stdout=subprocess.PIPE,
                             universal_newlines=True)
    second = pool.sshjob("client", job, "echo second")
    assert second.stdout == "second\n"
    assert first.communicate(timeout=30)[0] == "first\n"


def test_sshjob_py_runs_without_building(pool):
    job = pool.running_job()
    argv = pool.argv("client", job, "echo from-source")
    argv[argv.index(pool.pyz)] = os.path.join(os.path.dirname(os.path.dirname(__file__)), "sshjob.py")
    result = run(argv)
    assert result.stdout == "from-source\n", result.stderr
