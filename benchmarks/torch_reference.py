"""PyTorch reference of the DE-MKD training step, written the way the CRD-family codebases write it.

This is the baseline of the speed comparison (benchmarks/README.md), so it must be a faithful loop, neither a strawman nor
tuned beyond what CRD / RepDistiller / CA-MKD / mdistiller do. Per step, exactly as their
``train_distill*`` loops:

- a ``torch.utils.data.DataLoader`` (shuffle, batch 64, last short batch dropped) over a CIFAR-like
  uint8 NHWC array, each sample converted to a PIL image and augmented on the host one at a time:
  ``RandomCrop(32, padding=4)`` -> ``RandomHorizontalFlip()`` -> ``ToTensor()`` -> ``Normalize(mean, std)``,
  re-implemented here op for op as torchvision does it on PIL images (torchvision is not importable beside
  this torch build; ``--augment numpy`` gives the same transforms on numpy arrays, without PIL);
- the student forward with ``is_feat=True`` (train mode), then the K = 3 teachers one after the other under
  ``torch.no_grad()`` (eval mode);
- the losses of docs/method.md §2 written per teacher in eager PyTorch (mdistiller's DKD with a per-example
  reduction, the "camkd" entropy weights, CA-MKD's ``Embed`` connectors and per-example MSE);
- ``loss.item()`` and the top-1/top-5 accuracy into AverageMeters (``.item()`` for the loss, tensors for
  the accuracies in the distillation loops, ``.item()`` for both in ``train_vanilla``), ``optimizer.zero_grad()``,
  ``loss.backward()``, ``optimizer.step()`` with ``SGD(lr=0.05, momentum=0.9, nesterov=True,
  weight_decay=5e-4)`` over the student and the connectors.

Modes (each prints one JSON line):

==================  =====================================================================================
``demkd``           DE-MKD with features: entropy weights, weighted DKD, connectors + weighted feature MSE
``demkd_logits``    DE-MKD logits only: entropy weights, weighted DKD
``aver_logits``     AVER: uniform weights, vanilla KD (CA-MKD ``--ensemble_method AVERAGE_LOSS --distill kd``)
``camkd_features``  CA-MKD "inter": CE-confidence weights on KD, connectors judged by each teacher's head
                    (``CalWeight`` + ``CAMKD`` criterion, gradient through the feature weights, / (B * K))
``teacher_forward`` the 3 teacher forwards only, on DataLoader batches
``student_ce``      the student-only CE step (``train_vanilla``)
==================  =====================================================================================

Throughput is measured over the whole loop including the DataLoader (that is what the peer codebases'
figures measure): images/s = batch * steps / seconds, after ``--warmup`` steps. Typical use::

    PYTHONPATH=. python benchmarks/torch_reference.py --mode all --batch 64 --steps 20
    PYTHONPATH=. python benchmarks/torch_reference.py --mode demkd --device cuda --num-workers 8

``--num-workers`` defaults to 0 on CPU (a worker process can only run by taking a core from the compute
threads of a small machine) and to CA-MKD's 8 (capped at the core count) with pinned memory on CUDA. Each record
also carries ``other_cpu_cores`` (CPU used by *other* processes during each timed block, from /proc) and
``minor_faults_per_step``. Measured figures are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
if str(REPO_ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from torch_models import create_torch_model  # noqa: E402  (torch only; no jax import)

try:  # torchvision's CIFAR100 dataset hands PIL images to the transforms; pillow is a project dependency.
    from PIL import Image, ImageOps
except ImportError:  # pragma: no cover - pillow is installed with demkd_jax
    Image = ImageOps = None

__all__ = [
    "MODES",
    "PEER_IMG_PER_S",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "train_transform",
    "CIFARLike",
    "load_data",
    "make_loader",
    "dkd_loss",
    "kd_loss",
    "entropy_weights",
    "confidence_weights",
    "weighted_dkd_loss",
    "weighted_feature_mse",
    "Embed",
    "Connectors",
    "CalWeight",
    "run_mode",
    "main",
]

MODES: tuple[str, ...] = ("demkd", "demkd_logits", "aver_logits", "camkd_features", "teacher_forward", "student_ce")

# Issue 7: the CA-MKD codebase's own loop on the 2-core CI machine, CPU torch 2.13, 2 threads, batch 64,
# 3 x vgg13 -> vgg8. DE-MKD with features is compared with CA-MKD "inter", logits-only with AVER.
PEER_IMG_PER_S: dict[str, float] = {
    "demkd": 98.0,
    "camkd_features": 98.0,
    "demkd_logits": 106.0,
    "aver_logits": 106.0,
    "teacher_forward": 155.0,
    "student_ce": 359.0,
}

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
DEFAULT_TRAIN_NPZ = REPO_ROOT.parent / "shared" / "data" / "cifar100" / "cifar100_train.npz"


# ----------------------------------------------------------------------------------------------------------
# Host-side augmentation, op for op as torchvision's transforms on PIL images (v0.2x, functional_pil).


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


class RandomCrop:
    """``transforms.RandomCrop(size, padding)``: zero padding (``fill=0``, constant mode), then a random crop.

    The offsets come from ``torch.randint`` as in ``RandomCrop.get_params`` (so DataLoader workers get
    distinct streams through torch's per-worker seeding).
    """

    def __init__(self, size: int, padding: int = 0):
        self.size, self.padding = size, padding

    def __call__(self, img):
        p, s = self.padding, self.size
        if isinstance(img, np.ndarray):
            if p:
                img = np.pad(img, ((p, p), (p, p), (0, 0)), mode="constant")
            h, w = img.shape[:2]
        else:
            if p:
                img = ImageOps.expand(img, border=p, fill=0)
            w, h = img.size
        i = torch.randint(0, h - s + 1, size=(1,)).item()
        j = torch.randint(0, w - s + 1, size=(1,)).item()
        if isinstance(img, np.ndarray):
            return img[i:i + s, j:j + s]
        return img.crop((j, i, j + s, i + s))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img):
        if torch.rand(1) < self.p:
            if isinstance(img, np.ndarray):
                return img[:, ::-1]
            return img.transpose(Image.FLIP_LEFT_RIGHT)
        return img


class ToTensor:
    """HWC uint8 -> CHW float32 in [0, 1] (``np.array(pic, copy=True)`` -> view -> permute -> contiguous -> div)."""

    def __call__(self, pic):
        arr = np.array(pic, np.uint8, copy=True)
        img = torch.from_numpy(arr).view(arr.shape[0], arr.shape[1], -1)
        img = img.permute((2, 0, 1)).contiguous()
        return img.to(dtype=torch.get_default_dtype()).div(255)


class Normalize:
    """``transforms.Normalize``: clone, per-channel ``sub_(mean).div_(std)`` (with torchvision's std check)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device)
        if (std == 0).any():
            raise ValueError(f"std evaluated to zero after conversion to {tensor.dtype}")
        return tensor.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def train_transform(mean=CIFAR100_MEAN, std=CIFAR100_STD) -> Compose:
    """The CRD/RepDistiller/CA-MKD CIFAR-100 training transform."""
    return Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])


class CIFARLike(Dataset):
    """``torchvision.datasets.CIFAR100``'s ``__getitem__`` over an in-memory uint8 NHWC array.

    ``augment="pil"`` converts each image with ``Image.fromarray`` as torchvision does; ``"numpy"`` keeps
    numpy arrays (same transforms, no PIL).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable, augment: str = "pil"):
        if augment not in ("pil", "numpy"):
            raise ValueError(f"augment must be 'pil' or 'numpy', got {augment!r}")
        if augment == "pil" and Image is None:
            raise ImportError("augment='pil' needs pillow; use augment='numpy'")
        self.data = images
        self.targets = [int(t) for t in labels]  # torchvision keeps a Python list of ints
        self.transform = transform
        self.augment = augment

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img, target = self.data[index], self.targets[index]
        if self.augment == "pil":
            img = Image.fromarray(img)
        img = self.transform(img)
        return img, target


def load_data(data: str = "auto", path: str | os.PathLike | None = None, synthetic_size: int = 50_000,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """``(images uint8 [N, 32, 32, 3], labels int64 [N], name)``.

    ``data="cifar100"`` reads ``path`` (default ``../shared/data/cifar100/cifar100_train.npz``, keys
    ``image`` and ``label``); ``"synthetic"`` draws random uint8 images and labels of the same shape;
    ``"auto"`` is the real set when the file is present, else synthetic.
    """
    if data not in ("auto", "cifar100", "synthetic"):
        raise ValueError(f"data must be auto, cifar100 or synthetic, got {data!r}")
    path = pathlib.Path(path) if path is not None else DEFAULT_TRAIN_NPZ
    if data == "cifar100" or (data == "auto" and path.is_file()):
        with np.load(path) as f:
            images, labels = np.ascontiguousarray(f["image"], np.uint8), np.asarray(f["label"], np.int64)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{path}: expected uint8 NHWC images, got shape {images.shape}")
        return images, labels, "cifar100"
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(synthetic_size, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, size=(synthetic_size,), dtype=np.int64)
    return images, labels, "synthetic"


def make_loader(images: np.ndarray, labels: np.ndarray, batch: int, num_workers: int, pin_memory: bool,
                augment: str = "pil") -> DataLoader:
    dataset = CIFARLike(images, labels, train_transform(), augment=augment)
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True)


# ----------------------------------------------------------------------------------------------------------
# Losses, per example as in CA-MKD (``reduction="none"``), DKD as mdistiller writes it.


def _gt_mask(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(logits).scatter_(1, target.reshape(-1).unsqueeze(1), 1).bool()


def _cat_mask(t: torch.Tensor, mask1: torch.Tensor, mask2: torch.Tensor) -> torch.Tensor:
    t1 = (t * mask1).sum(dim=1, keepdims=True)
    t2 = (t * mask2).sum(1, keepdims=True)
    return torch.cat([t1, t2], dim=1)


def dkd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, target: torch.Tensor,
             alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """mdistiller's ``dkd_loss`` with a per-example reduction: ``alpha * TCKD + beta * NCKD``, ``[B]``."""
    gt_mask = _gt_mask(logits_student, target)
    other_mask = ~gt_mask
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = _cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = _cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1) * temperature**2
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="none").sum(1) * temperature**2
    return alpha * tckd + beta * nckd


def kd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """CA-MKD's ``DistillKL(T)(y_s, y_t, is_ca=True)``: per-example ``T² · KL(p_t ‖ p_s)``, ``[B]``."""
    p_s = F.log_softmax(logits_student / temperature, dim=1)
    p_t = F.softmax(logits_teacher / temperature, dim=1)
    return (F.kl_div(p_s, p_t, reduction="none") * temperature**2).sum(-1)


def entropy_weights(logit_t_list: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """The "camkd" entropy weights ``(1 − softmax_k(H_k)) / (K − 1)``, ``[K, B]``, H of softmax(z/T_w)."""
    entropies = []
    for logit_t in logit_t_list:
        log_p = F.log_softmax(logit_t / temperature, dim=1)
        entropies.append(-(log_p.exp() * log_p).sum(1))
    h = torch.stack(entropies, dim=0)
    return (1.0 - F.softmax(h, dim=0)) / (len(logit_t_list) - 1)


def confidence_weights(logit_t_list: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """CA-MKD's weights ``(1 − softmax_k(CE(z_k, y))) / (K − 1)``, ``[K, B]``."""
    loss_t = torch.stack([F.cross_entropy(z, target, reduction="none") for z in logit_t_list], dim=0)
    return (1.0 - F.softmax(loss_t, dim=0)) / (len(logit_t_list) - 1)


def weighted_dkd_loss(logit_s: torch.Tensor, logit_t_list: Sequence[torch.Tensor], target: torch.Tensor,
                      weight: torch.Tensor, alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """DE-MKD's logit term ``mean_x Σ_k w_k(x) · DKD(z_s, z_k, y)`` (batch mean, no extra 1/K)."""
    loss_div = torch.stack([dkd_loss(logit_s, logit_t, target, alpha, beta, temperature)
                            for logit_t in logit_t_list], dim=0)
    return torch.mul(weight, loss_div).sum() / loss_div.shape[1]


def weighted_feature_mse(trans_feat_s_list: Sequence[torch.Tensor], feat_t_list: Sequence[torch.Tensor],
                         weight: torch.Tensor) -> torch.Tensor:
    """``mean_x Σ_k w_k(x) · mean_{c,h,w} (r_k(f_s) − f_k)²`` (CA-MKD's per-example MSE, DE-MKD's sum reduction)."""
    bsz = weight.shape[1]
    loss_st = torch.stack([F.mse_loss(s, t, reduction="none").reshape(bsz, -1).mean(-1)
                           for s, t in zip(trans_feat_s_list, feat_t_list)], dim=0)
    return torch.mul(weight, loss_st).sum() / bsz


class Embed(nn.Module):
    """CA-MKD's ``Embed`` (``convs=False``): 1x1 conv with bias -> BatchNorm -> ReLU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.transfer = nn.Sequential(nn.Conv2d(dim_in, dim_out, kernel_size=1), nn.BatchNorm2d(dim_out),
                                      nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transfer(x)


def _resize(feat_s: torch.Tensor, t_h: int, pool_when_equal: bool) -> torch.Tensor:
    s_h = feat_s.shape[2]
    if s_h > t_h or (pool_when_equal and s_h == t_h):
        return F.adaptive_avg_pool2d(feat_s, (t_h, t_h))
    if s_h < t_h:
        return F.interpolate(feat_s, size=(t_h, t_h), mode="bilinear")
    return feat_s


class Connectors(nn.Module):
    """DE-MKD's connectors: one ``Embed`` per teacher from the student's ``features[-2]`` to the teacher's,
    the student map average-pooled (adaptive) first when it is larger."""

    def __init__(self, s_channels: int, t_shapes: Sequence[Sequence[int]]):
        super().__init__()
        self.t_sizes = [int(s[2]) for s in t_shapes]
        for i, s in enumerate(t_shapes):
            setattr(self, f"embed{i}", Embed(s_channels, int(s[1])))

    def forward(self, feat_s: torch.Tensor) -> list[torch.Tensor]:
        return [getattr(self, f"embed{i}")(_resize(feat_s, t_h, pool_when_equal=False))
                for i, t_h in enumerate(self.t_sizes)]


class CalWeight(nn.Module):
    """CA-MKD's ``CalWeight``: embeds the student map per teacher and runs each teacher's head
    (``pool4 -> flatten -> classifier``, its ``distill_seq()[-1]``) on it."""

    def __init__(self, s_channels: int, t_shapes: Sequence[Sequence[int]]):
        super().__init__()
        for i, s in enumerate(t_shapes):
            setattr(self, f"embed{i}", Embed(s_channels, int(s[1])))

    def forward(self, feat_s: torch.Tensor, feat_t_list: Sequence[torch.Tensor], model_t_list: Sequence[nn.Module]):
        trans_feat_s_list, output_feat_t_list = [], []
        for i, mid_feat_t in enumerate(feat_t_list):
            feat_s = _resize(feat_s, mid_feat_t.shape[2], pool_when_equal=True)
            trans_feat_s = getattr(self, f"embed{i}")(feat_s)
            trans_feat_s_list.append(trans_feat_s)
            output_feat_t_list.append(_teacher_head(model_t_list[i], trans_feat_s))
        return trans_feat_s_list, output_feat_t_list


def _teacher_head(model_t: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The teacher's head on a ``features[-2]``-shaped map (VGG: ``pool4`` + flatten + ``classifier``)."""
    if hasattr(model_t, "pool4") and hasattr(model_t, "classifier"):
        return model_t.classifier(model_t.pool4(x).flatten(1))
    head = getattr(model_t, "fc", None)
    if head is None:
        head = getattr(model_t, "linear", None)
    if head is None:
        raise NotImplementedError(f"no head for {type(model_t).__name__}")
    return head(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ----------------------------------------------------------------------------------------------------------
# The loop.


class AverageMeter:
    """RepDistiller's ``AverageMeter``."""

    def __init__(self):
        self.val = self.avg = self.sum = self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[torch.Tensor]:
    """RepDistiller's ``accuracy`` (top-k in percent)."""
    with torch.no_grad():
        maxk = max(topk)
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        res = []
        for k in topk:
            correct_k = correct[:k].reshape(-1).float().sum(0, keepdim=True)
            res.append(correct_k.mul_(100.0 / batch_size))
        return res


def _cpu_ticks() -> tuple[int, int, int] | None:
    """``(busy, total, ours)`` clock ticks from /proc: the whole machine, and this process plus its children
    (DataLoader workers). ``None`` off Linux. Used to report how much CPU *other* processes took while a
    measurement ran (this benchmark is meant for a shared 2-core machine)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        total = sum(vals[:8])
        me = os.getpid()
        ours = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(entry) == me or int(fields[1]) == me:  # fields[1] is the parent pid
                ours += int(fields[11]) + int(fields[12])  # utime + stime
        return total - idle, total, ours
    except (OSError, ValueError, IndexError):
        return None


def _minor_faults() -> int | None:
    """Minor page faults of this process so far (glibc hands large freed tensors back to the kernel, and
    a loop that re-faults them in every step pays for it: reported, not tuned away)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _other_load(before, after) -> float | None:
    """CPU cores used by processes other than this one (and its workers) between two ``_cpu_ticks``."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy, total, ours = (a - b for a, b in zip(after, before))
    return max(0.0, (busy - ours) / total * (os.cpu_count() or 1))


def cpu_matmul_gflops(n: int = 2048, reps: int = 3) -> float:
    """Best-of-``reps`` GFLOP/s of an ``n x n`` float32 matmul (MKL) with torch's current threads.

    A probe of the machine's speed at the moment of a measurement: on a shared VM it drifts by up to 2x
    (a host neighbour on the sibling hyper-thread does not show in /proc), so a throughput is only
    comparable with one taken at a similar probe value, or side by side.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _batches(loader: DataLoader):
    """Endless DataLoader batches (a new epoch, i.e. a new iterator, whenever one runs out)."""
    while True:
        yielded = False
        for b in loader:
            yielded = True
            yield b
        if not yielded:
            raise ValueError(f"the DataLoader yields no batch (dataset of {len(loader.dataset)} < batch)")


def _build_models(mode: str, device: torch.device, student: str, teacher: str, num_teachers: int,
                  num_classes: int, seed: int):
    torch.manual_seed(seed)
    model_s = create_torch_model(student, num_classes)
    model_t_list = []
    for k in range(num_teachers):
        torch.manual_seed(seed + 1 + k)
        model_t_list.append(create_torch_model(teacher, num_classes))
    # Shapes of features[-2] from a probe forward, as CA-MKD's train_student.py does (eval mode, batch 2).
    data = torch.randn(2, 3, 32, 32)
    model_s.eval()
    for m in model_t_list:
        m.eval()
    with torch.no_grad():
        feat_s, _ = model_s(data, is_feat=True)
        t_shapes = [tuple(m(data, is_feat=True)[0][-2].shape) for m in model_t_list]
    extra = None
    if mode == "demkd":
        extra = Connectors(feat_s[-2].shape[1], t_shapes)
    elif mode == "camkd_features":
        extra = CalWeight(feat_s[-2].shape[1], t_shapes)
    model_s.to(device)
    for m in model_t_list:
        m.to(device)
    if extra is not None:
        extra.to(device)
    return model_s, model_t_list, extra


def run_mode(
    mode: str,
    *,
    batch: int = 64,
    steps: int = 20,
    warmup: int = 5,
    repeats: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    data: str = "auto",
    data_path: str | os.PathLike | None = None,
    synthetic_size: int = 50_000,
    augment: str = "pil",
    student: str = "vgg8",
    teacher: str = "vgg13",
    num_teachers: int = 3,
    epoch: int = 5,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 6.0,
    warmup_epochs: int = 20,
    feature_weight: float = 50.0,
    lr: float = 0.05,
    seed: int = 0,
    dataset: tuple[np.ndarray, np.ndarray, str] | None = None,
    probe_cpu: bool | None = None,
) -> dict[str, Any]:
    """Runs one mode for ``warmup`` + ``repeats`` x ``steps`` steps and returns its JSON record.

    ``epoch`` fixes the epoch the step is taken in: the KD term gets the warm-up factor
    ``min(epoch / warmup_epochs, 1)`` and the feature term is on from epoch 2 (both as plain numbers).
    ``dataset`` may pass ``load_data``'s result to reuse it across modes. ``probe_cpu`` (default: on for a
    CPU run) times :func:`cpu_matmul_gflops` before the warm-up and after the timed blocks.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of: {', '.join(MODES)}")
    dev = resolve_device(device)
    if threads is None:  # 2 on CPU (the peer figures' setting); on CUDA torch's default, as the CRD scripts
        threads = 2 if dev.type == "cpu" else 0
    if threads > 0:
        torch.set_num_threads(threads)
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if dev.type == "cuda" else 0
    if pin_memory is None:
        pin_memory = dev.type == "cuda"
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as CA-MKD's train_student.py (not deterministic)
    cuda = dev.type == "cuda"
    if probe_cpu is None:
        probe_cpu = not cuda

    images, labels, data_name = dataset if dataset is not None else load_data(data, data_path, synthetic_size, seed)
    num_classes = 100
    loader = make_loader(images, labels, batch, num_workers, pin_memory, augment)
    model_s, model_t_list, extra = _build_models(mode, dev, student, teacher, num_teachers, num_classes, seed)
    features = mode in ("demkd", "camkd_features")

    trainable = nn.ModuleList([model_s] + ([extra] if extra is not None else []))
    optimizer = torch.optim.SGD(trainable.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    criterion_cls = nn.CrossEntropyLoss()
    warm = min(epoch / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0
    feat_on = 1.0 if epoch > 1 else 0.0
    k = len(model_t_list)

    losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
    data_time = AverageMeter()

    def set_modes():
        for m in trainable:
            m.train()
        for m in model_t_list:
            m.eval()

    def distill_step(input, target):
        # ===================forward===================== (CA-MKD: student first, then the teachers)
        feat_s, logit_s = model_s(input, is_feat=True)
        feat_t_list, logit_t_list = [], []
        with torch.no_grad():
            for model_t in model_t_list:
                feat_t, logit_t = model_t(input, is_feat=True)
                feat_t = [f.detach() for f in feat_t]
                feat_t_list.append(feat_t)
                logit_t_list.append(logit_t)

        # ================compute loss====================
        loss_cls = criterion_cls(logit_s, target)
        if mode in ("demkd", "demkd_logits"):
            weight = entropy_weights(logit_t_list)  # constants: the teachers ran under no_grad
            loss_div = weighted_dkd_loss(logit_s, logit_t_list, target, weight, alpha, beta, temperature)
            loss = loss_cls + warm * loss_div
            if mode == "demkd":
                mid_feat_t_list = [f[-2] for f in feat_t_list]
                trans_feat_s_list = extra(feat_s[-2])
                loss_kd = weighted_feature_mse(trans_feat_s_list, mid_feat_t_list, weight)
                loss = loss + feat_on * feature_weight * loss_kd
        elif mode == "aver_logits":
            # CA-MKD AVERAGE_LOSS: DistillKL(T) with batchmean per teacher, averaged over teachers.
            loss_div = torch.stack([kd_loss(logit_s, logit_t, temperature).sum() / logit_s.shape[0]
                                    for logit_t in logit_t_list]).mean(0)
            loss = loss_cls + loss_div
        else:  # camkd_features: CA-MKD --ensemble_method CAMKD --distill inter
            attention = confidence_weights(logit_t_list, target)
            loss_div = torch.stack([kd_loss(logit_s, logit_t, temperature) for logit_t in logit_t_list], dim=0)
            bsz = loss_div.shape[1]
            loss_div = torch.mul(attention, loss_div).sum() / (1.0 * bsz * k)
            mid_feat_t_list = [f[-2] for f in feat_t_list]
            trans_feat_s_list, output_feat_t_list = extra(feat_s[-2], mid_feat_t_list, model_t_list)
            weight = confidence_weights(output_feat_t_list, target)  # not detached, as in CA-MKD
            loss_st = torch.stack([F.mse_loss(s, t, reduction="none").reshape(bsz, -1).mean(-1)
                                   for s, t in zip(trans_feat_s_list, mid_feat_t_list)], dim=0)
            loss_kd = torch.mul(weight, loss_st).sum() / (1.0 * bsz * k)
            loss = loss_cls + loss_div + feat_on * feature_weight * loss_kd
        acc1, acc5 = accuracy(logit_s, target, topk=(1, 5))
        losses.update(loss.item(), input.size(0))  # the step's one host sync, as in their loops
        top1.update(acc1[0], input.size(0))  # tensors, as train_distill / train_distill_multi_teacher
        top5.update(acc5[0], input.size(0))

        # ===================backward=====================
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def vanilla_step(input, target):  # RepDistiller/CA-MKD train_vanilla
        output = model_s(input)
        loss = criterion_cls(output, target)
        losses.update(loss.item(), input.size(0))
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        top1.update(acc1[0].item(), input.size(0))
        top5.update(acc5[0].item(), input.size(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def teacher_step(input, target):
        with torch.no_grad():
            logits = [model_t(input, is_feat=True)[1] for model_t in model_t_list]
        top1.update(accuracy(logits[0], target)[0].item(), input.size(0))

    step_fn = {"student_ce": vanilla_step, "teacher_forward": teacher_step}.get(mode, distill_step)
    set_modes()
    batches = _batches(loader)

    def one_step():
        end = time.perf_counter()
        input, target = next(batches)
        input = input.float()
        if cuda:
            input = input.to(dev, non_blocking=True)
            target = target.to(dev, non_blocking=True)
        data_time.update(time.perf_counter() - end)
        step_fn(input, target)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    load_before = os.getloadavg()
    probe = [cpu_matmul_gflops()] if probe_cpu else []
    for _ in range(warmup):
        one_step()
    sync()
    rates, step_ms, data_ms, others, fault_rates = [], [], [], [], []
    for _ in range(max(1, repeats)):
        data_time.__init__()
        sync()
        ticks = _cpu_ticks()
        faults = _minor_faults()
        start = time.perf_counter()
        for _ in range(steps):
            one_step()
        sync()
        seconds = time.perf_counter() - start
        others.append(_other_load(ticks, _cpu_ticks()))
        fault_rates.append(None if faults is None else (_minor_faults() - faults) / steps)
        rates.append(batch * steps / seconds)
        step_ms.append(1000.0 * seconds / steps)
        data_ms.append(1000.0 * data_time.avg)
    load_after = os.getloadavg()
    if probe_cpu:
        probe.append(cpu_matmul_gflops())
    batches.close()  # drops the DataLoader iterator: shuts the workers down

    best = int(np.argmax(rates))
    med_rate = statistics.median(rates)
    peer = PEER_IMG_PER_S[mode]
    record = {
        "name": f"torch_reference/{mode}",
        "mode": mode,
        "batch": batch,
        "dtype": "float32",
        "features": features,
        "teachers": f"{num_teachers}x{teacher}" if mode != "student_ce" else None,
        "student": student if mode != "teacher_forward" else None,
        "teachers_execution": "sequential",
        "img_per_s": round(med_rate, 2),
        "ms_per_step": round(statistics.median(step_ms), 2),
        "img_per_s_best": round(rates[best], 2),
        "img_per_s_all": [round(r, 2) for r in rates],
        "data_ms_per_step": round(statistics.median(data_ms), 2),
        "peer_img_per_s": peer,
        "ratio_to_peer": round(med_rate / peer, 3),
        "steps": steps,
        "warmup": warmup,
        "repeats": len(rates),
        "loss": losses.avg if losses.count else None,
        "top1": float(top1.avg),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else (platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "torch_version": torch.__version__,
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "augment": augment,
        "data": data_name,
        "epoch": epoch,
        "cpu_sgemm_gflops": [round(g, 1) for g in probe] or None,
        "other_cpu_cores": [None if o is None else round(o, 2) for o in others],
        "minor_faults_per_step": None if fault_rates[0] is None else round(statistics.median(fault_rates)),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }
    return record


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", default="all", choices=("all", *MODES))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (also starts the workers)")
    p.add_argument("--repeats", type=int, default=1, help="timed blocks; img_per_s is their median")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default 2 on CPU (the peer figures' setting), torch's own "
                        "default on CUDA (as the CRD-family scripts, which never set it); 0: torch's default")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers; default 0 on CPU (a worker competes with the compute threads "
                        "for the cores; see the module docstring for 0 vs 2 vs 8), min(8, cores) on CUDA "
                        "(CA-MKD's default 8)")
    p.add_argument("--pin-memory", choices=("auto", "on", "off"), default="auto", help="auto: on for CUDA only")
    p.add_argument("--data", choices=("auto", "cifar100", "synthetic"), default="auto",
                   help="auto: the real CIFAR-100 train split when present, else synthetic uint8")
    p.add_argument("--data-path", default=None, help=f"CIFAR-100 train npz (default {DEFAULT_TRAIN_NPZ})")
    p.add_argument("--synthetic-size", type=int, default=50_000)
    p.add_argument("--augment", choices=("pil", "numpy"), default="pil" if Image is not None else "numpy",
                   help="host transforms on PIL images (as torchvision on CIFAR100) or on numpy arrays")
    p.add_argument("--student", default="vgg8")
    p.add_argument("--teacher", default="vgg13")
    p.add_argument("--num-teachers", type=int, default=3)
    p.add_argument("--epoch", type=int, default=5, help="epoch of the measured steps (KD warm-up factor epoch/20)")
    p.add_argument("--beta", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=None,
                   help="time a 2048^2 float32 matmul before and after each mode (cpu_sgemm_gflops): the "
                        "machine's speed at the time; default on for CPU runs")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="with --mode all, run each mode in a fresh process, so that no mode inherits another's "
                        "allocator state (a forward-only loop is ~15%% faster after a training loop has run in "
                        "the same process)")
    return p.parse_args(argv)


def _mode_argv(argv: Sequence[str], mode: str) -> list[str]:
    """``argv`` with ``--mode`` replaced by ``mode`` and isolation off (for one mode's subprocess)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--mode", "--isolate", "--no-isolate") or a.startswith(("--mode=", "--isolate=")):
            skip = a == "--mode"
            continue
        out.append(a)
    return [*out, "--mode", mode, "--no-isolate"]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.mode == "all" and args.isolate:
        import subprocess

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        records = []
        for mode in MODES:
            out = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), *_mode_argv(argv, mode)],
                                 env=env, stdout=subprocess.PIPE, text=True, check=True)
            for line in out.stdout.splitlines():
                print(line, flush=True)
                if line.startswith("{"):
                    records.append(json.loads(line))
        return records
    dev = resolve_device(args.device)
    if args.threads is None:
        args.threads = 2 if dev.type == "cpu" else 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__} | device {dev}"
          f"{' (' + torch.cuda.get_device_name(dev) + ')' if dev.type == 'cuda' else ''}"
          f" | threads {torch.get_num_threads()} | cores {os.cpu_count()} | python {platform.python_version()}"
          f" | loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr, flush=True)
    dataset = load_data(args.data, args.data_path, args.synthetic_size, args.seed)
    pin = None if args.pin_memory == "auto" else args.pin_memory == "on"
    records = []
    for mode in (MODES if args.mode == "all" else (args.mode,)):
        rec = run_mode(mode, batch=args.batch, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                       device=str(dev), threads=args.threads, num_workers=args.num_workers,
                       pin_memory=pin, augment=args.augment, student=args.student, teacher=args.teacher,
                       num_teachers=args.num_teachers, epoch=args.epoch, beta=args.beta, seed=args.seed,
                       dataset=dataset, probe_cpu=args.probe)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    return records


if __name__ == "__main__":
    main()
