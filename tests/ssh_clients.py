"""SSH clients that are not OpenSSH, for the ssh-hosts tests: each reads the
user's ~/.ssh/config as its library does, runs the Host block's ProxyCommand
and runs one command in the job.  The tests run this file's source as the
test user (`python3 -c SOURCE KIND HOST COMMAND`); its exit status is the
command's.

They pin the job's host key as the README tells their users to: from the
Host block's UserKnownHostsFile, read when the key is checked, by which time
the proxy has written the key the job's site vouches for."""

import asyncio
import os
import socket
import subprocess
import sys

CONFIG = os.environ.get("SSHJOB_TEST_SSH_CONFIG") or os.path.expanduser("~/.ssh/config")  # a test's own, or ~'s


def paramiko_config(host):
    import paramiko

    with open(CONFIG) as f:
        config = paramiko.SSHConfig()
        config.parse(f)
    return config.lookup(host)


def paramiko_pinned(config):
    """The Host block's pinned keys: its KnownHostsCommand's (a laptop's
    block), else its UserKnownHostsFile's."""
    import shlex

    import paramiko

    def known_keys(hostname):
        command = config.get("knownhostscommand")
        if command:
            said = subprocess.run(shlex.split(command.replace("%H", hostname)), stdout=subprocess.PIPE,
                                  universal_newlines=True).stdout
            entries = [paramiko.hostkeys.HostKeyEntry.from_line(line) for line in said.splitlines()]
            return {entry.key.get_name(): entry.key for entry in entries if entry}
        return paramiko.HostKeys(config["userknownhostsfile"].strip('"')).lookup(hostname) or {}

    class Pinned(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            if known_keys(hostname).get(key.get_name()) != key:
                raise paramiko.SSHException("the host key of %s is not the one the proxy pinned" % hostname)

    return Pinned()


def paramiko_command(host, command, sock=None):
    """paramiko's SSHClient, as Fabric and pyinfra use it."""
    import paramiko

    config = paramiko_config(host)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko_pinned(config))
    client.connect(config["hostname"], username=config.get("user", os.environ["USER"]),
                   key_filename=config["identityfile"][0].strip('"'), look_for_keys=False, allow_agent=False,
                   sock=sock or paramiko.ProxyCommand(config["proxycommand"]))
    _, out, err = client.exec_command(command)
    sys.stdout.write(out.read().decode())
    sys.stderr.write(err.read().decode())
    status = out.channel.recv_exit_status()
    client.close()
    return status


def socketpair_command(host, command):
    """A client that runs the ProxyCommand on a socket pair and never takes
    a passed descriptor: paramiko speaking over the pair's other end."""
    import shlex

    ours, theirs = socket.socketpair()
    proxy = subprocess.Popen(shlex.split(paramiko_config(host)["proxycommand"]), stdin=theirs, stdout=theirs)
    theirs.close()
    try:
        return paramiko_command(host, command, sock=ours)
    finally:
        ours.close()
        proxy.wait()


def asyncssh_command(host, command):
    """asyncssh, which reads ProxyCommand from the config it is given.  It
    reads known hosts as the connection starts, before the proxy has pinned
    the job's key: the key is checked when it is shown, by the client."""
    import asyncssh

    known = paramiko_config(host)["userknownhostsfile"].strip('"')

    class Pinned(asyncssh.SSHClient):
        def validate_host_public_key(self, name, address, port, key):
            return key in asyncssh.read_known_hosts(known).match(name, "", None)[0]

    async def run():
        async with asyncssh.connect(host, config=[CONFIG], known_hosts=lambda *_: ([], [], []),
                                    client_factory=Pinned) as conn:
            result = await conn.run(command)
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
            return result.exit_status

    return asyncio.get_event_loop().run_until_complete(run())


if __name__ == "__main__":
    kind, host, command = sys.argv[1:]
    sys.exit({"paramiko": paramiko_command, "socketpair": socketpair_command,
              "asyncssh": asyncssh_command}[kind](host, command))
