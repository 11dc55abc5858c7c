"""The sample workloads that ship with the package (the top-level sample_workloads/ folder,
installed as gemel_studio.sample_workloads), read with importlib.resources so that they are
found the same way in a source checkout, an editable install and an installed wheel."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from .errors import GemelError

PACKAGE = "gemel_studio.sample_workloads"
SUFFIX = ".yaml"


def _folder() -> Traversable:
    try:
        return resources.files(PACKAGE)
    except ModuleNotFoundError:
        # A source tree on sys.path without an install (or an editable install made before the
        # samples became a package): the folder next to the package.
        return Path(__file__).resolve().parent.parent / "sample_workloads"


def sample_names() -> list[str]:
    """The samples by name (the file name without .yaml), sorted."""
    return sorted(f.name.removesuffix(SUFFIX) for f in _folder().iterdir() if f.name.endswith(SUFFIX))


def sample_path(name: str = "quickstart") -> Path:
    """The file of sample `name` (e.g. 'quickstart'). A workload's relative paths are relative to
    its file, so this is a real path on disk: packages install unpacked (not as zip files)."""
    file = _folder() / f"{name.removesuffix(SUFFIX)}{SUFFIX}"
    if not file.is_file():
        raise GemelError(f"no sample workload named '{name}'; the samples are {', '.join(sample_names())} "
                         "(see `gemel samples`)")
    return Path(str(file))


def sample_description(name: str) -> str:
    """The sample's `description:` field, or '' when it has none."""
    import yaml

    data = yaml.safe_load(sample_path(name).read_text())
    return str(data.get("description") or "") if isinstance(data, dict) else ""


def copy_samples(names: list[str], folder: Path, overwrite: bool = False) -> list[Path]:
    """Write the named samples (all when `names` is empty) into `folder` (created if missing);
    return the files written. Nothing is written when one would overwrite a file, unless `overwrite`."""
    sources = [sample_path(n) for n in (names or sample_names())]
    targets = [folder / s.name for s in sources]
    if folder.exists() and not folder.is_dir():
        raise GemelError(f"{folder}: is a file; name a folder to copy the samples into")
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise GemelError(f"{existing[0]}: already exists; pass --force to overwrite it, or copy to another "
                         "folder with --to DIR")
    folder.mkdir(parents=True, exist_ok=True)
    for source, target in zip(sources, targets):
        target.write_bytes(source.read_bytes())
    return targets


TINY_TASKS = (("color", 3), ("shape", 3), ("size", 2))  # (synthetic task, classes) of the tiny workload


def write_tiny_workload(folder: Path) -> Path:
    """Write the tiny merge workload into `folder` (created if missing) and return its file: three
    untrained ResNet-18 at 16x16, each on its own synthetic task of 96 images, targets at 80% of
    their unmerged accuracy. A real merge of it takes a minute or two on a CPU; the screenshots
    and the UI probe merge it to show real figures."""
    import yaml

    models = [{"name": task, "source": {"kind": "torchvision", "architecture": "resnet18"}, "num_classes": classes,
               "target": {"relative": 0.8},
               "dataset": {"kind": "synthetic", "task": task, "samples": 96, "seed": seed}}
              for seed, (task, classes) in enumerate(TINY_TASKS)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "name": "tiny", "input_size": [3, 16, 16], "models": models},
                                   sort_keys=False))
    return path


# What the studio opens when given no workload. Not through sample_path(): a broken install
# must not make importing the CLI fail; opening the missing file says what is wrong instead.
DEFAULT_WORKLOAD = Path(str(_folder() / f"quickstart{SUFFIX}"))
