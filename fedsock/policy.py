"""A client's privacy policy: what it requires of a server before its update leaves it.

A client follows the run's settings, which the server chooses. Without a policy a server that
does not run secure aggregation, or sends a DP noise of 0, is simply obeyed. With one, the
client checks everything it can check itself, and fails closed: one line, a non-zero exit,
and an <ERROR> that tells the server why.

    --identity FILE                 secure aggregation whose keys are signed by enrolled
                                    identities (fedsock/identity.py); implies the next
    --require-secure-aggregation    the server sees only the sum of a round's updates
    --min-round-clients N           ... of at least N clients (the round's participants)
    --min-threshold T               ... and a threshold of at least T
    --require-dp                    noise this client adds itself (local or distributed DP)
    --min-noise-multiplier Z        ... of at least Z times the clip, on the round's sum
    --max-epsilon E                 ... until this client's own epsilon would pass E

When it is checked: at the welcome (<METADATA> announces secure aggregation, identities and
DP), then at each round (<SECAGG_SETUP>'s participants and threshold, <MODEL>'s clip and
noise), since a lying welcome must not be enough.

What it can check, and so what it counts. Central DP is noise the server adds to the sum,
which no client can see: --require-dp refuses it. Distributed DP is each client's share of
the noise, std z·S/√t, so that any t survivors' shares add up to z·S: the multiplier counted
is this client's std·√t / S, which holds if the other survivors add theirs too (the usual
assumption of distributed DP). Epsilon is this client's own count, rounds it trained in,
each a Gaussian mechanism of that multiplier under the replace-one relation, with no
amplification by sampling: the server's sampling is not something a client can check. It is
therefore at least the server's epsilon, and usually more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Mapping

from fedsock.console import FedsockError


class PolicyRefused(FedsockError):
    """The server offers less than this client's policy requires."""


@dataclass
class Policy:
    identity: bool = False
    require_secure_aggregation: bool = False
    min_round_clients: int | None = None
    min_threshold: int | None = None
    require_dp: bool = False
    min_noise_multiplier: float | None = None
    max_epsilon: float | None = None
    delta: float = 1e-5

    @classmethod
    def of(cls, config: Any) -> "Policy":
        """A client's policy from its settings (fedsock.config.ClientConfig); each stronger setting
        implies what it rests on."""
        secagg = bool(config.identity or config.require_secure_aggregation or config.min_round_clients
                      or config.min_threshold)
        dp = bool(config.require_dp or config.min_noise_multiplier or config.max_epsilon)
        return cls(bool(config.identity), secagg, config.min_round_clients, config.min_threshold, dp,
                   config.min_noise_multiplier, config.max_epsilon, config.policy_delta)

    @classmethod
    def stated(cls, fields: Mapping[str, Any]) -> "Policy":
        """A policy as a client's <HELLO> states it: to_json's keys, checked by the server
        (socket_methods.POLICY_KEYS). As in of(), each stronger setting implies what it rests on."""
        return cls.of(SimpleNamespace(
            identity=fields["identity"], require_secure_aggregation=fields["secure_aggregation"],
            min_round_clients=fields["min_round_clients"], min_threshold=fields["min_threshold"],
            require_dp=fields["dp"], min_noise_multiplier=fields["min_noise_multiplier"],
            max_epsilon=fields["max_epsilon"], policy_delta=fields["delta"] or cls.delta))

    @property
    def empty(self) -> bool:
        return not (self.require_secure_aggregation or self.require_dp)

    def describe(self) -> str:
        """The policy in one line, as the client prints it when it joins."""
        if self.empty:
            return "none: this client follows the server's settings (see --require-secure-aggregation, --require-dp)"
        parts = []
        if self.require_secure_aggregation:
            parts.append("secure aggregation" + (" with enrolled identities" if self.identity else ""))
            each = [f"at least {self.min_round_clients} clients" if self.min_round_clients else "",
                    f"a threshold of at least {self.min_threshold}" if self.min_threshold else ""]
            if any(each):
                parts[-1] += " of " + " and ".join(e for e in each if e) + " a round"
        if self.require_dp:
            dp = "DP noise that this client adds itself"
            if self.min_noise_multiplier:
                dp += f", multiplier at least {self.min_noise_multiplier:g}"
            if self.max_epsilon:
                dp += f", epsilon at most {self.max_epsilon:g} at delta {self.delta:g} (its own count)"
            parts.append(dp)
        return "requires " + "; ".join(parts)

    def summary(self) -> str:
        """The policy in a few words, for the dashboard's clients table:
        "secure aggregation with identities, ≥ 5 clients, t ≥ 4; DP noise it adds itself, z ≥ 1, ε ≤ 8 at δ 1e-05"."""
        if self.empty:
            return "none"
        parts = []
        if self.require_secure_aggregation:
            each = ["secure aggregation" + (" with identities" if self.identity else "")]
            if self.min_round_clients:
                each.append(f"≥ {self.min_round_clients} clients")
            if self.min_threshold:
                each.append(f"t ≥ {self.min_threshold}")
            parts.append(", ".join(each))
        if self.require_dp:
            each = ["DP noise it adds itself"]
            if self.min_noise_multiplier:
                each.append(f"z ≥ {self.min_noise_multiplier:g}")
            if self.max_epsilon:
                each.append(f"ε ≤ {self.max_epsilon:g} at δ {self.delta:g}")
            parts.append(", ".join(each))
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        """What <HELLO> tells the server (which shows it on the dashboard): the policy, not a secret."""
        return {"identity": self.identity, "secure_aggregation": self.require_secure_aggregation,
                "min_round_clients": self.min_round_clients, "min_threshold": self.min_threshold,
                "dp": self.require_dp, "min_noise_multiplier": self.min_noise_multiplier,
                "max_epsilon": self.max_epsilon, "delta": self.delta if self.max_epsilon else None}

    # ---- the checks

    def check_welcome(self, meta: Mapping[str, Any]) -> None:
        """What <METADATA> announces, against the policy (PolicyRefused, one line)."""
        if self.require_secure_aggregation and not meta["secure_aggregation"]:
            raise PolicyRefused("this client requires secure aggregation, and the server does not run it "
                                "(--secure-aggregation)")
        if self.identity and not meta["identities"]:
            raise PolicyRefused("this client has an identity, and the server runs secure aggregation without "
                                "identities (no --federation): a server that lies could read its update")
        mode = meta["dp_mode"]
        if self.require_dp and mode not in ("local", "distributed"):
            what = ("central DP, noise the server adds itself, which this client cannot check" if mode == "central"
                    else "no DP")
            raise PolicyRefused(f"this client requires DP noise that it adds itself (local or distributed), and the "
                                f"server runs {what}")
        if self.min_noise_multiplier and meta["dp_noise_multiplier"] < self.min_noise_multiplier:
            raise PolicyRefused(f"the server's DP noise multiplier {meta['dp_noise_multiplier']:g} is below this "
                                f"client's --min-noise-multiplier {self.min_noise_multiplier:g}")

    def check_round(self, params: Any) -> None:
        """A <SECAGG_SETUP> (fedsock.secagg.Params): enough clients, and a high enough threshold."""
        n, t = len(params.participants), params.threshold
        if self.min_round_clients and n < self.min_round_clients:
            raise PolicyRefused(f"round {params.round} has {n} clients, fewer than this client's --min-round-clients "
                                f"{self.min_round_clients}")
        if self.min_threshold and t < self.min_threshold:
            raise PolicyRefused(f"round {params.round} has threshold {t}, below this client's --min-threshold "
                                f"{self.min_threshold}")


def policy_text(stated: Mapping[str, Any] | None) -> str:
    """What the dashboard shows of a client's stated policy; a client that states none (an older or
    a third-party one) is "not stated", which is not the same as "none"."""
    return "not stated" if stated is None else Policy.stated(stated).summary()


class PrivacyLedger:
    """A client's check of each <MODEL> against its DP policy, and its own epsilon (see the module)."""

    def __init__(self, policy: Policy, dp_mode: str):
        self.policy, self.dp_mode = policy, dp_mode
        self.accountant = None
        if policy.max_epsilon:
            from fedsock.privacy import Accountant

            self.accountant = Accountant(policy.delta, "none")

    def multiplier(self, message: Mapping[str, Any], threshold: int | None) -> float:
        """The noise multiplier on the round's sum that this client can vouch for (the module says how)."""
        clip, std = message.get("dp_clip"), message.get("dp_noise_std", 0.0)
        if not clip:
            return 0.0
        if self.dp_mode == "distributed":
            return std * math.sqrt(threshold or 1) / clip
        return std / clip

    def check_model(self, message: Mapping[str, Any], threshold: int | None) -> str:
        """A <MODEL>, before training on it: PolicyRefused if its noise breaks the policy, or if training
        would take this client's epsilon past its limit. What this round spends, for the round line."""
        p, number = self.policy, message["round"]
        if not p.require_dp:
            return ""
        z = self.multiplier(message, threshold)
        if z <= 0:
            raise PolicyRefused(f"round {number}'s <MODEL> asks this client to add no DP noise; its policy requires it")
        if p.min_noise_multiplier and z < p.min_noise_multiplier * (1 - 1e-9):
            raise PolicyRefused(f"round {number}'s noise multiplier is {z:.4g}, below this client's "
                                f"--min-noise-multiplier {p.min_noise_multiplier:g}")
        if self.accountant is None:
            return f", DP noise multiplier {z:.3g}"
        after = self.accountant.epsilon([[z, 1, 1, 1.0]])
        if after > p.max_epsilon * (1 + 1e-9):
            raise PolicyRefused(f"round {number} would bring this client's epsilon to {after:.3g}, past its "
                                f"--max-epsilon {p.max_epsilon:g}; it leaves the run")
        self.accountant.record(z, 1, 1, 1.0)
        return f", DP noise multiplier {z:.3g}, its epsilon {after:.3g} of {p.max_epsilon:g}"
