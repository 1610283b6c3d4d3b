"""Energy sensors a device may have, each read only where it exists:

* ``rapl``: Intel/AMD RAPL package counters, ``/sys/class/powercap/intel-rapl:N/energy_uj``
  (microjoules, wrapping at ``max_energy_range_uj``); the top-level zones are the CPU packages.
  Recent kernels make ``energy_uj`` readable by root only: then RAPL is reported as unreadable.
* ``ina3221``: the INA3221 power monitors of NVIDIA Jetson boards. Two sysfs layouts exist:
  the ``ina3221x`` IIO driver of older L4T releases (``iio:device*/in_power<i>_input`` in mW with
  ``rail_name_<i>``) and the mainline ``ina3221`` hwmon driver of newer ones
  (``hwmon*/in<i>_input`` in mV times ``curr<i>_input`` in mA, named by ``in<i>_label``). Power is
  sampled every few milliseconds and integrated; the board's input rail (``VDD_IN``) is used when
  one is named so, else the sum of all rails (which rails: stated in the report).
* ``nvml``: NVIDIA GPUs through NVML (the ``pynvml`` module of ``nvidia-ml-py``, if installed):
  the total-energy counter where the GPU has one (Volta and newer), else sampled power.

:func:`find_sensor` returns the first that works for the execution provider in use (NVML, then
INA3221 for CUDA; RAPL, then INA3221 for the CPU) together with why each other one was not used,
so a report says which sensor it read, or "none" and why.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from pathlib import Path


class Sensor:
    """A source of joules: ``start()``, then ``stop()`` returns the joules used in between."""

    name = "none"
    detail = ""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> float:
        raise NotImplementedError


class RaplSensor(Sensor):
    """Sum of the RAPL package zones' ``energy_uj`` counters (wrap-around handled)."""

    name = "rapl"

    def __init__(self, zones: list[Path]):
        self.zones = zones
        self.ranges = [int((z / "max_energy_range_uj").read_text()) for z in zones]
        self.detail = ", ".join(f"{(z / 'name').read_text().strip() if (z / 'name').exists() else z.name}" for z in zones)

    def _read(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self.zones]

    def start(self) -> None:
        self.t0 = self._read()

    def stop(self) -> float:
        uj = 0
        for a, b, r in zip(self.t0, self._read(), self.ranges):
            uj += b - a if b >= a else b + r - a
        return uj * 1e-6


class _SampledPower(Sensor):
    """Integrates watts sampled every ``interval_s`` on a background thread (trapezoid rule)."""

    interval_s = 0.005

    def watts(self) -> float:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._done.is_set():
            self.samples.append((time.perf_counter(), self.watts()))
            self._done.wait(self.interval_s)

    def start(self) -> None:
        self.samples: list[tuple[float, float]] = [(time.perf_counter(), self.watts())]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), self.watts()))
        return integrate(self.samples)


def integrate(samples: list[tuple[float, float]]) -> float:
    """Joules from ``[(seconds, watts), ...]`` by the trapezoid rule."""
    return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(samples, samples[1:]))


class Ina3221Sensor(_SampledPower):
    """Jetson INA3221 rails; ``rails`` is ``[(label, reader)]`` where each reader gives watts."""

    name = "ina3221"

    def __init__(self, rails: list[tuple[str, object]]):
        total = [r for r in rails if r[0].upper() == "VDD_IN"]
        self.rails = total or rails
        self.detail = ("board input rail VDD_IN" if total else "sum of rails ") + ("" if total else ", ".join(r[0] for r in rails))

    def watts(self) -> float:
        return sum(read() for _, read in self.rails)


class NvmlSensor(Sensor):
    """NVML on GPU ``index``: the energy counter (mJ) where supported, else sampled power (mW)."""

    name = "nvml"

    def __init__(self, pynvml, index: int = 0):
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(self.handle)
        self.detail = f"GPU {index}: {name.decode() if isinstance(name, bytes) else name}"
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.counter = True
        except pynvml.NVMLError:
            self.counter = False
            self.detail += " (sampled power)"

    def start(self) -> None:
        if self.counter:
            self.mj0 = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        else:
            self._power = _SampledPower()
            self._power.watts = lambda: self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3
            self._power.start()

    def stop(self) -> float:
        if self.counter:
            return (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.mj0) / 1e3
        return self._power.stop()


def _file_reader(path: Path, scale: float):
    return lambda: int(path.read_text()) * scale


def _pair_reader(volts: Path, amps: Path):
    return lambda: int(volts.read_text()) * 1e-3 * int(amps.read_text()) * 1e-3


def rapl(root: str = "/sys") -> tuple[Sensor | None, str]:
    base = Path(root) / "class" / "powercap"
    zones = sorted(Path(p) for p in glob.glob(str(base / "intel-rapl:*")) if Path(p).name.count(":") == 1)
    if not zones:
        return None, f"no {base}/intel-rapl:* zones"
    try:
        sensor = RaplSensor(zones)
        sensor._read()
    except PermissionError:
        return None, f"{zones[0]}/energy_uj is not readable by this user (root only on recent kernels)"
    except (OSError, ValueError) as err:
        return None, f"{zones[0]}: cannot read the counter ({err})"
    return sensor, ""


def ina3221(root: str = "/sys") -> tuple[Sensor | None, str]:
    root = Path(root)
    rails: list[tuple[str, object]] = []
    for dev in sorted(glob.glob(str(root / "bus/i2c/drivers/ina3221x/*/iio:device*"))):  # older L4T (IIO driver)
        for p in sorted(glob.glob(f"{dev}/in_power*_input")):
            i = Path(p).name[len("in_power"):-len("_input")]
            label = Path(dev) / f"rail_name_{i}"
            rails.append((label.read_text().strip() if label.exists() else f"rail{i}", _file_reader(Path(p), 1e-3)))
    for hw in sorted(glob.glob(str(root / "bus/i2c/drivers/ina3221/*/hwmon/hwmon*"))):  # mainline hwmon driver
        for p in sorted(glob.glob(f"{hw}/curr*_input")):
            i = Path(p).name[len("curr"):-len("_input")]
            volts, label = Path(hw) / f"in{i}_input", Path(hw) / f"in{i}_label"
            if volts.exists():
                name = label.read_text().strip() if label.exists() else f"rail{i}"
                if not name.upper().startswith("NC"):  # unconnected channels are labelled NC
                    rails.append((name, _pair_reader(volts, Path(p))))
    if not rails:
        return None, f"no INA3221 rails under {root}/bus/i2c/drivers/ina3221{{,x}}"
    try:
        sensor = Ina3221Sensor(rails)
        sensor.watts()
    except (OSError, ValueError) as err:
        return None, f"INA3221 rails present but unreadable ({err})"
    return sensor, ""


def nvml(index: int = 0) -> tuple[Sensor | None, str]:
    try:
        import pynvml
    except ImportError:
        return None, "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() <= index:
            return None, "NVML found no GPU"
        return NvmlSensor(pynvml, index), ""
    except pynvml.NVMLError as err:
        return None, f"NVML cannot start ({err})"


def find_sensor(provider: str, root: str = "/sys") -> tuple[Sensor | None, dict[str, str]]:
    """The first working sensor for ``provider`` (an onnxruntime execution provider name) and, for
    each sensor not used, why (``{"rapl": "no /sys/class/powercap/intel-rapl:* zones", ...}``)."""
    order = [("nvml", nvml), ("ina3221", lambda: ina3221(root))] if provider.startswith("CUDA") else \
        [("rapl", lambda: rapl(root)), ("ina3221", lambda: ina3221(root))]
    reasons: dict[str, str] = {}
    for name, probe in order:
        sensor, why = probe()
        if sensor is not None:
            return sensor, reasons
        reasons[name] = why
    return None, reasons


def measure(sensor: Sensor, fn, samples_per_call: int, min_seconds: float = 1.0) -> dict:
    """Call ``fn()`` repeatedly for at least ``min_seconds`` while ``sensor`` counts joules."""
    fn()
    calls, t0 = 0, time.perf_counter()
    sensor.start()
    while calls == 0 or time.perf_counter() - t0 < min_seconds:
        fn()
        calls += 1
    seconds = time.perf_counter() - t0
    joules = sensor.stop()
    return {"sensor": sensor.name, "detail": sensor.detail, "calls": calls, "seconds": seconds, "joules": joules,
            "mean_watts": joules / seconds, "joules_per_sample": joules / (calls * samples_per_call)}


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
