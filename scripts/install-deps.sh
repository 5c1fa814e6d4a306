#!/usr/bin/env bash
# Installs the Debian 12 packages needed to build, test and benchmark moca. Only what is missing
# is installed, so a second run is quick and touches nothing. The CUDA toolkit is optional and
# not installed here: the CUDA backend is built when nvcc is found.
set -euo pipefail

packages=(
  cmake ninja-build g++        # build
  libeigen3-dev                # CPU backend
  doctest-dev                  # tests
  libbenchmark-dev             # benchmarks
  libstb-dev                   # image decoding
  nlohmann-json3-dev           # safetensors headers, configs
  libcli11-dev                 # command lines of the examples
  zlib1g-dev                   # .gz IDX files
  dataset-fashion-mnist        # the default data set
)

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

missing=()
for p in "${packages[@]}"; do
  installed "$p" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo -n)  # never prompt: CI has no stdin
else
  echo "install-deps: missing ${missing[*]}; run as root or install sudo" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends "${missing[@]}"

for p in "${missing[@]}"; do
  installed "$p" || { echo "install-deps: $p did not install" >&2; exit 1; }
done
echo "install-deps: done"
