"""The training loss of the registration network (the ``loss`` section of a deformable config).

``loss = weight_image * image dissimilarity + weight_embed * embedding dissimilarity + weight_reg * regulariser``

* image: ``lncc`` (:class:`monai.losses.LocalNormalizedCrossCorrelationLoss`, in [-1, 0]) or ``mind`` (mean
  squared difference of MIND-SSC descriptors, :func:`regsam.register.deformable.mind_ssc`) between the fixed
  crop and the moving crop warped by the predicted displacement, mean over the crop;
* embedding: ``1 - cos`` between the fixed SAM embedding and the moving embedding warped by the same
  displacement (both PCA-reduced with one basis, see :mod:`regsam.register.net.pairs`), mean over the fixed
  body; ``weight_embed: 0`` is the ablation without embedding guidance (the pool then computes no embeddings
  unless the network takes them as input); ``embed_schedule: cosine`` lowers its weight from ``weight_embed``
  to 0 over the run's steps (guidance while the network learns the large motion, the image term alone at the
  end), ``constant`` keeps it;
* regulariser: :class:`monai.losses.DiffusionLoss` (squared gradient of the displacement in voxels) or
  ``bending`` (:class:`monai.losses.BendingEnergyLoss`).

Warps are MONAI ``Warp`` (border padding), which reads voxelmorph's displacement unchanged (same convention).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss

from regsam.errors import InputError
from regsam.register.deformable import mind_ssc
from regsam.register.torch_fields import make_warp

#: log.csv columns of the loss components, in order
COMPONENTS = ("image", "embed", "reg")


@dataclass(frozen=True)
class LossConfig:
    """Weights and kinds of the three loss terms."""

    similarity: str = "lncc"
    lncc_kernel: int = 9
    weight_image: float = 1.0
    weight_embed: float = 1.0
    weight_reg: float = 1.0
    regulariser: str = "diffusion"
    embed_schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.embed_schedule not in ("constant", "cosine"):
            raise InputError(f"loss.embed_schedule must be 'constant' or 'cosine', got {self.embed_schedule!r}")
        if self.similarity not in ("lncc", "mind"):
            raise InputError(f"loss.similarity must be 'lncc' or 'mind', got {self.similarity!r}")
        if self.regulariser not in ("diffusion", "bending"):
            raise InputError(f"loss.regulariser must be 'diffusion' or 'bending', got {self.regulariser!r}")
        if min(self.weight_image, self.weight_embed, self.weight_reg) < 0 or self.lncc_kernel < 3:
            raise InputError("loss weights must be >= 0 and loss.lncc_kernel >= 3")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def embed_weight(self, step: int, max_steps: int) -> float:
        """The embedding term's weight at 0-based ``step`` of a run of ``max_steps``."""
        if self.embed_schedule == "constant" or max_steps <= 1:
            return self.weight_embed
        return self.weight_embed * 0.5 * (1.0 + math.cos(math.pi * min(step, max_steps - 1) / (max_steps - 1)))


class RegistrationLoss(torch.nn.Module):
    """``forward(batch, displacement[, weight_embed]) -> {"loss", "image", "embed", "reg"}`` (scalars; components
    unweighted; ``weight_embed`` replaces the config's, as :meth:`LossConfig.embed_weight` schedules it)."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self.lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=int(cfg.lncc_kernel))
        self.regulariser = BendingEnergyLoss(normalize=True) if cfg.regulariser == "bending" else DiffusionLoss()
        self.warp = make_warp("bilinear", "border")

    def image_term(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        if self.cfg.similarity == "lncc":
            return self.lncc(warped, fixed)
        return ((mind_ssc(warped) - mind_ssc(fixed)) ** 2).sum(dim=1).mean()

    def embed_term(self, batch: dict[str, torch.Tensor], displacement: torch.Tensor) -> torch.Tensor:
        """Mean over the fixed body of ``1 - cos(fixed embedding, warped moving embedding)``."""
        moved = self.warp(batch["moving_features"], displacement)
        dissim = 1.0 - F.cosine_similarity(moved, batch["fixed_features"], dim=1, eps=1e-6)[:, None]
        body = batch["body"]
        return (dissim * body).sum() / body.sum().clamp_min(1.0)

    def forward(
        self, batch: dict[str, torch.Tensor], displacement: torch.Tensor, weight_embed: float | None = None
    ) -> dict[str, torch.Tensor]:
        fixed, moving = batch["fixed"][:, :1], batch["moving"][:, :1]
        image = self.image_term(fixed, self.warp(moving, displacement))
        zero = torch.zeros((), device=displacement.device)
        embed = self.embed_term(batch, displacement) if "moving_features" in batch else zero
        with warnings.catch_warnings():  # MONAI indexes with lists of slices; torch warns on every call
            warnings.simplefilter("ignore", UserWarning)
            reg = self.regulariser(displacement)
        c = self.cfg
        loss = c.weight_image * image + c.weight_reg * reg
        weight = c.weight_embed if weight_embed is None else weight_embed
        if weight > 0:
            loss = loss + weight * embed
        return {"loss": loss, "image": image.detach(), "embed": embed.detach(), "reg": reg.detach()}


__all__ = ["COMPONENTS", "LossConfig", "RegistrationLoss"]
