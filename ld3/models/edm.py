"""EDM network pickles (Karras et al. 2022, NVlabs/edm release) as LD3 denoisers.

The release files (``edm-cifar10-32x32-cond-vp.pkl``, ``network-snapshot-*.pkl``, ...) are pickles of a
dict ``{"ema": network, "loss_fn": ..., "augment_pipe": ..., "dataset_kwargs": ...}``. Each network
object is saved by EDM's ``torch_utils.persistence``: it is pickled as a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` where ``meta`` holds the *source code* of
the whole Python module that defined the class, the class name and the object state. Unpickling
executes that source code.

SECURITY: a pickle can run arbitrary code when loaded, and these pickles run their embedded module
source by design. :func:`load_edm_network` therefore unpickles through an allow-list: tensor and
``nn.Module`` rebuilding (torch's own functions and ``torch.nn`` classes), ``OrderedDict``, numpy arrays and
scalars, and classes an application registers with :func:`register_safe_class`. Anything else -- ``os.system``,
``eval``, ``subprocess.run``, any other import -- is refused with :class:`UntrustedCodeError`, and so is the
embedded source, unless the caller opts in: ``trust_code=True``, or ``LD3_TRUST_CHECKPOINT_CODE=1`` in the
environment (the study scripts' ``--trust-checkpoint-code`` sets it). Opt in only for files you trust.

EDM's own source tree is not needed: :func:`load_edm_network` unpickles with a custom ``find_class``
that supplies minimal stand-ins for the ``torch_utils`` / ``dnnlib`` names the files reference. The
stand-ins are never added to ``sys.modules``; the embedded module code is executed in a private module
whose ``__import__`` resolves ``torch_utils.*`` / ``dnnlib.*`` to them (other imports are normal).

The networks (``VPPrecond``, ``VEPrecond``, ``EDMPrecond``, ``iDDPMPrecond``) are already denoisers in
EDM form, ``net(x, sigma, class_labels) -> D(x; sigma)``, so :class:`EDMDenoiser` only validates the call
and turns class ids into the one-hot labels the networks expect.
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import sys
import types
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from ld3.checkpoint_sources import EDM_RELEASE_URL, TRUST_ENV_VAR, TRUST_FLAG
from ld3.losses import MissingWeightsError
from ld3.models.base import DenoiserAdapter, expand_condition, freeze
from ld3.schedules import EDMSchedule

TRUST_WARNING = "a pickle runs arbitrary code when loaded (EDM pickles execute their embedded source): load only trusted files"
_PERSISTENCE_VERSION = 6  # version of EDM's torch_utils.persistence format that the release files use


class EmbeddedCodeError(ValueError):
    """The pickle's embedded code could not be rebuilt, or it does not define an EDM network."""


class UntrustedCodeError(ValueError):
    """Loading the pickle would run code (embedded source or a global off the allow-list) without an opt-in."""


# ---- stand-ins for the torch_utils / dnnlib names that EDM pickles reference ---------------------------
class EasyDict(dict):
    """A dict with attribute access (what ``dnnlib.EasyDict`` is in the pickles)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


_module_of_source: dict[str, types.ModuleType] = {}  # embedded source -> its private module
_source_of_module: dict[str, str] = {}  # private module name -> embedded source
_persistent_classes: set[type] = set()


def _persistent_class(orig_class: type) -> type:
    """Stand-in for ``persistence.persistent_class``: subclass that pickles back to the same format.

    Instances reduce to ``_reconstruct_persistent_obj(meta)`` of *this* module, so a loaded network can be
    deep-copied or pickled again (e.g. to send it to a worker) in any process that can import ``ld3``.
    """
    if orig_class in _persistent_classes:
        return orig_class
    source = _source_of_module.get(orig_class.__module__)
    if source is None:
        raise EmbeddedCodeError(
            f"persistent_class({orig_class.__name__}) outside embedded EDM code: ld3 only rebuilds classes "
            "from pickled EDM networks; import EDM's own torch_utils to define new persistent classes"
        )

    class Persistent(orig_class):
        def __reduce__(self):
            meta = dict(type="class", version=_PERSISTENCE_VERSION, module_src=source,
                        class_name=orig_class.__name__, state=self.__getstate__())
            return _reconstruct_persistent_obj, (meta,)

    Persistent.__name__ = Persistent.__qualname__ = orig_class.__name__
    Persistent.__module__ = orig_class.__module__
    _persistent_classes.add(Persistent)
    return Persistent


def _reconstruct_persistent_obj(meta: dict) -> Any:
    """Rebuild one persistent object: run its module source once, then restore the class instance state."""
    meta = EasyDict(meta)
    if meta.get("type") != "class" or meta.get("version") != _PERSISTENCE_VERSION:
        raise EmbeddedCodeError(
            f"unsupported torch_utils.persistence record (type={meta.get('type')!r}, version={meta.get('version')!r}); "
            f"ld3 reads version {_PERSISTENCE_VERSION} (the EDM release format)"
        )
    module = _module_from_source(meta.module_src)
    try:
        cls = _persistent_class(module.__dict__[meta.class_name])
    except KeyError:
        raise EmbeddedCodeError(f"the embedded module source defines no class {meta.class_name!r}") from None
    obj = cls.__new__(cls)
    state = EasyDict(meta.state)
    setstate = getattr(obj, "__setstate__", None)
    if callable(setstate):
        setstate(state)
    else:
        obj.__dict__.update(state)
    return obj


def _module_from_source(source: str) -> types.ModuleType:
    """Execute embedded module source once in a private module (not registered in ``sys.modules``)."""
    module = _module_of_source.get(source)
    if module is None:
        module = types.ModuleType(f"_ld3_edm_embedded_{uuid.uuid4().hex}")
        module.__dict__["__builtins__"] = {**vars(builtins), "__import__": _embedded_import}
        _source_of_module[module.__name__] = source
        try:
            exec(compile(source, f"<EDM pickle: {module.__name__}>", "exec"), module.__dict__)  # noqa: S102 - see TRUST_WARNING
        except Exception as error:
            del _source_of_module[module.__name__]
            raise EmbeddedCodeError(
                f"the pickle's embedded module source failed to run: {error!r}. Note: {TRUST_WARNING}"
            ) from error
        _module_of_source[source] = module
    return module


def _missing_attribute(module_name: str):
    def __getattr__(name: str) -> Any:
        raise AttributeError(
            f"{module_name}.{name} is not provided by ld3's EDM loader, which rebuilds only the networks "
            "(persistence, EasyDict); this object needs EDM's own source tree"
        )
    return __getattr__


def _stand_in_modules() -> dict[str, types.ModuleType]:
    """The ``torch_utils`` / ``dnnlib`` modules as the pickles and their embedded code see them."""
    modules = {name: types.ModuleType(name) for name in
               ("dnnlib", "dnnlib.util", "torch_utils", "torch_utils.persistence", "torch_utils.misc")}
    modules["dnnlib"].EasyDict = modules["dnnlib.util"].EasyDict = EasyDict
    modules["dnnlib"].util = modules["dnnlib.util"]
    persistence = modules["torch_utils.persistence"]
    persistence.persistent_class = _persistent_class
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    modules["torch_utils"].persistence = persistence
    modules["torch_utils"].misc = modules["torch_utils.misc"]  # imported by augment.py, needed only to train
    for module in modules.values():
        module.__getattr__ = _missing_attribute(module.__name__)
    return modules


_STAND_INS = _stand_in_modules()
_SAFE_STAND_INS = {("dnnlib", "EasyDict"), ("dnnlib.util", "EasyDict")}  # usable without trust: they run no code
_STAND_IN_ROOTS = {name.partition(".")[0] for name in _STAND_INS}


def _embedded_import(name: str, globals=None, locals=None, fromlist=(), level: int = 0):
    """``__import__`` of embedded EDM code: torch_utils/dnnlib from the stand-ins, the rest as usual."""
    if level == 0 and name.partition(".")[0] in _STAND_IN_ROOTS:
        if name not in _STAND_INS:
            raise ModuleNotFoundError(
                f"embedded code imports {name!r}, which ld3's EDM loader does not provide "
                f"(it provides {sorted(_STAND_INS)})", name=name)
        return _STAND_INS[name] if fromlist else _STAND_INS[name.partition(".")[0]]
    return builtins.__import__(name, globals, locals, fromlist, level)


def _load_storage_bytes(data: bytes) -> Any:
    """Safe ``torch.storage._load_from_bytes``: the nested storage record is read with torch's weights-only
    unpickler (torch's own function unpickles it with no restriction)."""
    return torch.load(io.BytesIO(data), weights_only=True)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    **{(numpy_core, name): None for numpy_core in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name in ("_reconstruct", "scalar")},
    ("numpy", "ndarray"): None,
    ("numpy", "dtype"): None,
}  # None: numpy's own object, imported on first use (ld3 does not import numpy otherwise)


def register_safe_class(cls: type) -> type:
    """Allow pickles to rebuild instances of ``cls`` (an ``nn.Module`` subclass whose ``__init__`` and
    ``__setstate__`` have no side effects), e.g. an application's own network classes; returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"only torch.nn.Module subclasses can be registered, got {cls!r}")
    _SAFE_GLOBALS[(cls.__module__, cls.__qualname__)] = cls
    return cls


def _safe_global(module: str, name: str) -> Any | None:
    """The allow-listed object ``module.name``, or None when loading it would run code from the file."""
    key = (module, name)
    if key in _SAFE_GLOBALS:
        found = _SAFE_GLOBALS[key]
        return found if found is not None else getattr(__import__(module, fromlist=[name]), name)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module == "numpy.dtypes" and name.endswith("DType"):
        return getattr(__import__(module, fromlist=[name]), name, None)
    if module.startswith("torch.nn.modules.") and module in sys.modules:
        found = getattr(sys.modules[module], name, None)
        return found if isinstance(found, type) and issubclass(found, nn.Module) else None
    return None


def code_trusted(trust_code: bool | None = None) -> bool:
    """``trust_code`` if given, else whether ``LD3_TRUST_CHECKPOINT_CODE=1`` is set."""
    return trust_code if trust_code is not None else os.environ.get(TRUST_ENV_VAR, "") == "1"


def _opt_in_hint() -> str:
    return f"if you trust the file, pass {TRUST_FLAG} or set {TRUST_ENV_VAR}=1"


def _off_the_list(module: str, name: str) -> UntrustedCodeError:
    return UntrustedCodeError(f"it references {module}.{name}, which would run code when loaded and is not on "
                              f"ld3's allow-list of tensor/module rebuilders; {_opt_in_hint()}")


class _EDMUnpickler(pickle.Unpickler):
    """Allow-list unpickler (module docstring); ``torch_utils.*`` / ``dnnlib.*`` resolve to the stand-ins, and
    with ``trust_code`` the embedded source and any other global are allowed (scoped to one load)."""

    def __init__(self, file: BinaryIO, *, trust_code: bool):
        super().__init__(file)
        self.trust_code = trust_code

    def find_class(self, module: str, name: str) -> Any:
        if module.partition(".")[0] in _STAND_IN_ROOTS:
            return self._stand_in(module, name)
        found = _safe_global(module, name)
        if found is not None:
            return found
        if self.trust_code:
            return super().find_class(module, name)
        raise _off_the_list(module, name)

    def _stand_in(self, module: str, name: str) -> Any:
        if not self.trust_code and (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            raise UntrustedCodeError(f"it embeds Python source (EDM torch_utils.persistence) that runs when it is "
                                     f"loaded; {_opt_in_hint()}")
        if not self.trust_code and (module, name) not in _SAFE_STAND_INS:
            raise _off_the_list(module, name)
        try:
            return getattr(_STAND_INS[module], name)
        except (KeyError, AttributeError):
            raise pickle.UnpicklingError(
                f"the pickle references {module}.{name}, which ld3's EDM loader does not provide"
            ) from None


# ---- loading -------------------------------------------------------------------------------------
def read_edm_pickle(file: BinaryIO, *, trust_code: bool | None = None) -> Any:
    """Unpickle an EDM-format pickle from an open binary file through the allow-list; with
    :func:`code_trusted` the file's code runs (TRUST_WARNING). Raises UntrustedCodeError otherwise."""
    return _EDMUnpickler(file, trust_code=code_trusted(trust_code)).load()


def _is_edm_network(obj: Any) -> bool:
    return isinstance(obj, nn.Module) and all(
        hasattr(obj, attr) for attr in ("img_resolution", "img_channels", "label_dim")
    )


def load_edm_network(path: str | os.PathLike, key: str = "ema", *, trust_code: bool | None = None) -> nn.Module:
    """Load the network stored under ``key`` of an EDM release pickle, frozen, on the CPU.

    Release pickles embed their network's source: they load only with ``trust_code=True`` or
    ``LD3_TRUST_CHECKPOINT_CODE=1`` (then the file's code runs: TRUST_WARNING).

    Raises:
        MissingWeightsError: the file does not exist.
        UntrustedCodeError: loading would run code from the file and there is no opt-in.
        ValueError / EmbeddedCodeError: the file is not an EDM network pickle.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(
            f"EDM network pickle {path.name!r} not found at {path.resolve()}; download it on a machine with "
            f"internet access from {EDM_RELEASE_URL} (e.g. edm-cifar10-32x32-uncond-vp.pkl) and pass its local path"
        )
    with path.open("rb") as file:
        try:
            data = read_edm_pickle(file, trust_code=trust_code)
        except UntrustedCodeError as error:
            raise UntrustedCodeError(f"refusing to load {path}: {error}") from None
        except (pickle.UnpicklingError, EOFError) as error:
            raise ValueError(
                f"{path} is not an EDM network pickle ({error}); expected a network-snapshot-*.pkl / edm-*.pkl "
                f"from the EDM release (a pickled dict with key 'ema'). Note: {TRUST_WARNING}"
            ) from error
    if not isinstance(data, dict) or key not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} holds {found}, not an EDM snapshot dict with key {key!r}; pass key= or an EDM release pickle")
    net = data[key]
    if not _is_edm_network(net):
        raise EmbeddedCodeError(
            f"{path}[{key!r}] is a {type(net).__name__}, not an EDM network (a torch.nn.Module with "
            f"img_resolution, img_channels and label_dim, called as net(x, sigma, class_labels)). Note: {TRUST_WARNING}"
        )
    return freeze(net)


def _autocast_output_to_input_dtype(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    """Forward hook: EDM preconditioners assert that the inner model returns its input dtype (fp32/fp16)."""
    return output.to(inputs[0].dtype) if output.dtype == torch.bfloat16 else output


class EDMDenoiser(DenoiserAdapter):
    """An EDM network (``VPPrecond``/``VEPrecond``/``EDMPrecond``/``iDDPMPrecond``) as ``D(x, sigma, cond)``.

    ``cond`` for class-conditional networks (``label_dim > 0``): integer class ids [B] (or a single id for
    all samples), or float labels [B, label_dim] (one-hot or soft) passed through unchanged.
    ``schedule`` is EDM's sampling range, sigma in [max(0.002, net.sigma_min), min(80, net.sigma_max)].
    """

    def __init__(self, net: nn.Module, *, sigma_min: float = 0.002, sigma_max: float = 80.0, **memory_options: bool):
        if not _is_edm_network(net):
            raise TypeError(f"net must be an EDM network (from load_edm_network), got {type(net).__name__}")
        sigma_min = max(sigma_min, float(getattr(net, "sigma_min", 0.0)))
        sigma_max = min(sigma_max, float(getattr(net, "sigma_max", float("inf"))))
        shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
        super().__init__(EDMSchedule(sigma_min, sigma_max), shape, **memory_options)
        self.net = freeze(net)
        self.label_dim = int(net.label_dim)
        self.condition_kind = "class" if self.label_dim > 0 else None
        if self.autocast_bf16:
            if not isinstance(getattr(net, "model", None), nn.Module):
                raise ValueError("autocast_bf16 needs the EDM preconditioner's inner network at net.model")
            net.model.register_forward_hook(_autocast_output_to_input_dtype)

    def _check_condition(self, cond: Tensor | None, x: Tensor) -> Tensor | None:
        if self.label_dim == 0:
            return super()._check_condition(cond, x)
        if cond is None:
            raise ValueError(f"this EDM network is class-conditional ({self.label_dim} classes): pass cond (class ids [B])")
        cond = torch.as_tensor(cond, device=x.device)
        if cond.is_floating_point():
            if cond.ndim != 2 or cond.shape[1] != self.label_dim:
                raise ValueError(f"float cond must be labels of shape [B, {self.label_dim}], got {tuple(cond.shape)}")
            return expand_condition(cond, x.shape[0])
        cond = expand_condition(cond.long().reshape(-1), x.shape[0])
        if bool(((cond < 0) | (cond >= self.label_dim)).any()):
            raise ValueError(f"class ids in cond must lie in [0, {self.label_dim}), got {cond.tolist()}")
        return torch.nn.functional.one_hot(cond, self.label_dim).to(torch.float32)

    def _denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        return self.net(x, sigma, class_labels=cond)


def load_edm_denoiser(path: str | os.PathLike, *, key: str = "ema", trust_code: bool | None = None,
                      **options: Any) -> EDMDenoiser:
    """:func:`load_edm_network` + :class:`EDMDenoiser` (options: sigma_min, sigma_max, memory options)."""
    return EDMDenoiser(load_edm_network(path, key, trust_code=trust_code), **options)
