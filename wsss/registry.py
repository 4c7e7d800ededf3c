"""Registries: one dict per user-facing choice, filled by decorators (timm's `register_model` style).

A recipe picks components by name (`cam.method: seam`, `pseudo.method: ppmg`, `seg.loss.name: pce`);
the stage looks the name up here. A component may declare an options dataclass: its fields become
the recipe section `<section>.<name>` (e.g. `cam.seam.view_scale`), typed and validated like every
other key. Plug-ins (`run.plugins: [my_package.my_method]`) are modules imported before the recipe
is validated; their decorators add to the same registries.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Optional, TypeVar

from wsss.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named components of one kind; `key` is the recipe key that picks one (named in errors)."""

    def __init__(self, kind: str, key: str, section: str = ""):
        self.kind, self.key, self.section = kind, key, section
        self._items: dict[str, T] = {}
        self.options: dict[str, type] = {}  # name -> options dataclass (recipe section `<section>.<name>`)
        self.uses: dict[str, tuple[str, ...]] = {}  # name -> other option sections of `section` it reads

    def register(self, name: str, options: Optional[type] = None, uses: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator: `@CAM_METHODS.register("seam", options=SeamOptions)`."""
        def add(obj: T) -> T:
            self.add(name, obj, options, uses)
            return obj
        return add

    def add(self, name: str, obj: T, options: Optional[type] = None, uses: tuple[str, ...] = ()) -> None:
        """Register `obj` under `name` (re-registering the same object is a no-op; another is an error)."""
        old = self._items.get(name)
        if old is not None and old is not obj and getattr(old, "__qualname__", None) != getattr(obj, "__qualname__", 0):
            raise ValueError(f"{self.kind} {name!r} is already registered ({old!r})")
        self._items[name] = obj
        if options is not None:
            self.options[name] = options
        self.uses[name] = tuple(uses)

    def get(self, name: str) -> T:
        """The component named `name`; an unknown name is a ConfigError listing the registered ones."""
        if name not in self._items:
            raise ConfigError(f"{self.key}: unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._items[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> Iterable[tuple[str, T]]:
        return self._items.items()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


# One registry per user-facing choice. Sections: where their options live in a recipe.
DATASETS: Registry[Any] = Registry("data set", "data.dataset")
CAM_METHODS: Registry[Any] = Registry("CAM method", "cam.method", section="cam")
PSEUDO_METHODS: Registry[Any] = Registry("pseudo-mask generator", "pseudo.method", section="pseudo")
SEG_METHODS: Registry[Any] = Registry("segmentation method", "seg.method", section="seg")
PIXEL_LOSSES: Registry[Any] = Registry("pixel loss", "seg.loss.name", section="seg.loss")
REGULARIZERS: Registry[Any] = Registry("regulariser", "seg.loss.regularizer", section="seg.loss")
CRF_PRESETS: Registry[Any] = Registry("CRF preset", "crf preset")
STAGES: Registry[Any] = Registry("stage", "run.stages")

ALL = (DATASETS, CAM_METHODS, PSEUDO_METHODS, SEG_METHODS, PIXEL_LOSSES, REGULARIZERS, CRF_PRESETS, STAGES)

# Modules whose import registers the built-in components (kept light where they can be).
BUILTINS = (
    "wsss.pipeline",
    "wsss.crf.presets",
    "wsss.data",
    "wsss.pseudo",
    "wsss.losses",
    "wsss.cam.methods",
    "wsss.cam.cpn",
    "wsss.engine.modules",
    "wsss.cam.group_wsss",
    "wsss.pseudo.saliency_fusion",
    "wsss.engine.aalr",
    "wsss.pseudo.auxsegnet",
    "wsss.engine.auxsegnet",
)


def load_builtins() -> None:
    """Import the modules that register wsss's own components (idempotent)."""
    for module in BUILTINS:
        importlib.import_module(module)


def load_plugins(names: Iterable[str], base: Optional[Path] = None) -> list[str]:
    """Import plug-in modules by dotted name or by path to a .py file (relative to `base`).

    A plug-in registers its components with the decorators of this module. Returns the module names.
    """
    loaded = []
    for name in names:
        name = str(name).strip()
        if not name:
            continue
        if name.endswith(".py"):
            path = Path(name).expanduser()
            if not path.is_absolute() and base is not None and not path.is_file():
                path = base / path
            if not path.is_file():
                raise ConfigError(f"run.plugins: {name}: plug-in file not found")
            module_name = f"wsss_plugin_{path.stem}"
            if module_name not in sys.modules:
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                try:
                    spec.loader.exec_module(module)
                except Exception as e:  # noqa: BLE001 - a user's module: name it and the cause
                    del sys.modules[module_name]
                    raise ConfigError(f"run.plugins: {path}: import failed ({type(e).__name__}: {e})") from None
            loaded.append(module_name)
        else:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise ConfigError(f"run.plugins: cannot import {name!r} ({e}); is it installed or on PYTHONPATH?") from None
            loaded.append(name)
    return loaded

