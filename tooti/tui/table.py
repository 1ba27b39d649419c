"""The live table widget behind both panes of ``tooti tui``.

:class:`LiveTable` shows a list of items through :class:`~tooti.tui.columns.Column`
specs and keeps its sort order and the row under the cursor across redraws. It is
virtualised: every item is ordered at each redraw (a sort, cheap for 10,000 peers), but
only a window of at most :data:`WINDOW` rows around the cursor is drawn into the
table, its cells computed and written only where their text changed (the window is
rebuilt only when its rows or column widths change). Moving the cursor past the
window's edge (arrows, page keys, home/end) slides the window. So a redraw writes at
most ``WINDOW`` rows whatever the number of peers, and a gateway's thousands of events
per second cost one bounded redraw per tick (the app batches events per tick).
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
WINDOW = 200
"""Rows drawn into the table at most: a window of the ordered items around the cursor,
which slides as the cursor leaves it (a gateway with 10,000 nodes is not 10,000 rows
rebuilt on every redraw)."""


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
        """The rows drawn now (the window), with their cells' text and style."""
        self._widths: list[int] = []
        self._order: list[str] = []
        """Every item's row key, in display order."""
        self._by_key: dict[str, T] = {}
        self._position: dict[str, int] = {}
        """Row key → its index in :attr:`_order`."""
        self._offset = 0
        """Index in :attr:`_order` of the window's first row."""
        self.cells_written = 0
        """Cells the last redraw wrote into the table (at most ``WINDOW`` rows' worth)."""

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
        """Order every item, then draw the window of at most :data:`WINDOW` rows around
        the cursor: its cells are computed and written only where the visible text
        changed (the whole window is rebuilt only when its rows or column widths
        changed). :attr:`cells_written` counts what this redraw wrote."""
        spec = next((c for c in self.specs if c.key == self.sort_by), self.specs[0])
        by_key = sorted(self._live_items, key=self.row_key)
        known = [item for item in by_key if spec.sort(item) is not None]
        known.sort(key=spec.sort, reverse=self.reverse)
        ordered = known + [item for item in by_key if spec.sort(item) is None]  # "-" last
        current = self._cursor_key()  # keep the cursor on this row, wherever it moves
        relative = self.cursor_row
        self._order = [self.row_key(item) for item in ordered]
        self._by_key = dict(zip(self._order, ordered, strict=True))
        self.cells_written = 0
        self._update_title()
        self._position = {key: i for i, key in enumerate(self._order)}
        position = self._position.get(current) if current is not None else None
        if relative <= 0 and self._offset == 0:
            position = None  # on the top row, stay on top (newest first)
        elif position is not None:
            self._offset = position - min(relative, position)
        self._offset = max(0, min(self._offset, len(ordered) - WINDOW))
        self._draw_window(position)

    def _row(self, item: T) -> tuple[str, tuple[tuple[str, str], ...]]:
        base = self.row_style(item) if self.row_style else ""
        return (self.row_key(item), tuple(
            (c.text(item, self._live_now),
             " ".join(filter(None, (c.style(item) if c.style else "", base))))
            for c in self.specs))

    def _draw_window(self, position: int | None) -> None:
        """Draw rows ``_offset`` .. ``_offset + WINDOW`` of the order; put the cursor on
        ``position`` (an index in the whole order) if it is in the window."""
        window = [self._by_key[key] for key in self._order[self._offset:self._offset + WINDOW]]
        rows = [self._row(item) for item in window]
        if rows == self._live_rows:
            return
        widths = [max([cell_len(spec.label)] + [cell_len(cells[i][0]) for _, cells in rows])
                  for i, spec in enumerate(self.specs)]
        same_rows = [key for key, _ in rows] == [key for key, _ in self._live_rows]
        if same_rows and widths == self._widths:
            for (key, cells), (_, old) in zip(rows, self._live_rows, strict=True):
                for (text, style), before, c in zip(cells, old, self.specs, strict=True):
                    if (text, style) != before:
                        self.update_cell(key, c.key, self._text(text, style, c))
                        self.cells_written += 1
            self._live_rows = rows
            return
        index = self.cursor_row
        self._live_rows, self._widths = rows, widths
        self.clear(columns=True)  # columns sized to what is shown now
        self._add_columns(widths)
        for key, cells in rows:
            self.add_row(*(self._text(text, style, c)
                           for (text, style), c in zip(cells, self.specs, strict=True)),
                         key=key)
            self.cells_written += len(cells)
        if position is not None and self._offset <= position < self._offset + len(rows):
            index = position - self._offset
        if rows:
            self.move_cursor(row=min(index, len(rows) - 1))

    @staticmethod
    def _text(text: str, style: str, column: Column[T]) -> Text:
        return Text(text, style=style, justify="right" if column.numeric else "left")

    def _cursor_key(self) -> str | None:
        if not self._live_rows or not 0 <= self.cursor_row < len(self._live_rows):
            return None
        return self._live_rows[self.cursor_row][0]

    def selected_key(self) -> str | None:
        """Key of the row under the cursor, if any."""
        return self._cursor_key()

    def shown_keys(self) -> list[str]:
        """Row keys in display order (every item, not only the drawn window)."""
        return list(self._order)

    def drawn_keys(self) -> list[str]:
        """Row keys of the rows in the table now (the window), in display order."""
        return [key for key, _ in self._live_rows]

    def cell(self, key: str, column: str) -> str | None:
        """The text shown (or shown once scrolled to) in row ``key``, column ``column``
        (None if no such row)."""
        item = self._by_key.get(key)
        if item is None:
            return None
        spec = next(c for c in self.specs if c.key == column)
        return spec.text(item, self._live_now)

    def show_key(self, key: str) -> None:
        """Move the window and the cursor to row ``key`` (if shown)."""
        position = self._position.get(key)
        if position is None:
            return
        if not self._offset <= position < self._offset + WINDOW:
            self._offset = max(0, min(position - WINDOW // 2, len(self._order) - WINDOW))
            self._draw_window(position)
        self.move_cursor(row=position - self._offset)

    def _shift(self, rows: int, cursor: int) -> None:
        """Slide the window by ``rows`` (clamped) and put the cursor on ``cursor``
        (an index in the whole order)."""
        self._offset = max(0, min(self._offset + rows, len(self._order) - WINDOW))
        cursor = max(0, min(cursor, len(self._order) - 1))
        self._draw_window(cursor)
        self.move_cursor(row=cursor - self._offset)

    def action_cursor_down(self) -> None:
        """Down a row; past the window's last row the window slides."""
        if self.cursor_row >= len(self._live_rows) - 1 and \
                self._offset + len(self._live_rows) < len(self._order):
            self._shift(WINDOW // 2, self._offset + self.cursor_row + 1)
            return
        super().action_cursor_down()

    def action_cursor_up(self) -> None:
        """Up a row; above the window's first row the window slides."""
        if self.cursor_row <= 0 and self._offset > 0:
            self._shift(-(WINDOW // 2), self._offset - 1)
            return
        super().action_cursor_up()

    def action_page_down(self) -> None:
        """A page down; near the window's end the window slides."""
        page = max(1, self.scrollable_content_region.height - 1)
        if self.cursor_row + page >= len(self._live_rows) and \
                self._offset + len(self._live_rows) < len(self._order):
            self._shift(WINDOW // 2, self._offset + self.cursor_row + page)
            return
        super().action_page_down()

    def action_page_up(self) -> None:
        """A page up; near the window's start the window slides."""
        page = max(1, self.scrollable_content_region.height - 1)
        if self.cursor_row - page < 0 and self._offset > 0:
            self._shift(-(WINDOW // 2), self._offset + self.cursor_row - page)
            return
        super().action_page_up()

    def action_scroll_top(self) -> None:
        """The first row of all."""
        if self._offset > 0:
            self._shift(-self._offset, 0)
            return
        super().action_scroll_top()

    def action_scroll_bottom(self) -> None:
        """The last row of all."""
        if self._offset + len(self._live_rows) < len(self._order):
            self._shift(len(self._order), len(self._order) - 1)
            return
        super().action_scroll_bottom()

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
