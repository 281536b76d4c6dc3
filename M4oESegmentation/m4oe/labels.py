"""Segment labels with standard terminology.

A label is what a model's task head predicts for one class: its integer value in the label map,
its display name and colour, and its meaning as DICOM / SNOMED CT codes (category, type and
optional type modifier such as laterality). The codes let Slicer's terminology module and DICOM SEG
writers recognise the organ, whatever the display name says.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

TERMINOLOGY_CONTEXT = "Segmentation category and type - M4oE Segmentation"
"""The terminology context every label names: the module's own Slicer terminology file
(``M4oESegmentation/Resources/Terminology/SegmentationCategoryTypeModifier-M4oESegmentation.term.json``),
which holds exactly the structures of :data:`m4oe.terminology.TERMS` with their codes, colours and
names; the Slicer module loads it into Slicer's terminologies at start-up."""
REGION_CONTEXT = "Anatomic codes - DICOM master list"
"""The anatomic region context Slicer names in a terminology entry (no label sets a region)."""


@dataclass(frozen=True)
class Code:
    """One coded concept: coding scheme designator (``"SCT"`` for SNOMED CT), code value, meaning."""

    scheme: str
    value: str
    meaning: str

    def as_slicer(self) -> str:
        """The ``scheme^value^meaning`` triple used in Slicer's terminology strings."""
        return f"{self.scheme}^{self.value}^{self.meaning}"


@dataclass(frozen=True)
class Label:
    """One class of a task: label-map value, name, colour (RGB in 0..1) and terminology codes."""

    value: int
    name: str
    color: tuple[float, float, float]
    category: Code
    type: Code
    modifier: Code | None = None

    def __post_init__(self):
        if not isinstance(self.value, int) or self.value < 1:
            raise ValueError(f"label {self.name!r}: value must be a positive integer, got {self.value!r}")
        if len(self.color) != 3 or not all(0.0 <= float(c) <= 1.0 for c in self.color):
            raise ValueError(f"label {self.name!r}: color must be 3 numbers in [0, 1], got {self.color!r}")

    def terminology_entry(self) -> str:
        """The segment's ``TerminologyEntry`` tag as Slicer writes it in ``.seg.nrrd`` files: context
        :data:`TERMINOLOGY_CONTEXT`, category, type, type modifier (or ``^^``), region context, no
        region (see Slicer's developer guide, "TerminologyEntry tag")."""
        modifier = self.modifier.as_slicer() if self.modifier else "^^"
        return (
            f"{TERMINOLOGY_CONTEXT}~{self.category.as_slicer()}~{self.type.as_slicer()}~{modifier}"
            f"~{REGION_CONTEXT}~^^~^^"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Label:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {"value", "name", "color", "category", "type", "modifier"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"label {data.get('name')!r}: unknown keys {sorted(unknown)}")
        modifier = data.get("modifier")
        return cls(
            value=int(data["value"]),
            name=str(data["name"]),
            color=tuple(float(c) for c in data["color"]),
            category=Code(**data["category"]),
            type=Code(**data["type"]),
            modifier=Code(**modifier) if modifier else None,
        )
