"""
The processor's name, for the first line of every benchmark (figures mean little without the machine).
Imported by the bench/ scripts: `from machine import cpu_name`.
"""
import platform


def cpu_name() -> str:
    """The model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()
