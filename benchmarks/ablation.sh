#!/usr/bin/env bash
# SA-Merging ablation (docs/ablation.md). Every variant is the paper's configuration (preset=paper) plus the named
# changes; everything is scored on the VALIDATION split of the built-in tasks, never on test data, and paired against
# TIES (density 0.2, per tensor, disjoint mean, lambda = 1) on the same experts.
#   screen:     every variant, seed 0 of the experts           -> OUT/screen
#   candidates: the variants that lead the screen, seeds 0-2   -> OUT/candidates
# Usage: bash benchmarks/ablation.sh SUITE [SIZE] [OUT]     (SUITE: text | vision | llm-lora)
# Re-running into the same OUT resumes (scores.jsonl). Experts are fine-tuned once and cached (~/.cache/samerge).
set -euo pipefail
suite=${1:?suite: text, vision or llm-lora}
size=${2:-full}
out=${3:-ablation/$suite-$size}
P="sa_merging[preset=paper"
ref="ties[aggregate=mean,scale=1.0]"
screen=(
  "$P]"                                                        # the paper: literal sign, sum, lambda = 1, T=10, p=0.2
  "$P,outside_rule=base]"
  "$P,outside_rule=mean]"
  "$P,saliency_sign=own_sign]"
  "$P,saliency_sign=own_value]"
  "$P,saliency_sign=own_value,outside_rule=base]"
  "$P,aggregate=disjoint_mean]"                                # SA trim + TIES elect + disjoint mean
  "$P,aggregate=disjoint_mean,outside_rule=mean]"
  "$P,saliency_sign=own_sign,aggregate=disjoint_mean,outside_rule=mean]"
  "$P,saliency_sign=own_value,aggregate=disjoint_mean,outside_rule=mean]"
  "$P,outside_rule=base,prune_ratio=0.25]"                     # final density 0.056
  "$P,outside_rule=base,prune_ratio=0.15]"                     # final density 0.197 (TIES' 0.2)
  "$P,outside_rule=base,prune_ratio=0.1134]"                   # final density 0.3
  "$P,outside_rule=base,prune_ratio=0.0876]"                   # final density 0.4
  "$P,outside_rule=base,scale=0.7]"
  "$P,outside_rule=base,scale=1.4]"
  "$P,outside_rule=base,density_rule=tadrop]"
  "$P,outside_rule=base,prune_ratio=0.15,density_rule=tadrop]"
  "$P,outside_rule=mean,prune_ratio=0.15]"
  "$P,outside_rule=base,qk_rule=value_proxy]"
  "$P,outside_rule=base,qk_rule=uniform]"
  "$P,outside_rule=base,iterations=1,prune_ratio=0.893]"       # one shot to the same density (no iteration)
  "$P,saliency_sign=own_value,outside_rule=base,prune_ratio=0.15]"
)
candidates=(
  "$P]"
  "$P,outside_rule=base]"
  "$P,outside_rule=base,prune_ratio=0.15]"
  "$P,outside_rule=mean,prune_ratio=0.15]"
  "$P,outside_rule=base,prune_ratio=0.1134]"
  "$P,outside_rule=base,prune_ratio=0.15,density_rule=tadrop]"
  "$P,saliency_sign=own_value,outside_rule=base]"
  "$P,saliency_sign=own_value,outside_rule=base,prune_ratio=0.15]"
)
join() { local IFS=,; echo "$*"; }
run() {  # run OUT SEEDS VARIANT...
  local dir=$1 seeds=$2; shift 2
  samerge suite report --suite "$suite" --size "$size" --seeds "$seeds" --split val --methods "$(join "$ref" "$@")" \
    --against "$ref" --out "$dir" ${QUIET:+--quiet}
}
[[ ${ONLY:-} == candidates ]] || run "$out/screen" 0 "${screen[@]}"
[[ ${ONLY:-} == screen ]] || run "$out/candidates" "${SEEDS:-0-2}" "${candidates[@]}"
