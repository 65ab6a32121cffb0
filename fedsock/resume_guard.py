"""What a run protects, and what a resume may not quietly drop (issue 23).

Every checkpoint records its run's protections (`Protections`: TLS, client certificates,
which authentication, secure aggregation, client-level DP), and a run with secrets seals
it: an HMAC-SHA256 under a key derived from them (fedsock/run_files.py's `seal_key`).
`check_resume` then, before a resumed run prepares anything:

1. checks the seal with the secrets given now. The secrets must be the ones that sealed
   it, and the MAC must match; a MAC that does not is always refused (the file was changed
   by someone without the secrets, or the secrets are not the run's);
2. refuses to go on with less than the checkpoint records (`weakened`, the one definition
   of "at least as strong").

Either refusal is one line naming what would be lost and the flags that keep it;
--allow-weaker-resume goes on anyway and prints what was dropped.

The secrets that seal are the server's TLS private key (the key file's bytes), the shared
token and the per-client secrets: the operator holds them, gives them again on every resume
(a resume takes key and token files only from the flags given now, never from the file:
config.given_again_on_resume), and they last as long as the run (a TLS key renewed since
cannot check the old key's checkpoints: resume with the old file). Certificates and CAs are
public, so they do not seal. Every client holds a shared token too: a seal made with a token
alone keeps out whoever is outside the federation, not an enrolled client.

What this cannot defend: a run without secrets writes unsealed checkpoints, and whoever can
write its output folder can edit one to record no protections and recompute its SHA-256.
A resume given no secrets cannot tell that file from an honest one of a plain run (the
config.json beside it is no more trustworthy). So a resume given secrets needs a checkpoint
sealed with exactly those (an unsealed one was written without them or stripped of its
seal), and a server resuming an unsealed checkpoint says which protections it goes
without (`unprotected`). The path left open is an attacker who can write the output folder
and an operator who resumes with no security flags and does not read that line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from fedsock.config import ServerConfig, from_dict
from fedsock.console import UsageError, say, warn
from fedsock.privacy import default_delta
from fedsock.run_files import Checkpoint, seal_key, seal_matches

# Stronger to the right. Per-client secrets: no client can claim another's id, as any holder of a shared token can.
AUTH_STRENGTH = {"none": 0, "shared": 1, "per-client": 2}
# What the server sees of one update: all of it (central), a noised share inside a masked sum, only a noised update.
DP_MODE_STRENGTH = {"central": 0, "distributed": 1, "local": 2}
# The secrets that seal a checkpoint: what each is, and the flag that gives it.
SECRETS = {
    "tls-key": ("TLS key", "--tls-key"),
    "auth-token": ("token", "--auth-token-file (or $FEDSOCK_TOKEN)"),
    "client-secrets": ("per-client secrets", "--auth-tokens-file"),
}


@dataclass(frozen=True)
class Protections:
    """A run's protections, as its checkpoints record them (fields for DP and secure aggregation are
    None when those are off)."""

    tls: bool = False
    client_certificates: bool = False
    auth: str = "none"  # a key of AUTH_STRENGTH
    secure_aggregation: bool = False
    secagg_threshold: float | None = None
    secagg_identities: bool = False  # --federation: keys signed by enrolled identities
    dp_mode: str | None = None
    dp_noise_multiplier: float | None = None  # None: planned from the budget
    dp_epsilon: float | None = None  # the budget, if the run has one
    dp_delta: float | None = None

    @classmethod
    def of_run(cls, config: ServerConfig, tls: bool = False, auth: str = "none") -> Protections:
        dp = config.dp_clip is not None
        return cls(tls=tls, client_certificates=tls and bool(config.tls_client_ca), auth=auth,
                   secure_aggregation=config.secure_aggregation,
                   secagg_threshold=config.secagg_threshold if config.secure_aggregation else None,
                   secagg_identities=config.secure_aggregation and config.federation is not None,
                   dp_mode=config.dp_mode if dp else None,
                   dp_noise_multiplier=config.dp_noise_multiplier if dp else None,
                   dp_epsilon=config.dp_epsilon if dp else None,
                   dp_delta=(config.dp_delta or default_delta(config.num_clients)) if dp else None)

    @classmethod
    def of_checkpoint(cls, checkpoint: Checkpoint) -> Protections:
        """The record of a checkpoint; for a format-2 file, which has none, what its settings say (a token
        from $FEDSOCK_TOKEN left no trace there)."""
        if checkpoint.protections is None:
            saved = from_dict(ServerConfig, checkpoint.config)
            auth = "per-client" if saved.auth_tokens_file else "shared" if saved.auth_token_file else "none"
            return cls.of_run(saved, bool(saved.tls_cert), auth)
        if not _well_formed(checkpoint.protections):
            raise ValueError("its record of the run's protections is malformed")
        return cls(**{**asdict(cls()), **checkpoint.protections})

    def to_json(self) -> dict:
        return asdict(self)


def _well_formed(data: dict) -> bool:
    """A record `weakened` can compare: known names, values of their types, and the numbers of what is on."""
    values = {**asdict(Protections()), **data}
    numbers = ("secagg_threshold", "dp_noise_multiplier", "dp_epsilon", "dp_delta")
    return (set(values) == set(asdict(Protections()))
            and all(type(values[k]) is bool for k in ("tls", "client_certificates", "secure_aggregation",
                                                                 "secagg_identities"))
            and values["auth"] in AUTH_STRENGTH and values["dp_mode"] in (None, *DP_MODE_STRENGTH)
            and all(values[k] is None or (type(values[k]) in (int, float) and values[k] > 0) for k in numbers)
            and (values["secagg_threshold"] is not None or not values["secure_aggregation"])
            and (values["dp_delta"] is not None or values["dp_mode"] is None))


def weakened(before: Protections, now: Protections) -> list[tuple[str, str]]:
    """What a resumed run (`now`) would drop of its checkpoint's protections (`before`), each with the flags
    that keep it. The one definition of "at least as strong":

    - TLS stays on, and so do client certificates (mutual TLS);
    - authentication is no weaker: none < a shared token < per-client secrets;
    - secure aggregation stays on, its threshold t no lower (fewer clients would suffice to unmask), and
      with identities if it had them (--federation: without, a lying server could substitute keys);
    - client-level DP stays on; its noise is added no nearer the server (central < distributed < local);
      a budget epsilon stays, and grows no larger; a fixed noise multiplier z falls no lower; delta grows
      no larger.

    Not in the list: the clip S (epsilon depends on z, the sampling and delta, not on S, as the noise's
    std is z·S), nor which certificate, CA or secret (they may be renewed; the seal checks the secrets)."""
    drops = []
    if before.tls and not now.tls:
        drops.append(("TLS", "--tls-cert and --tls-key"))
    if before.client_certificates and not now.client_certificates:
        drops.append(("client certificates (mutual TLS)", "--tls-client-ca"))
    if AUTH_STRENGTH[now.auth] < AUTH_STRENGTH[before.auth]:
        drops.append(("per-client secrets", SECRETS["client-secrets"][1]) if before.auth == "per-client"
                     else ("token authentication", SECRETS["auth-token"][1]))
    if before.secure_aggregation and not now.secure_aggregation:
        drops.append(("secure aggregation", "--secure-aggregation"))
    elif before.secure_aggregation and now.secagg_threshold < before.secagg_threshold:
        drops.append((f"secure aggregation's threshold {before.secagg_threshold:g}",
                      f"--secagg-threshold {before.secagg_threshold:g} or more"))
    if before.secagg_identities and now.secure_aggregation and not now.secagg_identities:
        drops.append(("secure aggregation's identities", "--federation"))
    if before.dp_mode is not None:
        drops += _dp_weakened(before, now)
    return drops


def _dp_weakened(before: Protections, now: Protections) -> list[tuple[str, str]]:
    if now.dp_mode is None:
        return [("client-level DP", "--dp-clip with --dp-noise-multiplier or --dp-epsilon")]
    drops = []
    if DP_MODE_STRENGTH[now.dp_mode] < DP_MODE_STRENGTH[before.dp_mode]:
        drops.append((f"DP noise added by the clients ({before.dp_mode} mode)", f"--dp-mode {before.dp_mode}"))
    if before.dp_epsilon is not None and (now.dp_epsilon is None or now.dp_epsilon > before.dp_epsilon):
        drops.append((f"the DP budget epsilon {before.dp_epsilon:g}", f"--dp-epsilon {before.dp_epsilon:g} or less"))
    if before.dp_noise_multiplier is not None and (now.dp_noise_multiplier or 0) < before.dp_noise_multiplier:
        drops.append((f"the DP noise multiplier {before.dp_noise_multiplier:g}",
                      f"--dp-noise-multiplier {before.dp_noise_multiplier:g} or more"))
    if now.dp_delta > before.dp_delta:
        drops.append((f"DP delta {before.dp_delta:g}", f"--dp-delta {before.dp_delta:g} or less"))
    return drops


def unprotected(now: Protections) -> list[str]:
    """The protections a server run goes without, for the line that says so."""
    return [name for name, on in (("TLS", now.tls), ("authentication", now.auth != "none"),
                                  ("secure aggregation", now.secure_aggregation),
                                  ("client-level DP", now.dp_mode is not None)) if not on]


def run_secrets(tls_key: str | None, shared: bytes | None, per_client: dict[int, bytes] | None) -> dict[str, bytes]:
    """The secrets that seal this run's checkpoints, by name (SECRETS)."""
    secrets = {}
    if tls_key:
        try:
            secrets["tls-key"] = Path(tls_key).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read --tls-key {tls_key}: {exc.strerror or exc}") from exc
    if shared is not None:
        secrets["auth-token"] = shared
    if per_client is not None:  # in a fixed order: the same secrets give the same key however the file is laid out
        secrets["client-secrets"] = b"".join(b"%d %s\n" % (k, v) for k, v in sorted(per_client.items()))
    return secrets


def check_resume(checkpoint: Checkpoint, now: Protections, secrets: dict[str, bytes], path: str, allow: bool,
                 who: str) -> None:
    """Refuse a resume whose checkpoint's seal does not hold, or which would go on with less protection
    than the checkpoint records (UsageError, one line); with `allow` (--allow-weaker-resume), warn instead."""
    check_seal(checkpoint, secrets, path, allow, who)  # first: whether the record below can be trusted
    try:
        before = Protections.of_checkpoint(checkpoint)
    except ValueError as exc:
        raise UsageError(f"cannot resume from {path}: {exc}") from exc
    drops = weakened(before, now)
    if drops and not allow:
        had = _and([f"{what} ({flags})" for what, flags in drops])
        them = "those flags" if len(drops) > 1 else "it"
        raise UsageError(f"cannot resume from {path}: its run had {had}, which this resume would drop: give {them} "
                         f"again (or --allow-weaker-resume to go on without)")
    if drops:
        warn(who, f"--allow-weaker-resume: this run goes on without {_and([what for what, _ in drops])}, which "
                  f"its checkpoint {path} records")


def check_seal(checkpoint: Checkpoint, secrets: dict[str, bytes], path: str, allow: bool, who: str) -> None:
    """The seal against the secrets given now. They must be the ones that sealed the file: a secret it was
    sealed with that is not given cannot check it, and a secret given that did not seal it says the file
    was written without it or stripped of its seal. A seal that does not match is never let through."""
    sealed_with = checkpoint.seal.secrets if checkpoint.seal is not None else ()
    unknown = [name for name in sealed_with if name not in SECRETS]
    if unknown:
        raise UsageError(f"cannot resume from {path}: it is sealed with {unknown[0]!r}, unknown to this fedsock")
    missing = [name for name in sealed_with if name not in secrets]
    if sealed_with and not missing:
        if not seal_matches(checkpoint.seal, seal_key({name: secrets[name] for name in sealed_with})):
            raise UsageError(f"cannot resume from {path}: its seal does not match {_secrets(sealed_with)} given: "
                             f"the file was changed by someone without them, or they are not its run's")
        say(who, f"the seal of {path} holds (checked with {_secrets(sealed_with)})")
    if missing and not allow:
        flags = _and([flag for name, (_, flag) in SECRETS.items() if name in missing])
        raise UsageError(f"cannot resume from {path}: it is sealed with {_secrets(missing)} of its run: give {flags} "
                         f"again (or --allow-weaker-resume to go on without checking it)")
    if missing:
        warn(who, f"--allow-weaker-resume: the seal of {path} is not checked ({_secrets(missing)} were not given)")
    unsealed = [name for name in secrets if name not in sealed_with]
    if unsealed and not allow:
        raise UsageError(f"cannot resume from {path}: it is not sealed with {_secrets(unsealed)}, as every "
                         f"checkpoint of a run with {'them' if len(unsealed) > 1 else 'it'} is: it comes from a run "
                         f"without, or its seal was stripped (if its run had none, --allow-weaker-resume goes on "
                         f"without checking it)")
    if unsealed:
        warn(who, f"--allow-weaker-resume: {path} is not checked with {_secrets(unsealed)}: only its SHA-256, "
                  f"which anyone can recompute")


def _secrets(names) -> str:
    return _and([f"the {what}" for name, (what, _) in SECRETS.items() if name in names])


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
