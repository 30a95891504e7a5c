"""Sparsity patterns: N:M structured (N kept of every M consecutive input columns) or an unstructured ratio."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sparsity:
    """`keep:group` structured when group > 0; else `ratio` of entries pruned (0 = dense)."""

    keep: int = 0
    group: int = 0
    ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.group and not 0 < self.keep < self.group:
            raise ValueError(f"N:M sparsity needs 0 < N < M, got {self.keep}:{self.group}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"unstructured sparsity ratio must be in [0, 1), got {self.ratio}")

    @classmethod
    def parse(cls, text: str) -> "Sparsity":
        """'2:4' -> 2 of 4 kept; '0.5' -> 50% pruned unstructured; '0' or 'none' -> dense."""
        text = text.strip().lower()
        if text in ("", "none", "dense", "0"):
            return cls()
        if ":" in text:
            keep, group = (int(p) for p in text.split(":"))
            return cls(keep=keep, group=group)
        return cls(ratio=float(text))

    @property
    def structured(self) -> bool:
        return self.group > 0

    @property
    def is_24(self) -> bool:
        return (self.keep, self.group) == (2, 4)

    @property
    def dense(self) -> bool:
        return not self.structured and self.ratio == 0.0

    def __str__(self) -> str:
        if self.structured:
            return f"{self.keep}:{self.group}"
        return f"{self.ratio:g}" if self.ratio else "none"
