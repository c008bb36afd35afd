"""Reading a judge model's answer: a verdict from its text, and P(first ≻ second) from its log-probs.

Verdicts are about slots: ``"first"`` (shown as A), ``"second"`` (shown as B) or ``"tie"``. The caller maps
slots back to the pair's original order.

Accepted text, in the forms models actually produce: a bare word (``A``, ``b``, ``tie``), decorated
(``**A**``, ``[[B]]``, ``"A".``, ``Response A``, ``Verdict: tie``, ``Final answer: B``,
``Response B is better.``), or a JSON object
(optionally in a code fence) with a ``verdict``/``winner``/``answer``/``choice``/``better``/``preferred``
key holding one of those. Anything else — prose, both letters, an empty reply — is an abstention with
the reason, never a silent default to one side.
"""

from __future__ import annotations

import json
import math
import re

FIRST, SECOND, TIE = "first", "second", "tie"

_WORDS = {"a": FIRST, "b": SECOND, "tie": TIE, "draw": TIE, "equal": TIE, "tied": TIE, "both": TIE}
_KEYS = ("verdict", "winner", "answer", "choice", "better", "preferred", "preference", "result")
_DECOR = " \t\r\n*_`'\"[](){}<>.,:;!"
_PREFIX = re.compile(r"^(?:final\s+)?(?:verdict|answer|winner|choice|decision|output|better(?:\s+response)?)\s*(?:is)?\s*[:=\-]?\s*", re.I)
_RESPONSE = re.compile(r"^(?:response|assistant|option|answer)\s+", re.I)
_SUFFIX = re.compile(r"\s+is\s+(?:the\s+)?better(?:\s+(?:one|response))?$", re.I)
_CODE_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S | re.I)


def parse_verdict(text: str | None) -> tuple[str | None, str | None]:
    """(verdict, None) or (None, reason)."""
    if text is None or not text.strip():
        return None, "empty answer"
    s = text.strip()
    m = _CODE_FENCE.match(s)
    if m:
        s = m.group(1)
    if s.startswith("{"):
        return _from_json(s)
    word = _word(s)
    if word is not None:
        return word, None
    return None, f"no verdict in answer {_preview(text)}"


def _word(s: str) -> str | None:
    s = s.strip(_DECOR)
    s = _PREFIX.sub("", s).strip(_DECOR)
    s = _RESPONSE.sub("", s).strip(_DECOR)
    s = _SUFFIX.sub("", s).strip(_DECOR)
    s = _RESPONSE.sub("", s).strip(_DECOR)
    return _WORDS.get(s.lower())


def _from_json(s: str) -> tuple[str | None, str | None]:
    try:
        obj = json.loads(s)
    except ValueError:
        return None, f"malformed JSON answer {_preview(s)}"
    if not isinstance(obj, dict):
        return None, f"JSON answer is not an object {_preview(s)}"
    lowered = {str(k).lower(): v for k, v in obj.items()}
    for key in _KEYS:
        if key in lowered:
            value = lowered[key]
            word = _word(value) if isinstance(value, str) else None
            if word is None:
                return None, f"JSON answer has {key}={_preview(json.dumps(value))}, not A, B or tie"
            return word, None
    return None, f"JSON answer has no verdict key (one of {', '.join(_KEYS)}) {_preview(s)}"


def _preview(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n] + "…")


def logprob_p_first(logprobs: dict | None, verdict: str) -> float | None:
    """P(first ≻ second) from the verdict token's alternatives, or None when the answer carries none.

    The verdict token is the first generated token that reads as the parsed verdict (``A``, ``B`` or
    ``tie``, ignoring case, spaces and quotes), so a JSON answer works too. Its ``top_logprobs`` give
    the probabilities of the alternatives A, B and tie (several spellings of one, e.g. ``A`` and `` A``,
    add up); P = (p_A + p_tie / 2) / (p_A + p_B + p_tie), renormalised over the verdict tokens only.
    """
    content = (logprobs or {}).get("content") or []
    for tok in content:
        if _token_verdict(tok.get("token")) != verdict:
            continue
        mass = {FIRST: 0.0, SECOND: 0.0, TIE: 0.0}
        for alt in tok.get("top_logprobs") or []:
            v = _token_verdict(alt.get("token"))
            lp = alt.get("logprob")
            if v is not None and isinstance(lp, (int, float)) and math.isfinite(lp):
                mass[v] += math.exp(lp)
        total = sum(mass.values())
        if total <= 0.0:
            return None
        return (mass[FIRST] + 0.5 * mass[TIE]) / total
    return None


def _token_verdict(token: str | None) -> str | None:
    if not token:
        return None
    t = token.strip(" \t\r\n\"'*[]().:").lower()
    return {"a": FIRST, "b": SECOND, "tie": TIE}.get(t)
