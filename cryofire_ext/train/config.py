"""TrainConfig: every knob of a training run, typed, saved as JSON in the run folder.

The saved file carries the package version, the creation time and the command
line, so a run folder says how it was made. `load` refuses files from a newer
format and names unknown fields.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryofire_ext.configfile import ConfigFile
from cryofire_ext.errors import InputError
from cryofire_ext.refine.config import RefineConfig

# fields a resumed run may change (they do not alter what has been trained so far)
RESUMABLE_FIELDS = ("epochs", "max_minutes", "device", "precision", "num_workers", "log_every",
                    # the landscape stage runs after training, from its results
                    "z_mode", "landscape_resolution_A", "landscape_nodes", "landscape_iters",
                    "landscape_pose_rounds")


@dataclass
class TrainConfig(ConfigFile):
    """A training run's settings (units in names; images counted in particles seen).

    Model (seed cryoFIRE, Fig. S1/S2): `zdim` conformation dims (0 = homogeneous);
    `enc_channels` CNN widths, one 3x3 conv + BatchNorm + ReLU + 2x2 max-pool per level
    (5 levels -> `(D/32)^2` cells of the last width, 256); `hidden` MLP width;
    `dec_layers` x `dec_hidden` neural field with `pe_freqs` (None = D/2) Gaussian
    frequencies of scale `pe_sigma` (in cycles per unit of k times D/2).
    `n_pose_heads` > 1 gives a winner-take-all multi-head encoder (cryoSPIN).
    `symmetric`: the image and its copy rotated 180 deg in-plane are both encoded;
    the smaller loss wins.

    Schedule: `pose_only_images` with random z before the encoder's z is used;
    frequency marching from `march_start` (units of Nyquist) to 1 over `march_images`;
    Adam `lr` with linear warm-up over `lr_warmup_images`; `z_l2` an L2 penalty on z.

    Warm start (`refine.warmstart`; `warm_start="search"`, the default, because the plain recipe learns no
    poses on CPU budgets; `"none"` is the seed's plain recipe): an online hard-assignment EM (`warm_steps`
    minibatches of `warm_batch` images, global search over `warm_rotations` rotations and a 3x3 shift grid
    up to `warm_max_shift_px`) on `warm_images` images Fourier-cropped to `warm_box` builds a low-resolution
    map; `warm_rounds` projection-matching rounds lift it to the training box, and with `zdim` > 0 and
    `warm_classes` K > 1 a hard-EM classification at fixed poses splits it into K class maps.
    Each training particle's searched (pose, shift, class) is computed once, when it is first seen
    (`train.candidates.SearchCache`). For `distill_images` images (then decaying to 0 over as many again)
    the encoder is taught the searched poses and the class's z target (a vertex of a simplex in z,
    `class_codes`) while the decoder learns from the searched poses only. With `search_candidates` the
    searched pose is also a candidate in the winner-take-all loss, at every class's z code, in training and in
    the model pass after it: the pose model's z is a class label.

    Landscape (`cryofire_ext.landscape`): with `z_mode="continuous"`, after training and the refinement, each
    particle's z becomes its position along a curve of `landscape_nodes` maps through the particles' main
    motion, fitted at the refined poses on images Fourier-cropped to `landscape_resolution_A`, in
    `landscape_iters` rounds. The refinement before it adds `landscape_pose_rounds` rounds against one map of all
    particles after its class rounds, then decides the classes again at those poses (`pipeline._refine`): z is
    the position along the landscape (which `cryofire analyze` clusters) and the classes stay beside it.
    `z_mode="classes"`: z is the class code, the refinement's classes are the answer.

    The refinement after training has its own config (`refine.config.RefineConfig`), saved apart.

    `train_box`: Fourier-crop the images to this box for training (None = keep; a multiple of 32 px).

    `precision`: the training step's arithmetic. "auto" = bf16 autocast on CUDA and fp32 on the
    CPU; "bf16" = bf16 autocast (CUDA only; refused on the CPU, where torch's bf16 kernels are not
    the fast path); "fp32" = full float32 everywhere. Inference (`predict`, the refinement) is float32.
    """

    FORMAT = "cryofire-train-config"
    KIND = "training config"
    RETIRED_FIELDS = ("landscape_box", "landscape_epochs", "landscape_lr")

    zdim: int = 8
    epochs: int = 20
    max_minutes: float | None = None
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    lr: float = 1e-4
    lr_warmup_images: int = 2000
    # model
    enc_channels: tuple = (32, 64, 128, 256, 256)
    hidden: int = 256
    dec_hidden: int = 256
    dec_layers: int = 4
    pe_freqs: int | None = None
    pe_sigma: float = 0.15
    n_pose_heads: int = 1
    symmetric: bool = True
    train_box: int | None = None
    # schedule
    pose_only_images: int = 20000
    march_start: float = 0.25
    march_images: int = 20000
    z_l2: float = 0.0
    z_mode: str = "classes"
    # landscape (z_mode "continuous")
    landscape_resolution_A: float = 20.0
    landscape_nodes: int = 16
    landscape_iters: int = 1
    landscape_pose_rounds: int = 2
    # warm start
    warm_start: str = "search"
    warm_images: int = 1000
    warm_box: int = 24
    warm_steps: int = 600
    warm_batch: int = 32
    warm_rotations: int = 4000
    warm_max_shift_px: float = 4.0
    warm_rounds: int = 2
    warm_classes: int = 2
    distill_images: int = 10000
    search_candidates: bool = True
    # runtime
    num_workers: int = 2
    log_every: int = 50
    # provenance (filled by save)
    version: str = ""
    created: str = ""
    command_line: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.enc_channels = tuple(int(c) for c in self.enc_channels)
        self.validate()

    def validate(self) -> None:
        """Raise InputError naming the first bad field."""
        def bad(name, expected):
            raise InputError(f"training config field {name}={getattr(self, name)!r}: expected {expected}")
        if not isinstance(self.zdim, int) or self.zdim < 0:
            bad("zdim", "an integer >= 0 (0 = homogeneous)")
        if self.epochs < 0:
            bad("epochs", "an integer >= 0")
        if self.max_minutes is not None and self.max_minutes <= 0:
            bad("max_minutes", "a positive number of minutes or None")
        if self.batch_size < 1:
            bad("batch_size", "an integer >= 1")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            bad("device", "auto, cpu or cuda")
        if self.precision not in ("auto", "bf16", "fp32"):
            bad("precision", "auto (bf16 autocast on CUDA, fp32 on the CPU), bf16 or fp32")
        if self.lr <= 0:
            bad("lr", "a positive learning rate")
        if len(self.enc_channels) != 5:
            bad("enc_channels", "5 channel widths (5 levels of 2x2 pooling down to D/32)")
        if self.n_pose_heads < 1:
            bad("n_pose_heads", "an integer >= 1")
        if self.z_mode not in ("classes", "continuous"):
            bad("z_mode", "'classes' (z is the class code) or 'continuous' (z learned by the landscape stage)")
        if not self.landscape_resolution_A > 0:
            bad("landscape_resolution_A", "a positive resolution in Angstrom (20 A keeps the large-scale motions)")
        if not isinstance(self.landscape_nodes, int) or self.landscape_nodes < 2:
            bad("landscape_nodes", "an integer >= 2 (maps along the landscape's curve)")
        if not isinstance(self.landscape_iters, int) or self.landscape_iters < 1:
            bad("landscape_iters", "an integer >= 1")
        if not isinstance(self.landscape_pose_rounds, int) or self.landscape_pose_rounds < 0:
            bad("landscape_pose_rounds", "an integer >= 0 (refinement rounds against one map before the landscape)")
        if self.warm_start not in ("search", "none"):
            bad("warm_start", "'search' or 'none'")
        if not 0 < self.march_start <= 1:
            bad("march_start", "a radius in (0, 1] (units of Nyquist)")
        if self.train_box is not None and (self.train_box < 32 or self.train_box % 32):
            bad("train_box", "a multiple of 32 px (the encoder pools 5 times by 2), e.g. 32, 64 or 128")
        if self.warm_box < 8 or self.warm_box % 2:
            bad("warm_box", "an even box of at least 8 px")
        if not isinstance(self.warm_rounds, int) or self.warm_rounds < 0:
            bad("warm_rounds", "an integer >= 0 (refinement rounds at the training box)")
        if not isinstance(self.warm_classes, int) or self.warm_classes < 1:
            bad("warm_classes", "an integer >= 1 (classes of the warm start; 1 = none)")

    # ---- persistence (`ConfigFile`: save, load, from_dict)
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """`ConfigFile.from_dict` without the refinement's fields: a job's config file (and the config.json of a run
        made before `RefineConfig`) may hold them beside the training ones; `RefineConfig.fields_in` reads them."""
        refine = RefineConfig.fields_in(d)
        return super().from_dict({k: v for k, v in d.items() if k not in refine}, source)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["enc_channels"] = list(self.enc_channels)
        return d

    def save(self, path: str | os.PathLike, force: bool = True, argv: list[str] | None = None) -> Path:
        """Write the versioned JSON, stamped with the package version, the time and the command line (atomic)."""
        from cryofire_ext import __version__

        self.version = __version__
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.command_line = list(argv if argv is not None else (self.command_line or sys.argv))
        return super().save(path, force=force)

    def training_fields(self) -> dict:
        """The fields that define what is trained (all but provenance and RESUMABLE_FIELDS)."""
        d = self.to_dict()
        for k in RESUMABLE_FIELDS + ("version", "created", "command_line"):
            d.pop(k, None)
        return d

    def differences(self, other: "TrainConfig") -> list[str]:
        """Names of training fields that differ between two configs, `name: old -> new`."""
        a, b = self.training_fields(), other.training_fields()
        return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]
