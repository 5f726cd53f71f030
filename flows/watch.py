"""``watch-experts``: poll an expert registry (and optionally a Hugging Face Hub organisation) for new experts.

Each run compares the registry's state (:func:`samerge.registry.registry_state`: ``{expert name: fingerprint}``)
with the state the previous run saved, and emits the Prefect event ``samerge.expert.added`` for every expert that
is new or changed since. The ``remerge`` deployment's trigger turns each event into a re-merge of the registry
(queued one at a time; a re-merge finding the registry as it last merged it returns at once).

The state lives in a JSON file, by default ``<registry>/.samerge-watch.json``, replaced atomically (temp + rename).
A state is saved only for the experts whose event was emitted, so an expert whose event could not be sent (no
Prefect API) is reported again by the next run. The first run on a registry records what is there without
emitting (``emit_existing=True`` emits for every expert present): experts added with ``samerge experts add``
already sent their event.

With ``hub_org`` the run also lists that organisation's models on the Hugging Face Hub (``huggingface_hub``,
revision = the commit sha) and emits ``samerge.expert.added`` with resource ``samerge.hub.<repo id>`` and payload
``{"hub_repo", "revision", "source": "hub"}`` for new revisions. These events carry no ``registry``, so the
``remerge`` trigger (which matches ``samerge.registry.*``) ignores them: bring such experts into a registry
(fine-tuned from the registry's base) with an automation of your own, or by hand with ``samerge experts add``.
A Hub that cannot be reached is logged as a warning; the registry part of the run is unaffected.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import registry_or_env, write_json_atomic
from samerge.errors import SamergeError
from samerge.registry import EVENT_EXPERT_ADDED, emit_expert_added, read_registry_or_empty

STATE_FILE = ".samerge-watch.json"


def diff_states(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, list[str]]:
    """``{"added", "changed", "removed"}``: names of experts, sorted, between two ``{name: fingerprint}`` states."""
    return {"added": sorted(n for n in new if n not in old),
            "changed": sorted(n for n in new if n in old and new[n] != old[n]),
            "removed": sorted(n for n in old if n not in new)}


def read_watch_state(path: Path) -> dict[str, Any]:
    """The saved state (``{}`` when there is none yet); a :class:`SamergeError` when the file is not ours."""
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SamergeError(f"{path}: not a watch-experts state file ({exc}); delete it to start afresh") from None
    if not isinstance(state, dict):
        raise SamergeError(f"{path}: not a watch-experts state file; delete it to start afresh")
    return state


def _expert_info(reg: Path, name: str, change: str, manifest: Mapping[str, Any], state: Mapping[str, str]
                 ) -> dict[str, Any]:
    spec = json.loads((reg / "experts" / name / "task.json").read_text(encoding="utf-8"))
    return {"registry": str(reg), "name": name, "suite": manifest.get("suite"), "task": spec.get("name"),
            "fingerprint": state[name], "change": change, "experts": sorted(state), "source": "watch-experts"}


def poll_registry(registry: str | Path, state_file: str | Path | None = None, *, emit_existing: bool = False
                  ) -> dict[str, Any]:
    """Compare the registry with the saved state, emit ``samerge.expert.added`` per new or changed expert, save.

    Returns ``{"registry", "state_file", "first_run", "added", "changed", "removed", "emitted", "not_emitted"}``.
    """
    reg = registry_or_env(str(registry))
    path = Path(state_file) if state_file else reg / STATE_FILE
    saved = read_watch_state(path)
    current = read_registry_or_empty(reg)
    manifest = json.loads((reg / "manifest.json").read_text(encoding="utf-8"))
    first = "experts" not in saved
    old: dict[str, str] = {} if first else dict(saved["experts"])
    diff = diff_states(old, current)
    emitted: list[str] = []
    not_emitted: list[str] = []
    if not first or emit_existing:
        for change in ("added", "changed"):
            for name in diff[change]:
                sent = emit_expert_added(_expert_info(reg, name, change, manifest, current))
                (emitted if sent else not_emitted).append(name)
    # an expert whose event was not sent keeps its old fingerprint (or stays unknown): the next run retries it
    new_state = {n: fp for n, fp in current.items() if n not in not_emitted}
    new_state.update({n: old[n] for n in not_emitted if n in old})
    write_json_atomic(path, {**saved, "registry": str(reg), "experts": new_state,
                             "polled": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return {"registry": str(reg), "state_file": str(path), "first_run": first, **diff, "emitted": emitted,
            "not_emitted": not_emitted}


def poll_hub(org: str, state_file: Path) -> dict[str, Any]:
    """List ``org``'s models on the Hugging Face Hub; emit ``samerge.expert.added`` for each new revision.

    The first poll of an organisation records its revisions without emitting. Returns ``{"org", "new",
    "error"}``; a Hub that cannot be reached gives ``error`` (and changes nothing), never an exception.
    """
    from prefect.events import emit_event

    try:
        from huggingface_hub import HfApi

        revisions = {m.id: m.sha for m in HfApi().list_models(author=org, expand=["sha"]) if m.sha}
    except Exception as exc:  # no network, offline mode, rate limit, huggingface_hub missing: try again next run
        return {"org": org, "new": [], "error": f"{type(exc).__name__}: {exc}"}
    saved = read_watch_state(state_file)
    hub = dict(saved.get("hub", {}))
    first = org not in hub
    known: dict[str, str] = dict(hub.get(org, {}))
    new = [] if first else sorted(r for r, sha in revisions.items() if known.get(r) != sha)
    for repo in new:
        emit_event(event=EVENT_EXPERT_ADDED, resource={"prefect.resource.id": f"samerge.hub.{repo}",
                                                       "prefect.resource.name": repo},
                   payload={"hub_repo": repo, "revision": revisions[repo], "source": "hub"})
    hub[org] = revisions
    write_json_atomic(state_file, {**read_watch_state(state_file), "hub": hub})
    return {"org": org, "new": new, "error": None}


@flow(name="watch-experts", log_prints=True)
def watch_experts(registry: str | None = None, state_file: str | None = None, hub_org: str | None = None,
                  emit_existing: bool = False) -> dict[str, Any]:
    """One poll of ``registry`` (default ``$SAMERGE_EXPERTS``) and, with ``hub_org``, of that Hub organisation.

    Scheduled at an interval by the ``watch-experts`` deployment; see the module docstring for the semantics.
    """
    logger = get_run_logger()
    reg = registry_or_env(registry)
    out = poll_registry(reg, state_file, emit_existing=emit_existing)
    if out["first_run"] and not emit_existing:
        logger.info("first poll of %s: recorded %d experts (no events)", reg, len(out["added"]))
    for name in out["emitted"]:
        logger.info("emitted %s for expert %s", EVENT_EXPERT_ADDED, name)
    if out["not_emitted"]:
        logger.warning("no Prefect API to send %s for %s: they will be reported again by the next poll",
                       EVENT_EXPERT_ADDED, ", ".join(out["not_emitted"]))
    if hub_org:
        hub = poll_hub(hub_org, Path(out["state_file"]))
        if hub["error"]:
            logger.warning("Hugging Face Hub organisation %s not polled: %s", hub_org, hub["error"])
        out["hub"] = hub
    return out
