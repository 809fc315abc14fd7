"""The demo's progress bar: optimizer steps, and the latest validation, on one short line.

Both back-ends drive the same :class:`StepBar` (Lightning through a ``ProgressBar`` callback,
``transformers.Trainer`` through a ``TrainerCallback``): it counts optimizer steps up to
``max_steps`` (not micro-batches, not epochs), shows no bar for validation, and puts the latest
``val/bit_match`` and ``val/exact_match`` after the bar. It fits in 80 columns.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["SHOWN_KEYS", "StepBar", "format_values"]

#: The validation values shown after the bar, and their short names there.
SHOWN_KEYS: dict[str, str] = {"val/bit_match": "bit_match", "val/exact_match": "exact_match"}
_WIDTH = 80


def format_values(values: Mapping[str, float]) -> str:
    """The text after the bar: the latest validation's :data:`SHOWN_KEYS`.

    Examples:
        >>> format_values({"val/loss": 0.1, "val/bit_match": 0.9634, "val/exact_match": 0.5})
        'val bit_match 0.963 exact_match 0.500'
        >>> format_values({})
        ''
    """
    shown = [f"{name} {values[key]:.3f}" for key, name in SHOWN_KEYS.items() if key in values]
    return "val " + " ".join(shown) if shown else ""


class StepBar:
    """One ``tqdm`` line counting optimizer steps, with the latest validation after it.

    Args:
        total: the number of optimizer steps (``max_steps``).
        initial: the step the count starts from.
        values: a validation's values to show from the start (see :meth:`show_validation`).
        file: where to draw; default ``sys.stderr`` (``tqdm``'s).
        ncols: the line's width; default the terminal's, at most 80 columns.

    Examples:
        >>> import io
        >>> out = io.StringIO()
        >>> bar = StepBar(4, file=out)
        >>> bar.show_validation({"val/bit_match": 0.5, "val/exact_match": 0.25})
        >>> bar.update_to(3)
        >>> bar.close()
        >>> bar.n, bar.total
        (3, 4)
        >>> line = out.getvalue().split("\\r")[-1].rstrip()
        >>> line.startswith("step 3/4 |"), line.endswith("val bit_match 0.500 exact_match 0.250")
        (True, True)
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        values: Mapping[str, Any] | None = None,
        file: TextIO | None = None,
        ncols: int | None = None,
    ) -> None:
        self.total = total
        self._values = {key: float(v) for key, v in (values or {}).items() if key in SHOWN_KEYS}
        self._tqdm = tqdm(
            total=total,
            initial=initial,
            file=file,
            ncols=ncols or min(shutil.get_terminal_size().columns, _WIDTH),
            desc="step",
            postfix=format_values(self._values) or None,
            bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}{postfix}",
            mininterval=0.5,
            leave=True,
            dynamic_ncols=False,
        )

    @property
    def n(self) -> int:
        """The steps counted so far."""
        return int(self._tqdm.n)

    def update_to(self, step: int) -> None:
        """Move the count to ``step`` optimizer steps (never backwards)."""
        if step > self._tqdm.n:
            self._tqdm.update(step - self._tqdm.n)

    def show_validation(self, values: Mapping[str, Any]) -> None:
        """Show the :data:`SHOWN_KEYS` of a validation that just ended."""
        self._values.update({key: float(values[key]) for key in SHOWN_KEYS if key in values})
        self._tqdm.set_postfix_str(format_values(self._values))

    def write(self, text: str) -> None:
        """Print a line above the bar."""
        self._tqdm.write(text, file=self._tqdm.fp)

    def close(self) -> None:
        """Draw the final state and end the line."""
        self._tqdm.close()
