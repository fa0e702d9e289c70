"""The playbook and roles without hosts: syntax, conventions, the rendered systemd unit, the runner's
error paths that need no lab (no root, no network)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from xenctl.deploy import DeployError, find_ansible_playbook, run_site

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
ROLES = ("transfer_node", "workstation")
BIN = Path(sys.executable).parent
ENV = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1")


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def tiny_inventory(tmp: Path) -> Path:
    inv = tmp / "hosts.yml"
    inv.write_text(yaml.safe_dump({"all": {"children": {
        "nodes": {"hosts": {"node-01": {"ansible_host": "10.213.255.10"}}},
        "workstation": {"hosts": {"ws": {"ansible_host": "10.213.255.9"}}}}}}))
    return inv


def test_site_passes_the_syntax_check(tmp_path: Path) -> None:
    out = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "-i",
                          str(tiny_inventory(tmp_path)), str(REPO / "playbooks" / "site.yml")],
                         capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "WARNING" not in out.stderr, out.stderr


@pytest.mark.parametrize("role", ROLES)
def test_role_has_the_usual_anatomy(role: str) -> None:
    root = REPO / "roles" / role
    for part in ("defaults/main.yml", "tasks/main.yml", "handlers/main.yml", "meta/main.yml"):
        assert (root / part).is_file(), part
    assert list((root / "templates").glob("*.j2"))
    info = load(root / "meta" / "main.yml")["galaxy_info"]
    assert info["role_name"] == role and info["description"] and info["license"]
    platforms = {p["name"]: [str(v) for v in p["versions"]] for p in info["platforms"]}
    assert {"7", "8", "9"} <= set(platforms["EL"]) and platforms["Debian"]
    # OS variables: one file per family (and per EL major where they differ), same keys in each
    files = {p.stem: load(p) for p in (root / "vars").glob("*.yml")}
    assert {"Debian", "RedHat", "RedHat-7", "RedHat-8", "main"} <= set(files)
    keys = {k: sorted(v) for k, v in files.items()}
    assert len({tuple(v) for v in keys.values()}) == 1, keys
    assert all(k.startswith(f"__{role}_") for k in keys["main"])


@pytest.mark.parametrize("role", ROLES)
def test_role_variables_carry_the_role_prefix(role: str) -> None:
    root = REPO / "roles" / role
    defaults = load(root / "defaults" / "main.yml")
    bad = [k for k in defaults if not k.startswith(f"{role}_")]
    assert not bad, bad
    # facts and registered results the role creates are prefixed too
    for f in (root / "tasks").glob("*.yml"):
        for task in load(f) or []:
            for k in (task.get("ansible.builtin.set_fact") or {}):
                assert k.startswith(f"{role}_"), (f.name, k)
            if "register" in task:
                assert task["register"].startswith(f"{role}_"), (f.name, task["register"])
    # every variable the templates use is defined by the role or is a documented input
    inputs = {"ansible_managed", "groups", "hostvars", "h", "ansible_facts"}
    for t in (root / "templates").glob("*.j2"):
        for name in set(re.findall(r"\b([a-z_]+_[a-z_]+)\b", t.read_text())):
            if name.startswith(f"{role}_") and name not in inputs:
                known = name in defaults or name in {f"{role}_python", f"{role}_supervisor",
                                                     f"{role}_low_port", f"{role}_systemd_version"}
                assert known, (t.name, name)


def _tasks(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in load(path) or []:
        if "tasks" in item or "hosts" in item:  # a play
            out.append(item)
            out.extend(item.get("tasks", []))
        else:
            out.append(item)
    return out


def test_task_names_are_sentences() -> None:
    files = [REPO / "playbooks" / "site.yml"]
    for role in ROLES:
        files += sorted((REPO / "roles" / role / "tasks").glob("*.yml"))
        files += [REPO / "roles" / role / "handlers" / "main.yml"]
    seen = 0
    for f in files:
        for task in _tasks(f):
            name = task.get("name", "")
            assert re.fullmatch(r"[A-Z].*\.", name), f"{f.relative_to(REPO)}: {name!r}"
            seen += 1
    assert seen > 30


def test_repository_holds_no_secrets() -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           timeout=60, check=True).stdout.decode().split("\0")
    assert "inventory/hosts.yml" not in files  # generated, holds key paths
    assert not [f for f in files if re.search(r"(^|/)(token|.*\.key|.*\.pem|id_(rsa|ed25519))$", f)]
    leaks = []
    for f in files:
        p = REPO / f
        if not f or not p.is_file() or p.stat().st_size > 2_000_000:
            continue
        text = p.read_bytes()
        if re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", text):
            leaks.append(f)
        # a Vault payload outside a comment is a committed secret (encrypted or not, keep it out)
        if re.search(rb"^\s*\$ANSIBLE_VAULT;", text, re.M):
            leaks.append(f)
    assert not leaks, leaks


# --------------------------------------------------------------------------- rendered files

RENDER = """
- name: Render the transfer_node service files.
  hosts: localhost
  connection: local
  gather_facts: false
  vars_files: ["{repo}/roles/transfer_node/defaults/main.yml"]
  tasks:
    - name: Render each systemd unit variant.
      ansible.builtin.template:
        src: "{repo}/roles/transfer_node/templates/transferd.service.j2"
        dest: "{out}/{{{{ item.name }}}}.service"
        mode: "0644"
      loop: {units}
      vars:
        transfer_node_systemd_version: "{{{{ item.version }}}}"
        transfer_node_port: "{{{{ item.port }}}}"
    - name: Render each supervisor script variant.
      ansible.builtin.template:
        src: "{repo}/roles/transfer_node/templates/transferd-ctl.sh.j2"
        dest: "{out}/ctl-{{{{ item }}}}.sh"
        mode: "0755"
      loop: [start-stop-daemon, setpriv]
      vars:
        transfer_node_supervisor: "{{{{ item }}}}"
"""
UNITS = [
    {"name": "el7", "version": 219, "port": 7370},     # CentOS 7
    {"name": "unknown", "version": 0, "port": 7370},   # no systemd facts
    {"name": "el8", "version": 239, "port": 7370},     # Rocky / Stream 8
    {"name": "bookworm", "version": 252, "port": 7370},
    {"name": "lowport", "version": 252, "port": 443},
]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rendered")
    play = out / "render.yml"
    play.write_text(RENDER.format(repo=REPO, out=out, units=json.dumps(UNITS)))
    # ExecStart must exist for systemd-analyze: point the venv at this one
    run = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", str(play),
                          "-e", f"transfer_node_venv={BIN.parent}"],
                         capture_output=True, text=True, timeout=180, env=ENV, cwd=out,
                         check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return out


def directives(unit: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v
    return out


@pytest.mark.parametrize("variant", [u["name"] for u in UNITS])
def test_systemd_unit_is_hardened(rendered: Path, variant: str) -> None:
    spec = next(u for u in UNITS if u["name"] == variant)
    d = directives(rendered / f"{variant}.service")
    assert d["User"] == "medstream" and d["Group"] == "medstream"
    assert d["ExecStart"] == f"{BIN}/transferd --config /etc/medstream/transferd.toml"
    assert d["Restart"] == "on-failure" and d["NoNewPrivileges"] == "yes"
    assert d["UMask"] == "0027" and d["PrivateTmp"] == "yes" and d["ProtectHome"] == "yes"
    if spec["version"] >= 232:
        assert d["ProtectSystem"] == "strict" and d["ReadWritePaths"] == "/srv/medstream"
    else:  # systemd 219 knows neither "strict" nor ReadWritePaths
        assert d["ProtectSystem"] == "full" and d["ReadWriteDirectories"] == "/srv/medstream"
        assert "ReadWritePaths" not in d and "SystemCallFilter" not in d
    if spec["port"] < 1024:
        assert d["AmbientCapabilities"] == d["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    else:
        assert d["CapabilityBoundingSet"] == "" and "AmbientCapabilities" not in d


@pytest.mark.parametrize("variant", [u["name"] for u in UNITS])
def test_systemd_unit_passes_systemd_analyze(rendered: Path, variant: str) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    unit = rendered / f"{variant}.service"
    out = subprocess.run([tool, "verify", unit.name], capture_output=True, text=True,
                         timeout=60, cwd=rendered, check=False)
    # verify exits 0 even for unknown keys or bad values: it only warns ("..., ignoring")
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    if next(u for u in UNITS if u["name"] == variant)["version"] >= 250:  # --offline since 250
        sec = subprocess.run([tool, "security", "--offline=true", unit.name],
                             capture_output=True, text=True, timeout=60, cwd=rendered,
                             check=False)
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", sec.stdout)
        assert m and float(m.group(1)) <= 2.5, sec.stdout[-500:]


@pytest.mark.parametrize("tool", ["start-stop-daemon", "setpriv"])
def test_supervisor_script_is_valid_sh(rendered: Path, tool: str) -> None:
    script = rendered / f"ctl-{tool}.sh"
    assert subprocess.run(["sh", "-n", str(script)], timeout=30, check=False).returncode == 0
    text = script.read_text()
    assert f"Tool: {tool}" in text and 'UMASK="0027"' in text
    assert ("--umask" in text) == (tool == "start-stop-daemon")


# --------------------------------------------------------------------------- runner errors

def test_missing_ansible_playbook_is_reported_before_any_work(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(DeployError) as exc:
        run_site(tiny_inventory(tmp_path), state_dir=state,
                 ansible_playbook_path=tmp_path / "no-such-ansible-playbook")
    assert str(exc.value).startswith(f"ansible-playbook not found at {tmp_path}")
    assert "pip install 'medstream[deploy]'" in str(exc.value)
    assert not state.exists()  # no wheelhouse built, no state made


def test_missing_ansible_playbook_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDSTREAM_ANSIBLE_PLAYBOOK", raising=False)
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python3"))
    with pytest.raises(DeployError, match=r"^ansible-playbook not found \(not next to "):
        find_ansible_playbook()
    exe = tmp_path / "bin" / "ansible-playbook"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert find_ansible_playbook() == exe


def test_cli_says_one_line_when_ansible_playbook_is_missing(tmp_path: Path) -> None:
    env = dict(ENV, MEDSTREAM_ANSIBLE_PLAYBOOK=str(tmp_path / "nope"))
    out = subprocess.run([sys.executable, "-m", "xenctl.deploy", "site",
                          str(tiny_inventory(tmp_path)), "--state-dir", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60, env=env, cwd=REPO,
                         check=False)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ansible-playbook not found at "), lines


def test_missing_vars_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="variables file .*vault.yml does not exist"):
        run_site(tiny_inventory(tmp_path), state_dir=tmp_path / "s",
                 vars_files=[tmp_path / "vault.yml"])


def test_a_silent_hang_is_ended_by_the_timeout(tmp_path: Path) -> None:
    from xenctl.deploy import Wheelhouse

    play = tmp_path / "hang.yml"
    marker = tmp_path / "sleeping"
    play.write_text(yaml.safe_dump([{
        "name": "Hang without output.", "hosts": "localhost", "connection": "local",
        "gather_facts": False,
        "tasks": [{"name": "Sleep far longer than the timeout.",
                   "ansible.builtin.shell": f"echo $$ > {marker}; exec sleep 300"}]}]))
    payloads = set(Path(tempfile.gettempdir()).glob("ansible_*_payload_*"))
    t0 = time.monotonic()
    with pytest.raises(DeployError, match=r"ran longer than 5s \(last task: Sleep far longer"):
        run_site(tiny_inventory(tmp_path), state_dir=tmp_path / "s", playbook=play, timeout=5,
                 wheelhouse=Wheelhouse(tmp_path / "wh", "none", built=False))
    assert time.monotonic() - t0 < 60
    # the task's own process went with ansible's process group
    pid = int(marker.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = Path(f"/proc/{pid}/stat").exists() and \
        Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    assert not alive
    # and Ansible's temp files went too: its controller temp dir was private to the run, and
    # the local task was pipelined (no module file naming this test's marker in ~/.ansible/tmp)
    assert list((tmp_path / "s" / "ansible-tmp").iterdir()) == []
    home_tmp = Path.home() / ".ansible" / "tmp"
    ours = [p for p in home_tmp.glob("ansible-tmp-*/*")
            if p.is_file() and str(marker).encode() in p.read_bytes()] if home_tmp.is_dir() else []
    assert ours == []
    # nor did the killed module leave its unpacked payload in the system temp dir
    assert set(Path(tempfile.gettempdir()).glob("ansible_*_payload_*")) - payloads == set()
