"""Real photos that ship inside installed packages (no network): demos, smoke tests, parity checks.

    python -m common.samples                          # list them: name and path
    python -m common.samples --paths chelsea coffee   # only the paths, e.g. for clients.classify
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

# name -> (package, path inside the package). Colour photos of ImageNet-like subjects first.
_SOURCES = {
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "astronaut": ("skimage", "data/astronaut.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "horse": ("skimage", "data/horse.png"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "retina": ("skimage", "data/retina.jpg"),
    "camera": ("skimage", "data/camera.png"),
    "coins": ("skimage", "data/coins.png"),
    "moon": ("skimage", "data/moon.png"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}

# What the bundled ImageNet model must say about some of them (ImageNet-1k class indices).
CAT_CLASSES = frozenset(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def sample_photos(names: list[str] | None = None) -> dict[str, Path]:
    """{name: path} of the bundled photos that are installed (all, or the ones named)."""
    wanted = list(_SOURCES) if names is None else names
    found = {}
    for name in wanted:
        if name not in _SOURCES:
            raise KeyError(f"unknown sample photo {name!r}; known: {', '.join(_SOURCES)}")
        package, relative = _SOURCES[name]
        root = _package_dir(package)
        if root is not None and (root / relative).is_file():
            found[name] = root / relative
    if names is not None and (missing := sorted(set(names) - set(found))):
        raise FileNotFoundError(f"sample photos not installed: {missing} (run `make setup`)")
    return found


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="The bundled sample photos (they ship inside installed packages).")
    parser.add_argument("names", nargs="*", help=f"some of: {', '.join(_SOURCES)} (default: all installed)")
    parser.add_argument("--paths", action="store_true", help="print only the paths, one per line")
    args = parser.parse_args()
    try:
        photos = sample_photos(args.names or None)
    except (KeyError, FileNotFoundError) as exc:
        sys.exit(f"common.samples: {exc.args[0]}")
    for name in args.names or photos:
        print(photos[name] if args.paths else f"{name:14s} {photos[name]}")
