"""Combo-box helpers of the panel: fill a list and choose an entry without firing its signals twice.

They take any object with the ``QComboBox`` interface (``currentData``, ``currentIndex``,
``findData``, ``addItem``, ``clear``, ``blockSignals``) and import nothing, so the panel uses them
before the engine's packages are installed.
"""

from __future__ import annotations


def select_item_data(comboBox, value) -> None:
    """Make the entry whose data is ``value`` current; leave the box as it is when none has it."""
    index = comboBox.findData(value)
    if index >= 0 and comboBox.currentIndex != index:
        comboBox.currentIndex = index


def fill_combo_box(comboBox, items) -> None:
    """Replace the entries with ``items`` ((data, text) pairs), keeping the current entry when its
    data is still there (else the first; none when empty), with the box's signals blocked meanwhile."""
    current = comboBox.currentData
    wasBlocked = comboBox.blockSignals(True)
    try:
        comboBox.clear()
        for data, text in items:
            comboBox.addItem(text, data)
        comboBox.currentIndex = max(comboBox.findData(current), 0) if items else -1
    finally:
        comboBox.blockSignals(wasBlocked)
