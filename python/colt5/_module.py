"""torch.nn.Module views of the C++ modules.

A C++ module (built by colt5._C from the reference's keyword arguments) is
mirrored by a tree of torch.nn.Module objects with the same child names. Each
parameter and buffer registered in the Python tree is the C++ module's own
tensor: the same TensorImpl, re-classed as torch.nn.Parameter for parameters.
So state_dict keys are the C++ (= reference) names, in-place updates
(optimizers, load_state_dict) are seen by the C++ forward, and gradients of
the C++ graph accumulate in the parameters' .grad.

Conversions (.to(), .cuda(), .half(), ...) keep the parameter objects
(torch.nn.Module._apply sets param.data, which replaces the TensorImpl's data
in place); buffers and any tensor that Python replaces by a new object (for
example load_state_dict(assign=True)) are written back into the C++ tensor,
which then takes the new one's place in the Python tree.
"""

import json
import math

import torch
from torch import nn

from . import _C

__all__ = ["CppModule"]


def _adopt(own, value):
    """Makes the C++ tensor `own` hold the data of `value` (a tensor)."""
    if value is own:
        return
    with torch.no_grad():
        own.data = value.detach()
    if isinstance(own, nn.Parameter) and isinstance(value, nn.Parameter) and value.requires_grad != own.requires_grad:
        own.requires_grad_(value.requires_grad)


class _Node(nn.Module):
    """A C++ module's view in Python: its own parameters and buffers, and its children."""

    def __init__(self, cpp=None):
        super().__init__()
        if cpp is not None:
            self._attach(cpp)

    def _attach(self, cpp):
        object.__setattr__(self, "_cpp", cpp)
        owned = {}
        for name, t in cpp.local_parameters():
            if not isinstance(t, nn.Parameter):
                t.__class__ = nn.Parameter
            nn.Module.register_parameter(self, name, t)
            owned[name] = t
        for name, t in cpp.local_buffers():
            nn.Module.register_buffer(self, name, t)
            owned[name] = t
        object.__setattr__(self, "_cpp_tensors", owned)
        for name, child in cpp.children():
            names = [n for n, _ in child.children()]
            is_sequence = names and all(n.isdigit() for n in names)
            self.add_module(name, _SequenceNode(child) if is_sequence else _Node(child))

    # -- keeping the Python tree and the C++ module one and the same

    def _owned(self, name):
        owned = self.__dict__.get("_cpp_tensors")
        return None if owned is None else owned.get(name)

    def _take_back(self):
        """Writes tensors that Python replaced back into the C++ ones."""
        owned = self.__dict__.get("_cpp_tensors")
        if not owned:
            return
        for name, own in owned.items():
            registry = self._parameters if name in self._parameters else self._buffers
            current = registry.get(name)
            if current is None:
                registry[name] = own
            elif current is not own:
                _adopt(own, current)
                if isinstance(own, nn.Parameter) and isinstance(current, nn.Parameter) and current.grad is not None:
                    own.grad = current.grad
                registry[name] = own

    def __setattr__(self, name, value):
        own = self._owned(name)
        if own is not None:
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"cannot assign {type(value).__name__} to '{name}': it is a tensor of the C++ module "
                    "(assign a tensor of the same shape)")
            if value.shape != own.shape:
                raise ValueError(f"cannot assign a tensor of shape {tuple(value.shape)} to '{name}' of shape "
                                 f"{tuple(own.shape)}")
            _adopt(own, value)
            value = own
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if self._owned(name) is not None:
            raise AttributeError(f"cannot delete '{name}': the C++ module uses it")
        super().__delattr__(name)

    def register_parameter(self, name, param):
        own = self._owned(name)
        if own is not None and param is not None and param is not own:
            _adopt(own, param)
            param = own
        super().register_parameter(name, param)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._take_back()
        return self

    def train(self, mode=True):
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self._cpp.train(mode)
        return super().train(mode)

    def _get_name(self):
        return repr(self._cpp) if "_cpp" in self.__dict__ else type(self).__name__

    def _replicate_for_data_parallel(self):
        raise RuntimeError("colt5 modules do not support torch.nn.DataParallel (its replicas' parameters would not "
                           "reach the C++ module): use DistributedDataParallel")

    def extra_repr(self):
        return ""


class _SequenceNode(_Node):
    """A C++ Sequential or ModuleList: children indexed like the reference's nn.Sequential / nn.ModuleList."""

    def __getitem__(self, idx):
        children = list(self._modules.values())
        if isinstance(idx, slice):
            raise TypeError("slicing a module list of the C++ module is not supported")
        return children[idx]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


def _check_json(kind, key, value):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{kind}: keyword '{key}' must be finite, got {value}")
        return value
    if isinstance(value, dict):
        return {str(k): _check_json(kind, f"{key}['{k}']", v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_check_json(kind, key, v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    raise TypeError(f"{kind}: keyword '{key}' has unsupported type {type(value).__name__}")


class CppModule(_Node):
    """Base class of the routed modules: builds the C++ module of kind `_kind`
    from the reference's keyword arguments and mirrors it."""

    _kind = None

    def __init__(self, **config):
        super().__init__()
        kind = self._kind
        config = {k: _check_json(kind, k, v) for k, v in config.items()}
        self._attach(_C.build(kind, json.dumps(config)))
        object.__setattr__(self, "_config", config)  # after the children, whose names may equal keywords
        owned = []
        for prefix, node in self.named_modules():
            for name, t in node.__dict__.get("_cpp_tensors", {}).items():
                registry = node._parameters if name in node._parameters else node._buffers
                owned.append((registry, name, t, f"{prefix}.{name}" if prefix else name))
        object.__setattr__(self, "_owned_tensors", owned)

    def _check_tensors(self):
        """Raises when a parameter or buffer was swapped for a tensor the C++ module does not use
        (torch.func.functional_call, swap_tensors): that would silently compute with the old one."""
        for registry, name, t, key in self._owned_tensors:
            if registry.get(name) is not t:
                raise RuntimeError(f"{self._kind}: '{key}' was replaced by a tensor the C++ module does not use "
                                   "(functional_call and tensor swapping are not supported; assign it or load a "
                                   "state_dict instead)")

    def _get_name(self):
        return type(self).__name__

    def __getattr__(self, name):
        # Parameters, buffers and submodules first; then the configuration
        # (the reference keeps e.g. num_heavy_tokens as an attribute).
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = self.__dict__.get("_config")
            if config is not None and name in config:
                return config[name]
            raise

    @property
    def config(self):
        """The keyword arguments the module was built with."""
        return dict(self._config)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self._config.items())

    # Pickling and deepcopy rebuild the C++ module from the configuration.
    def __getstate__(self):
        return {"config": self._config, "state_dict": self.state_dict(), "training": self.training}

    def __setstate__(self, state):
        CppModule.__init__(self, **state["config"])
        self.load_state_dict(state["state_dict"])
        self.train(state["training"])


def tensor_or_none(kind, name, value):
    if value is None or isinstance(value, torch.Tensor):
        return value
    raise TypeError(f"{kind}: argument '{name}' must be a tensor or None, got {type(value).__name__}")


def tensor(kind, name, value):
    if isinstance(value, torch.Tensor):
        return value
    raise TypeError(f"{kind}: argument '{name}' must be a tensor, got {type(value).__name__}")


def count(kind, name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            return int(value.item())
        raise TypeError(f"{kind}: argument '{name}' must be an int or None, got {type(value).__name__}")
    return value
