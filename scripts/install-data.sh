#!/usr/bin/env bash
# Offline data the built-in text and vision suites read (Debian packages). Idempotent; needs root and apt-get.
set -euo pipefail
need=()
[ -e /usr/share/games/fortunes/art ] || need+=(fortunes)
[ -d /usr/share/games/fortunes/de ] || need+=(fortunes-de)
[ -d /usr/share/games/fortunes/es ] || need+=(fortunes-es)
[ -d /usr/share/games/fortunes/it ] || need+=(fortunes-it)
[ -e /usr/share/wordnet/data.noun ] || need+=(wordnet-base)
[ -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "note: the suites' fortune_topic, language_id, supersense and fashion_mnist tasks need: ${need[*]}" >&2
  echo "      (Debian packages; install them with apt-get as root)" >&2
fi
