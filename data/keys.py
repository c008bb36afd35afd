"""Deterministic keys: the same thing always gets the same id, so a repeated write is harmless."""

import hashlib


def stable_hash(*parts: object, length: int = 16) -> str:
    """Hex digest of the parts, separated so that ("ab", "c") and ("a", "bc") differ."""
    h = hashlib.blake2b(digest_size=length)
    for part in parts:
        data = str(part).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def prompt_id(prompt: str) -> str:
    return "p-" + stable_hash(prompt)


def response_id(prompt_id: str, policy_version: str, round: int, slot: int) -> str:
    """A response is identified by where it was sampled (its slot), not by its text: two samples
    with the same text are two draws from the policy."""
    return "r-" + stable_hash(prompt_id, policy_version, round, slot)


def comparison_id(prompt_id: str, a_id: str, b_id: str, oracle_id: str) -> str:
    """One oracle's judgment of one *ordered* pair (a shown first)."""
    return "c-" + stable_hash(prompt_id, a_id, b_id, oracle_id)
