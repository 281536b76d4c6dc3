"""Standard codes and colours for the structures M4oE models segment.

Each entry gives a segment's display name, Slicer's recommended colour and its DICOM / SNOMED CT
meaning (category, type and, for paired organs, a laterality modifier), so that a model card can
name its classes the way Slicer's terminology module and DICOM SEG writers expect.

The module ships these structures as a Slicer terminology context of its own,
``M4oESegmentation/Resources/Terminology/SegmentationCategoryTypeModifier-M4oESegmentation.term.json``
(context :data:`m4oe.labels.TERMINOLOGY_CONTEXT`, the one every label's ``TerminologyEntry`` names),
as SlicerTotalSegmentator does: Slicer's "3D Slicer General Anatomy list" lacks the inferior vena
cava, the portal and splenic vein, the vertebra and the liver tumour, so naming that list for them
would point at codes it does not hold. Testing/test_terminology.py checks that file and this table
against each other, and both against the entries of Slicer's own terminology files
(Testing/data/slicer_terminology/) that hold the same codes.

Sources of the codes and colours (looked up, not remembered):
- Slicer's ``SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json``: codes, code meanings and
  ``recommendedDisplayRGBValue`` of every entry it holds (all but the five below).
- Slicer's ``SegmentationCategoryTypeModifier-DICOM-Master.json`` for the inferior vena cava
  (SCT 64131007), the vertebra (SCT 51282000) and the neoplasm (SCT 108369006).
- SlicerTotalSegmentator's ``SegmentationCategoryTypeModifier-TotalSegmentator.term.json`` for the
  portal vein and splenic vein (SCT 110765007, in no Slicer file) and the colour of the veins.

Our choices: the liver tumour takes the colour of TotalSegmentator's neoplasm and has no anatomic
region (a ``Label`` has no region field); the vertebra takes the General Anatomy list's bone colour;
:func:`generic_label`'s "Anatomical structure" (SCT 91723000, in no Slicer file) the list's
neutral tissue colour.
"""

from __future__ import annotations

from dataclasses import dataclass

from m4oe.labels import Code, Label

ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
TISSUE = Code("SCT", "85756007", "Tissue")
MORPHOLOGICALLY_ALTERED_STRUCTURE = Code("SCT", "49755003", "Morphologically Altered Structure")
RIGHT = Code("SCT", "24028007", "Right")
LEFT = Code("SCT", "7771000", "Left")


SOURCES = ("general-anatomy", "dicom-master", "totalsegmentator")


@dataclass(frozen=True)
class Term:
    """A structure's display name, recommended colour (RGB, 0..255), codes and where they come from.

    ``source``: the file whose entry gives the codes, :data:`SOURCES` ("general-anatomy": Slicer's
    General Anatomy list; "dicom-master": Slicer's DICOM master list; "totalsegmentator":
    SlicerTotalSegmentator's terminology).
    """

    name: str
    rgb: tuple[int, int, int]
    category: Code
    type: Code
    modifier: Code | None = None
    source: str = "general-anatomy"

    def label(self, value: int) -> Label:
        """This structure as class ``value`` of a task (colour converted to 0..1)."""
        color = tuple(round(c / 255.0, 4) for c in self.rgb)
        return Label(value, self.name, color, self.category, self.type, self.modifier)


def _sct(value: str, meaning: str) -> Code:
    return Code("SCT", value, meaning)


_KIDNEY = _sct("64033007", "Kidney")
_ADRENAL = _sct("23451007", "Adrenal gland")

TERMS: dict[str, Term] = {
    "spleen": Term("spleen", (157, 108, 162), ANATOMICAL_STRUCTURE, _sct("78961009", "Spleen")),
    "kidney_right": Term("right kidney", (185, 102, 83), ANATOMICAL_STRUCTURE, _KIDNEY, RIGHT),
    "kidney_left": Term("left kidney", (185, 102, 83), ANATOMICAL_STRUCTURE, _KIDNEY, LEFT),
    "gallbladder": Term("gallbladder", (139, 150, 98), ANATOMICAL_STRUCTURE, _sct("28231008", "Gallbladder")),
    "esophagus": Term("esophagus", (211, 171, 143), ANATOMICAL_STRUCTURE, _sct("32849002", "Esophagus")),
    "liver": Term("liver", (221, 130, 101), ANATOMICAL_STRUCTURE, _sct("10200004", "Liver")),
    "stomach": Term("stomach", (216, 132, 105), ANATOMICAL_STRUCTURE, _sct("69695003", "Stomach")),
    "aorta": Term("aorta", (224, 97, 76), ANATOMICAL_STRUCTURE, _sct("15825003", "Aorta")),
    "inferior_vena_cava": Term(
        "inferior vena cava",
        (0, 151, 206),
        ANATOMICAL_STRUCTURE,
        _sct("64131007", "Inferior vena cava"),
        source="dicom-master",
    ),
    "portal_vein_and_splenic_vein": Term(
        "portal vein and splenic vein",
        (0, 151, 206),
        ANATOMICAL_STRUCTURE,
        _sct("110765007", "Portal vein and splenic vein"),
        source="totalsegmentator",
    ),
    "pancreas": Term("pancreas", (249, 180, 111), ANATOMICAL_STRUCTURE, _sct("15776009", "Pancreas")),
    "adrenal_gland_right": Term(
        "right adrenal gland", (249, 186, 150), ANATOMICAL_STRUCTURE, _ADRENAL, RIGHT
    ),
    "adrenal_gland_left": Term("left adrenal gland", (249, 186, 150), ANATOMICAL_STRUCTURE, _ADRENAL, LEFT),
    "duodenum": Term("duodenum", (255, 253, 229), ANATOMICAL_STRUCTURE, _sct("38848004", "Duodenum")),
    "urinary_bladder": Term(
        "urinary bladder", (222, 154, 132), ANATOMICAL_STRUCTURE, _sct("89837001", "Bladder")
    ),
    "prostate": Term("prostate", (230, 158, 140), ANATOMICAL_STRUCTURE, _sct("41216001", "Prostate")),
    "uterus": Term("uterus", (255, 181, 158), ANATOMICAL_STRUCTURE, _sct("35039007", "Uterus")),
    "colon": Term("colon", (204, 168, 143), ANATOMICAL_STRUCTURE, _sct("71854001", "Colon")),
    "small_bowel": Term(
        "small bowel", (205, 167, 142), ANATOMICAL_STRUCTURE, _sct("30315005", "Small Intestine")
    ),
    "vertebrae": Term(
        "vertebrae",
        (212, 188, 102),
        ANATOMICAL_STRUCTURE,
        _sct("51282000", "Vertebra"),
        source="dicom-master",
    ),
    "liver_tumor": Term(
        "liver tumor",
        (144, 238, 144),
        MORPHOLOGICALLY_ALTERED_STRUCTURE,
        _sct("108369006", "Neoplasm"),
        source="dicom-master",
    ),
    "muscle": Term("muscle", (192, 104, 88), TISSUE, _sct("71616004", "Muscle")),
    "body_fat": Term("body fat", (230, 220, 70), TISSUE, _sct("248300009", "Body fat")),
}

STANDARD_KEYS: tuple[str, ...] = tuple(TERMS)
"""The keys :func:`standard_label` accepts, e.g. ``"spleen"``, ``"kidney_right"``."""


GENERIC_STRUCTURE = _sct("91723000", "Anatomical structure")
GENERIC_RGB = (128, 174, 128)


def generic_label(name: str, value: int) -> Label:
    """A structure no single standard code fits (AMOS's "prostate/uterus"): SNOMED "Anatomical
    structure" as its type, its own name (underscores shown as spaces) and a neutral colour."""
    return Term(name.replace("_", " "), GENERIC_RGB, ANATOMICAL_STRUCTURE, GENERIC_STRUCTURE).label(value)


def standard_label(key: str, value: int) -> Label:
    """The standard label for structure ``key`` as class ``value`` (1..K-1) of a task.

    Raises ``ValueError`` naming the key and listing the known ones when ``key`` is unknown.
    """
    if key not in TERMS:
        raise ValueError(f"unknown structure {key!r}; standard structures are {', '.join(STANDARD_KEYS)}")
    return TERMS[key].label(value)


def organ_keys(labels: list[Label]) -> dict[int, str]:
    """Label value -> TERMS key for the classes of a task whose codes name a standard structure.

    A class matches a TERMS entry when its type code and laterality modifier (coding scheme and
    value) are the entry's; classes matching none (a tumour class of a custom model) are left out.
    """

    def identity(type_code, modifier) -> tuple:
        return (
            type_code.scheme,
            type_code.value,
            None if modifier is None else (modifier.scheme, modifier.value),
        )

    by_code = {identity(term.type, term.modifier): key for key, term in TERMS.items()}
    found = {}
    for label in labels:
        key = by_code.get(identity(label.type, label.modifier))
        if key is not None:
            found[label.value] = key
    return found


def structure_key(label: Label) -> str:
    """The name a user types for a class: its :data:`TERMS` key (``"kidney_right"``) when the label
    is that standard structure (same display name and codes), else its name with spaces as
    underscores."""
    for key, term in TERMS.items():
        if (term.name, term.type, term.modifier) == (label.name, label.type, label.modifier):
            return key
    return label.name.replace(" ", "_")


def name_key(name) -> str:
    """A structure name as it is matched: any case, spaces and underscores alike (``"kidney_right"``)."""
    return str(name).strip().lower().replace(" ", "_")


def labels_by_name(labels: list[Label]) -> dict[str, Label]:
    """Each label under the :func:`name_key` of its :func:`structure_key` and of its display name."""
    return {name_key(name): label for label in labels for name in (structure_key(label), label.name)}


def select_labels(labels: list[Label], names: list[str]) -> list[Label]:
    """The labels that ``names`` choose, in the task's order.

    A name is a :func:`structure_key` (``"kidney_right"``) or a display name (``"right kidney"``),
    any case, spaces and underscores alike. Raises ``ValueError`` naming the first unknown name and
    listing the task's structures; an empty list is refused too.
    """
    by_name = labels_by_name(labels)
    chosen = set()
    for name in names:
        label = by_name.get(name_key(name))
        if label is None:
            known = ", ".join(structure_key(label) for label in labels)
            raise ValueError(f"unknown structure {name!r}; this task has: {known}")
        chosen.add(label.value)
    if not chosen:
        raise ValueError("no structure chosen; name at least one of the task's structures")
    return [label for label in labels if label.value in chosen]
