"""The live dashboard: its page in a real headless Chromium, its HTTP checks on real sockets.

The browser test drives a real federation (a server and two clients as processes) from the
page, opened with the link the server printed: the clients appear, Start (with settings),
a session ends, more rounds, Stop; then the server's files and exit codes are checked.
Chromium is the system's (apt's `chromium`, installed by .ci/run); Playwright drives it
without downloading a browser of its own. The checks of who may ask (the token, the Host,
cross-site requests) run a Dashboard in this process, on a real socket.
"""

from __future__ import annotations

import asyncio
import csv
import http.client
import http.cookies
import io
import json
import re
import shutil
import signal
import socket
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch

from conftest import FAST
from support import run_cli
from fedsock.console import ExitStatus
from fedsock import dashboard as dashboard_module, secagg
from fedsock.dashboard import (CENTRAL_IN_CLEAR, CENTRAL_SUM_IN_CLEAR, NO_DEFENCE, SUM_LEAKS, Dashboard,
                               DashboardState, host_name, parse_address, per_class_scores, privacy_warnings)
from fedsock.events import (ClientDropped, ClientJoined, ClientProgress, ClientReady, ConnectionRefused, Listening,
                            RoundAggregated, RoundFinished, RoundSaved, RoundStarted, UpdateAccepted, UpdateArriving)
from fedsock.identity import fingerprint
from fedsock.policy import Policy, policy_text
from fedsock.privacy import Accountant, Privacy, PrivacySettings
from fedsock.run_files import read_checkpoint
from socket_methods import encode_message
from test_compression import RawPeer
from test_engine import FakeClient, engine_for, run

DASHBOARD_LINK = r"dashboard: ((http://127\.0\.0\.1:\d+/)\?token=[\w-]+)"  # the link, then its bare URL
UI_TIMEOUT_MS = 120_000  # a bound on every wait in the page (each takes seconds)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        pytest.fail("the dashboard tests need Chromium: apt-get install chromium (.ci/run does it)")
    return path


def request(url: str, body: dict | None = None, headers: dict | None = None, method: str | None = None):
    """(status, JSON answer) of one HTTP request; an action is POSTed as the page posts it, unless
    `headers` says otherwise."""
    data = None if body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", "X-Fedsock-Action": "1"} if body is not None else {}
    sent.update(headers or {})
    req = urllib.request.Request(url, data=data, headers={k: v for k, v in sent.items() if v is not None},
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            return answer.status, decoded(answer)
    except urllib.error.HTTPError as exc:
        return exc.code, decoded(exc)


def decoded(answer):
    body = answer.read()
    return json.loads(body or b"null") if answer.headers.get_content_type() == "application/json" else body


def bearer(link: str) -> dict:
    """The header a script sends, with the token of the link the server printed."""
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["token"][0]
    return {"Authorization": f"Bearer {token}"}


def sign_in(link: str) -> tuple[str, dict, http.cookies.Morsel]:
    """Open the printed link as a browser does, without following the redirect: where it sends the
    browser, the cookie it set (as the header the browser sends back), and that cookie's attributes."""
    parts = urllib.parse.urlsplit(link)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("GET", f"{parts.path}?{parts.query}")
        answer = connection.getresponse()
        answer.read()
    finally:
        connection.close()
    assert answer.status == 303, answer.status
    [(name, cookie)] = http.cookies.SimpleCookie(answer.headers["Set-Cookie"]).items()
    return urllib.parse.urljoin(link, answer.headers["Location"]), {"Cookie": f"{name}={cookie.value}"}, cookie


def with_dashboard(engine, scenario, host: str = "127.0.0.1", loopback: bool = True):
    """`scenario(dashboard)`, blocking HTTP calls in a thread, against a Dashboard served by this
    process's event loop on a free port; bounded."""
    async def run():
        dashboard = Dashboard(host, 0, engine, "test", loopback)
        await dashboard.start()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, scenario, dashboard)
        finally:
            await dashboard.close()

    return asyncio.run(asyncio.wait_for(run(), 60))


# --------------------------------------------------------------------------- in the browser


@pytest.mark.processes
def test_the_page_shows_the_lobby_starts_the_run_trains_more_and_stops_it(cluster, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    out = tmp_path / "run"
    server = cluster.server(*FAST, "--num-clients", "2", "--min-clients", "2", "--num-rounds", "1", "--start", "manual",
                            "--stay", "--dashboard", "127.0.0.1:0", "--seed", "3", output_dir=out)
    link, url = server.wait_for(DASHBOARD_LINK, timeout=30).groups()
    clients = [cluster.client(k, quiet=False) for k in (1, 2)]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            assert browser.new_page().goto(url).status == 403  # a browser that never opened the link
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(link)
            assert page.url == url  # the token left the address bar, for a cookie no script can read
            [cookie] = page.context.cookies()
            assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict") and cookie["value"] in link
            expect(page.locator("#phase")).to_have_text("waiting for start", timeout=UI_TIMEOUT_MS)
            expect(page.locator("#client-count")).to_have_text("(2 waiting)", timeout=UI_TIMEOUT_MS)
            expect(page.locator("#clients tbody tr")).to_have_count(2)
            page.fill("input[name=num_rounds]", "2")
            page.fill("input[name=lr]", "0.1")
            page.click("#start")
            expect(page.locator("#answer")).to_contain_text("training starts; num rounds 2; lr 0.1")
            expect(page.locator("#phase")).to_have_text("between sessions", timeout=UI_TIMEOUT_MS)
            assert page.evaluate("state.rounds.size") == 2
            for chart in ("accuracy", "loss", "seconds", "bytes"):  # each chart holds both rounds
                assert page.evaluate(f"charts['chart-{chart}'].plot.data[0]") == [1, 2]
            accuracy = page.evaluate("state.rounds.get(2).test_accuracy")
            assert 0.8 < accuracy <= 1
            expect(page.locator("#clients tbody tr").first).to_contain_text("waiting")
            expect(page.locator("#clients tbody tr").first).to_contain_text("127.0.0.1")

            csv = page.request.get(url + "download/metrics.csv")  # with the page's cookie, as its links are
            assert csv.ok and csv.text().count("\n") == 3  # a header and two rounds
            model = page.request.get(url + "download/model.pt")
            (tmp_path / "model.pt").write_bytes(model.body())
            weights = torch.load(tmp_path / "model.pt", weights_only=True)
            saved = read_checkpoint(out / "checkpoint.fsck")  # round 2's, written before the session ended
            assert saved.round == 2 and all(torch.equal(weights[k], saved.model[k]) for k in saved.model)
            assert page.request.get(url + "download/accuracy.png").body()[:8] == b"\x89PNG\r\n\x1a\n"

            page.fill("#more-rounds", "500")
            page.click("#more")
            expect(page.locator("#answer")).to_contain_text("500 more round(s)")
            page.wait_for_function("() => state.rounds.size >= 4 && state.run.phase === 'training'", timeout=UI_TIMEOUT_MS)
            expect(page.locator("#progress")).to_contain_text("of 502")
            marks = "charts['chart-accuracy'].plot.sessionMarks"  # as the chart last drew them
            page.wait_for_function(f"() => {marks} && {marks}.length === 1", timeout=UI_TIMEOUT_MS)
            assert page.evaluate(marks) == [{"round": 3, "label": "session 2"}]  # where session 2 began
            page.click("#stop")
            expect(page.locator("#phase")).to_have_text("finished", timeout=UI_TIMEOUT_MS)
            expect(page.locator("#log")).to_contain_text("the Stop button on the dashboard")
            assert not errors, errors
        finally:
            browser.close()
    assert server.finish(timeout=60) == ExitStatus.INTERRUPTED  # as SIGINT: stopped in the middle of a session
    for client in clients:
        assert client.finish(timeout=60) == 0, client.output
        assert "session 1 ended after round 2; stay connected" in client.output
    checkpoint = read_checkpoint(out / "checkpoint.fsck")
    rows = [json.loads(json.dumps(r)) for r in checkpoint.metrics]
    assert checkpoint.round >= 4 and [r["round"] for r in rows] == list(range(1, checkpoint.round + 1))
    saved = json.loads((out / "config.json").read_text())
    assert (saved["num_rounds"], saved["lr"]) == (502, 0.1)
    assert (out / "metrics.csv").read_text().count("\n") == checkpoint.round + 1


@pytest.mark.processes
def test_the_page_shows_each_clients_policy_as_its_hello_stated_it(cluster, tmp_path):
    """Client 1 is fl_client.py with a DP policy; clients 2 and 3 are raw peers, one stating a policy with a
    key this server does not know (which it drops), one stating none, as an older or a third-party client."""
    from playwright.sync_api import expect, sync_playwright

    server = cluster.server(*FAST, "--num-clients", "3", "--start", "manual", "--dp-clip", "1",
                            "--dp-noise-multiplier", "1", "--dp-mode", "local", "--dashboard", "127.0.0.1:0")
    link, url = server.wait_for(DASHBOARD_LINK, timeout=30).groups()
    cluster.client(1, "--require-dp", "--min-noise-multiplier", "1", "--max-epsilon", "8")
    stated = Policy(require_secure_aggregation=True, min_round_clients=5).to_json()  # a raw peer says what it likes
    peers = [RawPeer(cluster.port, client_id=2, features=["dp-local"], policy={**stated, "max_rounds": 3}),
             RawPeer(cluster.port, client_id=3, features=["dp-local"])]
    try:
        for k in (1, 2, 3):
            server.wait_for(rf"client {k} joined from", timeout=120)
        status, state = request(url + "api/state", headers=bearer(link))
        assert status == 200
        clients = {c["id"]: c for c in state["clients"]}
        assert clients[1]["policy"] == Policy(require_dp=True, min_noise_multiplier=1.0, max_epsilon=8.0).to_json()
        assert (clients[2]["policy"], clients[3]["policy"]) == (stated, None)  # without max_rounds
        texts = ["DP noise it adds itself, z ≥ 1, ε ≤ 8 at δ 1e-05", "secure aggregation, ≥ 5 clients", "not stated"]
        assert [clients[k]["policy_text"] for k in (1, 2, 3)] == texts

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(link)
                expect(page.locator("#clients td.policy")).to_have_text(texts, timeout=UI_TIMEOUT_MS)
            finally:
                browser.close()
    finally:
        for peer in peers:
            peer.close()


@pytest.mark.processes
def test_the_privacy_card_shows_the_epsilon_the_run_spends(cluster, tmp_path):
    """A real federation with central DP: the card before Start (epsilon planned for the two rounds, none
    spent yet), then after them: the epsilon spent that metrics.csv and the server's round line say."""
    from playwright.sync_api import expect, sync_playwright

    server = cluster.server(*FAST, "--num-clients", "2", "--num-rounds", "2", "--start", "manual", "--stay",
                            "--dp-clip", "1", "--dp-noise-multiplier", "1.1", "--dashboard", "127.0.0.1:0")
    link, url = server.wait_for(DASHBOARD_LINK, timeout=30).groups()
    server.wait_for(r"client-level DP \(central: the server clips and adds it\).*epsilon exact", timeout=30)
    clients = [cluster.client(k) for k in (1, 2)]
    planned = format(Accountant(1e-5, "none").epsilon([[1.1, 2, 2, 1.0]] * 2), ".3g")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(link)
            expect(page.locator("#client-count")).to_have_text("(2 waiting)", timeout=UI_TIMEOUT_MS)
            card = page.locator("#privacy")

            def fact(key: str):
                return card.locator(f"tr[data-key={key}] td").nth(1)

            expect(fact("dp")).to_have_text(re.compile(r"^on, central: the server clips each update"))
            expect(fact("noise")).to_have_text(re.compile(r"^S = 1, z = 1\.1 "))
            expect(fact("relation")).to_have_text(re.compile(r"^replace-one client"))
            expect(fact("sampling")).to_have_text(re.compile(r"^none: every ready client trains every round"))
            expect(fact("epsilon_spent")).to_have_text("0 after 0 of 2 rounds (0% of ε planned)")
            expect(fact("epsilon_planned")).to_have_text(f"{planned}: what the 2 planned rounds spend")
            expect(fact("delta")).to_have_text(re.compile(r"^1e-05 "))
            expect(fact("accounting")).to_have_text("exact: ε exact (the Gaussian mechanism's)")
            expect(fact("secure_aggregation")).to_have_text("off: the server sees each client's update")
            expect(card.locator(".warn")).to_have_text([CENTRAL_IN_CLEAR])  # a note, not the no-defence warning
            expect(page.locator("#privacy-badge")).to_have_text(f"DP: ε 0 of {planned}")

            page.click("#start")
            expect(page.locator("#phase")).to_have_text("between sessions", timeout=UI_TIMEOUT_MS)
            answer = page.request.get(url + "download/metrics.csv")
            rows = list(csv.DictReader(io.StringIO(answer.text())))
            epsilon = float(rows[-1]["epsilon"])
            assert [r["round"] for r in rows] == ["1", "2"] and 0 < float(rows[0]["epsilon"]) < epsilon
            expect(fact("epsilon_spent")).to_have_text(f"{epsilon:.3g} after 2 of 2 rounds (100% of ε planned)")
            assert server.wait_for(r"round 2/2 .*  ε (\S+)").group(1) == f"{epsilon:.3g}"  # the server's log line
            assert fact("epsilon_spent").text_content().split()[0] == planned  # the rounds spent what was planned
            expect(page.locator("#privacy-badge")).to_have_text(f"DP: ε {epsilon:.3g} of {planned}")
            page.click("#stop")
            expect(page.locator("#phase")).to_have_text("finished", timeout=UI_TIMEOUT_MS)
            assert not errors, errors
        finally:
            browser.close()
    assert server.finish(timeout=60) == ExitStatus.OK  # Stop between sessions: every round asked for was done
    for client in clients:
        assert client.finish(timeout=60) == 0, client.output


@pytest.mark.processes
def test_the_live_views_follow_a_real_federation(cluster, tmp_path):
    """Two real clients training six local epochs a round (a few seconds): before Start, the page says what
    is coming instead of empty charts; during a round, the headline's round and a client's progress, moving
    from its <PROGRESS> reports; after the rounds, the headline's accuracy, the confusion matrix and the
    per-class scores as metrics.csv has them, a client's view (its rounds, its label balance from the counts
    it reported) and the log filtered by client and level, in 24-hour times."""
    from playwright.sync_api import expect, sync_playwright

    out = tmp_path / "run"
    server = cluster.server(*FAST, "--num-clients", "2", "--num-rounds", "2", "--local-epochs", "6", "--start",
                            "manual", "--stay", "--dashboard", "127.0.0.1:0", "--seed", "3", output_dir=out)
    link, url = server.wait_for(DASHBOARD_LINK, timeout=30).groups()
    clients = [cluster.client(k) for k in (1, 2)]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(link)
            expect(page.locator("#client-count")).to_have_text("(2 waiting)", timeout=UI_TIMEOUT_MS)
            expect(page.locator("#hl-round")).to_have_text("0 of 2")
            expect(page.locator(".charts .empty").first).to_contain_text(
                "No round yet: 2 client(s) ready; training starts when you press Start training")
            expect(page.locator("#chart-accuracy")).to_be_hidden()
            expect(page.locator("#evaluation .empty")).to_be_visible()
            card = page.locator("#model-card")  # logreg on MNIST: 784 x 10 + 10 weights, 31,400 bytes as float32
            expect(card).to_contain_text("parameters7,850")
            expect(card).to_contain_text("an update on the wire0.03 MB")
            expect(card).to_contain_text("Linear(in_features=784, out_features=10, bias=True)")

            page.click("#start")
            expect(page.locator("#hl-round")).to_have_text("1 of 2", timeout=UI_TIMEOUT_MS)
            expect(page.locator("#hl-waiting")).to_contain_text("waiting for", timeout=UI_TIMEOUT_MS)
            # Client 1's training share, at every frame: within one round it moves (two values inside 0..1)
            page.wait_for_function("""() => {
                window.seen = window.seen || {};
                const p = state.progress.get(1), r = state.run.round && state.run.round.number;
                if (p && p[1] == null && r && p[0] > 0 && p[0] < 1) {
                    const values = window.seen[r] = window.seen[r] || [];
                    if (values[values.length - 1] !== p[0]) values.push(p[0]);
                }
                return Object.values(window.seen).some((values) => values.length >= 2);
            }""", timeout=UI_TIMEOUT_MS, polling="raf")
            assert page.evaluate("Object.values(window.seen).every((v) => v.every((x, i) => i === 0 || x > v[i - 1]))")
            expect(page.locator("#phase")).to_have_text("between sessions", timeout=UI_TIMEOUT_MS)

            rows = list(csv.DictReader(io.StringIO(page.request.get(url + "download/metrics.csv").text())))
            accuracy, confusion = float(rows[-1]["test_accuracy"]), json.loads(rows[-1]["confusion"])
            best = max(float(r["test_accuracy"]) for r in rows)
            expect(page.locator("#hl-round")).to_have_text("2 of 2")
            expect(page.locator("#hl-current")).to_have_text(f"{100 * accuracy:.2f}%")
            expect(page.locator("#hl-metric-label")).to_have_text("accuracy, round 2's model")
            expect(page.locator("#hl-best")).to_contain_text(f"best {100 * best:.2f}%")
            expect(page.locator("#round-progress")).to_be_hidden()  # no round in progress
            assert page.evaluate("charts['chart-bytes'].plot.scales.y.min") == 0  # traffic from zero

            expect(page.locator("#evaluation-what")).to_have_text("(round 2's model, on the server's test set)")
            cells = page.locator("#confusion td").all_text_contents()
            assert [int(v) for v in cells] == [v for row in confusion for v in row]
            recall_of_3 = confusion[3][3] / sum(confusion[3])
            expect(page.locator("#per-class tbody tr").nth(3).locator("td").nth(2)).to_have_text(
                f"{100 * recall_of_3:.1f}%")

            page.click("#clients tbody tr[data-id='2']")
            expect(page.locator("#cv-id")).to_have_text("2")
            expect(page.locator("#cv-labels .label-row")).to_have_count(10)
            counts = [int(v) for v in page.locator("#cv-labels .count").all_text_contents()]
            examples = page.evaluate("state.clients.get(2).examples")
            assert sum(counts) == examples and min(counts) > 0  # the counts it reported, for its examples
            page.wait_for_function("() => charts['chart-client'] && charts['chart-client'].plot.data[0].length === 2")
            assert page.evaluate("charts['chart-client-times'].plot.data[0]") == [1, 2]

            page.fill("#log-client", "2")
            expect(page.locator("#log li").first).to_contain_text("client 2")
            texts = page.locator("#log li").all_text_contents()
            assert texts and all("client 2" in t for t in texts) and any("client 2 is ready" in t for t in texts)
            page.fill("#log-client", "")
            expect(page.locator("#log")).to_contain_text("round 2/2  clients 2/2  test acc")  # the server's line
            page.select_option("#log-level", "warning")
            expect(page.locator("#log li:not(.warning)")).to_have_count(0)
            page.select_option("#log-level", "")
            assert all(re.fullmatch(r"\d\d:\d\d:\d\d", t) for t in page.locator("#log time").all_text_contents())
            page.click("#stop")
            expect(page.locator("#phase")).to_have_text("finished", timeout=UI_TIMEOUT_MS)
            assert not errors, errors
        finally:
            browser.close()
    assert server.finish(timeout=60) == ExitStatus.OK
    for client in clients:
        assert client.finish(timeout=60) == 0, client.output


@pytest.mark.processes
def test_progress_reports_and_label_counts_are_checked_like_every_field(cluster):
    """A raw peer's <READY> with label counts that do not add up, and a <PROGRESS> while it trains nothing:
    each gets an <ERROR> naming what is wrong, and the connection is closed."""
    cluster.server(*FAST, "--num-clients", "2", "--dashboard", "127.0.0.1:0")
    bad_counts = RawPeer(cluster.port, client_id=1, features=["dp-local", "compression", "secagg", "augment"])
    welcome = bad_counts.read_until({"<METADATA>"})[-1]
    assert welcome["progress_every_s"] == 0.5  # a server with a dashboard asks for progress
    bad_counts.send(encode_message("<READY>", num_examples=10, test_examples=1, label_counts=[5, 4] + [0] * 8))
    assert "label_counts must be 10 counts (>= 0) that add up to num_examples 10" in \
        bad_counts.read_until({"<ERROR>"})[-1]["message"]
    idle = RawPeer(cluster.port, client_id=2, features=["dp-local", "compression", "secagg", "augment"])
    idle.read_until({"<METADATA>"})
    idle.send(encode_message("<READY>", num_examples=10, test_examples=1))  # no counts: an older client
    idle.send(encode_message("<PROGRESS>", round=1, done=0.5))
    assert idle.read_until({"<ERROR>"})[-1]["message"] == "<PROGRESS> is not expected when the client is in state idle"
    for peer in (bad_counts, idle):
        peer.close()


def test_per_class_scores_from_a_confusion_matrix():
    # rows: true class; columns: predicted. Class 2 is never predicted and never present.
    scores = per_class_scores([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    assert scores[0] == {"precision": 3 / 5, "recall": 3 / 4, "f1": pytest.approx(2 / 3), "support": 4}
    assert scores[1] == {"precision": 4 / 5, "recall": 4 / 6, "f1": pytest.approx(8 / 11), "support": 6}
    assert scores[2] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert per_class_scores([[0, 2], [0, 0]])[0]["f1"] == 0.0  # present, never right: F1 0, not unknown


def test_the_state_follows_each_clients_progress_and_who_the_round_waits_for():
    engine, _ = engine_for([FakeClient(1), FakeClient(2), FakeClient(3)])
    state = DashboardState(engine)
    for k in (1, 2, 3):
        state.notify(ClientJoined(k, f"127.0.0.1:{k}", False))
        state.notify(ClientReady(k, 10, k, 3, [4, 6] if k == 1 else None))
    state.changes()
    state.notify(RoundStarted(1, 0, [1, 2, 3], [1, 2, 3], 0))
    batch = state.changes()
    assert batch["progress"] == {1: [0.0, None], 2: [0.0, None], 3: [0.0, None]}
    assert (batch["run"]["waiting_for"], batch["run"]["waiting_ids"]) == (3, "1-3")
    state.notify(ClientProgress(1, 1, 0.25))
    state.notify(ClientProgress(1, 1, 0.5))
    assert state.changes() == {"progress": {1: [0.5, None]}}  # the last report of the batch, and nothing else
    state.notify(UpdateArriving(1, 2))
    engine.pool.connected[2].upload_progress = lambda: 0.404  # its weights frame, 40% in
    assert state.changes()["progress"] == {2: [1.0, 0.4]}
    assert state.changes() is None  # no byte more: nothing sent
    state.notify(UpdateAccepted(1, 2, 10, {"train_loss": 0.5, "local_test_accuracy": 0.75, "fit_seconds": 2.0}))
    state.notify(ClientDropped(1, 3, "connection closed"))
    batch = state.changes()
    assert batch["progress"] == {2: None, 3: None}  # their part of the round is over
    assert (batch["run"]["waiting_for"], batch["run"]["waiting_ids"]) == (1, "1")
    assert [line["client"] for line in batch["log"]] == [3] and batch["log"][0]["level"] == "warning"
    row = {"round": 1, "clients": 2, "expected": 3, "train_loss": 0.5, "seconds": 3.0, "bytes_sent": 10,
           "bytes_received": 20, "max_fit_seconds": 2.0, "sum_fit_seconds": 4.0}
    state.notify(RoundAggregated(dict(row), 2))  # on the charts before the evaluation
    batch = state.changes()
    assert batch["rounds"][0]["seconds"] == 3.0 and batch["rounds"][0]["test_accuracy"] is None
    assert batch["run"]["evaluating"] == 1 and batch["run"]["waiting_for"] == 0
    state.notify(RoundFinished({**row, "test_accuracy": 0.5, "test_loss": 1.0, "confusion": [[1, 1], [0, 2]]}, 2))
    batch = state.changes()
    assert batch["rounds"][0]["test_accuracy"] == 0.5 and batch["run"]["evaluating"] is None
    assert batch["evaluation"]["confusion"] == [[1, 1], [0, 2]] and batch["evaluation"]["per_class"][1]["recall"] == 1
    detail = state.client_detail(2)
    assert detail["history"][0][:4] == [1, 0.5, 0.75, 2.0] and detail["label_counts"] is None
    assert state.client_detail(1)["label_counts"] == [4, 6] and state.client_detail(9) is None


# --------------------------------------------------------------------------- the HTTP checks


@pytest.mark.processes
def test_a_dashboard_beyond_loopback_prints_its_link_once_and_writes_its_token_nowhere(cluster, tmp_path):
    """No federation token is needed: the dashboard's own guards it. The page is plain HTTP: a warning says so."""
    out = tmp_path / "run"
    server = cluster.server(*FAST, "--num-clients", "2", "--start", "manual", "--dashboard", "0.0.0.0:0",
                            output_dir=out)
    link, url = server.wait_for(DASHBOARD_LINK, timeout=30).groups()
    server.wait_for("WARNING: the dashboard listens on 0.0.0.0 over plain HTTP", timeout=30)
    good = bearer(link)
    assert request(url + "api/state")[0] == 403
    status, state = request(url + "api/state", None, good)
    assert status == 200 and state["run"]["phase"] == "waiting for start"
    shown = json.dumps(state)
    assert good["Authorization"][7:] not in shown and str(tmp_path) not in shown  # no token, no path
    assert request(url + "api/state", None, {**good, "Host": "rebound.example"})[0] == 403
    assert request(url + "api/stop", {}, {**good, "Origin": "http://evil.example"})[0] == 403  # the token is not enough
    assert request(url + "api/start", {"lr": -1}, good) == (409, {"error": "lr -1 is outside 1e-05..10"})
    status, csv = request(url + "download/metrics.csv", None, good)
    assert status == 200 and csv.startswith(b"round,clients,") and csv.count(b"\n") == 1  # no round yet: a header
    assert request(url + "api/stop", {}, good)[0] == 200
    assert server.finish(timeout=60) == ExitStatus.INTERRUPTED
    assert "stopped (the Stop button on the dashboard) before any round completed" in server.output
    token = good["Authorization"][7:].encode()
    assert [line for line in server.lines if token.decode() in line] == [server.wait_for(DASHBOARD_LINK).string]
    written = [path for path in out.rglob("*") if path.is_file()]
    assert written and not [path for path in written if token in path.read_bytes()]  # config.json, metrics, logs


def test_every_request_needs_the_dashboards_token_on_loopback_too():
    """What another local user gets without the printed link: 403 and how to get in; nothing acts."""
    engine, _ = engine_for([FakeClient(1)], start="manual")

    def scenario(dashboard) -> dict:
        link, url = dashboard.access.link, dashboard.url
        wrong = {"Authorization": "Bearer " + "x" * 43}
        answers = {name: request(url + path, *rest) for name, (path, *rest) in {
            "page": ("",), "script": ("static/dashboard.js",), "state": ("api/state",), "feed": ("api/events",),
            "stop": ("api/stop", {}), "model": ("download/model.pt",), "wrong bearer": ("api/state", None, wrong),
            "wrong link": ("?token=" + "x" * 43,), "wrong cookie": ("api/state", None, {
                "Cookie": f"fedsock-dashboard-{dashboard.port}={'x' * 43}"}),
            "link as a POST": ("api/stop?" + urllib.parse.urlsplit(link).query, {}),
        }.items()}
        answers["refused"] = engine.control.stopping.is_set()
        answers["signed in"] = signed_in = sign_in(link)
        answers["page with the cookie"] = request(signed_in[0], None, signed_in[1])[0]
        answers["state with the cookie"] = request(url + "api/state", None, signed_in[1])[0]
        answers["model with the token"] = request(url + "download/model.pt", None, bearer(link))
        answers["stop with the token"] = request(url + "api/stop", {}, bearer(link))[0]
        return answers

    answers = with_dashboard(engine, scenario)
    refused = ["page", "script", "state", "feed", "stop", "model", "wrong bearer", "wrong link", "wrong cookie",
               "link as a POST"]
    assert {name: answers[name][0] for name in refused} == {name: 403 for name in refused}
    assert answers["refused"] is False  # no Stop went through
    error = answers["state"][1]["error"]
    assert "open the link the server printed (dashboard: http://127.0.0.1:" in error and "?token=..." in error
    url, _, cookie = answers["signed in"]
    assert url.endswith("/") and "token" not in url  # the redirect leaves the token out of the address bar
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert (answers["page with the cookie"], answers["state with the cookie"]) == (200, 200)
    status, model = answers["model with the token"]
    assert status == 200 and torch.load(io.BytesIO(model), weights_only=True)["w"].tolist() == [0.0, 0.0]
    assert answers["stop with the token"] == 200 and engine.control.stopping.is_set()


def test_cross_site_and_rebinding_requests_are_refused():
    """What a hostile page could send with the cookie a browser holds (the token alone is not enough)."""
    engine, _ = engine_for([FakeClient(1)], start="manual")

    def scenario(dashboard) -> list:
        url, cookie, _ = sign_in(dashboard.access.link)
        return [request(url + path, body, {**cookie, **headers}) for path, body, headers in [
            ("api/stop", {}, {"Origin": "http://evil.example"}),
            ("api/stop", {}, {"Sec-Fetch-Site": "cross-site"}),
            ("api/stop", {}, {"X-Fedsock-Action": None}),  # a plain form post cannot add it
            ("api/stop", {}, {"Content-Type": "text/plain"}),
            ("api/state", None, {"Host": f"evil.example:{dashboard.port}"}),  # DNS rebinding
            ("api/more", {"rounds": 3}, {}),
            ("download/config.json", None, {}),  # only the three downloads
            ("static/..%2Fdashboard.py", None, {}),
            ("api/stop", {}, {"Origin": url.rstrip("/")}),  # the page itself
        ]]

    answers = with_dashboard(engine, scenario)
    assert [status for status, _ in answers] == [403, 403, 403, 403, 403, 409, 404, 404, 200]
    assert "may not act on this run" in answers[0][1]["error"]
    assert "answers only to its own addresses and names" in answers[4][1]["error"]
    assert engine.control.stopping.is_set() and engine.control.stop_reason == "the Stop button on the dashboard"
    assert answers[8][1]["message"].startswith("dashboard: stopping")


def test_beyond_loopback_the_host_must_name_this_machine():
    """Bound to 0.0.0.0 (and reached on 127.0.0.1): a rebinding page's name is refused; an address, and
    this machine's names, are not."""
    engine, _ = engine_for([FakeClient(1)], start="manual")
    machine = socket.gethostname()

    def scenario(dashboard) -> dict:
        good, port = bearer(dashboard.access.link), dashboard.port
        return {host: request(dashboard.url + "api/state", None, {**good, "Host": host})[0] for host in [
            f"rebound.example:{port}", f"{machine}.rebound.example", f"127.0.0.1:{port}", f"localhost:{port}",
            f"[::1]:{port}", f"192.0.2.7:{port}", f"{machine.upper()}.:{port}", f"{machine.split('.')[0]}.local"]}

    statuses = with_dashboard(engine, scenario, host="0.0.0.0", loopback=False)
    assert list(statuses.values()) == [403, 403, 200, 200, 200, 200, 200, 200], statuses


def test_the_state_keeps_each_clients_last_numbers_and_sends_only_what_changed():
    engine, _ = engine_for([FakeClient(1), FakeClient(2)])
    state = DashboardState(engine)
    state.notify(Listening("127.0.0.1:5", "plain TCP", "no authentication", "/secret/path"))
    for k in (1, 2):
        state.notify(ClientJoined(k, f"127.0.0.1:{k}", False))
        state.notify(ClientReady(k, 100 * k, k, 2))
    first = state.changes()
    assert [(c["id"], c["state"], c["examples"]) for c in first["clients"]] == [(1, "waiting", 100), (2, "waiting", 200)]
    state.notify(UpdateAccepted(1, 2, 200, {"train_loss": 0.25, "local_test_accuracy": 0.5, "fit_seconds": 1.5}))
    state.notify(RoundSaved({"round": 1, "clients": 1, "expected": 1, "seconds": 2.0, "test_accuracy": 0.9,
                             "test_f1": 0.8, "train_loss": float("nan")}, 3))
    second = state.changes()
    assert [c["id"] for c in second["clients"]] == [2]  # only the client that changed
    assert (second["clients"][0]["loss"], second["clients"][0]["fit_seconds"]) == (0.25, 1.5)
    assert second["rounds"][0]["test_f1"] is None  # MNIST has no positive class: no F1 on the page
    assert state.changes() is None  # nothing new: nothing sent
    state.notify(ConnectionRefused("127.0.0.1:9", "client id 2 is already connected to this run", 2))
    state.notify(ConnectionRefused("127.0.0.1:8", "client id 7 is not part of this run (ids are 1..2)", 7))
    third = state.changes()
    assert [(c["id"], c["state"]) for c in third["clients"]] == [(7, "refused")]  # live client 2 stays as it is
    assert [r["client_id"] for r in third["refused"]] == [2, 7] and state.clients[2]["state"] == "waiting"
    from fedsock.dashboard import dumps

    assert json.loads(dumps(state.snapshot()))["rounds"][0]["train_loss"] is None  # NaN is not JSON
    assert "/secret/path" not in dumps(state.snapshot())


def test_a_resumed_runs_state_holds_its_rounds_so_far_with_their_sessions():
    """The charts of a resumed run go on from its earlier rounds, and its rounds say where the resume began."""
    from fedsock.run_files import Checkpoint

    before = [{"round": k, "clients": 1, "test_accuracy": 0.5, "session": 1} for k in (1, 2)]
    resumed = Checkpoint({}, 2, before, {"w": torch.zeros(2)})
    from fedsock.engine import RoundEngine

    plain, _ = engine_for([FakeClient(1)], num_rounds=3)  # its pool, model and evaluation, with the checkpoint
    engine = RoundEngine(plain.config, plain.strategy, plain.pool, plain.model, plain.reports.evaluate,
                         plain.events, plain.traffic, resumed)
    state = DashboardState(engine)
    engine.events.observers.append(state)
    assert [(r["round"], r["session"]) for r in state.changes()["rounds"]] == [(1, 1), (2, 1)]
    assert run(engine) == ExitStatus.OK
    rows = state.changes()["rounds"]
    assert [(r["round"], r["session"], r["resumed"]) for r in rows] == [(3, 2, 1)]


def test_the_state_says_each_clients_policy_in_words():
    engine, _ = engine_for([FakeClient(1), FakeClient(2), FakeClient(3)])
    state = DashboardState(engine)
    strict = Policy(True, True, 5, 4, True, 1.0, 8.0, 1e-5).to_json()
    state.notify(ClientJoined(1, "127.0.0.1:1", False, strict))
    state.notify(ClientJoined(2, "127.0.0.1:2", False, Policy().to_json()))
    state.notify(ClientJoined(3, "127.0.0.1:3", False))  # a client that stated no policy
    clients = {c["id"]: c for c in state.changes()["clients"]}
    assert clients[1]["policy"] == strict and clients[3]["policy"] is None
    assert [clients[k]["policy_text"] for k in (1, 2, 3)] == [
        "secure aggregation with identities, ≥ 5 clients, t ≥ 4; DP noise it adds itself, z ≥ 1, ε ≤ 8 at δ 1e-05",
        "none", "not stated"]


@pytest.mark.parametrize("changes, text", [
    ({"min_threshold": 3}, "secure aggregation, t ≥ 3"),  # a stronger setting implies what it rests on, as in
    ({"identity": True}, "secure aggregation with identities"),  # fl_client.py
    ({"max_epsilon": 2.5, "delta": 1e-6}, "DP noise it adds itself, ε ≤ 2.5 at δ 1e-06"),
    ({"dp": True, "min_noise_multiplier": 0.7}, "DP noise it adds itself, z ≥ 0.7"),
])
def test_a_stated_policy_in_words(changes, text):
    assert policy_text({**Policy().to_json(), **changes}) == text


# --------------------------------------------------------------------------- the privacy card


def test_the_privacy_card_warns_in_plain_words_when_nothing_protects_the_updates():
    engine, _ = engine_for([FakeClient(1), FakeClient(2)])
    card = json.loads(dashboard_module.dumps(DashboardState(engine).snapshot()))["privacy"]
    assert (card["dp"], card["secure_aggregation"], card["sampling"]) == (False, False, "none")
    assert card["warnings"] == [{"level": "danger", "text": NO_DEFENCE}]
    assert NO_DEFENCE.startswith("No privacy protection: the server sees every client's update in the clear")
    assert "epsilon_spent" not in card  # no DP: no epsilon to show, not a zero


def test_the_privacy_card_follows_epsilon_round_by_round_and_plans_it_once_a_round(monkeypatch):
    """Central DP with Poisson sampling: add-or-remove neighbours, PLD; epsilon spent is the released
    rounds' (metrics.csv's); epsilon planned is what the run's rounds spend, computed once per round."""
    asked = []

    class Counting(Accountant):
        def epsilon(self, extra=None):
            asked.append(len(extra or []))
            return super().epsilon(extra)

    monkeypatch.setattr(dashboard_module, "Accountant", Counting)
    engine, recorder = engine_for([FakeClient(k) for k in (1, 2, 3, 4)], num_rounds=3, clients_per_round=2,
                                  sampling="poisson", min_clients=1)
    privacy = Privacy(PrivacySettings(clip=1.0, noise_multiplier=1.5, delta=1e-5, sampling="poisson"))
    engine.strategy.privacy = engine.privacy = privacy
    state = DashboardState(engine)

    before = [state.changes()["privacy"]] + [state.snapshot()["privacy"] for _ in range(20)]
    assert all(card == before[0] for card in before) and asked == [3]  # 21 asks, one computation
    card = before[0]
    assert (card["mode"], card["relation"], card["sampling"], card["accounting"]) == ("central", "add-remove",
                                                                                     "poisson", "PLD")
    assert card["relation_text"].startswith("add-or-remove-one client")
    assert "probability q = 0.5" in card["sampling_text"] and "about 2 of 4 a round" in card["sampling_text"]
    assert (card["clip"], card["noise_multiplier"], card["delta"], card["budget"]) == (1.0, 1.5, 1e-5, None)
    assert (card["epsilon_spent"], card["rounds_spent"], card["planned_rounds"]) == (0.0, 0, 3)
    planned = Accountant(1e-5, "poisson").epsilon([[1.5, 4, 2, 0.5]] * 3)
    assert card["epsilon_planned"] == pytest.approx(planned, rel=1e-9) and 0 < planned < 10
    assert card["warnings"] == [{"level": "note", "text": CENTRAL_IN_CLEAR}]
    assert state.changes() is None  # nothing changed: nothing sent
    assert str(privacy.sampling_seed) not in dashboard_module.dumps(state.snapshot())  # the sampling's secret

    assert run(engine) == ExitStatus.OK
    rows = recorder.rows()
    after = state.changes()["privacy"]
    assert after["epsilon_spent"] == rows[-1]["epsilon"] and after["rounds_spent"] == 3
    assert 0 < rows[0]["epsilon"] < rows[-1]["epsilon"] == pytest.approx(planned, rel=1e-3)  # as planned
    assert after["epsilon_planned"] == pytest.approx(rows[-1]["epsilon"], rel=1e-9)  # every planned round done
    assert len(asked) == 2  # once more, for the rounds now accounted


def test_the_privacy_card_shows_a_budget_and_secure_aggregation_with_its_threshold_and_identities():
    engine, _ = engine_for([FakeClient(k) for k in (1, 2, 3, 4, 5)], secure_aggregation=True, clients_per_round=4)
    key = bytes(range(32))
    engine.secure = secagg.SecureAggregation(secagg.Settings(federation_key=key), {"w": torch.zeros(2)})
    card = DashboardState(engine).snapshot()["privacy"]
    assert card["secure_aggregation"] and card["sampling_text"].startswith("fixed: 4 of the 5 clients a round")
    assert card["secure_text"] == f"threshold 3 of 4 clients a round, with identities (federation {fingerprint(key)})"
    assert card["warnings"] == [{"level": "note", "text": SUM_LEAKS}]  # the sum still leaks without DP

    budget = Privacy(PrivacySettings(clip=2.0, noise_multiplier=0.8, delta=1e-6, mode="distributed",
                                     sampling="fixed"), budget=4.0)
    engine.strategy.privacy = engine.privacy = budget
    engine.secure.settings.federation_key = None
    card = DashboardState(engine).snapshot()["privacy"]
    assert (card["epsilon_planned"], card["budget"], card["relation"], card["accounting"]) == (4.0, 4.0, "replace",
                                                                                            "RDP")
    assert card["warnings"] == [] and card["mode_text"].startswith("distributed: each client")
    assert "without identities" in card["secure_text"]


@pytest.mark.parametrize("dp_mode, secure, expected", [
    (None, False, [("danger", NO_DEFENCE)]),
    (None, True, [("note", SUM_LEAKS)]),
    ("central", False, [("note", CENTRAL_IN_CLEAR)]),
    ("central", True, [("note", CENTRAL_SUM_IN_CLEAR)]),
    ("local", False, []),
    ("distributed", True, []),
])
def test_privacy_warnings(dp_mode, secure, expected):
    assert [(w["level"], w["text"]) for w in privacy_warnings(dp_mode, secure)] == expected


@pytest.mark.parametrize("value, expected", [("8080", ("127.0.0.1", 8080)), ("0.0.0.0:0", ("0.0.0.0", 0)),
                                             ("[::1]:9000", ("::1", 9000)), ("localhost:1", ("localhost", 1))])
def test_dashboard_addresses(value, expected):
    assert parse_address(value) == expected


@pytest.mark.parametrize("host, name", [("127.0.0.1:8080", "127.0.0.1"), ("[::1]:8080", "::1"), ("::1", "::1"),
                                        ("Box.Example.:80", "box.example"), ("localhost", "localhost")])
def test_host_headers_are_read_as_names(host, name):
    assert host_name(host) == name


@pytest.mark.parametrize("value", ["", "host:", "99999", ":80", "[::1]9000", "a:b"])
def test_bad_dashboard_addresses_are_one_line_errors(value):
    code, output = run_cli("fl_server", ["--dashboard", value])  # main as the script runs it, in this process
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == ExitStatus.USAGE and "--dashboard" in output and len(lines) <= 3 and "Traceback" not in output


@pytest.mark.processes
def test_a_dashboard_port_in_use_is_a_one_line_error(cluster):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = cluster.server(*FAST, "--dashboard", f"127.0.0.1:{port}", wait=False)
        assert server.finish(timeout=60) == ExitStatus.USAGE
    assert f"--dashboard 127.0.0.1:{port}: port {port} is already in use; pick another" in server.output
    assert "Traceback" not in server.output


# --------------------------------------------------------------------------- without a browser


@pytest.mark.processes
def test_sigusr1_starts_a_manual_run_without_a_browser(cluster, tmp_path):
    server = cluster.server(*FAST, "--num-clients", "1", "--num-rounds", "1", "--start", "manual")
    server.wait_for("waiting for SIGUSR1 to start training", timeout=30)
    client = cluster.client(1)
    server.wait_for("client 1 is ready", timeout=120)
    server.signal(signal.SIGUSR1)
    server.wait_for("SIGUSR1: training starts", timeout=30)
    assert server.finish(timeout=120) == 0
    assert client.finish(timeout=60) == 0
    assert read_checkpoint(tmp_path / "run" / "checkpoint.fsck").round == 1


@pytest.mark.processes
def test_a_client_that_knows_no_sessions_is_refused_by_a_staying_server(cluster, tmp_path):
    cluster.server(*FAST, "--num-clients", "1", "--stay")
    peer = RawPeer(cluster.port, client_id=1, features=["dp-local", "compression", "secagg"])
    messages = peer.read_until({"<ERROR>"})
    assert messages and messages[-1]["header"] == "<ERROR>", messages
    assert "this run needs the client features sessions" in messages[-1]["message"]
    peer.close()


@pytest.mark.processes
def test_the_demo_opens_a_dashboard_that_starts_and_stops_the_run(cluster, tmp_path):
    from conftest import free_port

    port = free_port()
    demo = cluster.run_program("demo.py", "--dashboard", str(port), "--clients", "2", "--model", "logreg", "--rounds",
                               "1", "--no-tmux", "--output-dir", str(tmp_path / "demo"))
    link, url = demo.wait_for(r"demo: the dashboard is at ((http://127\.0\.0\.1:\d+/)\?token=[\w-]+)",
                              timeout=60).groups()
    assert url == f"http://127.0.0.1:{port}/" and link in demo.wait_for(DASHBOARD_LINK).string  # the server's own
    demo.wait_for(r"2/2 ready", timeout=120)
    assert request(url + "api/start", {})[0] == 403
    assert request(url + "api/start", {}, bearer(link))[0] == 200
    demo.wait_for("session 1 finished after round 1", timeout=120)
    assert request(url + "api/stop", {}, bearer(link))[0] == 200
    assert demo.finish(timeout=120) == 0
    assert "final test accuracy" in demo.output and (tmp_path / "demo" / "model.pt").exists()
