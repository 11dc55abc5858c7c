"""Class names of an annotation file to a detector's class indices, by one rule.

The dataset's `classes:` (a list of names, the i-th is class i + 1, or {name or COCO id:
index}; the categories it leaves out are dropped), else the model's `class_names` (by name),
else the file's own order numbered from 1. Index 0 is the background.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DatasetError
from ..workload import ModelSpec
from .annotations_images import ImageEntry

@dataclass
class ClassMap:
    """Categories of a file (by the key its boxes use: a COCO id as text, a VOC name) to the
    model's class indices."""

    index: dict[str, int]
    dropped: set[str]  # categories an explicit `classes:` leaves out: their boxes are skipped
    names: dict[int, str]  # class index -> name, for the bundle's labels
    by_class_names: bool  # mapped through the model's class_names (changes the fix we suggest)

    def label(self, key: str, name: str, where: str, origin: str, spec: ModelSpec) -> int | None:
        """The class index of a box of category `key`, None to skip it."""
        if key in self.index:
            return self.index[key]
        if key in self.dropped:
            return None
        if self.by_class_names:
            raise DatasetError(f"{where}: category '{name}' is not among model '{spec.name}''s class_names "
                               f"(after background); add it there, or list the categories to keep in the "
                               f"dataset's classes:")
        # Unreachable: the file's own order maps every category it has.
        raise DatasetError(f"{where}: category '{name}' is not among {origin}'s categories; fix the entry")


def class_map(origin: str, categories: list[tuple[str, str]], classes, spec: ModelSpec) -> ClassMap:
    """`categories`: (key, name) pairs in the file's order. The rule is in the module's docstring."""
    n = spec.num_classes
    names_in_file = {name for _, name in categories}
    index: dict[str, int] = {}
    names: dict[int, str] = {}
    if isinstance(classes, list):
        for i, name in enumerate(classes):
            if name not in names_in_file:
                raise DatasetError(f"{origin}: the dataset's classes names '{name}', which no category in it has "
                                   f"(it has {some_of(sorted(names_in_file))}); fix the spelling or remove it")
            names[i + 1] = name
        wanted = {name: i for i, name in names.items()}
        index = {key: wanted[name] for key, name in categories if name in wanted}
    elif isinstance(classes, dict):
        for key, i in classes.items():
            # A name first; a COCO category id second (YAML may hand it over as text after a save).
            hits = [c for c in categories if c[1] == str(key)] or [c for c in categories if c[0] == str(key)]
            if not hits:
                raise DatasetError(f"{origin}: the dataset's classes maps '{key}', which is neither the name nor "
                                   f"the id of a category in it (it has {some_of(sorted(names_in_file))}); fix it")
            for hit_key, hit_name in hits:
                index[hit_key] = i
                names.setdefault(i, hit_name)
    elif spec.class_names:
        by_name = {name: i for i, name in enumerate(spec.class_names) if i > 0}  # 0 is background
        index = {key: by_name[name] for key, name in categories if name in by_name}
        names = dict(enumerate(spec.class_names))
    else:
        index = {key: i + 1 for i, (key, _) in enumerate(categories)}
        names = {i + 1: name for i, (_, name) in enumerate(categories)}
        if len(categories) + 1 > n:
            raise DatasetError(f"{origin}: {len(categories)} categories, but model '{spec.name}' has num_classes "
                               f"{n} (background + {n - 1}); raise num_classes to {len(categories) + 1} or list the "
                               f"categories to keep in the dataset's classes:")
    too_big = sorted(i for i in set(index.values()) if i >= n)
    if too_big:
        raise DatasetError(f"{origin}: the dataset's classes uses class {too_big[-1]}, but model '{spec.name}' has "
                           f"num_classes {n} (classes 0..{n - 1}, 0 is background); raise num_classes or fix classes")
    explicit = classes is not None
    dropped = {key for key, _ in categories if key not in index} if explicit else set()
    return ClassMap(index, dropped, names, by_class_names=not explicit and bool(spec.class_names))


# What a reader returns: the images with their boxes, and how it mapped the classes (None
# with labels: distill, when no box is read).
Read = tuple[list[ImageEntry], ClassMap | None]


def some_of(items: list[str], k: int = 8) -> str:
    """The first k items for an error message, and how many more."""
    shown = ", ".join(items[:k])
    return shown + (f" and {len(items) - k} more" if len(items) > k else "") if items else "none"

