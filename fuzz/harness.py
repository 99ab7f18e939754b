"""
What the fuzz harnesses share: the extension they test, the exceptions bad input may raise, and the atheris
entry point. A harness is fuzz/fuzz_<what>.py with a test_one_input(data: bytes); run one with

    make fuzz                                          # build with ASan + UBSan, then every harness 10 min
    FUZZ_SECONDS=60 fuzz/run.sh fuzz/fuzz_encoder.py   # one harness, one minute

fuzz/run.sh sets NANOSLM_FUZZ_BUILD to the sanitized build's folder; without it (tests/test_fuzz.py's smoke)
the harnesses import the normal build from the repository root.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANITIZED_BUILD = os.environ.get("NANOSLM_FUZZ_BUILD")

# The contract every entry point keeps: bad input raises one of these, never crashes, hangs or trips a
# sanitizer. (pybind11 maps std::invalid_argument to ValueError, std::out_of_range to IndexError, bad_alloc to
# MemoryError, a dict key it lacks to KeyError; UnicodeEncodeError is a ValueError.) Anything else escapes
# and atheris reports it.
REFUSALS = (ValueError, TypeError, IndexError, KeyError, OverflowError, RuntimeError, MemoryError)


def native():
    """_nanoslm: the sanitized build when run by fuzz/run.sh (checked, so a run never fuzzes the wrong one),
    else the normal one. Also puts the repository root on sys.path for tokenizer, data, ..."""
    if SANITIZED_BUILD:
        sys.path.insert(0, os.path.abspath(SANITIZED_BUILD))
    if ROOT not in sys.path:
        sys.path.insert(1 if SANITIZED_BUILD else 0, ROOT)
    import _nanoslm
    if SANITIZED_BUILD and not os.path.abspath(_nanoslm.__file__).startswith(os.path.abspath(SANITIZED_BUILD)):
        sys.exit(f"fuzz: imported {_nanoslm.__file__}, not the sanitized build in {SANITIZED_BUILD}")
    return _nanoslm


def main(test_one_input, also_instrument=()):
    """atheris over test_one_input, with libFuzzer's own arguments from the command line. The Python coverage
    it steers by: every function of test_one_input's module, and also_instrument (say, the reader fuzzed)."""
    import inspect
    import atheris
    module = sys.modules[test_one_input.__module__]
    for f in [*vars(module).values(), *also_instrument]:
        if inspect.isfunction(f) and (f.__module__ == module.__name__ or f in also_instrument):
            atheris.instrument_func(f)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
