"""``python -m topoderiv``: prints what was built, and which GPUs this process sees."""
import warnings
from pathlib import Path
from typing import Any, Dict

from ._lib import build_info


def nvidia_driver_loaded() -> bool:
    """Whether an NVIDIA kernel driver is loaded on this machine (Linux: ``/proc/driver/nvidia``)."""
    return Path("/proc/driver/nvidia/version").exists()


def describe_gpus(info: Dict[str, Any]) -> Dict[str, Any]:
    """``info`` with ``gpus`` in plain words when there is none.

    The CUDA runtime reports a machine without any NVIDIA driver as "CUDA driver version is
    insufficient for CUDA runtime version" (the driver's version is taken as 0): that is said as
    "none visible" here. Only with a driver loaded is the runtime's error kept (then it is real: an
    old driver, a busy or broken device).
    """
    info = dict(info)
    err = info.pop("gpu_error", None)
    if info.get("gpus"):
        return info
    if not info.get("cuda"):
        info["gpus"] = "none used (this build has no CUDA kernels)"
    elif err is None or not nvidia_driver_loaded():
        info["gpus"] = "none visible (no NVIDIA GPU or driver on this machine): the CPU kernels are used"
    else:
        info["gpus"] = f"none usable: {err} (CUDA runtime {info.get('cuda_runtime', '?')}); the CPU kernels are used"
    return info


def main() -> None:
    with warnings.catch_warnings():  # torch's "CUDA initialization: ..." on a machine without a driver
        warnings.filterwarnings("ignore", message="CUDA initialization")
        info = describe_gpus(build_info())
    width = max(len(k) for k in info)
    print("topoderiv build")
    for key, val in info.items():
        print(f"  {key:<{width}} : {val}")


if __name__ == "__main__":
    main()
