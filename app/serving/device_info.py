"""MindSpore Serving's model context objects: ``Context`` and its device infos.

Servable configs written for MindSpore Serving pass ``declare_model(...,
context=Context(...))`` with ``CPUDeviceInfo``/``GPUDeviceInfo``/``AscendDeviceInfo``
appended (or the deprecated ``options=AclOptions(...)``/``GpuOptions(...)``). They are
checked here as MindSpore checks them, with its messages, and turned into a plain
dict (`Context.as_dict`) that a model's backend receives as ``LoadRequest.context``:
a backend that cannot apply a setting says so when the model loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("mserve.register")


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise RuntimeError(f"Parameter '{name}' should be str, but actually {type(value)}")


def _check_choice(what: str, name: str, value: Any, choices: tuple[str, ...], text: str) -> str:
    _check_str(name, value)
    if value not in choices:
        raise RuntimeError(f"{what} '{name}' can only be {text}, actually given '{value}'")
    return value


class DeviceInfoContext:
    """A device's settings; ``context_map`` is the dict of what was set plus its type."""

    device_type = ""
    _unsupported = "Set device info failed, unsupported option "

    def __init__(self, setters: dict[str, Callable[[Any], Any]], kwargs: dict[str, Any]):
        self._settings: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key not in setters:
                raise RuntimeError(self._unsupported + key)
            self._settings[key] = setters[key](value)
        self.context_map = self._as_context_map()

    def _as_context_map(self) -> dict[str, Any]:
        return {**self._settings, "device_type": self.device_type}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.__dict__.get("_settings", {}).get(name, "")


def _precision(kind: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        _check_str("precision_mode", value)
        if value not in ("origin", "fp16"):
            raise RuntimeError(f"{kind} device info 'precision_mode' can only be 'origin', 'fp16'. given '{value}'")
        return value
    return check


class CPUDeviceInfo(DeviceInfoContext):
    """CPU settings: ``precision_mode`` ``"origin"`` or ``"fp16"``."""

    device_type = "cpu"
    _unsupported = "Set cpu device info failed, unsupported option "

    def __init__(self, **kwargs: Any):
        super().__init__({"precision_mode": _precision("Cpu")}, kwargs)


class GPUDeviceInfo(DeviceInfoContext):
    """GPU settings: ``precision_mode`` ``"origin"`` or ``"fp16"``."""

    device_type = "gpu"
    _unsupported = "Set gpu device info failed, unsupported option "

    def __init__(self, **kwargs: Any):
        super().__init__({"precision_mode": _precision("Gpu")}, kwargs)


def _ascend_str(name: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        _check_str(name, value)
        return value
    return check


def _ascend_choice(name: str, choices: tuple[str, ...], text: str) -> Callable[[Any], str]:
    return lambda value: _check_choice("Ascend device info", name, value, choices, text)


class AscendDeviceInfo(DeviceInfoContext):
    """Ascend (ACL) settings, with MindSpore Serving's names and allowed values."""

    device_type = "ascend"
    _unsupported = "Set ascend device info failed, unsupported parameter "

    def __init__(self, **kwargs: Any):
        super().__init__({
            "insert_op_cfg_path": _ascend_str("insert_op_cfg_path"),
            "input_format": _ascend_choice(
                "input_format", ("ND", "NCHW", "NHWC", "CHWN", "NC1HWC0", "NHWC1C0"),
                "'ND', 'NCHW', 'NHWC', 'CHWN', 'NC1HWC0', or 'NHWC1C0'"),
            "input_shape": _ascend_str("input_shape"),
            "output_type": _ascend_choice("output_type", ("FP32", "FP16", "UINT8"),
                                          "'FP32'(default), 'FP16' or 'UINT8'"),
            "precision_mode": _ascend_choice(
                "precision_mode", ("force_fp16", "allow_fp32_to_fp16", "must_keep_origin_dtype", "allow_mix_precision"),
                "'force_fp16'(default), 'allow_fp32_to_fp16' 'must_keep_origin_dtype' or 'allow_mix_precision'"),
            "op_select_impl_mode": _ascend_choice("op_select_impl_mode", ("high_performance", "high_precision"),
                                                  "'high_performance'(default) or 'high_precision'"),
            "fusion_switch_config_path": _ascend_str("fusion_switch_config_path"),
            "buffer_optimize_mode": _ascend_choice(
                "buffer_optimize_mode", ("l1_optimize", "l2_optimize", "off_optimize", "l1_and_l2_optimize"),
                "'off_optimize'(default), 'l1_optimize', 'l2_optimize' or 'l1_and_l2_optimize'"),
        }, kwargs)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuntimeError(f"Parameter '{name}' should be int, but actually {type(value)}")
    if value < minimum:
        raise RuntimeError(f"Parameter '{name}' should be >= {minimum}, but actually {value}")
    return value


def _check_int_list(name: str, value: Any) -> list[int]:
    if not isinstance(value, (tuple, list)):
        raise RuntimeError(f"Parameter '{name}' should be tuple/list of int, but actually {type(value)}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise RuntimeError(f"The item of parameter '{name}' should be int, but actually {type(item)}")
        if item < 0:
            raise RuntimeError(f"The item of parameter '{name}' should be >= 0, but actually {item}")
    return list(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RuntimeError(f"Parameter '{name}' should be bool, but actually {type(value)}")
    return value


@dataclass
class ModelContext:
    """What a `Context` holds, under MindSpore's names: ``enable_parallel`` is 1, 0
    or -1 (unset); ``device_list`` one dict per appended device info."""

    thread_num: int = 0
    thread_affinity_core_list: list[int] = field(default_factory=list)
    enable_parallel: int = -1
    device_list: list[dict[str, Any]] = field(default_factory=list)


class Context:
    """Settings for running one model: ``thread_num``, ``thread_affinity_core_list``,
    ``enable_parallel``, and one device info per device type (`append_device_info`)."""

    def __init__(self, **kwargs: Any):
        self.model_context = ModelContext()
        self._set: dict[str, Any] = {}
        setters = {
            "thread_num": lambda v: _check_int("thread_num", v, 1),
            "thread_affinity_core_list": lambda v: _check_int_list("thread_affinity_core_list", v),
            "enable_parallel": lambda v: 1 if _check_bool("enable_parallel", v) else 0,
        }
        for key, value in kwargs.items():
            if key not in setters:
                raise RuntimeError("Set context failed, unsupported option " + key)
            self._set[key] = setters[key](value)
            setattr(self.model_context, key, self._set[key])
        self.device_types: list[str] = []

    def append_device_info(self, device_info: DeviceInfoContext) -> None:
        """Add the settings of one device type (each type at most once)."""
        if not isinstance(device_info, DeviceInfoContext):
            raise RuntimeError(f"Parameter 'device_info' should instance of CPUDeviceInfo, GPUDeviceInfo, or "
                               f"AscendDeviceInfo, but actually {type(device_info)}")
        info = device_info.context_map
        if not info.get("device_type"):
            raise RuntimeError("Invalid DeviceInfoContext, device_type cannot be empty")
        if info["device_type"] in self.device_types:
            raise RuntimeError(f"Device info of type {info['device_type']} has already been appended")
        self.device_types.append(info["device_type"])
        self.model_context.device_list.append(dict(info))

    def as_dict(self) -> dict[str, Any]:
        """What a backend gets: the options set, and ``device_list`` when any was appended."""
        result = {key: (bool(value) if key == "enable_parallel" else value) for key, value in self._set.items()}
        if self.model_context.device_list:
            result["device_list"] = [dict(d) for d in self.model_context.device_list]
        return result

    def __str__(self) -> str:
        ctx = self.model_context
        return (f"thread_num: {ctx.thread_num}, thread_affinity_core_list: {ctx.thread_affinity_core_list}, "
                f"enable_parallel: {ctx.enable_parallel}, device_list, {ctx.device_list}")


class _DeprecatedOptions:
    """``AclOptions``/``GpuOptions``: a `Context` with one device info, deprecated."""

    info_class: type[DeviceInfoContext] = DeviceInfoContext
    substitute = ""

    def __init__(self, **kwargs: Any):
        log.warning(f"'{type(self).__name__}' is deprecated from MindSpore Serving 1.6.0 and will be removed in a "
                    f"future version, use 'mserve.server.register.{self.substitute}' instead.")
        self.context = Context()
        self.context.append_device_info(self.info_class(**kwargs))


class AclOptions(_DeprecatedOptions):
    """Deprecated: `AscendDeviceInfo` in a `Context` (``declare_model(options=AclOptions(...))``)."""

    info_class = AscendDeviceInfo
    substitute = "AscendDeviceInfo"


class GpuOptions(_DeprecatedOptions):
    """Deprecated: `GPUDeviceInfo` in a `Context` (``declare_model(options=GpuOptions(...))``)."""

    info_class = GPUDeviceInfo
    substitute = "GPUDeviceInfo"


DEPRECATED_OPTIONS = (AclOptions, GpuOptions)
