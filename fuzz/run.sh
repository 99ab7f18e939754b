#!/usr/bin/env bash
# Builds _nanoslm with AddressSanitizer + UndefinedBehaviorSanitizer into build/fuzz/ (the normal in-place
# build is untouched), then runs each harness fuzz/fuzz_*.py against it for FUZZ_SECONDS.
#
#     make fuzz                                   # every harness, 10 minutes each
#     FUZZ_SECONDS=30 fuzz/run.sh fuzz/fuzz_encoder.py
#
# With clang the extension also gets libFuzzer's coverage feedback (-fsanitize=fuzzer-no-link) and runs
# under atheris's own ASan runtime; with only gcc it is sanitized but the fuzzer sees Python coverage alone.
# A harness stops at its first crash, sanitizer report or hang (a run over FUZZ_HANG seconds), writing the
# input to fuzz/findings/; a run passes when every harness ran its time without one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FUZZ_SECONDS=${FUZZ_SECONDS:-600}
FUZZ_HANG=${FUZZ_HANG:-20}
BUILD=build/fuzz
SITE=$($PY -c "import atheris; print(atheris.path())" 2>/dev/null) || {
    echo "fuzz: $PY cannot import atheris: it installs (make test) on Linux x86-64 with Python <= 3.11;" \
         "elsewhere: pip install atheris==2.3.0, which builds from source with clang and libFuzzer" >&2
    exit 2
}

# --- the sanitizer build ----------------------------------------------------------------------------------
# (setup.py's own -O3 comes after these flags, so it is the level the sanitized code is built at.)
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1 -Wno-psabi"
if command -v clang++ >/dev/null; then
    SAN="$SAN -fno-sanitize=vptr,function -fsanitize=fuzzer-no-link"  # vptr would need one more runtime
    export CC=clang CXX=clang++ LDSHARED="clang++ -shared" LDCXXSHARED="clang++ -shared"
    PRELOAD="$SITE/asan_with_fuzzer.so"
else
    echo "fuzz: no clang, so gcc's sanitizers without native coverage feedback" >&2
    SAN="$SAN -fno-sanitize=vptr"
    export CC=gcc CXX=g++ LDSHARED="g++ -shared" LDCXXSHARED="g++ -shared"
    PRELOAD="$(g++ -print-file-name=libasan.so)"
fi
export CFLAGS="$SAN" CXXFLAGS="$SAN" LDFLAGS="$SAN"  # CXXFLAGS replaces Python's own flags for C++ files
$PY setup.py -q build_ext --build-temp "$BUILD/tmp" --build-lib "$BUILD/lib" >/dev/null
[ "${FUZZ_SECONDS}" != 0 ] || exit 0  # FUZZ_SECONDS=0: build only

# --- the runs ---------------------------------------------------------------------------------------------
mkdir -p fuzz/findings
harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=(fuzz/fuzz_*.py)
failed=()
for harness in "${harnesses[@]}"; do
    name=$(basename "$harness" .py)
    echo "fuzz: $name for ${FUZZ_SECONDS}s"
    mkdir -p "fuzz/corpus/$name"
    NANOSLM_FUZZ_BUILD="$BUILD/lib" LD_PRELOAD="$PRELOAD" \
    ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        $PY "$harness" "fuzz/corpus/$name" -max_total_time="$FUZZ_SECONDS" -timeout="$FUZZ_HANG" \
            -rss_limit_mb=4096 -artifact_prefix="fuzz/findings/$name-" -print_final_stats=1 || failed+=("$name")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: findings in ${failed[*]}: inputs in fuzz/findings/; replay one with" >&2
    echo "  NANOSLM_FUZZ_BUILD=$BUILD/lib LD_PRELOAD=$PRELOAD $PY fuzz/<harness>.py fuzz/findings/<file>" >&2
    exit 1
fi
echo "fuzz: every harness ran ${FUZZ_SECONDS}s without a finding"
