#!/usr/bin/env bash
# Builds the full project here (Debian 12, nvcc, sm_90) and gathers what a GPU machine without the
# service's dependencies (abseil, OpenBLAS, ...) needs to run it: the binaries, the test and bench
# programs, and the shared libraries that machine lacks. The bundle goes to .gpu-bundle/ (ignored
# by git; the device tool carries it) as one compressed archive, well under the 64 MiB a device call
# carries. On the GPU machine:
#   tar -xJf .gpu-bundle/bundle.tar.xz -C /tmp && /tmp/bundle/run.sh /tmp/bundle/build/test_model
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
BINS=${BUNDLE_BINS:-test_cuda_* test_distributed train_bench sp_bench mamba-worker mamba_logits}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
# Only the bundled programs: the CPU tests would double the build on a small machine.
mapfile -t targets < <(ninja -C "$BUILD" -t targets all | sed -n 's/^\([A-Za-z0-9_-]*\): .*/\1/p' |
  while read -r t; do for g in $BINS; do [[ $t == $g ]] && echo "$t" && break; done; done | sort -u)
cmake --build "$BUILD" -j"$(nproc)" --target "${targets[@]}"
STAGE=$(mktemp -d)/bundle
mkdir -p "$STAGE/build" "$STAGE/lib"
# Executables (and the kernels' shared library) at their build-tree names.
# Only what the GPU run uses (each binary carries every CUDA kernel, ~11 MB; the device tool
# carries at most 64 MiB). BUNDLE_BINS: space-separated globs relative to the build folder.
for pattern in $BINS; do
  for f in "$BUILD"/$pattern; do [[ -f "$f" ]] && cp "$f" "$STAGE/build/"; done
done
# Shared libraries the GPU machine's Ubuntu image lacks.
for bin in "$STAGE"/build/*; do ldd "$bin" 2>/dev/null || true; done |
  awk '/=> \// {print $3}' | sort -u |
  grep -E 'libabsl_|libopenblas|libgfortran|libquadmath|libprotobuf|libgrpc|libgpr|libaddress_sorting|libupb|libre2|libcares|libsqlite3' |
  xargs -r -I{} cp -L {} "$STAGE/lib/"
cat > "$STAGE/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs a bundled program with the bundled libraries after the system's own.
here="$(cd "$(dirname "$0")" && pwd)"
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$here/lib"
exec "$@"
RUN
chmod +x "$STAGE/run.sh"
rm -rf .gpu-bundle && mkdir -p .gpu-bundle
tar -C "$(dirname "$STAGE")" -cJf .gpu-bundle/bundle.tar.xz bundle
rm -rf "$(dirname "$STAGE")"
du -sh .gpu-bundle/bundle.tar.xz
