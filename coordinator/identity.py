"""Agent identities: enrolment with the fleet token, then one credential per agent.

The fleet token is an enrolment secret. An agent's first registration presents it
and receives a credential of its own; the store keeps only the credential's sha256
(and, under mutual TLS, the sha256 of the client certificate it enrolled with). From
then on the agent's identity (its agent id) is reachable only with that credential
(or that certificate): another holder of the fleet token cannot take it over. A
revoked identity is refused for good.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from edgefarm.errors import AuthError
from results.records import AgentIdentity
from results.store import ResultsStore


def digest(secret: str | bytes) -> str:
    """sha256 hex of a credential or a certificate."""
    data = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(data).hexdigest()


def token_ok(expected: str, given: str) -> bool:
    """Constant-time secret check."""
    return secrets.compare_digest(expected.encode(), given.encode())


@dataclass(frozen=True)
class Admission:
    """The outcome of an identity check: who, and a new credential if just enrolled."""

    agent_id: str
    credential: str = ""  # set only when this registration enrolled the agent


def admit(
    store: ResultsStore,
    fleet_token: str,
    *,
    token: str,
    agent_id: str,
    name: str,
    device_id: str,
    credential: str,
    cert_der: bytes | None,
) -> Admission:
    """Check (or enrol) the identity an agent registers under; AuthError if refused.

    ``token`` is the fleet token the agent gave, ``credential`` its own credential
    (empty before enrolment), ``cert_der`` its verified client certificate under
    mutual TLS. Runs store calls: call it off the event loop.
    """
    known = store.agent_identity(agent_id)
    cert_sha = digest(cert_der) if cert_der else None
    if known is not None:
        if known.revoked:
            raise AuthError(f"agent {name}: its credential was revoked")
        if credential and token_ok(known.credential_sha256, digest(credential)):
            return Admission(agent_id)
        if not credential and cert_sha and known.cert_sha256 == cert_sha:
            return Admission(agent_id)
        if credential:
            raise AuthError(f"agent {name}: wrong credential")
        raise AuthError(
            f"agent {name} is enrolled already: present its credential "
            "(the fleet token cannot take over an enrolled agent)"
        )
    if credential:
        raise AuthError(
            f"agent {name}: this coordinator does not know its credential (delete the "
            "agent's credential file to enrol again with the fleet token)"
        )
    if not token_ok(fleet_token, token):
        raise AuthError("invalid fleet token")
    issued = secrets.token_urlsafe(32)
    enrolled = store.enrol_agent(
        AgentIdentity(
            agent_id=agent_id,
            agent_name=name,
            device_id=device_id,
            credential_sha256=digest(issued),
            cert_sha256=cert_sha,
            enrolled_at=time.time(),
        )
    )
    if not enrolled:
        raise AuthError(f"agent {name} was enrolled by a concurrent registration")
    return Admission(agent_id, issued)
