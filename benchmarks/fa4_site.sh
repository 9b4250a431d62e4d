#!/usr/bin/env bash
# flash-attention 4 (`model.flash_attention_impl = "FA4"`) for the lent GPU machines, whose image
# (CPython 3.12, torch 2.11+cu130, no network) lacks it.
#
#   benchmarks/fa4_site.sh build [DIR]      here, with network: DIR/site.tar.xz (default .fa4/)
#   eval "$(benchmarks/fa4_site.sh install [DIR] [TARGET])"   there: unpack, export PYTHONPATH
#
# build installs the pinned wheels below for CPython 3.12 x86-64 into one folder (pip --target,
# no dependency resolution: the image already has torch, einops, typing-extensions, protobuf and
# cuda-bindings) and packs the folder (264 MB, most of it the CUDA 13 CuTe DSL libraries: a
# 193 MB MLIR module) with xz's x86 filter and a 256 MiB dictionary into 57.5 MB, so that it, the
# repo and the torchdata wheel stay under a device call's 64 MiB (the CUDA 13 library wheel alone
# is 92 MB, and 63.5 MB with plain xz -9e). Packing takes ~6 minutes on 2 cores.
# The folder is git-ignored (.gitignore); name it in the call's carry. install unpacks it with
# Python's tarfile (no xz binary needed) and prints the exports: the folder, and the CuTe DSL's
# dsl_packages, which the nvidia-cutlass-dsl wheel adds through a .pth file that a PYTHONPATH
# folder does not run. flash-attention 4 compiles its kernels in each process at first use (in
# the trainer's start-up check, before any measured step); its on-disk cache
# (FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1) is off by default upstream and left off.
#
# Versions: flash-attn-4 4.0.0b36 (2026-10-21) has the Hopper (SM90) forward and backward;
# titan_llava/models/fa4_compat.py calls it (torch 2.11's own FA4 glue cannot run packed rows).
# Checked on the CPU machine: with torch 2.11+cu130 and these versions (their CPython 3.11
# builds), flash_attn.cute.interface imports and fa4_compat's kernels register. Run on an H100
# (torch 2.11.0+cu130) in round 8 (benchmarks/README.md); the build took ~3 minutes there (session
# 14). CUTLASS_FLAVOR=cu12 builds for a CUDA 12 driver instead.
set -euo pipefail
mode=${1:-}
dir=${2:-.fa4}
case "$mode" in
build)
  flavor=${CUTLASS_FLAVOR:-cu13}
  pkgs=(
    flash-attn-4==4.0.0b36
    nvidia-cutlass-dsl==4.8.1
    nvidia-cutlass-dsl-libs-base==4.8.1
    nvidia-cutlass-dsl-libs-core==4.8.1
    "nvidia-cutlass-dsl-libs-$flavor==4.8.1"
    quack-kernels==0.6.5
    apache-tvm-ffi==0.1.15.post2
    torch-c-dlpack-ext==0.1.5
  )
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --pre \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --target "$tmp/site" "${pkgs[@]}"
  mkdir -p "$dir"
  echo "packing $(du -sh "$tmp/site" | cut -f1) (xz, x86 filter: a few minutes)" >&2
  tar cf - -C "$tmp/site" . | xz --x86 --lzma2=preset=9e,dict=256MiB -T1 >"$dir/site.tar.xz.part"
  mv "$dir/site.tar.xz.part" "$dir/site.tar.xz"
  printf '%s\n' "${pkgs[@]}" >"$dir/versions.txt"
  ls -l "$dir/site.tar.xz" >&2
  ;;
install)
  target=${3:-/tmp/fa4_site}
  python3 - "$dir/site.tar.xz" "$target" <<'EOF' >&2
import sys, tarfile
with tarfile.open(sys.argv[1], "r:xz") as tar:
    tar.extractall(sys.argv[2], filter="data")
print(f"flash-attention 4 unpacked into {sys.argv[2]}")
EOF
  echo "export PYTHONPATH=$target:$target/nvidia_cutlass_dsl/dsl_packages\${PYTHONPATH:+:\$PYTHONPATH}"
  ;;
*)
  echo "usage: $0 build [DIR] | install [DIR] [TARGET]" >&2
  exit 2
  ;;
esac
