"""Bad input and failures: one sentence on stderr, a non-zero exit, no traceback."""

import os
import subprocess

import pytest


def one_sentence(result, status=1):
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sshjob: "), result.stderr
    return lines[0]


def test_unknown_and_malformed_job_ids(pool):
    assert one_sentence(pool.sshjob("client", "9999")) == "sshjob: job 9999.0 is not in the queue"
    for bad in ("abc", "1.2.3.4", "1.", "-5x", "1.x"):
        message = one_sentence(pool.sshjob("client", bad, "true"), status=2)
        assert "malformed job id" in message or "unknown option" in message
    job = pool.running_job()
    assert "has no node 3" in one_sentence(pool.sshjob("client", job + ".3", "true"))


def test_missing_job_argument_and_unknown_option(pool):
    assert "no job given" in one_sentence(pool.sshjob("client"), status=2)
    assert "unknown option -frobnicate" in one_sentence(pool.sshjob("client", "-frobnicate", "1"), status=2)
    assert "needs a value" in one_sentence(pool.sshjob("client", "-ssh"), status=2)
    assert "unknown role" in one_sentence(pool.sshjob("teleport"), status=2)


def test_job_not_yet_running_finished_and_removed(make_pool):
    pool = make_pool({"starter_slots": "1"})
    blocker = pool.running_job()
    idle = pool.submit("sleep", "600")
    message = one_sentence(pool.sshjob("client", idle, "true"))
    assert message == "sshjob: job %s is idle, not running yet: use -auto-retry to wait for it" % idle

    removed = pool.sshjob("rm", idle)
    assert removed.stdout == "Job %s marked for removal.\n" % idle
    assert one_sentence(pool.sshjob("client", idle, "true")) == (
        "sshjob: job %s has been removed: there is nothing to enter" % idle)
    done = pool.submit("true")
    pool.sshjob("rm", blocker)
    pool.wait_state(done, "completed")
    assert one_sentence(pool.sshjob("client", done, "true")) == (
        "sshjob: job %s has finished: there is nothing to enter" % done)


def test_auto_retry_waits_until_the_job_runs(make_pool):
    pool = make_pool({"starter_slots": "1"})
    blocker = pool.running_job()
    waiting = pool.submit("sleep", "600")
    proc = subprocess.Popen(pool.argv("client", "-auto-retry", waiting, "echo inside"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    assert "is idle, not running yet; waiting" in proc.stderr.readline()
    assert proc.poll() is None
    pool.sshjob("rm", blocker)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == "inside\n"

    gone = pool.submit("sleep", "600")
    proc = subprocess.Popen(pool.argv("client", "-auto-retry", gone + ".0", "true"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    assert "is idle, not running yet; waiting" in proc.stderr.readline()
    pool.sshjob("rm", gone)  # the slot is taken: it was idle, and now never runs
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.splitlines()[-1] == "sshjob: job %s has been removed: there is nothing to enter" % gone


def test_schedd_not_running_and_wrong_config(make_pool, tmp_path):
    pool = make_pool(start=False)
    message = one_sentence(pool.sshjob("client", "1", "true"))
    assert message.startswith("sshjob: cannot reach the schedd at %s/schedd.sock" % pool.dir)
    wrong = pool.sshjob("q", env={"SSHJOB_CONFIG": str(tmp_path / "nope.conf")})
    assert one_sentence(wrong) == "sshjob: the configuration %s does not exist: check SSHJOB_CONFIG or --config" % (
        tmp_path / "nope.conf")
    unset = pool.sshjob("q", config=False, env={"PATH": "/nonexistent"})  # no pool, and no Slurm to detect
    assert "no sshjob pool is configured" in one_sentence(unset)
    (tmp_path / "bad.conf").write_text("this is not ini\n")
    assert "is malformed" in one_sentence(pool.sshjob("q", env={"SSHJOB_CONFIG": str(tmp_path / "bad.conf")}))


def test_missing_programs_are_named_with_their_package(make_pool, pool):
    job = pool.running_job()
    keygen = pool.sshjob("client", job, "true", env={"SSHJOB_SSH_KEYGEN": "/nonexistent/ssh-keygen"})
    assert one_sentence(keygen) == (
        "sshjob: /nonexistent/ssh-keygen was not found on this machine: install the openssh-client package, "
        "or set ssh_keygen in the configuration")
    ssh = pool.sshjob("client", "-ssh", "/nonexistent/ssh", job, "true")
    assert "install the openssh-client package" in one_sentence(ssh)

    nosshd = make_pool({"sshd": "/nonexistent/sshd"})
    job = nosshd.running_job()
    message = one_sentence(nosshd.sshjob("client", "-transport", "openssh", job, "true"))
    assert message.startswith("sshjob: /nonexistent/sshd was not found on node starter@")
    assert "install the openssh-server package" in message


def test_ssh_to_job_switches(make_pool):
    schedd_off = make_pool({"schedd_enable_ssh_to_job": "false"})
    job = schedd_off.running_job()
    assert "disabled on schedd" in one_sentence(schedd_off.sshjob("client", job, "true"))
    starter_off = make_pool({"enable_ssh_to_job": "no"})
    job = starter_off.running_job()
    assert "enable_ssh_to_job = false" in one_sentence(starter_off.sshjob("client", job, "true"))


def test_session_of_a_removed_job_ends_with_a_sentence(pool):
    job = pool.running_job()
    proc = subprocess.Popen(pool.argv("client", job, "echo in; sleep 120"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    assert proc.stdout.readline() == "in\n"
    pool.sshjob("rm", job)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert err.splitlines()[-1] == "sshjob: the session ended because job %s was removed" % job


@pytest.mark.parametrize("role", ["submit", "q", "rm", "pool"])
def test_queue_commands_reject_bad_input(pool, role):
    args = {"submit": ["--env", "NOEQUALS", "--", "true"], "q": ["--bogus"], "rm": ["x.y"],
            "pool": ["explode", "--dir", "/tmp"]}[role]
    result = pool.sshjob(role, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip()


def test_the_demo_needs_no_configuration(base, pool, tmp_path):
    os.chmod(str(tmp_path), 0o755)
    result = pool.sshjob("demo", config=False, timeout=120, env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "hello from the job: root in %s/sshjob-demo-" % tmp_path in result.stdout
    assert os.listdir(str(tmp_path)) == []
