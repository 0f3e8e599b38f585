"""Metrics over HTTP, the JSON log, and the Grafana dashboard over the metrics.

The daemon runs with two workers, each serving two of four sessions held
open at once, so that what is scraped from the supervisor is a sum over
both.  ``promtool check metrics`` (Debian's prometheus package) reads the
scrape; under CI (``CI=true``) a missing promtool fails the test rather
than skipping it: ``.ci/run`` installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from mmdf_smtp import logjson, metrics
from mmdf_smtp.queue.spool import Spool
from test_deliver_wire import configure, run_deliver
from test_wire import read_replies, recv_reply
from wire import Daemon, daemon, queued

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "contrib" / "grafana-mmdf.json"
MESSAGE_SIZE = 2000


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return str(response.read().decode())


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool is not installed (.ci/run installs it: apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def log_until(d: Daemon, text: str, count: int) -> list[str]:
    """Every line of the log until ``count`` of them hold ``text``."""
    lines: list[str] = []
    while sum(text in line for line in lines) < count:
        line = d.lines.get(timeout=60)
        assert line is not None, f"smtpd ended before logging {text!r}"
        lines.append(line)
    return lines


def send_session(sock_list: list, refused: bool) -> None:  # type: ignore[type-arg]
    """On each open session: one message queued, and one too big (552) if ``refused``."""
    for sock in sock_list:
        sock.sendall(b"EHLO client.test\r\n")
        read_replies(sock, 1)
        sock.sendall(b"MAIL FROM:<a@client.test>\r\n")
        assert recv_reply(sock).startswith(b"250")
        sock.sendall(b"RCPT TO:<bob@example.org>\r\n")
        assert recv_reply(sock).startswith(b"250")
        sock.sendall(b"DATA\r\n")
        assert recv_reply(sock).startswith(b"354")
        sock.sendall(b"Subject: counted\r\n\r\nhello\r\n.\r\n")
        assert recv_reply(sock).startswith(b"250 2.0.0")
        if refused:
            sock.sendall(b"MAIL FROM:<a@client.test>\r\n")
            assert recv_reply(sock).startswith(b"250")
            sock.sendall(b"RCPT TO:<bob@example.org>\r\n")
            assert recv_reply(sock).startswith(b"250")
            sock.sendall(b"DATA\r\n")
            assert recv_reply(sock).startswith(b"354")
            sock.sendall(b"x" * 100 + b"\r\n")
            sock.sendall((b"y" * 998 + b"\r\n") * 3 + b".\r\n")
            assert recv_reply(sock).startswith(b"552")
        sock.sendall(b"QUIT\r\n")
        assert recv_reply(sock).startswith(b"221")


def test_metrics_are_summed_over_the_workers_and_deliver(tmp_path: Path) -> None:
    extra = f'\n[limits]\nmessage_size = {MESSAGE_SIZE}\n\n[metrics]\nlisten = "127.0.0.1:0"\n'
    config = configure(tmp_path, extra)
    with daemon(config, "-n", "4") as d:
        if d.workers < 2:
            pytest.skip("one core: one worker, nothing to sum")
        [line] = d.log_lines("metrics at http://")
        url = re.search(r"(http://\S+/metrics)", line).group(1)  # type: ignore[union-attr]
        empty = samples(scrape(url))
        assert value(empty, "mmdf_queue_messages") == 0
        # Four sessions open at once: each worker, with two slots, serves two.
        sockets = [d.connect() for _ in range(4)]
        try:
            for sock in sockets:
                assert recv_reply(sock).startswith(b"220")
            send_session(sockets, refused=True)
        finally:
            for sock in sockets:
                sock.close()
        lines = log_until(d, "session ", 4)
        queued_lines = [line for line in lines if " queued id=" in line]
        sizes = [int(re.search(r" size=(\d+)", q).group(1)) for q in queued_lines]  # type: ignore[union-attr]
        refusals = [line for line in lines if " refused " in line]
        assert len(queued_lines) == 4 and len(refusals) == 4
        reasons = {re.search(r"reason=(\S+)", r).group(1) for r in refusals}  # type: ignore[union-attr]
        assert len(reasons) == 1
        [reason] = reasons

        before = samples(scrape(url))
        assert value(before, "mmdf_sessions_total", channel="local", outcome="quit") == 4
        assert value(before, "mmdf_messages_accepted_total", channel="local") == 4
        assert value(before, "mmdf_accepted_bytes_total", channel="local") == sum(sizes)
        assert value(before, "mmdf_messages_refused_total", reason=reason) == 4
        assert value(before, "mmdf_refusals_total", reason=reason) == 4
        # Per session: 220, EHLO, MAIL, RCPT, 250 queued, MAIL, RCPT, QUIT; then 552.
        assert value(before, "mmdf_replies_total", **{"class": "2xx"}) == 4 * 8
        assert value(before, "mmdf_replies_total", **{"class": "5xx"}) == 4
        assert value(before, "mmdf_commit_seconds_count") == 4
        assert value(before, "mmdf_commit_seconds_bucket", le="+Inf") == 4
        assert value(before, "mmdf_queue_messages") == 4
        assert 0 <= value(before, "mmdf_queue_oldest_seconds") < 300
        assert value(before, "mmdf_deliveries_total", status="delivered", kind="local") == 0

        result = run_deliver(config, "--once")
        assert result.returncode == 0, result.stderr
        text = scrape(url)
        after = samples(text)
        assert value(after, "mmdf_deliveries_total", status="delivered", kind="local") == 4
        assert value(after, "mmdf_delivery_seconds_count", kind="local") == 4
        assert value(after, "mmdf_queue_messages") == 0
        assert value(after, "mmdf_queue_oldest_seconds") == 0
        assert value(after, "mmdf_sessions_total", channel="local", outcome="quit") == 4

        check = subprocess.run(
            [promtool(), "check", "metrics"], input=text.encode(), capture_output=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.strip() == b"" and check.stderr.strip() == b"", (
            check.stdout + check.stderr
        )


def test_deliver_serves_its_own_and_keeps_counting_across_runs(tmp_path: Path) -> None:
    config = configure(tmp_path, '\n[metrics]\ndeliver_listen = "127.0.0.1:0"\n')
    with daemon(config) as d:
        for _ in range(2):
            with d.connect() as sock:
                assert recv_reply(sock).startswith(b"220")
                send_session([sock], refused=False)
        d.log_lines(" queued id=", 2)
    assert len(queued(config)) == 2
    for _ in range(2):  # counts of a deliver before go on in the spool's file
        result = run_deliver(config, "--once")
        assert result.returncode == 0, result.stderr
    segment = metrics.read_deliver_segment(tmp_path / "spool")
    assert segment is not None
    totals = metrics.summed([segment])
    assert totals[("mmdf_deliveries", ("delivered", "local"))] == [2.0]


def test_recorder_takes_over_a_segment_and_sums_histograms() -> None:
    shared = metrics.SharedSegments(2)
    first = metrics.Recorder(shared.segment(0))
    first.add("mmdf_sessions", ("local", "quit"))
    first.observe("mmdf_commit_seconds", (), 0.001)  # le="0.001" holds it
    first.observe("mmdf_commit_seconds", (), 99.0)  # +Inf only
    again = metrics.Recorder(shared.segment(0))  # a worker replacing a dead one
    again.add("mmdf_sessions", ("local", "quit"), 2)
    other = metrics.Recorder(shared.segment(1))
    other.add("mmdf_sessions", ("local", "quit"))
    other.observe("mmdf_commit_seconds", (), 0.0001)
    totals = metrics.summed(shared.segments())
    assert totals[("mmdf_sessions", ("local", "quit"))] == [4.0]
    commit = totals[("mmdf_commit_seconds", ())]
    bounds = metrics.FAMILIES["mmdf_commit_seconds"].buckets
    assert commit[0] == 1  # 0.0001 <= 0.0005
    assert commit[bounds.index(0.001)] == 1
    assert commit[len(bounds)] == 1  # +Inf
    assert commit[-1] == pytest.approx(99.0011)


def test_a_segment_full_of_keys_drops_new_ones_and_keeps_the_old() -> None:
    shared = metrics.SharedSegments(1)
    recorder = metrics.Recorder(shared.segment(0))
    for i in range(metrics.SLOTS + 10):
        recorder.add("mmdf_refusals", (f"reason{i}",))
    recorder.add("mmdf_refusals", ("reason0",))
    totals = metrics.summed(shared.segments())
    assert len(totals) == metrics.SLOTS
    assert totals[("mmdf_refusals", ("reason0",))] == [2.0]


def test_queue_gauges_read_the_arrival_time_from_the_ids(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    assert metrics.queue_gauges(spool.queue, time.time()) == (0, 0.0)
    old = spool.new_id()
    (spool.queue / old).write_bytes(b"")
    (spool.queue / spool.new_id()).write_bytes(b"")
    (spool.queue / "not-an-id").write_bytes(b"")
    messages, age = metrics.queue_gauges(spool.queue, time.time() + 100)
    assert messages == 2
    assert 100 <= age < 130


def test_json_log_has_the_text_lines_fields_and_the_id_from_smtpd_to_deliver(
    tmp_path: Path,
) -> None:
    config = configure(tmp_path)
    config.write_text('log_format = "json"\n' + config.read_text())
    with daemon(config) as d:
        with d.connect() as sock:
            assert recv_reply(sock).startswith(b"220")
            send_session([sock], refused=False)
        [queued_line] = d.log_lines('"event": "queued"')
        [session_line] = d.log_lines('"event": "session"')
    entry = json.loads(queued_line)
    assert entry["program"] == "smtpd" and entry["level"] == "info"
    assert re.fullmatch(r"[0-9a-f]{26}", entry["id"])
    assert re.fullmatch(r"[0-9a-f]{8}", entry["session"])
    assert entry["from"] == "<a@client.test>" and entry["to"] == "<bob@example.org>"
    assert entry["channel"] == "local" and isinstance(entry["size"], int)
    assert entry["client"] == "localhost[127.0.0.1]" or entry["client"].endswith("[127.0.0.1]")
    session = json.loads(session_line)
    assert session["session"] == entry["session"] and session["end"] == "quit"
    assert session["messages"] == 1

    result = run_deliver(config, "--once")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.decode().splitlines()]
    assert all(line["program"] == "deliver" for line in lines)
    [delivered] = [line for line in lines if line.get("status") == "delivered"]
    assert delivered["id"] == entry["id"]
    assert delivered["to"] == "<bob@example.org>"
    assert delivered["detail"].startswith("250 2.0.0 Delivered to maildir")
    about_it = [line for line in lines if entry["id"] in line["message"]]
    assert about_it and all(line["id"] == entry["id"] for line in about_it)


def test_json_fields_of_a_refusal_line() -> None:
    text = (
        '0badcafe refused client=unknown[192.0.2.7] helo=x reply="550 5.7.1 \\"no\\" here" '
        "reason=relay id=0123456789abcdef0123456789 stage=rcpt from=<> to=<a@b>"
    )
    assert logjson.fields(text) == {
        "session": "0badcafe",
        "event": "refused",
        "client": "unknown[192.0.2.7]",
        "helo": "x",
        "reply": '550 5.7.1 "no" here',
        "reason": "relay",
        "id": "0123456789abcdef0123456789",
        "stage": "rcpt",
        "from": "<>",
        "to": "<a@b>",
    }


@given(st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), st.text(min_size=1)))
def test_json_fields_read_back_every_quoted_field(written: dict[str, str]) -> None:
    written.pop("message", None)
    quoted = {k: v.replace("\\", "").replace('"', "") for k, v in written.items()}
    quoted = {k: v for k, v in quoted.items() if v}
    text = " ".join(f'{k}="{v}"' for k, v in quoted.items())
    parsed = logjson.fields(text)
    expected = {
        k + "_" if k in {"time", "program", "pid", "level", "exception"} else k: v
        for k, v in quoted.items()
    }
    for key in logjson.NUMBERS & set(expected):
        if expected[key].isdigit():
            expected[key] = int(expected[key])  # type: ignore[assignment]
    assert parsed == expected


def exported_names() -> set[str]:
    names = {"mmdf_queue_messages", "mmdf_queue_oldest_seconds"}
    for family in metrics.FAMILIES.values():
        if family.kind == metrics.COUNTER:
            names.add(f"{family.name}_total")
        else:
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
    return names


def test_the_grafana_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert len(exprs) >= 8
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\bmmdf_[a-z_]+", expr))
        assert names, expr
        used |= names
    assert sorted(used - exported_names()) == []
    # Every family is on the dashboard somewhere.
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    assert families >= {f.name for f in metrics.FAMILIES.values()} | {"mmdf_queue_messages"}
