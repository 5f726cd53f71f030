"""The methods a suite report compares when none are named (a suite may name its own)."""

from __future__ import annotations


def default_methods(size: str) -> list[str]:
    wudi = "wudi" if size == "full" else "wudi[iterations=20]"  # 300 Adam steps per weight: minutes on a CPU
    return ["weight_average", "task_arithmetic", "ties", "dare", "breadcrumbs", "consensus", "pcb", wudi,
            "ties[density_rule=tadrop]", "dare[density_rule=tadrop]", "sa_merging",
            "sa_merging[saliency_sign=own_sign]", "sa_merging[saliency_sign=own_value]"]
