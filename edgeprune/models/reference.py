"""Where a model's architecture comes from, so that any process can build it again.

A checkpoint never holds a pickled module: it holds a `ModelRef` (a name, a factory in the user's
file or package with its keyword arguments, or, by explicit opt-in, a pickled module file checked
by hash), a plan where pruned, and a state dict.

    resnet20                       edgeprune's built-ins for small inputs
    resnet18                       torchvision classifiers by name
    path/to/file.py:factory        a function (or class) in the user's file, called with `kwargs`
    package.module:factory         the same, imported from an installed package
    pickle:/abs/path/model.pt      a whole pickled module (trusted once, checked by SHA-256 after)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.runs import file_sha256

KINDS = ("builtin", "torchvision", "file", "module", "pickle", "python")


def kind_of(name: str) -> str:
    """Which of KINDS `name` is (a bare name is checked against the registry when built)."""
    from edgeprune.models.registry import BUILTINS

    if name.startswith("pickle:"):
        return "pickle"
    if name.startswith("python:"):
        return "python"
    if ":" in name:
        return "file" if name.partition(":")[0].endswith(".py") else "module"
    return "builtin" if name in BUILTINS else "torchvision"


def _import_file(path: Path):
    """Import the user's file as a module of its own (its folder on sys.path while it imports, so
    it can import its neighbours)."""
    if not path.is_file():
        raise EdgepruneError(f"model file {path} does not exist; give --model path/to/file.py:factory")
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    module_name = f"edgeprune_user_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise EdgepruneError(f"importing {path} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    finally:
        sys.path.remove(str(path.parent))
    return module


def _attribute(module, dotted: str, where: str):
    obj = module
    for part in dotted.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise EdgepruneError(f"{where} has no {dotted!r}; callables there: {', '.join(public[:12]) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise EdgepruneError(f"{where}:{dotted} is not a function or class that builds a model")
    return obj


def head_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The layer that produces the class scores: the last Linear registered, else the last Conv2d
    (squeezenet's 1x1 classifier), by the convention every torchvision classifier follows."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    layers = layers or [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not layers:
        raise EdgepruneError("the model has no Linear or Conv2d layer to serve as its classifier head")
    return layers[-1]


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Give the classifier head `num_classes` outputs (a fresh layer, same inputs); its name."""
    name, old = head_layer(model)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(
            old.in_channels,
            num_classes,
            old.kernel_size,
            old.stride,
            old.padding,
            old.dilation,
            1,
            old.bias is not None,
        )
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)
    return name


def head_outputs(model: nn.Module) -> int:
    _, layer = head_layer(model)
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@dataclass(frozen=True)
class ModelRef:
    """How to build a model's architecture (randomly initialised) in any process."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None  # built-ins / torchvision: passed on; factories: the head replaced
    in_channels: int | None = None  # built-ins / torchvision: the stem follows the data
    sha256: str | None = None  # a pickled module's file, checked before it is unpickled again

    @property
    def kind(self) -> str:
        return kind_of(self.name)

    @property
    def id(self) -> str:
        """A short name for files (latency tables): the registry name, or `file.factory`."""
        if self.kind in ("builtin", "torchvision"):
            return self.name
        if self.kind == "pickle":
            return Path(self.name[7:]).stem
        if self.kind == "python":
            return self.name.rpartition(".")[2]
        where, _, factory = self.name.partition(":")
        return f"{Path(where).stem if where.endswith('.py') else where.rpartition('.')[2]}.{factory}"

    def build(self, *, trust_pickle: bool = False) -> nn.Module:
        """The architecture, freshly initialised (weights are loaded separately)."""
        kind = self.kind
        if kind in ("builtin", "torchvision"):
            from edgeprune.models.registry import build_model

            if self.kwargs:
                raise EdgepruneError(f"model {self.name!r} takes no keyword arguments (got {sorted(self.kwargs)})")
            return build_model(self.name, num_classes=self.num_classes or 10, in_channels=self.in_channels or 3)
        if kind == "python":
            raise EdgepruneError(
                f"this checkpoint comes from a {self.id} passed in Python, which edgeprune cannot build by itself: "
                f"restore it onto one you build, edgeprune.restore({self.id}(...), PATH), or prune through "
                "--model file.py:factory (model_ref=...) to make it buildable anywhere"
            )
        if kind == "pickle":
            model = self._unpickle(trust_pickle)
        else:
            where, _, factory = self.name.partition(":")
            if kind == "file":
                module = _import_file(Path(where))
            else:
                try:
                    module = importlib.import_module(where)
                except ImportError as e:
                    raise EdgepruneError(f"cannot import {where!r} for --model {self.name}: {e}") from None
            fn = _attribute(module, factory, where)
            try:
                model = fn(**self.kwargs)
            except TypeError as e:
                raise EdgepruneError(
                    f"{self.name}(**{self.kwargs}) failed: {e}; set its arguments in model_kwargs"
                ) from None
            if not isinstance(model, nn.Module):
                raise EdgepruneError(f"{self.name} returned a {type(model).__name__}, not a torch.nn.Module")
        if self.num_classes is not None and head_outputs(model) != self.num_classes:
            replace_head(model, self.num_classes)
        return model.eval()

    def _unpickle(self, trust: bool) -> nn.Module:
        path = Path(self.name[7:])
        if not path.is_file():
            raise EdgepruneError(f"the pickled model {path} this checkpoint was built from is gone; put it back")
        if self.sha256 and file_sha256(path) != self.sha256:
            raise EdgepruneError(
                f"{path} changed since the checkpoint was made from it (SHA-256 differs): it would run other code; "
                "restore the original file"
            )
        if not (trust or self.sha256):
            raise EdgepruneError(f"{path} is a pickled module: loading it runs code; pass --trust-pickle")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as e:
            raise EdgepruneError(
                f"unpickling {path} needs the code that defines its classes ({e}): put its package on PYTHONPATH"
            ) from None
        model = obj.get("model") if isinstance(obj, dict) else obj
        if not isinstance(model, nn.Module):
            raise EdgepruneError(f"{path} holds a {type(obj).__name__}, not a pickled torch.nn.Module")
        return model

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {})}

    @classmethod
    def from_dict(cls, d: dict) -> ModelRef:
        return cls(d["name"], dict(d.get("kwargs") or {}), d.get("num_classes"), d.get("in_channels"), d.get("sha256"))

    @classmethod
    def python(cls, model: nn.Module) -> ModelRef:
        """A model passed in Python: its class named, for the record; not buildable by itself."""
        return cls(f"python:{type(model).__module__}.{type(model).__qualname__}")

    @classmethod
    def parse(
        cls, name: str, *, kwargs: dict | None = None, num_classes: int | None = None, in_channels: int | None = None
    ) -> ModelRef:
        """A reference from what a user types: a path in `file.py:factory` is made absolute, so
        that the checkpoint builds from any working directory."""
        if not name or not isinstance(name, str):
            raise EdgepruneError(
                "name a model: a built-in or torchvision name, file.py:factory or package.module:factory"
            )
        if kind_of(name) == "file":
            where, _, factory = name.partition(":")
            if not factory:
                raise EdgepruneError(f"--model {name}: name the factory after the colon, e.g. {where}:build_model")
            name = f"{Path(where).expanduser().resolve()}:{factory}"
        elif kind_of(name) == "module" and not name.partition(":")[2]:
            raise EdgepruneError(f"--model {name}: name the factory after the colon, e.g. mypackage.models:build")
        return cls(name, dict(kwargs or {}), num_classes, in_channels)
