"""cloud.yml loading: precedence, located errors, TLS pins, password sources (no sockets)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from xenctl.errors import CredentialsError, SpecError
from xenctl.spec import (
    GiB,
    MiB,
    Secret,
    host_url,
    load_spec,
    normalize_fingerprint,
    parse_size,
    resolve_password,
)

FP = "AB:" * 31 + "CD"
FP_HEX = ("ab" * 31) + "cd"

CLOUD = f"""\
cloud: medstream
pool:
  name: hospital
  master: 10.213.1.1
  members: [10.213.1.2, "https://10.213.1.3:8443"]
  tls:
    fingerprints:
      10.213.1.1: "sha256:{FP}"
nodes:
  count: 5
  template: "CentOS 7 (medstream node)"
  memory: 2GiB
  network: xenbr0
  cidr: 10.213.5.0/24
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cloud.yml"
    p.write_text(text)
    return p


def test_file_values_and_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, CLOUD), env={})
    assert spec.pool.master == "https://10.213.1.1:443"
    assert spec.pool.members == ("https://10.213.1.2:443", "https://10.213.1.3:8443")
    assert spec.pool.name == "hospital"
    assert spec.nodes.memory == 2 * GiB
    assert spec.nodes.vcpus == 1  # default
    assert spec.nodes.cidr == ipaddress.ip_network("10.213.5.0/24")
    assert spec.pool.tls.pins_for("10.213.1.1") == (FP_HEX,)
    assert spec.pool.tls.pins_for("10.213.1.2") == ()
    assert not spec.pool.tls.insecure


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, CLOUD)
    env = {"XENCTL_MEMORY": "1GiB", "XENSERVER_HOST": "10.213.9.9", "XENCTL_NODES": "7"}
    spec = load_spec(path, env=env)
    assert spec.nodes.memory == GiB
    assert spec.pool.master == "https://10.213.9.9:443"
    assert spec.nodes.count == 7
    spec = load_spec(path, env=env, overrides={"nodes.memory": "512MiB", "nodes.count": None})
    assert spec.nodes.memory == 512 * MiB
    assert spec.nodes.count == 7  # None = flag not given
    # XENCTL_ wins over the XENSERVER_ alias
    spec = load_spec(path, env={**env, "XENCTL_MASTER": "10.213.8.8"})
    assert spec.pool.master == "https://10.213.8.8:443"


@pytest.mark.parametrize(
    ("bad", "where", "words"),
    [
        ("  memory: lots\n", ":13:", "nodes.memory: 'lots' is not a size"),
        ("  placement: random\n", ":13:", "nodes.placement: 'random' must be spread or pack"),
        ("  vcpus: 0\n", ":13:", "nodes.vcpus: 0 is out of range"),
        ("  ip_timeout: soon\n", ":13:", "nodes.ip_timeout: 'soon' is not a number"),
        ("  colour: blue\n", ":13:", "nodes.colour: unknown key"),
    ],
)
def test_errors_are_located(tmp_path: Path, bad: str, where: str, words: str) -> None:
    text = CLOUD.replace("  network: xenbr0\n", bad)
    with pytest.raises(SpecError) as exc:
        load_spec(write(tmp_path, text), env={})
    msg = str(exc.value)
    assert msg.startswith(str(tmp_path / "cloud.yml") + where), msg
    assert words in msg


def test_env_errors_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^XENCTL_VCPUS: nodes.vcpus: 'x' is not a whole number"):
        load_spec(write(tmp_path, CLOUD), env={"XENCTL_VCPUS": "x"})


def test_password_in_file_is_refused(tmp_path: Path) -> None:
    text = CLOUD.replace("  name: hospital\n", "  name: hospital\n  password: hunter2\n")
    with pytest.raises(SpecError, match=r"cloud.yml:4: pool.password: a password does not belong"):
        load_spec(write(tmp_path, text), env={})


def test_plain_http_needs_insecure(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="plain http sends the password in clear"):
        load_spec(None, env={"XENCTL_MASTER": "http://10.213.1.1"})
    spec = load_spec(None, env={"XENCTL_MASTER": "http://10.213.1.1", "XENCTL_INSECURE": "1"})
    assert spec.pool.master == "http://10.213.1.1:80"
    assert spec.pool.tls.insecure


def test_missing_master_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="pool.master: missing"):
        load_spec(None, env={})
    with pytest.raises(SpecError, match=r"cloud.yml:3: not valid YAML"):
        load_spec(write(tmp_path, "pool:\n  master: [\n"), env={})
    with pytest.raises(SpecError, match="master .* is also listed as a member"):
        load_spec(None, env={"XENCTL_MASTER": "h1", "XENCTL_MEMBERS": "h2,h1"})


def test_fingerprints_forms() -> None:
    assert normalize_fingerprint(FP) == FP_HEX
    assert normalize_fingerprint("SHA256:" + FP_HEX.upper()) == FP_HEX
    with pytest.raises(ValueError):
        normalize_fingerprint("abcd")
    spec = load_spec(None, env={"XENCTL_MASTER": "h1",
                                "XENCTL_FINGERPRINTS": f"h1={FP},{'00' * 32}"})
    assert spec.pool.tls.pins_for("h1") == (FP_HEX, "00" * 32)
    assert spec.pool.tls.pins_for("h2") == ("00" * 32,)


def test_sizes_and_urls() -> None:
    assert parse_size("1GiB") == GiB
    assert parse_size("1G") == GiB
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError):
        parse_size("-1")
    assert host_url("[fd00::1]:8443") == "https://[fd00::1]:8443"
    with pytest.raises(ValueError):
        host_url("ftp://x")
    with pytest.raises(ValueError):
        host_url("https://x/api")


def test_secret_is_masked() -> None:
    s = Secret("hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in f"{s}"
    assert s.reveal() == "hunter2"


def test_password_sources_in_order(tmp_path: Path) -> None:
    spec = load_spec(None, env={"XENCTL_MASTER": "h1"})
    pwfile = tmp_path / "pw"
    pwfile.write_text("from-file\n")
    pwfile.chmod(0o600)
    xe_style = tmp_path / "xe"
    xe_style.write_text("root\nfrom-xe-file\n")
    xe_style.chmod(0o600)
    env = {"XENCTL_PASSWORD": "from-env", "XENCTL_PASSWORD_FILE": str(xe_style)}
    assert resolve_password(spec.pool, env=env, password_file=pwfile).reveal() == "from-file"
    assert resolve_password(spec.pool, env=env).reveal() == "from-env"
    assert resolve_password(spec.pool, env={"XENSERVER_PASSWORD": "x"}).reveal() == "x"
    env.pop("XENCTL_PASSWORD")
    assert resolve_password(spec.pool, env=env).reveal() == "from-xe-file"
    assert resolve_password(spec.pool, env={}, prompt=lambda _t: "typed").reveal() == "typed"
    with pytest.raises(CredentialsError, match="no password"):
        resolve_password(spec.pool, env={})
    spec2 = load_spec(None, env={"XENCTL_MASTER": "h1"},
                      overrides={"pool.password_env": "MY_PW"})
    with pytest.raises(CredentialsError, match="MY_PW"):
        resolve_password(spec2.pool, env={})
    assert resolve_password(spec2.pool, env={"MY_PW": "z"}).reveal() == "z"


def test_example_cloud_yml_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "cloud.yml"
    spec = load_spec(example, env={})
    assert spec.nodes.count == 30 and spec.nodes.placement == "spread"
    assert len(spec.pool.all_hosts) == 3
    assert all(len(spec.pool.tls.pins_for(h.split("//")[1].split(":")[0])) == 1
               for h in spec.pool.all_hosts)
