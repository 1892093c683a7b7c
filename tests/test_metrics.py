"""nfrewrite.service.metrics in single-process mode: counting, the kernel queue collector, HTTP.

Scrapes are parsed with ``prometheus_client.parser`` (never regexes); each test makes its own
:class:`Metrics` set, so tests do not see each other's counts.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfrewrite.core.constants import ACCEPT, DROP
from nfrewrite.core.engine import PASS, Result
from nfrewrite.core.packet import REASONS
from nfrewrite.service import metrics as M

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_text(sup: M.SupervisorMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(sup.registry).decode()


def samples(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got: Samples, name: str, **labels: str) -> float:
    return got[(name, frozenset(labels.items()))]


@pytest.fixture
def proc_file(tmp_path: Path) -> Path:
    path = tmp_path / "nfnetlink_queue"
    path.write_text(
        "    0  31337     3 2 65531     7     9      120  1\n"
        "    1  31338     0 2 65531     0     0       55  1\n"
        "    9  40000   100 2 65531   500   600     9999  1\n"
    )
    return path


@pytest.fixture
def world(proc_file: Path) -> tuple[M.Metrics, M.SupervisorMetrics]:
    m = M.Metrics()
    sup = M.SupervisorMetrics([0, 1], ports=["eth1", "eth2"], metrics=m, proc_path=str(proc_file))
    return m, sup


# -- the per-packet hook -----------------------------------------------------------------------
def test_observe_counts_each_outcome_per_queue_and_rule(
    world: tuple[M.Metrics, M.SupervisorMetrics],
) -> None:
    m, sup = world
    w0 = M.WorkerMetrics(0, rules=["banner", "ttl", "block"], metrics=m)
    w1 = M.WorkerMetrics(1, rules=["banner", "ttl", "block"], metrics=m)
    modified = Result(ACCEPT, b"new", rules=("banner", "ttl"))
    header_only_unchanged = Result(ACCEPT, None, rules=())
    dropped = Result(DROP, rules=("block",))
    unparsed = Result(ACCEPT, unparsed=REASONS[0])
    for _ in range(5):
        w0.observe(modified, 3e-6)
    for _ in range(2):
        w0.observe(dropped, 1.5e-5)
    w0.observe(unparsed, 1e-6)
    w0.observe(PASS, 4e-5)
    w0.observe(header_only_unchanged, 4e-5)
    w1.observe(modified, 0.02)
    w0.flush()
    w1.flush()

    got = samples(scrape_text(sup))
    assert value(got, "nfrewrite_packets_seen_total", queue="0") == 10
    assert value(got, "nfrewrite_packets_seen_total", queue="1") == 1
    assert value(got, "nfrewrite_packets_modified_total", queue="0") == 5
    assert value(got, "nfrewrite_packets_dropped_total", queue="0") == 2
    assert value(got, "nfrewrite_packets_dropped_total", queue="1") == 0
    assert value(got, "nfrewrite_packets_unparsed_total", queue="0", reason=REASONS[0]) == 1
    assert value(got, "nfrewrite_rule_applied_total", rule="banner") == 6
    assert value(got, "nfrewrite_rule_applied_total", rule="ttl") == 6
    assert value(got, "nfrewrite_rule_applied_total", rule="block") == 2

    hist = "nfrewrite_packet_processing_seconds"
    assert value(got, hist + "_count", queue="0") == 10
    assert value(got, hist + "_sum", queue="0") == pytest.approx(
        5 * 3e-6 + 2 * 1.5e-5 + 1e-6 + 8e-5
    )
    assert value(got, hist + "_bucket", queue="0", le="2e-06") == 1
    assert value(got, hist + "_bucket", queue="0", le="5e-06") == 6
    assert value(got, hist + "_bucket", queue="0", le="2e-05") == 8
    assert value(got, hist + "_bucket", queue="0", le="5e-05") == 10
    assert value(got, hist + "_bucket", queue="1", le="0.01") == 0
    assert value(got, hist + "_bucket", queue="1", le="+Inf") == 1


def test_observe_tallies_until_a_flush_and_a_flush_adds_exactly_what_came(
    world: tuple[M.Metrics, M.SupervisorMetrics],
) -> None:
    m, sup = world
    w = M.WorkerMetrics(0, rules=["banner"], metrics=m)
    hist = "nfrewrite_packet_processing_seconds"
    w.observe(Result(ACCEPT, b"new", rules=("banner",)), 3e-6)
    w.observe(Result(ACCEPT, unparsed=REASONS[1]), 2e-5)
    w.observe_released(Result(DROP, rules=("banner",)))
    got = samples(scrape_text(sup))
    assert value(got, "nfrewrite_packets_seen_total", queue="0") == 0  # tallied, not yet moved
    assert value(got, hist + "_count", queue="0") == 0
    for _ in range(2):  # a second flush with nothing tallied adds nothing
        w.flush()
        got = samples(scrape_text(sup))
        assert value(got, "nfrewrite_packets_seen_total", queue="0") == 2
        assert value(got, "nfrewrite_packets_modified_total", queue="0") == 1
        assert value(got, "nfrewrite_packets_dropped_total", queue="0") == 1
        assert value(got, "nfrewrite_packets_unparsed_total", queue="0", reason=REASONS[1]) == 1
        assert value(got, "nfrewrite_rule_applied_total", rule="banner") == 2
        assert value(got, hist + "_count", queue="0") == 2
        assert value(got, hist + "_sum", queue="0") == pytest.approx(2.3e-5)
        assert value(got, hist + "_bucket", queue="0", le="5e-06") == 1
        assert value(got, hist + "_bucket", queue="0", le="2e-05") == 2
    w.observe(PASS, 1e-6)
    w.flush()
    got = samples(scrape_text(sup))
    assert value(got, "nfrewrite_packets_seen_total", queue="0") == 3
    assert value(got, hist + "_bucket", queue="0", le="2e-06") == 1


def test_every_unparsed_reason_and_error_kind_reads_zero_before_any_packet(
    world: tuple[M.Metrics, M.SupervisorMetrics],
) -> None:
    m, sup = world
    M.WorkerMetrics(1, metrics=m)
    got = samples(scrape_text(sup))
    for reason in REASONS:
        assert value(got, "nfrewrite_packets_unparsed_total", queue="1", reason=reason) == 0
    for kind in M.ERROR_KINDS:
        assert value(got, "nfrewrite_handler_errors_total", queue="1", kind=kind) == 0
    reasons = {
        dict(labels)["reason"] for name, labels in got if name == "nfrewrite_packets_unparsed_total"
    }
    assert reasons == set(REASONS)


def test_rules_loaded_later_and_rules_never_announced_are_both_counted(
    world: tuple[M.Metrics, M.SupervisorMetrics],
) -> None:
    m, sup = world
    w = M.WorkerMetrics(0, rules=["a"], metrics=m)
    w.set_rules(["a", "b"])  # reload added b
    w.observe(Result(ACCEPT, b"x", rules=("surprise",)), 1e-5)
    w.flush()
    got = samples(scrape_text(sup))
    assert value(got, "nfrewrite_rule_applied_total", rule="a") == 0
    assert value(got, "nfrewrite_rule_applied_total", rule="b") == 0
    assert value(got, "nfrewrite_rule_applied_total", rule="surprise") == 1


def test_an_unknown_unparsed_reason_is_a_bug_not_a_new_label(
    world: tuple[M.Metrics, M.SupervisorMetrics],
) -> None:
    m, _ = world
    w = M.WorkerMetrics(0, metrics=m)
    with pytest.raises(KeyError):
        w.observe(Result(ACCEPT, unparsed="10.0.0.1:80"), 1e-6)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ValueError("x"), "ValueError"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), "ValueError"),
        (ConnectionResetError(), "OSError"),
        (KeyError("k"), "KeyError"),
        (RecursionError(), "RecursionError"),
        (struct.error("short"), "other"),
        (type("ValueError", (Exception,), {})(), "other"),  # same name, not the builtin
        (IndexError, "IndexError"),
        ("TypeError", "TypeError"),
        ("192.0.2.1", "other"),
        (KeyboardInterrupt(), "other"),
    ],
)
def test_error_kind_is_a_builtin_class_from_the_fixed_list_or_other(
    exc: BaseException | type[BaseException] | str, kind: str
) -> None:
    assert M.error_kind(exc) == kind


def test_error_counts_by_kind(world: tuple[M.Metrics, M.SupervisorMetrics]) -> None:
    m, sup = world
    w = M.WorkerMetrics(0, metrics=m)
    w.error(ConnectionResetError())
    w.error(OSError())
    w.error(struct.error("x"))
    got = samples(scrape_text(sup))
    assert value(got, "nfrewrite_handler_errors_total", queue="0", kind="OSError") == 2
    assert value(got, "nfrewrite_handler_errors_total", queue="0", kind="other") == 1
    assert value(got, "nfrewrite_packets_seen_total", queue="0") == 0


def test_set_flows_copies_the_gauge_and_advances_the_table_counters_by_the_difference(
    world: tuple[M.Metrics, M.SupervisorMetrics],
) -> None:
    m, sup = world
    w = M.WorkerMetrics(0, metrics=m)
    w.set_flows(3, {"flows_evicted": 0, "edits_refused": 0, "segments_cut": 2})
    w.set_flows(7, {"flows_evicted": 4, "edits_refused": 10, "segments_cut": 2})
    w.set_flows(5, {"flows_evicted": 4, "edits_refused": 12, "segments_cut": 3})
    # a new FlowTable: counts from 0 again
    w.set_flows(2, {"flows_evicted": 1, "edits_refused": 0, "segments_cut": 1})
    got = samples(scrape_text(sup))
    assert value(got, "nfrewrite_seqadj_flows", queue="0") == 2
    assert value(got, "nfrewrite_seqadj_flow_evictions_total", queue="0") == 5
    assert value(got, "nfrewrite_seqadj_edits_refused_total", queue="0") == 12
    assert value(got, "nfrewrite_seqadj_segments_cut_total", queue="0") == 4


def test_the_table_counters_are_what_a_flow_table_counts() -> None:
    """The names set_flows reads are FlowTable.stats()'s own (a renamed key would read 0)."""
    from nfrewrite.core.seqadj import FlowTable

    assert {name for _, name in M.WorkerMetrics(0, metrics=M.Metrics())._table_counters} <= set(
        FlowTable().stats())


def test_queue_numbers_are_checked() -> None:
    m = M.Metrics()
    for bad in (-1, 65536, True):
        with pytest.raises(ValueError):
            M.WorkerMetrics(bad, metrics=m)
    with pytest.raises(ValueError):
        M.SupervisorMetrics([], metrics=m)


# -- supervisor figures ------------------------------------------------------------------------
def test_supervisor_reports_rules_reload_offloads_restarts_and_build_info(
    world: tuple[M.Metrics, M.SupervisorMetrics],
) -> None:
    import platform

    import nfrewrite

    _, sup = world
    sup.rules_loaded(12)
    sup.reload(True, 1_700_000_000.5)
    sup.reload(False, 1_700_000_100.0)
    sup.offloads("eth1", {"gro": False, "tx-checksumming": True})
    sup.worker_restarted(1)
    sup.worker_restarted(1)
    sup.worker_died(12345)  # single-process mode: nothing to forget, no error
    got = samples(scrape_text(sup))
    assert value(got, "nfrewrite_rules_loaded") == 12
    assert value(got, "nfrewrite_last_reload_successful") == 0
    assert value(got, "nfrewrite_last_reload_timestamp_seconds") == 1_700_000_100.0
    assert value(got, "nfrewrite_offload_enabled", port="eth1", feature="gro") == 0
    assert value(got, "nfrewrite_offload_enabled", port="eth1", feature="tx-checksumming") == 1
    assert value(got, "nfrewrite_worker_restarts_total", queue="0") == 0
    assert value(got, "nfrewrite_worker_restarts_total", queue="1") == 2
    assert (
        value(
            got,
            "nfrewrite_build_info",
            version=nfrewrite.__version__,
            python=platform.python_version(),
        )
        == 1
    )


def test_supervisor_refuses_labels_outside_the_configured_sets(
    world: tuple[M.Metrics, M.SupervisorMetrics],
) -> None:
    _, sup = world
    with pytest.raises(ValueError, match="not a configured bridge port"):
        sup.offloads("eth9", {"gro": True})
    with pytest.raises(ValueError):
        sup.worker_restarted(7)


def test_every_metric_has_the_prefix_base_units_and_help() -> None:
    for spec in M.METRICS + M.KERNEL_QUEUE_METRICS:
        assert spec.name.startswith("nfrewrite_")
        assert spec.help and spec.help.endswith(".")
        assert spec.name.endswith("_total") == (spec.type == "counter")
        assert "milli" not in spec.name and "micro" not in spec.name
    for spec in M.METRICS:  # the kernel queue's are read at scrape time: no process to combine
        if spec.type == "gauge":
            assert spec.mode in ("livesum", "mostrecent", "livemax")
    everything = M.METRICS + M.KERNEL_QUEUE_METRICS
    assert len({s.name for s in everything}) == len(everything)
    assert list(M.TIME_BUCKETS) == sorted(M.TIME_BUCKETS)
    assert M.TIME_BUCKETS[0] <= 2e-6 and M.TIME_BUCKETS[-1] >= 0.01
    steps = [b / a for a, b in zip(M.TIME_BUCKETS, M.TIME_BUCKETS[1:], strict=False)]
    assert all(1.9 < r < 2.6 for r in steps)


def test_label_values_come_only_from_fixed_sets_rule_names_and_configured_ports(
    world: tuple[M.Metrics, M.SupervisorMetrics],
) -> None:
    import platform

    import nfrewrite

    m, sup = world
    rules = ["hide-server-banner", "clamp.mss"]
    for q in (0, 1):
        w = M.WorkerMetrics(q, rules=rules, metrics=m)
        w.observe(Result(ACCEPT, b"x", rules=tuple(rules)), 1e-5)
        w.observe(Result(DROP, rules=("clamp.mss",)), 1e-5)
        for reason in REASONS:
            w.observe(Result(ACCEPT, unparsed=reason), 1e-6)
        w.flush()
        w.error(OSError())
        w.set_flows(1, {"flows_evicted": 1})
    sup.offloads("eth1", {"gro": True})
    sup.offloads("eth2", {"gso": False})
    sup.rules_loaded(2)
    sup.reload(True, 1.0)
    allowed = {
        "queue": {"0", "1"},
        "reason": set(REASONS),
        "kind": set(M.ERROR_KINDS),
        "rule": set(rules),
        "port": {"eth1", "eth2"},
        "feature": {"gro", "gso"},
        "le": {repr(float(b)) for b in M.TIME_BUCKETS} | {"+Inf"},
        "version": {nfrewrite.__version__},
        "outcome": set(M.HOLD_OUTCOMES),
        "python": {platform.python_version()},
    }
    got = samples(scrape_text(sup))
    assert got
    for name, labels in got:
        for label, val in labels:
            assert label in allowed, (name, label)
            if label == "le":
                assert val == "+Inf" or float(val) in M.TIME_BUCKETS
            else:
                assert val in allowed[label], (name, label, val)
            if label != "python" and label != "version":
                with pytest.raises(ValueError):
                    ipaddress.ip_address(val.strip("[]"))
                assert ":" not in val


# -- the kernel queue collector ----------------------------------------------------------------
def test_kernel_queue_figures_for_our_queues_only(
    world: tuple[M.Metrics, M.SupervisorMetrics],
) -> None:
    _, sup = world
    got = samples(scrape_text(sup))
    assert value(got, "nfrewrite_kernel_queue_waiting", queue="0") == 3
    assert value(got, "nfrewrite_kernel_queue_dropped_total", queue="0") == 7
    assert value(got, "nfrewrite_kernel_queue_user_dropped_total", queue="0") == 9
    assert value(got, "nfrewrite_kernel_queue_waiting", queue="1") == 0
    kernel = {k for k in got if k[0].startswith("nfrewrite_kernel_queue")}
    assert all(dict(labels)["queue"] in ("0", "1") for _, labels in kernel)
    assert len(kernel) == 6  # queue 9 is someone else's


def test_read_queue_stats_skips_what_it_cannot_parse(tmp_path: Path) -> None:
    path = tmp_path / "q"
    path.write_bytes(
        b"\n"
        b"garbage line\n"
        b"    4  1  2 2 65531  3  4\n"  # too short
        b"    5  1  x 2 65531  3  4  8  1\n"  # not a number
        b"    6  1 -2 2 65531  3  4  8  1\n"  # negative
        b"\xff\xfe\x00\n"
        b"    7  100  2 2 65531  3  4  8  1\n"
        b"    8  100  2 2 65531  3  4  8\n"  # no trailing "1": still the 8 columns we need
    )
    stats = M.read_queue_stats(str(path))
    assert set(stats) == {7, 8}
    assert stats[7] == M.QueueStats(7, 100, 2, 2, 65531, 3, 4, 8)


@pytest.mark.parametrize("kind", ["missing", "directory", "empty"])
def test_a_missing_or_odd_proc_file_gives_no_samples_and_no_exception(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "q"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    m = M.Metrics()
    sup = M.SupervisorMetrics([0], metrics=m, proc_path=str(path))
    got = samples(scrape_text(sup))
    assert not [k for k in got if k[0].startswith("nfrewrite_kernel_queue")]
    assert value(got, "nfrewrite_worker_restarts_total", queue="0") == 0


def test_the_real_proc_file_parses_whatever_this_namespace_has() -> None:
    stats = M.read_queue_stats()  # absent without nfnetlink_queue loaded: {} is fine
    assert all(isinstance(s, M.QueueStats) for s in stats.values())


# -- HTTP --------------------------------------------------------------------------------------
@pytest.fixture
def server(world: tuple[M.Metrics, M.SupervisorMetrics]) -> Iterator[M.Server]:
    _, sup = world
    with M.serve(("127.0.0.1", 0), sup.registry) as srv:
        yield srv


def request(
    srv: M.Server, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_metrics_endpoint_serves_the_text_format(server: M.Server) -> None:
    status, headers, body = request(server, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(body.decode())
    assert value(got, "nfrewrite_kernel_queue_waiting", queue="0") == 3


def test_metrics_endpoint_honours_accept_for_openmetrics(server: M.Server) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    status, headers, body = request(
        server, "GET", "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    families = text_string_to_metric_families(body.decode())  # type: ignore[no-untyped-call]
    names = {f.name for f in families}
    assert "nfrewrite_packets_seen" in names


def test_metrics_endpoint_filters_by_name(server: M.Server) -> None:
    status, _, body = request(
        server,
        "GET",
        "/metrics?name[]=nfrewrite_rules_loaded&name[]=nfrewrite_kernel_queue_waiting",
    )
    assert status == 200
    assert {name for name, _ in samples(body.decode())} == {
        "nfrewrite_rules_loaded",
        "nfrewrite_kernel_queue_waiting",
    }


def test_landing_page_links_to_metrics(server: M.Server) -> None:
    status, headers, body = request(server, "GET", "/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b'href="/metrics"' in body


def test_head_gives_headers_without_a_body(server: M.Server) -> None:
    status, headers, body = request(server, "HEAD", "/metrics")
    assert status == 200 and body == b""
    assert int(headers["content-length"]) > 0
    assert request(server, "HEAD", "/")[0] == 200


@pytest.mark.parametrize(
    "path", ["/metricsx", "/metrics/", "/favicon.ico", "/index.html", "/METRICS"]
)
def test_other_paths_are_404(server: M.Server, path: str) -> None:
    assert request(server, "GET", path)[0] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_other_methods_are_405(server: M.Server, method: str) -> None:
    for path in ("/", "/metrics"):
        status, headers, _ = request(server, method, path)
        assert status == 405
        assert headers["allow"] == "GET, HEAD"


def test_requests_leave_no_lines_on_stderr(
    server: M.Server, capfd: pytest.CaptureFixture[str]
) -> None:
    for path in ("/", "/metrics", "/nope"):
        request(server, "GET", path)
    request(server, "POST", "/metrics")
    out, err = capfd.readouterr()
    assert err == "" and out == ""


def test_close_frees_the_port(world: tuple[M.Metrics, M.SupervisorMetrics]) -> None:
    _, sup = world
    srv = M.serve(("127.0.0.1", 0), sup.registry)
    host, port = srv.address
    srv.close()
    with socket.create_server((host, port)):
        pass


def test_ipv6_listen(world: tuple[M.Metrics, M.SupervisorMetrics]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    _, sup = world
    try:
        srv = M.serve(("::1", 0), sup.registry)
    except OSError as exc:
        pytest.skip(f"no ::1 here: {exc}")
    with srv:
        assert srv.address[0] == "::1"
        assert srv.url.startswith("http://[::1]:")
        assert request(srv, "GET", "/metrics")[0] == 200


@pytest.mark.privileged
def test_the_collector_reads_a_real_bound_queue_in_its_namespace() -> None:
    """Bind NFQUEUE 4242 in a fresh network namespace and read the kernel's line for it."""
    import subprocess
    import sys

    code = (
        "from netfilterqueue import NetfilterQueue\n"
        "from nfrewrite.service import metrics as M\n"
        "q = NetfilterQueue(); q.bind(4242, lambda p: p.accept())\n"
        "s = M.read_queue_stats()\n"
        "print(s[4242].portid > 0, s[4242].waiting, s[4242].dropped, s[4242].user_dropped)\n"
        "q.unbind()\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "0", "0", "0"]
