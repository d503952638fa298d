"""What a Lean verifier checks: a proof body under a header."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LeanItem:
    """One proof to check.

    `header` (imports, `set_option`, `open`) is elaborated once per REPL process and its environment reused
    by every proof with the same header; `body` is the theorem with its proof. Positions in outcomes and
    verdict details count lines of `body` (line 1 = its first line), whichever backend checked it.
    """

    body: str
    header: str = ""
    id: str = ""

    @property
    def code(self) -> str:
        """The whole file text, as a Lean file (or the Kimina server) sees it."""
        return f"{self.header}\n{self.body}" if self.header else self.body

    @property
    def header_lines(self) -> int:
        """Lines the header adds before the body in `code`."""
        return self.header.count("\n") + 1 if self.header else 0
