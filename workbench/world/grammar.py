"""Scene grammar of the procedural video world: words -> Scene and back.

A prompt names one object (colour, shape), its motion direction and its speed, e.g.
"a red circle moving left" or "a fast blue square moving up". Words outside the grammar are an
error that lists the vocabulary, so a typo never silently becomes a different video.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "cyan": (0.10, 0.85, 0.90),
    "magenta": (0.88, 0.12, 0.85),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dy, dx) in image coordinates
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
}
SPEEDS: dict[str, float] = {"slow": 1.0, "fast": 2.5}  # pixels per frame
FILLER_WORDS: frozenset[str] = frozenset({"a", "an", "the", "moving", "that", "is", "goes", "going", "towards", "to"})
SPEED_ALIASES: dict[str, str] = {"slowly": "slow", "quickly": "fast", "fastly": "fast"}
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "direction", "speed")


class PromptError(ValueError):
    """A prompt that the scene grammar cannot read."""


def vocabulary() -> dict[str, list[str]]:
    """Every word the grammar knows, by role."""
    return {
        "color": list(COLORS),
        "shape": list(SHAPES),
        "direction": list(DIRECTIONS),
        "speed": list(SPEEDS),
        "filler": sorted(FILLER_WORDS),
    }


def _vocab_text() -> str:
    v = vocabulary()
    return "; ".join(f"{role}: {', '.join(words)}" for role, words in v.items())


@dataclass(frozen=True)
class Scene:
    """One object moving in a straight line at constant speed on a black background."""

    color: str
    shape: str
    direction: str
    speed: str = "slow"

    def __post_init__(self) -> None:
        for role, value, allowed in (
            ("color", self.color, COLORS),
            ("shape", self.shape, SHAPES),
            ("direction", self.direction, DIRECTIONS),
            ("speed", self.speed, SPEEDS),
        ):
            if value not in allowed:
                raise PromptError(f"unknown {role} {value!r}; the grammar knows {role}: {', '.join(allowed)}")

    @property
    def prompt(self) -> str:
        """Canonical prompt: 'a fast red circle moving left' ('slow' is left out)."""
        speed = "fast " if self.speed == "fast" else ""
        return f"a {speed}{self.color} {self.shape} moving {self.direction}"

    def as_dict(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "direction": self.direction, "speed": self.speed}


MAX_PROMPT_CHARS = 200


def shown(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters for an error message (a long input is never echoed whole)."""
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def parse_prompt(text: str) -> Scene:
    """Read a prompt into a Scene; any word outside the grammar raises PromptError listing the vocabulary."""
    if not isinstance(text, str) or not text.strip():
        raise PromptError(f"empty prompt; write e.g. 'a red circle moving left'. Vocabulary: {_vocab_text()}")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"prompt of {len(text)} characters ({shown(text)!r}); a scene of the grammar takes a few "
                          f"words (at most {MAX_PROMPT_CHARS} characters), e.g. 'a fast red circle moving left'")
    words = re.findall(r"[a-z]+", text.lower())
    found: dict[str, list[str]] = {"color": [], "shape": [], "direction": [], "speed": []}
    unknown = []
    for w in words:
        w = SPEED_ALIASES.get(w, w)
        if w in COLORS:
            found["color"].append(w)
        elif w in SHAPES or (w.endswith("s") and w[:-1] in SHAPES):
            found["shape"].append(w.rstrip("s") if w not in SHAPES else w)
        elif w in DIRECTIONS:
            found["direction"].append(w)
        elif w in SPEEDS:
            found["speed"].append(w)
        elif w not in FILLER_WORDS:
            unknown.append(w)
    if unknown:
        raise PromptError(
            f"prompt {shown(text)!r} has words outside the grammar: {', '.join(unknown)}. Vocabulary: {_vocab_text()}"
        )
    for role in ("color", "shape", "direction"):
        if len(found[role]) != 1:
            what = "no" if not found[role] else "more than one"
            raise PromptError(
                f"prompt {shown(text)!r} names {what} {role}; it needs exactly one of: {', '.join(vocabulary()[role])}"
            )
    if len(found["speed"]) > 1:
        raise PromptError(f"prompt {shown(text)!r} names more than one speed; use one of: {', '.join(SPEEDS)}")
    return Scene(found["color"][0], found["shape"][0], found["direction"][0], (found["speed"] or ["slow"])[0])


def all_scenes() -> list[Scene]:
    """Every scene of the grammar, in a fixed order."""
    return [Scene(c, s, d, v) for c, s, d, v in itertools.product(COLORS, SHAPES, DIRECTIONS, SPEEDS)]


def heldout_scenes() -> list[Scene]:
    """The fixed held-out set: 16 combinations never shown in training, covering every word.

    Chosen by a fixed Latin-square walk so each colour, shape, direction and speed appears.
    """
    colors, dirs, speeds = list(COLORS), list(DIRECTIONS), list(SPEEDS)
    out = []
    for i in range(16):
        out.append(Scene(colors[i % 6], SHAPES[(i // 2) % 4], dirs[(i + i // 4) % 4], speeds[(i // 3) % 2]))
    return out


def training_scenes() -> list[Scene]:
    """All scenes minus the held-out ones."""
    held = set(heldout_scenes())
    return [s for s in all_scenes() if s not in held]
