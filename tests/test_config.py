"""The config file becomes frozen dataclasses; every key has a default; diagnostics show 3 lines."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from nfrewrite.config.diagnostics import Diagnostic
from nfrewrite.config.settings import (
    Bridge,
    Config,
    FlowsConfig,
    MetricsConfig,
    Offloads,
    QueueConfig,
    load_all,
    load_config,
)


def write(tmp_path: Path, text: str, name: str = "nfrewrite.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_an_empty_config_means_every_default(tmp_path: Path) -> None:
    config, diags = load_config(write(tmp_path, ""))
    assert diags == []
    path = str(tmp_path / "nfrewrite.toml")
    assert config == Config(path=path, rules_dir=str(tmp_path / "rules"))
    assert config.queue == QueueConfig(num=0, workers=1, maxlen=4096, sock_buf=8 * 1024 * 1024)
    assert config.metrics.listen == "127.0.0.1:9640"
    assert ipaddress.ip_address(config.metrics.host).is_loopback
    assert config.flows == FlowsConfig(max=65536, idle_timeout=300.0)
    assert config.bridges == ()


def test_a_full_config(tmp_path: Path) -> None:
    config, diags = load_config(write(tmp_path, """
rules_dir = "../shared-rules"
[[bridge]]
name = "br0"
ports = ["eth1", "eth2"]
offloads = { gro = false, tso = true }
[[bridge]]
name = "br1"
ports = ["eth3"]
[queue]
num = 10
workers = 4
maxlen = 1024
sock_buf = 65536
[metrics]
listen = "[::1]:9100"
[flows]
max = 1000
idle_timeout = 12.5
"""))
    assert diags == []
    assert config is not None
    # ".." is left to the kernel, which takes it after any link (see test_filesafety)
    assert config.rules_dir == str(tmp_path / ".." / "shared-rules")
    assert config.bridges == (
        Bridge("br0", ("eth1", "eth2"), Offloads(gro=False, tso=True)),
        Bridge("br1", ("eth3",)),
    )
    assert config.bridges[0].offloads.items() == (("tso", True), ("gro", False))
    assert config.bridge_ports == ("eth1", "eth2", "eth3")
    assert config.queue == QueueConfig(10, 4, 1024, 65536)
    assert config.metrics == MetricsConfig("::1", 9100)
    assert config.metrics.listen == "[::1]:9100"
    assert config.flows == FlowsConfig(1000, 12.5)


def test_config_objects_are_frozen(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, ""))
    assert config is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.queue.num = 3  # type: ignore[misc]


def test_rules_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    config, _ = load_config(write(tmp_path, 'rules_dir = "r"\n', "etc/n.toml"))
    assert config is not None and config.rules_dir == str(tmp_path / "etc" / "r")


@pytest.mark.parametrize("listen,host,port", [
    ("127.0.0.1:9640", "127.0.0.1", 9640),
    ("0.0.0.0:1", "0.0.0.0", 1),
    ("localhost:9640", "localhost", 9640),
    ("[::]:9640", "::", 9640),
    ("[::1]:9640", "::1", 9640),
    ("localhost:80", "localhost", 80),
    ("0.0.0.0:65535", "0.0.0.0", 65535),
])
def test_metrics_listen_forms(tmp_path: Path, listen: str, host: str, port: int) -> None:
    config, diags = load_config(write(tmp_path, f'[metrics]\nlisten = "{listen}"\n'))
    assert diags == [] and config is not None
    assert (config.metrics.host, config.metrics.port) == (host, port)


@pytest.mark.parametrize("listen", [
    "9640", "[::1]9640", "[zz]:1", ":80", "h:x", "h:0", "a b:1", "::1:9640", "[::1]", "h:http",
    "h:70000", "", "[::]:0", "h:-1",
])
def test_bad_metrics_listen(tmp_path: Path, listen: str) -> None:
    """Refused at its place in the file; port 0 too: a scrape target needs a fixed port."""
    config, diags = load_config(write(tmp_path, f'[metrics]\nlisten = "{listen}"\n'))
    assert config is None
    assert [(d.line, d.col, d.severity) for d in diags] == [(2, 10, "error")]


def test_bool_is_not_an_integer_and_int_is_not_a_bool(tmp_path: Path) -> None:
    text = '[queue]\nnum = true\n[[bridge]]\nname = "b"\nports = ["p"]\noffloads = { gro = 0 }\n'
    config, diags = load_config(write(tmp_path, text))
    assert config is None
    assert [(d.line, d.message) for d in diags] == [
        (2, "queue.num must be an integer, not boolean"),
        (6, "offloads.gro must be true or false, not integer"),
    ]


def test_load_all_loads_config_and_rules_with_bridge_ports(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "a.toml").write_text(
        '[[rule]]\nname = "a"\nmatch = { in_port = "eth2" }\nset = { ttl = 9 }\n')
    path = write(tmp_path, '[[bridge]]\nname = "br0"\nports = ["eth1", "eth2"]\n')
    config, ruleset, diags = load_all(path)
    assert diags == []
    assert config is not None and ruleset is not None
    assert [r.name for r in ruleset.rules] == ["a"]


def test_load_all_still_reports_rule_errors_when_the_config_has_errors(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "a.toml").write_text('[[rule]]\nname = "A"\n')
    config, ruleset, diags = load_all(write(tmp_path, "[queue]\nnum = -5\n"))
    assert config is None and ruleset is None
    assert [(Path(d.path).name, d.line) for d in diags] == [("nfrewrite.toml", 2), ("a.toml", 2)]


def test_in_port_without_any_bridge_is_a_warning(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "a.toml").write_text(
        '[[rule]]\nname = "a"\nmatch = { in_port = "eth2" }\nset = { ttl = 9 }\n')
    config, ruleset, diags = load_all(write(tmp_path, ""))
    assert ruleset is not None
    assert [(d.severity, d.line, d.col) for d in diags] == [("warning", 3, 21)]


# -- Diagnostic rendering --------------------------------------------------------------------


def test_diagnostic_format_is_three_lines_with_a_caret_under_the_column() -> None:
    d = Diagnostic("r.toml", 3, 9, "error", "bad thing", 'match = { dport = 1 }')
    assert d.format() == (
        "r.toml:3:9: error: bad thing\n"
        "    match = { dport = 1 }\n"
        "            ^"
    )


def test_diagnostic_caret_follows_tabs() -> None:
    d = Diagnostic("r.toml", 1, 4, "warning", "w", "\t\tx = 1")
    assert d.format().splitlines()[2] == "    \t\t ^"


def test_diagnostic_for_a_whole_file_is_one_line() -> None:
    whole = Diagnostic("r.toml", 0, 0, "error", "cannot read")
    assert whole.format() == "r.toml: error: cannot read"


def test_every_offload_key_the_config_accepts_is_one_netsetup_can_set() -> None:
    from nfrewrite.config import settings as config
    from nfrewrite.kernel import netsetup

    assert set(netsetup.OFFLOAD_NAMES) == set(config.OFFLOAD_KEYS)



@pytest.mark.parametrize("text,size", [
    ('"256M"', 256 << 20), ('"1G"', 1 << 30), ('"65536K"', 64 << 20), ('"64k"', 64 << 10),
    ("1048576", 1 << 20), ('"2097152"', 2 << 20),
])
def test_flows_memory_takes_a_size_with_k_m_g(tmp_path: Path, text: str, size: int) -> None:
    config, diags = load_config(write(tmp_path, f"[flows]\nmemory = {text}\n"))
    assert diags == [] and config is not None
    assert config.flows.memory == size


def test_flows_memory_defaults_to_256_mib(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, "[flows]\nmax = 10\n"))
    assert config is not None and config.flows.memory == 256 << 20


@pytest.mark.parametrize("text,message", [
    ('"256MB"', "flows.memory '256MB' is not a size"),
    ('"M"', "flows.memory 'M' is not a size"),
    ('"1.5G"', "flows.memory '1.5G' is not a size"),
    ('"-1M"', "flows.memory '-1M' is not a size"),
    ('"²M"', "flows.memory '²M' is not a size"),
    ('"1K"', "flows.memory '1K' is out of range (64K..1T)"),
    ('"2048G"', "flows.memory '2048G' is out of range (64K..1T)"),
    ("true", "flows.memory must be a size"),
    ("1.5", "flows.memory must be a size"),
])
def test_a_bad_flows_memory_is_an_error_at_its_value(tmp_path: Path, text: str,
                                                     message: str) -> None:
    config, diags = load_config(write(tmp_path, f"[flows]\nmemory = {text}\n"))
    assert config is None
    assert [(d.line, d.col, d.severity) for d in diags] == [(2, 10, "error")]
    assert diags[0].message.startswith(message)


@pytest.mark.parametrize("text,seconds", [("60", 60.0), ("0", 0.0), ("2.5", 2.5)])
def test_flows_state_max_age_takes_seconds(tmp_path: Path, text: str, seconds: float) -> None:
    config, diags = load_config(write(tmp_path, f"[flows]\nstate_max_age = {text}\n"))
    assert diags == [] and config is not None
    assert config.flows.state_max_age == seconds


def test_flows_state_max_age_defaults_to_a_minute(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, "[flows]\nmax = 10\n"))
    assert config is not None and config.flows.state_max_age == 60.0


@pytest.mark.parametrize("text,message", [
    ("-1", "flows.state_max_age -1 is out of range (0 to 604800)"),
    ("604801", "flows.state_max_age 604801 is out of range (0 to 604800)"),
    ("true", "flows.state_max_age must be a number of seconds, not boolean"),
    ('"60"', "flows.state_max_age must be a number of seconds, not string"),
])
def test_a_bad_flows_state_max_age_is_an_error_at_its_value(tmp_path: Path, text: str,
                                                            message: str) -> None:
    config, diags = load_config(write(tmp_path, f"[flows]\nstate_max_age = {text}\n"))
    assert config is None
    assert [(d.line, d.col, d.severity) for d in diags] == [(2, 17, "error")]
    assert diags[0].message.startswith(message)
