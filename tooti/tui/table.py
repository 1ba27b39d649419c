"""The live table widget behind both panes of ``tooti tui``.

:class:`LiveTable` shows a list of items through :class:`~tooti.tui.columns.Column`
specs, rebuilding its rows only when the visible text changed, and keeps its sort
order and the row under the cursor across redraws.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar, Generic, TypeVar

from rich.cells import cell_len
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import DataTable

from tooti.tui.columns import Column

T = TypeVar("T")


class LiveTable(DataTable[Text], Generic[T]):
    """A table redrawn from a list of items, keeping its sort order and the row under
    the cursor. Click a header (or press ``s``) to sort by it; ``r`` reverses."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "select_cursor", "Details"),
        Binding("s", "next_sort", "Sort"),
        Binding("r", "reverse_sort", "Reverse"),
    ]

    def __init__(self, title: str, columns: list[Column[T]], row_key: Callable[[T], str],
                 sort_by: str, *, id: str, row_style: Callable[[T], str] | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.title = title
        self.specs = columns
        self.row_key = row_key
        self.row_style = row_style
        self.sort_by = sort_by
        self.reverse = False
        self.note = ""
        self._live_items: list[T] = []
        self._live_now = 0.0
        self._live_rows: list[tuple[str, tuple[tuple[str, str], ...]]] = []

    def on_mount(self) -> None:
        """Add the columns."""
        self._add_columns([cell_len(spec.label) for spec in self.specs])
        self._update_title()

    def _add_columns(self, widths: list[int]) -> None:
        # Explicit widths: DataTable's own measuring happens on idle, after a frame may
        # already have been cached at the old widths.
        for spec, width in zip(self.specs, widths, strict=True):
            self.add_column(Text(spec.label, justify="right" if spec.numeric else "left"),
                            key=spec.key, width=width)

    def show(self, items: Iterable[T], now: float, note: str = "") -> None:
        """Display ``items`` (already filtered) at gateway time ``now``."""
        self._live_items = list(items)
        self._live_now = now
        self.note = note
        self.redraw()

    def redraw(self) -> None:
        """Rebuild the rows if anything visible changed."""
        spec = next((c for c in self.specs if c.key == self.sort_by), self.specs[0])
        by_key = sorted(self._live_items, key=self.row_key)
        known = [item for item in by_key if spec.sort(item) is not None]
        known.sort(key=spec.sort, reverse=self.reverse)
        ordered = known + [item for item in by_key if spec.sort(item) is None]  # "-" last
        rows = []
        for item in ordered:
            base = self.row_style(item) if self.row_style else ""
            rows.append((self.row_key(item), tuple(
                (c.text(item, self._live_now),
                 " ".join(filter(None, (c.style(item) if c.style else "", base))))
                for c in self.specs)))
        self._update_title()
        if rows == self._live_rows:
            return
        current = self._cursor_key()  # keep the cursor on this row, wherever it moves
        index = self.cursor_row
        self._live_rows = rows
        widths = [max([cell_len(spec.label)] + [cell_len(cells[i][0]) for _, cells in rows])
                  for i, spec in enumerate(self.specs)]
        self.clear(columns=True)  # columns sized to what is shown now
        self._add_columns(widths)
        for key, cells in rows:
            self.add_row(*(Text(text, style=style,
                                justify="right" if c.numeric else "left")
                           for (text, style), c in zip(cells, self.specs, strict=True)),
                         key=key)
        keys = [key for key, _ in rows]
        if current in keys and index > 0:  # on the top row, stay on top (newest first)
            index = keys.index(current)
        if rows:
            self.move_cursor(row=min(index, len(rows) - 1))

    def _cursor_key(self) -> str | None:
        if not self._live_rows or not 0 <= self.cursor_row < len(self._live_rows):
            return None
        return self._live_rows[self.cursor_row][0]

    def selected_key(self) -> str | None:
        """Key of the row under the cursor, if any."""
        return self._cursor_key()

    def shown_keys(self) -> list[str]:
        """Row keys in display order."""
        return [key for key, _ in self._live_rows]

    def cell(self, key: str, column: str) -> str | None:
        """The text shown in row ``key``, column ``column`` (None if not shown)."""
        index = [c.key for c in self.specs].index(column)
        for row_key, cells in self._live_rows:
            if row_key == key:
                return cells[index][0]
        return None

    def _update_title(self) -> None:
        spec = next((c for c in self.specs if c.key == self.sort_by), self.specs[0])
        arrow = "↓" if self.reverse else "↑"
        parts = [f"{self.title} ({len(self._live_items)})", f"sort: {spec.label} {arrow}"]
        if self.note:
            parts.append(self.note)
        self.border_title = " · ".join(parts)

    def sort_on(self, key: str) -> None:
        """Sort by column ``key``; the same column again reverses the order."""
        if key == self.sort_by:
            self.reverse = not self.reverse
        else:
            self.sort_by, self.reverse = key, False
        self.redraw()

    def action_next_sort(self) -> None:
        """Sort by the next column."""
        keys = [c.key for c in self.specs]
        position = keys.index(self.sort_by) if self.sort_by in keys else -1
        self.sort_by, self.reverse = keys[(position + 1) % len(keys)], False
        self.redraw()

    def action_reverse_sort(self) -> None:
        """Reverse the sort order."""
        self.reverse = not self.reverse
        self.redraw()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        """A header was clicked: sort by that column."""
        event.stop()
        self.sort_on(str(event.column_key.value))
