"""site.yml against real lab hosts (sshd in network namespaces): deploy, use, redeploy, verify."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from labdeploy import N_NODES, Deployed

from transfer.placement import place
from xenctl.deploy import DeployError, run_site

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
CLIENT = "/opt/medstream/venv/bin/transfer"
PIDFILE = "/run/medstream/transferd.pid"
RESTART = "Restart transferd under the pidfile supervisor."


def daemon_state(node: Any) -> tuple[int, int]:
    """(pid from the pidfile, number of starts logged) of a node's transferd."""
    pid = int(node.run(["cat", PIDFILE]).stdout.strip())
    log = (node.upper("var") / "log" / "medstream" / "transferd.log").read_text()
    return pid, log.count(" serving ")


def node_config(node: Any) -> dict[str, Any]:
    text = (node.upper("etc") / "medstream" / "transferd.toml").read_text()
    return dict(tomllib.loads(text)["transferd"])


def ssh(d: Deployed, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(d.workstation.ssh_argv("sh", "-c", shlex.quote(script)),
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_first_run_deploys_every_host(deployed: Deployed) -> None:
    recap = deployed.first.recap
    assert sorted(recap) == sorted(["localhost", "workstation",
                                    *[n.name for n in deployed.nodes]])
    assert all(r.failed == 0 and r.unreachable == 0 for r in recap.values())
    assert all(recap[n.name].changed > 0 for n in deployed.nodes)
    assert any("Wait until transferd accepts connections." in p for p in deployed.progress)
    pki = deployed.state / "pki"
    assert json.loads((pki / "issued.json").read_text()) == {n.name: n.ip for n in deployed.nodes}
    assert (deployed.state / "token").stat().st_mode & 0o777 == 0o600


def test_upload_from_the_workstation_reaches_the_nodes(deployed: Deployed) -> None:
    script = f"""set -e
    rm -rf /root/smoke && mkdir -p /root/smoke
    {CLIENT} synth /root/smoke/in --slices 12 --rows 64 --cols 64 >/dev/null
    {CLIENT} upload /root/smoke/in --json-report /root/smoke/report.json >/dev/null
    {CLIENT} ls --json > /root/smoke/ls.json
    {CLIENT} get /root/smoke/out --all >/dev/null
    cat /root/smoke/report.json
    """
    out = ssh(deployed, script)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["total"]["files"] == 12 and report["total"]["failed"] == 0
    # what each node holds, seen by the nodes themselves (via the client's config)
    held = json.loads((deployed.workstation.upper("root") / "smoke" / "ls.json").read_text())
    counts = {node: len(rows) for node, rows in held.items()}
    assert sum(counts.values()) == 12
    assert len([c for c in counts.values() if c]) >= 2, counts
    # every instance sits on the node rendezvous placement chose (nodes keyed by name)
    names = [n.name for n in deployed.nodes]
    for node, rows in held.items():
        for row in rows:
            assert place(row["sop"], names, 1) == [node], (row["sop"], node)
    # the files fetched back are byte-identical to what was sent
    root = deployed.workstation.upper("root") / "smoke"
    sent = sorted(p.read_bytes() for p in (root / "in").rglob("*") if p.is_file())
    back = sorted(p.read_bytes() for p in (root / "out").rglob("*.dcm"))
    assert sent == back


def test_stored_objects_are_on_the_nodes_disks(deployed: Deployed) -> None:
    total = 0
    for node in deployed.nodes:
        store = node.upper("srv") / "medstream"
        files = [p for p in store.rglob("*") if p.is_file() and p.suffix == ".dcm"]
        total += len(files)
    assert total == 12


def test_second_run_changes_nothing(deployed: Deployed) -> None:
    again = run_site(deployed.inventory, state_dir=deployed.state, wheelhouse=deployed.wheelhouse)
    assert not again.changed, {h: r.changed for h, r in again.recap.items()}
    assert all(r.failed == 0 and r.unreachable == 0 for r in again.recap.values())
    assert len(again.recap) == N_NODES + 2


def test_config_change_restarts_the_daemon_once(deployed: Deployed) -> None:
    d = deployed
    before = {n.name: daemon_state(n) for n in d.nodes}
    progress: list[str] = []
    changed = run_site(d.inventory, state_dir=d.state, wheelhouse=d.wheelhouse,
                       extra_vars={"transfer_node_idle_timeout": 45.0}, progress=progress.append)
    # per node: the configuration file and the one restart; nothing else anywhere
    assert {h: r.changed for h, r in changed.recap.items()} == {
        "localhost": 0, d.workstation.name: 0, **{n.name: 2 for n in d.nodes}}
    assert len([p for p in progress if p.endswith(f" : {RESTART}")]) == 1  # one handler run
    for n in d.nodes:
        pid, starts = daemon_state(n)
        assert pid != before[n.name][0], n.name
        assert starts == before[n.name][1] + 1, n.name  # started exactly once more
        assert node_config(n)["idle_timeout"] == 45.0
    again = run_site(d.inventory, state_dir=d.state, wheelhouse=d.wheelhouse,
                     extra_vars={"transfer_node_idle_timeout": 45.0})
    assert not again.changed, {h: r.changed for h, r in again.recap.items()}
    assert {n.name: daemon_state(n)[1] for n in d.nodes} == {
        n.name: before[n.name][1] + 1 for n in d.nodes}
    # back to the defaults for the tests that follow (one more restart)
    back = run_site(d.inventory, state_dir=d.state, wheelhouse=d.wheelhouse)
    assert all(back.recap[n.name].changed == 2 for n in d.nodes)
    assert all(node_config(n)["idle_timeout"] == 60.0 for n in d.nodes)


def test_token_from_ansible_vault(deployed: Deployed, tmp_path: Path) -> None:
    d = deployed
    password = tmp_path / "vault-password"
    password.write_text(secrets.token_hex(16) + "\n")
    password.chmod(0o600)
    token = secrets.token_urlsafe(32)
    enc = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-vault")), "encrypt_string",
         "--vault-password-file", str(password), "--stdin-name", "medstream_token"],
        input=token, capture_output=True, text=True, timeout=120, check=True)
    assert token not in enc.stdout and "$ANSIBLE_VAULT" in enc.stdout
    vault_vars = tmp_path / "vault.yml"
    vault_vars.write_text(enc.stdout)
    before = {n.name: daemon_state(n)[1] for n in d.nodes}
    res = run_site(d.inventory, state_dir=d.state, wheelhouse=d.wheelhouse,
                   vars_files=[vault_vars], vault_password_file=password)
    assert res.changed
    for n in d.nodes:
        assert (n.upper("etc") / "medstream" / "token").read_text() == token + "\n"
        assert daemon_state(n)[1] == before[n.name] + 1, n.name  # restarted once for it
    assert (d.workstation.upper("etc") / "medstream" / "token").read_text() == token + "\n"
    assert res.log is not None and token not in res.log.read_text()  # no_log held
    # the client, with the new token, is accepted by every node
    out = ssh(d, f"{CLIENT} ls --json")
    assert out.returncode == 0, out.stderr
    assert sorted(json.loads(out.stdout)) == sorted(n.name for n in d.nodes)
    again = run_site(d.inventory, state_dir=d.state, wheelhouse=d.wheelhouse,
                     vars_files=[vault_vars], vault_password_file=password)
    assert not again.changed, {h: r.changed for h, r in again.recap.items()}


def test_testinfra_suite_passes_on_the_same_inventory(deployed: Deployed) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
               ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO / "tests" / "infra"), "-q", "-p",
         "no:cacheprovider", "--ansible-inventory", str(deployed.inventory), "-m", "infra",
         "-o", "addopts="],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-1000:]


def test_failure_names_the_host_and_task(deployed: Deployed) -> None:
    node = deployed.nodes[0].name
    with pytest.raises(DeployError) as exc:
        run_site(deployed.inventory, state_dir=deployed.state, wheelhouse=deployed.wheelhouse,
                 limit=node, extra_vars={"transfer_node_storage_mode": "not-a-mode"})
    assert exc.value.host == node
    assert "storage root" in exc.value.task
    assert node in str(exc.value) and "storage root" in str(exc.value)


def test_unreachable_host_is_named(deployed: Deployed, tmp_path: Path) -> None:
    import yaml

    inv = yaml.safe_load(deployed.inventory.read_text())
    nodes = inv["all"]["children"]["nodes"]["hosts"]
    first = deployed.nodes[0]
    # a node whose sshd port is closed: refused at once (lab addresses only)
    nodes["ghost"] = {**nodes[first.name], "ansible_port": 1, "medstream_node_name": "ghost"}
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    progress: list[str] = []
    with pytest.raises(DeployError) as exc:  # a fresh state dir: the lab's PKI stays as it is
        run_site(path, state_dir=tmp_path / "state", wheelhouse=deployed.wheelhouse,
                 limit="ghost", progress=progress.append)
    err = exc.value
    assert err.host == "ghost" and err.failed_hosts == ["ghost"]
    assert str(err).startswith("host ghost is unreachable over SSH")
    assert "Connection refused" in str(err) and "ansible_host" in str(err)
    assert any(p.startswith("deploy: UNREACHABLE ghost: ") for p in progress)


def test_new_wheel_upgrades_and_restarts_every_daemon(deployed: Deployed, tmp_path: Path) -> None:
    """A changed checkout (a new medstream wheel) is installed and every daemon restarted on it;
    the nodes serve again, and going back to the first wheel works the same way."""
    import shutil

    from xenctl.deploy import _source_files, build_wheelhouse

    d = deployed
    src = tmp_path / "src"
    for f in _source_files(REPO):  # exactly what a wheel is built from
        dest = src / f.relative_to(REPO)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    with (src / "transfer" / "__init__.py").open("a") as f:
        f.write("# a new build for the upgrade test\n")
    new = build_wheelhouse(d.wheelhouse.path.parent, src=src)
    assert new.build_id != d.wheelhouse.build_id
    for wheelhouse in (new, d.wheelhouse):
        before = {n.name: daemon_state(n) for n in d.nodes}
        res = run_site(d.inventory, state_dir=d.state, wheelhouse=wheelhouse)
        assert all(r.failed == 0 for r in res.recap.values()), res.recap
        for n in d.nodes:
            pid, starts = daemon_state(n)
            assert pid != before[n.name][0] and starts == before[n.name][1] + 1, n.name
        out = ssh(d, f"{CLIENT} ls --json >/dev/null")
        assert out.returncode == 0, out.stderr
