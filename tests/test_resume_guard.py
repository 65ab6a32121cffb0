"""--resume keeps what protected the run (issue 23): each checkpoint records its run's protections,
a run with secrets seals it (HMAC-SHA256 under a key derived from them), and a resume whose seal
does not hold, or that would drop a protection, is refused in one line unless
--allow-weaker-resume, which says what is dropped.

In-process: the checkpoints are written by the server's own setup and RunFiles, the attacker edits
them with the run_files API (which recomputes the SHA-256, as anyone can), and the resumes are
fl_server.py's own parsing and setup (`server.prepare`, everything before it listens)."""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import fl_server
from fedsock import run_files, server
from fedsock.events import RoundFinished
from fedsock.resume_guard import Protections, weakened
from fedsock.run_files import Checkpoint, RunFiles, SealKey, read_checkpoint, write_checkpoint
from pki import Authority
from support import run_cli

PLAIN = ["--model", "logreg", "--num-clients", "3", "--num-rounds", "3"]
ROW = {"round": 1, "clients": 3, "test_accuracy": 0.5, "test_loss": 1.0, "train_loss": 1.0, "seconds": 1.0,
       "bytes_sent": 1, "bytes_received": 1, "max_fit_seconds": 0.1}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, list[str]]:
    """The flags of a run's TLS pair and of its token file."""
    folder = tmp_path_factory.mktemp("keys")
    cert, key = Authority(folder, "ca").issue("server", dns=["localhost"], ips=["127.0.0.1"])
    token = folder / "token"
    token.write_text("the-run's-secret\n")
    token.chmod(0o600)
    return {"tls": ["--tls-cert", cert, "--tls-key", key], "token": ["--auth-token-file", str(token)]}


@pytest.fixture(autouse=True)
def no_token_in_the_environment(monkeypatch):
    monkeypatch.delenv("FEDSOCK_TOKEN", raising=False)


def resume(*flags: str):
    """fl_server.py's parsing and setup of a resume: the Setup it would listen with."""
    config, checkpoint = fl_server.parse_config(list(flags))
    return server.prepare(config, checkpoint)


def checkpoint_of(run_dir: Path, *flags: str) -> Path:
    """The checkpoint after round 1 of a server run with `flags`, written by its RunFiles."""
    config, _ = fl_server.parse_config([*PLAIN, "--output-dir", str(run_dir), *flags])
    setup = resume(*PLAIN, "--output-dir", str(run_dir), *flags)
    run_dir.mkdir()
    files = RunFiles(run_dir, "test", None, setup.protections, setup.seal_key)
    privacy = setup.strategy.privacy
    state = Checkpoint(asdict(config), 1, [dict(ROW)], setup.model.tensors, setup.strategy.state,
                       {"privacy": privacy.to_json()} if privacy else {})
    files.notify(RoundFinished(dict(ROW), config.num_rounds, state))
    asyncio.run(files.flush())
    files.close()
    return run_dir / run_files.CHECKPOINT_NAME


def edit(path: Path, seal_with: bytes | None = None, **config_changes) -> Checkpoint:
    """What someone who can write the file but holds no secret can do: change it, recompute its SHA-256,
    and either drop the seal or make one with a key of their own (`seal_with`)."""
    state = read_checkpoint(path)
    state.config.update(config_changes)
    key = SealKey(state.seal.secrets, seal_with) if seal_with is not None else None
    write_checkpoint(path, state, key)
    return state


def refused(argv: list[str], pattern: str) -> str:
    """fl_server.py, as its script runs, refuses `argv` in one line matching `pattern`, exit status 2."""
    code, output = run_cli("fl_server", argv)
    assert code == 2 and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("fl_server.py: error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), output
    return lines[0]


@pytest.mark.parametrize("secrets, sealed_with", [
    (["tls", "token"], "the TLS key and the token"),
    (["tls"], "the TLS key"),  # TLS alone: its key seals, though no token is set
])
def test_the_issues_attack_a_protected_runs_checkpoint_stripped_of_its_protections_is_refused(
        tmp_path, keys, secrets, sealed_with):
    """The issue's finding: the checkpoint of a run with TLS (and a token) and secure aggregation, edited
    to say "plain TCP, no authentication, no secure aggregation" with its SHA-256 recomputed, resumed as
    that. Now the run's secrets, given again, find no seal of theirs on it."""
    flags = [flag for name in secrets for flag in keys[name]]
    path = checkpoint_of(tmp_path / "run", "--secure-aggregation", *flags)
    state = edit(path, tls_cert=None, tls_key=None, auth_token_file=None, secure_aggregation=False)
    state.protections = {}
    write_checkpoint(path, state)  # its record of protections emptied too
    line = refused(["--resume", str(path), *flags], rf"cannot resume from {path}: it is not sealed with {sealed_with}")
    assert "--allow-weaker-resume" in line


def test_the_open_path_a_resume_given_no_secrets_says_what_it_goes_without(tmp_path, keys, capsys):
    """What cannot be told apart: an unsealed file that records nothing, resumed with no security flags.
    The run says, at start, what it goes without."""
    path = checkpoint_of(tmp_path / "run", "--secure-aggregation", *keys["tls"], *keys["token"])
    state = edit(path, secure_aggregation=False)
    state.protections = {}
    write_checkpoint(path, state)
    setup = resume("--resume", str(path))
    assert setup.tls is None and setup.secure is None
    assert ("resuming from an unsealed checkpoint without TLS, authentication, secure aggregation, client-level "
            "DP: if its run had them, the file was edited") in capsys.readouterr().out


@pytest.mark.parametrize("change", ["a weight", "a setting", "the record of protections"])
def test_a_sealed_checkpoint_changed_anywhere_is_refused_by_its_seal(tmp_path, keys, change):
    flags = [*keys["tls"], *keys["token"]]
    path = checkpoint_of(tmp_path / "run", "--secure-aggregation", *flags)
    state = read_checkpoint(path)
    if change == "a weight":
        next(iter(state.model.values())).view(-1)[0] += 1e-3
    elif change == "a setting":
        state.config["secure_aggregation"] = False
    else:
        state.protections["secure_aggregation"] = False
    write_checkpoint(path, state, SealKey(state.seal.secrets, b"a key the attacker made up"))
    refused(["--resume", str(path), *flags], rf"cannot resume from {path}: its seal does not match the TLS key and "
                                             rf"the token given: the file was changed by someone without them")


def test_a_sealed_checkpoint_resumed_without_its_secrets_says_which_flags_to_give(tmp_path, keys):
    path = checkpoint_of(tmp_path / "run", *keys["tls"], *keys["token"])
    refused(["--resume", str(path)], rf"cannot resume from {path}: it is sealed with the TLS key and the token of its "
                                     rf"run: give --tls-key and --auth-token-file \(or \$FEDSOCK_TOKEN\) again \(or "
                                     rf"--allow-weaker-resume to go on without checking it\)")
    refused(["--resume", str(path), *keys["token"]], "it is sealed with the TLS key of its run: give --tls-key again")


def test_a_resume_with_the_same_protections_goes_on_with_all_of_them(tmp_path, keys, capsys):
    flags = [*keys["tls"], *keys["token"]]
    path = checkpoint_of(tmp_path / "run", "--secure-aggregation", "--tls-client-ca", keys["tls"][1], *flags)
    setup = resume("--resume", str(path), "--tls-client-ca", keys["tls"][1], *flags)
    assert setup.tls is not None and setup.auth.required and setup.secure is not None
    assert setup.protections == read_checkpoint(path).protections
    assert setup.seal_key.secrets == ("auth-token", "tls-key")
    output = capsys.readouterr()
    assert f"the seal of {path} holds (checked with the TLS key and the token)" in output.out
    assert "WARNING" not in output.err and "unsealed" not in output.out


def test_a_weaker_resume_is_refused_and_with_the_allow_flag_goes_on_saying_what_it_drops(tmp_path, keys, capsys):
    path = checkpoint_of(tmp_path / "run", "--secure-aggregation", "--tls-client-ca", keys["tls"][1], *keys["tls"],
                         *keys["token"])
    refused(["--resume", str(path), *keys["tls"], *keys["token"]],
            rf"cannot resume from {path}: its run had client certificates \(mutual TLS\) \(--tls-client-ca\), which "
            rf"this resume would drop: give it again \(or --allow-weaker-resume to go on without\)")
    setup = resume("--resume", str(path), "--allow-weaker-resume")
    assert setup.tls is None and not setup.auth.required and setup.secure is not None  # kept: not a secret
    warnings = capsys.readouterr().err
    assert (f"--allow-weaker-resume: the seal of {path} is not checked (the TLS key and the token were not "
            f"given)") in warnings
    assert (f"--allow-weaker-resume: this run goes on without TLS, client certificates (mutual TLS) and token "
            f"authentication, which its checkpoint {path} records") in warnings


@pytest.mark.parametrize("run, weaker, dropped", [
    (["--secure-aggregation"], ["--secagg-threshold", "0.55"],
     r"secure aggregation's threshold 0.666667 \(--secagg-threshold 0.666667 or more\)"),
    (["--dp-clip", "1", "--dp-epsilon", "5"], ["--dp-epsilon", "8"],
     r"the DP budget epsilon 5 \(--dp-epsilon 5 or less\)"),
    (["--dp-clip", "1", "--dp-noise-multiplier", "1.2"], ["--dp-noise-multiplier", "0.6"],
     r"the DP noise multiplier 1.2 \(--dp-noise-multiplier 1.2 or more\)"),
    (["--dp-clip", "1", "--dp-noise-multiplier", "1.2", "--dp-mode", "local"], ["--dp-mode", "central"],
     r"DP noise added by the clients \(local mode\) \(--dp-mode local\)"),
])
def test_secure_aggregation_and_dp_made_weaker_by_a_flag_are_refused(tmp_path, run, weaker, dropped, capsys):
    path = checkpoint_of(tmp_path / "run", *run)
    refused(["--resume", str(path), *weaker], rf"cannot resume from {path}: its run had {dropped}, which this resume")
    resume("--resume", str(path), *weaker, "--allow-weaker-resume")
    assert "--allow-weaker-resume: this run goes on without" in capsys.readouterr().err


def test_secure_aggregation_with_identities_resumes_only_with_them(tmp_path):
    """--federation is a file of the run's trust, given again on every resume: without it, the resumed
    rounds' keys would be signed by no one, and a lying server could substitute them."""
    from fedsock import enrol

    enrol.enrol(tmp_path / "federation", [1, 2, 3])
    federation = str(tmp_path / "federation" / "federation.pub")
    path = checkpoint_of(tmp_path / "run", "--secure-aggregation", "--federation", federation)
    refused(["--resume", str(path)], r"its run had secure aggregation's identities \(--federation\)")
    resume("--resume", str(path), "--federation", federation)


def test_a_secret_added_on_resume_needs_the_allow_flag(tmp_path, keys, capsys):
    """An unsealed checkpoint resumed with a token: a run without one (then the flag says so), or a file
    stripped of its seal (then it is the attack above)."""
    path = checkpoint_of(tmp_path / "run")
    refused(["--resume", str(path), *keys["token"]], r"it is not sealed with the token, as every checkpoint of a run "
                                                     r"with it is")
    setup = resume("--resume", str(path), *keys["token"], "--allow-weaker-resume")
    assert setup.auth.required and setup.seal_key.secrets == ("auth-token",)  # from now on, sealed
    assert "is not checked with the token: only its SHA-256" in capsys.readouterr().err


def test_a_checkpoint_never_takes_key_or_token_files_or_the_allow_flag_from_its_settings(tmp_path, keys):
    """Whoever edits the file must not pick the key that checks it: the files of keys, tokens and CAs,
    and the permission to weaken, come only from the flags given now."""
    path = checkpoint_of(tmp_path / "run", *keys["tls"], *keys["token"])
    edit(path, seal_with=b"x", allow_weaker_resume=True)
    config, _ = fl_server.parse_config(["--resume", str(path)])
    assert (config.tls_cert, config.tls_key, config.auth_token_file, config.allow_weaker_resume) == (None, None, None,
                                                                                                     False)


def test_a_format_2_checkpoint_is_read_and_its_protections_inferred_from_its_settings(tmp_path, keys, monkeypatch):
    path = checkpoint_of(tmp_path / "run", *keys["tls"])
    state = read_checkpoint(path)
    with monkeypatch.context() as older:
        older.setattr(run_files, "CHECKPOINT_FORMAT", 2)
        write_checkpoint(path, state)  # as fedsock wrote before format 3: no record read back, no seal
    assert read_checkpoint(path).protections is None
    refused(["--resume", str(path)], r"its run had TLS \(--tls-cert and --tls-key\)")
    refused(["--resume", str(path), *keys["tls"]], "it is not sealed with the TLS key")


def test_the_rule_at_least_as_strong():
    """`weakened` on hand-made records: each protection, kept, strengthened and dropped."""
    everything = Protections(tls=True, client_certificates=True, auth="per-client", secure_aggregation=True,
                             secagg_threshold=0.7, dp_mode="distributed", dp_noise_multiplier=1.0, dp_delta=1e-5)
    assert weakened(everything, everything) == [] and weakened(Protections(), everything) == []
    assert weakened(everything, Protections()) == [
        ("TLS", "--tls-cert and --tls-key"), ("client certificates (mutual TLS)", "--tls-client-ca"),
        ("per-client secrets", "--auth-tokens-file"), ("secure aggregation", "--secure-aggregation"),
        ("client-level DP", "--dp-clip with --dp-noise-multiplier or --dp-epsilon")]
    signed = Protections(**{**asdict(everything), "secagg_identities": True})
    assert weakened(signed, everything) == [("secure aggregation's identities", "--federation")]
    assert weakened(everything, signed) == []
    shared = Protections(auth="shared")
    assert [what for what, _ in weakened(everything, Protections(**{**asdict(everything), "auth": "shared"}))] == [
        "per-client secrets"]
    assert weakened(shared, everything) == [] and weakened(shared, Protections())[0][0] == "token authentication"
    local = Protections(**{**asdict(everything), "dp_mode": "local", "dp_noise_multiplier": 2.0, "dp_delta": 1e-6})
    assert weakened(everything, local) == []  # the noise nearer the clients, more of it, a smaller delta
    assert [what for what, _ in weakened(local, everything)] == [
        "DP noise added by the clients (local mode)", "the DP noise multiplier 2", "DP delta 1e-06"]
    budget = Protections(dp_mode="central", dp_epsilon=3.0, dp_delta=1e-5)
    assert weakened(budget, Protections(**{**asdict(budget), "dp_epsilon": 2.0})) == []
    assert [w for w, _ in weakened(budget, Protections(dp_mode="central", dp_noise_multiplier=9.0, dp_delta=1e-5))] == [
        "the DP budget epsilon 3"]


@pytest.mark.parametrize("record", [{"tls": "no"}, {"secure_aggregation": True}, {"dp_mode": "local"},
                                    {"dp_epsilon": -1.0}, {"firewall": True}])
def test_a_malformed_record_of_protections_is_one_line(tmp_path, record):
    path = checkpoint_of(tmp_path / "run")
    state = read_checkpoint(path)
    state.protections = record
    write_checkpoint(path, state)
    refused(["--resume", str(path)], rf"cannot resume from {path}: its record of the run's protections is malformed")


def test_a_resume_opens_no_dashboard_and_records_nothing_unless_asked_again(tmp_path):
    """The dashboard, manual starts, sessions and --record-updates belong to the session that asked for them."""
    from dataclasses import asdict

    from fedsock import config as settings
    from fedsock.config import ServerConfig

    saved = asdict(ServerConfig(dashboard="127.0.0.1:8080", start="manual", stay=True, record_updates="seen"))
    now = ServerConfig(resume=str(tmp_path / "checkpoint.fsck"))
    config = settings.resumed(now, saved, {}, {})
    assert (config.dashboard, config.start, config.stay, config.record_updates) == (None, "auto", False, None)
    asked = ServerConfig(resume=str(tmp_path / "checkpoint.fsck"), dashboard="0")
    assert settings.resumed(asked, saved, {"dashboard": "0"}, {"dashboard": "0"}).dashboard == "0"
