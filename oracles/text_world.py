"""A synthetic text world with known, intransitive preferences that a tiny byte-level model can learn.

A population of annotator groups, each judging by one simple property of the response text:

    fondness   the share of one character in the text (default "a": more is better)
    length     closeness of the length in characters to a target (default 12)
    variety    the number of distinct characters (more is better)

P(a ≻ b) = Σ_g w_g · v_g(a, b) / Σ_g w_g, where v_g is 1 if group g's property prefers a, 0 if it
prefers b, ½ if the property ties. So P(a ≻ b) + P(b ≻ a) = 1 and P(a ≻ a) = ½.

Three groups judging by three different properties make majority cycles (Condorcet): e.g. with the
defaults, B = "abcdefghijk" ≻ A = "aaaa" (length, variety) ≻ C = "aaaaaaaaaabcdefghijklm" (share of "a",
length) ≻ B (share of "a", variety), each with probability ⅔. No scalar reward can rank such a world; a
Nash equilibrium is a mixture over kinds of text. The prompts do not enter the judgment: they only give the
policy different contexts, and the held-out prompts check that what it learned carries over.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np

from data.keys import stable_hash
from oracles.protocol import Judgment, Pair, make_oracle_id

KINDS = ("fondness", "length", "variety")


@dataclass(frozen=True)
class Group:
    """One annotator group: prefers the text with the larger ``score`` (ties are ties)."""

    name: str
    kind: str  # one of KINDS
    char: str = "a"  # fondness: the character counted
    target: int = 12  # length: the preferred number of characters
    weight: float = 1.0  # the group's share of the population (relative)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"group {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "fondness" and len(self.char) != 1:
            raise ValueError(f"group {self.name!r}: char must be one character, got {self.char!r}")
        if self.weight <= 0:
            raise ValueError(f"group {self.name!r}: weight must be positive, got {self.weight}")

    def score(self, text: str) -> Fraction | int:
        """The property this group prefers more of (exact, so equal properties tie exactly)."""
        if self.kind == "fondness":
            return Fraction(text.count(self.char), len(text)) if text else Fraction(0)
        if self.kind == "length":
            return -abs(len(text) - self.target)
        return len(set(text))

    def vote(self, a: str, b: str) -> float:
        """1 if this group prefers a, 0 if b, ½ on a tie."""
        sa, sb = self.score(a), self.score(b)
        return 1.0 if sa > sb else 0.0 if sa < sb else 0.5


DEFAULT_GROUPS = (
    Group("a-lovers", "fondness", char="a"),
    Group("brief", "length", target=12),
    Group("varied", "variety"),
)


@dataclass
class TextWorldOracle:
    """Judges pairs of texts by the share of annotator groups preferring each (see the module doc).

    mode="exact": p_a = P(a ≻ b), n_votes = number of groups. mode="bernoulli": one annotator, from a
    group drawn with probability ∝ weight, votes (1, 0, or ½ on a tie); drawn from a generator seeded by
    (seed, pair), so asking again gives the same answer, and its mean over annotators is P(a ≻ b).
    """

    groups: tuple[Group, ...] = DEFAULT_GROUPS
    mode: str = "exact"
    seed: int = 0
    name: str = "text_world"

    def __post_init__(self):
        if self.mode not in ("exact", "bernoulli"):
            raise ValueError(f"text world oracle: mode must be 'exact' or 'bernoulli', got {self.mode!r}")
        self.groups = tuple(self.groups)
        if not self.groups:
            raise ValueError("text world oracle: needs at least one annotator group")
        if len({g.name for g in self.groups}) != len(self.groups):
            raise ValueError("text world oracle: group names must be distinct")
        settings = {"mode": self.mode, "groups": [asdict(g) for g in self.groups]}
        if self.mode == "bernoulli":
            settings["seed"] = self.seed
        self.oracle_id = make_oracle_id("text_world", self.name, settings)

    def votes(self, a: str, b: str) -> dict[str, float]:
        """Each group's vote on a ≻ b."""
        return {g.name: g.vote(a, b) for g in self.groups}

    def prob(self, a: str, b: str) -> float:
        """The ground truth P(a ≻ b)."""
        total = sum(g.weight for g in self.groups)
        return sum(g.weight * g.vote(a, b) for g in self.groups) / total

    def matrix(self, texts: list[str]) -> np.ndarray:
        """P[i, j] = P(texts[i] ≻ texts[j]), for ground-truth evaluation of sets of responses."""
        return np.array([[self.prob(a, b) for b in texts] for a in texts])

    def judge(self, pairs: list[Pair]) -> list[Judgment]:
        return [self._judge_one(p) for p in pairs]

    def _judge_one(self, pair: Pair) -> Judgment:
        votes = self.votes(pair.a, pair.b)
        if self.mode == "exact":
            return Judgment(pair, self.prob(pair.a, pair.b), n_votes=len(self.groups), detail={"votes": votes})
        rng = np.random.default_rng(int(stable_hash(self.seed, pair.prompt_id, pair.a_id, pair.b_id, length=8), 16))
        weights = np.array([g.weight for g in self.groups])
        group = self.groups[rng.choice(len(self.groups), p=weights / weights.sum())]
        return Judgment(pair, votes[group.name], detail={"group": group.name})


# ----- prompts ----------------------------------------------------------------------------------------

_TRAIN_TOPICS = (
    "the sea", "a cat", "rain", "bread", "the moon", "a river", "winter", "a garden",
    "music", "a train", "coffee", "the wind", "a map", "a lamp", "snow", "a bridge",
    "apples", "a clock", "the desert", "a boat", "stars", "a forest", "a letter", "the sun",
)
_EVAL_TOPICS = ("a mountain", "tea", "a city", "the night", "a song", "a storm", "a key", "paper")
_FORMS = ("Write about {}.", "Say something on {}.", "A line about {}:", "Describe {}.")


def letter_world() -> "TextWorldOracle":
    """A world a tiny model learns in seconds: three groups, each fond of one letter (a, b, c). Strings
    mostly of one letter plus some of the next (:func:`letter_texts`) cycle: e.g. "bbbbcc" ≻ "aaaabb" ≻
    "ccccaa" ≻ "bbbbcc", each with probability ⅔."""
    return TextWorldOracle(tuple(Group(f"{c}-fans", "fondness", char=c) for c in "abc"), name="letters")


def letter_texts(rng: random.Random, k: int) -> list[str]:
    """k distinct strings for :func:`letter_world`, each mostly one letter with some of the next one."""
    out: set[str] = set()
    while len(out) < k:
        major, minor = rng.choice([("a", "b"), ("b", "c"), ("c", "a")])
        n = rng.randint(3, 7)
        chars = list(major * n + minor * rng.randint(1, n - 1))
        rng.shuffle(chars)
        out.add("".join(chars))
    return sorted(out)


def text_world_prompts(split: str) -> list[str]:
    """The synthetic prompts: "train" (24) or "eval" (8, on topics never seen in training)."""
    topics = {"train": _TRAIN_TOPICS, "eval": _EVAL_TOPICS}.get(split)
    if topics is None:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return [_FORMS[i % len(_FORMS)].format(topic) for i, topic in enumerate(topics)]
