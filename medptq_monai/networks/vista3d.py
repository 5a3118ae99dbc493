"""VISTA3D automatic (class-prompt) segmentation as a plain ``image -> logits`` network.

MONAI's ``VISTA3D`` (He et al., "VISTA3D: a unified segmentation foundation model for 3D
medical imaging", arXiv:2406.05285) answers prompts: a class vector for automatic
segmentation, point clicks for interactive segmentation, one binary sigmoid map per
prompt. Sliding-window inference, ONNX export and INT8 calibration want a fixed
``forward(image)`` instead. ``Vista3DSegmenter`` *is* a ``VISTA3D`` (same submodules,
same state-dict keys as ``monai.networks.nets.vista3d132``, so the official checkpoint
loads with ``strict=True``) whose ``forward`` runs the class-prompt path for a fixed list
of VISTA3D label ids:

* image encoder (``SegResNetDS2``) with only its automatic-branch decoder;
* the class head's two residual conv blocks on the encoder features;
* class embeddings of ``class_ids`` through the class head's MLP, used as the kernel of a
  1x1x1 convolution: ``logit[k] = <embedding_k, feature>`` at every voxel — the same
  product VISTA3D computes, written so the batch axis stays free (VISTA3D's own class
  head puts the *classes* on the batch axis and needs ``transpose`` to undo it);
* channel 0 is a constant 0 "background" logit, so ``argmax`` picks background exactly
  where no class logit is > 0, i.e. where VISTA3D's ``sigmoid > 0.5`` rule finds no class.
  Where several classes pass it, argmax keeps the most confident one.

The class embeddings do not depend on the image; during ONNX export they are evaluated
once and written as the convolution's constant weight (a quantizable 1x1x1 Conv).

Interactive segmentation stays available in FP32 torch: ``point_prompt`` runs VISTA3D's
point head through the parent ``VISTA3D.forward``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import SegResNetDS2
from monai.networks.nets.vista3d import VISTA3D, ClassMappingClassify, PointMappingSAM

from ..errors import InputImageError, MedPTQError

__all__ = [
    "BTCV13_VISTA3D_CLASS_IDS",
    "ClassLogits",
    "PointPromptError",
    "VISTA3D_NUM_EMBEDDINGS",
    "VISTA3D_LAST_SUPPORTED",
    "Vista3DSegmenter",
]

#: VISTA3D label-dictionary ids of the 13 BTCV-style organs, in the project's output-channel order:
#: spleen 3, right kidney 5, left kidney 14, gallbladder 10, esophagus 11, liver 1, stomach 12,
#: aorta 6, inferior vena cava 7, portal and splenic vein 17, pancreas 4, right adrenal gland 8,
#: left adrenal gland 9 (from the channel_def of MONAI model-zoo ``models/vista3d/configs/metadata.json``).
BTCV13_VISTA3D_CLASS_IDS: tuple[int, ...] = (3, 5, 14, 10, 11, 1, 12, 6, 7, 17, 4, 8, 9)
#: size of VISTA3D's class-embedding tables (``n_classes`` of ``vista3d132``)
VISTA3D_NUM_EMBEDDINGS = 512
#: last label id VISTA3D was trained on; larger prompt classes are zero-shot for the point head
VISTA3D_LAST_SUPPORTED = 132
_ENCODER_BLOCKS_DOWN = (1, 2, 2, 4, 4)
_POINT_LABELS = (-1, 0, 1, 2, 3)


class PointPromptError(MedPTQError, ValueError):
    """Point prompts (coordinates, labels, prompt classes) that VISTA3D cannot take."""


def _is_exporting() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def _as_initializer(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (image-independent) as an ONNX initializer rather than the ops that compute it.

    The value is evaluated eagerly and enters the trace as a constant; adding ``0 * param[0]``
    (exact) ties it to a parameter, so the exporter's constant folding emits one initializer
    (a ``Constant`` node would not be quantizable as a Conv weight).
    """
    const = torch.from_numpy(value.detach().cpu().numpy().copy())
    return const + param.reshape(-1)[:1].reshape([1] * const.ndim) * 0.0


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_class_ids(class_ids: Sequence[int]) -> tuple[int, ...]:
    if isinstance(class_ids, (str, bytes)) or not isinstance(class_ids, Sequence) or len(class_ids) == 0:
        raise ValueError(f"class_ids must be a non-empty sequence of VISTA3D label ids, got {class_ids!r}")
    ids = tuple(_check_int("every class id", c, 1) for c in class_ids)
    bad = [c for c in ids if c >= VISTA3D_NUM_EMBEDDINGS]
    if bad:
        raise ValueError(f"class ids must be < {VISTA3D_NUM_EMBEDDINGS} (VISTA3D's embedding table), got {bad}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"class_ids must not repeat, got {list(ids)}")
    return ids


class ClassLogits(torch.nn.Module):
    """``features [B, C, *S]`` · ``kernel [K, C, 1, 1, 1]`` → ``[B, 1 + K, *S]`` with a 0 background channel first.

    No parameters (nothing in the state dict); a module only so that its ONNX nodes are named
    ``/class_logits/...``.
    """

    def forward(self, features: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        logits = F.conv3d(features, kernel)
        background = torch.zeros_like(logits[:, :1])
        return torch.cat([background, logits], dim=1)


class Vista3DSegmenter(VISTA3D):
    """VISTA3D (``vista3d132`` layout) whose ``forward(image)`` gives ``1 + len(class_ids)`` logit channels.

    Args:
        in_channels: image channels (1 for CT).
        encoder_embed_dim: encoder width; 48 is ``vista3d132`` (the official checkpoint), smaller
            values (multiples of 8, e.g. 16) give a small network with the same layout.
        class_ids: VISTA3D label ids, in output-channel order (channel ``i + 1`` is ``class_ids[i]``).

    ``forward(x)``: ``x`` ``[B, in_channels, D, H, W]`` with every spatial size divisible by 16 →
    ``[B, 1 + len(class_ids), D, H, W]`` logits; channel 0 is 0 (background).
    """

    def __init__(
        self,
        in_channels: int = 1,
        encoder_embed_dim: int = 48,
        class_ids: Sequence[int] = BTCV13_VISTA3D_CLASS_IDS,
    ) -> None:
        in_channels = _check_int("in_channels", in_channels)
        dim = _check_int("encoder_embed_dim", encoder_embed_dim)
        if dim % 8:
            # the point head's attention halves the width and splits it over 4 heads
            raise ValueError(f"encoder_embed_dim must be a multiple of 8, got {dim}")
        ids = _check_class_ids(class_ids)
        # same modules, names and construction order as monai.networks.nets.vista3d132
        encoder = SegResNetDS2(
            in_channels=in_channels, blocks_down=_ENCODER_BLOCKS_DOWN, norm="instance",
            out_channels=dim, init_filters=dim, dsdepth=1,
        )
        point_head = PointMappingSAM(
            feature_size=dim, n_classes=VISTA3D_NUM_EMBEDDINGS, last_supported=VISTA3D_LAST_SUPPORTED
        )
        class_head = ClassMappingClassify(n_classes=VISTA3D_NUM_EMBEDDINGS, feature_size=dim, use_mlp=True)
        super().__init__(image_encoder=encoder, class_head=class_head, point_head=point_head)
        self.in_channels = in_channels
        self.encoder_embed_dim = dim
        self.class_ids = ids
        self.shape_factor = tuple(int(f) for f in encoder.shape_factor())
        # not in the state dict: checkpoints keep VISTA3D's exact keys
        self.register_buffer("class_index", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.class_logits = ClassLogits()

    @property
    def num_classes(self) -> int:
        """Output channels: background + one per class id."""
        return 1 + len(self.class_ids)

    def class_kernel(self) -> torch.Tensor:
        """Class embeddings after the class head's MLP, as a 1x1x1 conv kernel ``[K, C, 1, 1, 1]``."""
        head = self.class_head
        emb = head.class_embeddings(self.class_index.unsqueeze(1))  # [K, 1, C], as VISTA3D feeds its MLP
        if head.use_mlp:
            emb = head.mlp(emb)
        kernel = emb.reshape(len(self.class_ids), self.encoder_embed_dim, 1, 1, 1)
        if _is_exporting():
            kernel = _as_initializer(kernel, head.class_embeddings.weight)
        return kernel

    def check_image(self, x: torch.Tensor, name: str = "input") -> None:
        """Raise ``InputImageError`` unless ``x`` is a float ``[B, in_channels, D, H, W]`` tensor the encoder accepts."""
        if not isinstance(x, torch.Tensor):
            raise InputImageError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise InputImageError(
                f"{name} must be [B, {self.in_channels}, D, H, W], got shape {list(x.shape)}"
            )
        if x.shape[0] < 1 or any(s < 1 for s in x.shape[2:]):
            raise InputImageError(f"{name} is empty: shape {list(x.shape)}")
        if not x.is_floating_point():
            raise InputImageError(f"{name} must be a floating-point tensor, got {x.dtype}")
        bad = [int(s) for s, f in zip(x.shape[2:], self.shape_factor) if s % f]
        if bad:
            raise InputImageError(
                f"{name} spatial shape {list(x.shape[2:])} must be divisible by {list(self.shape_factor)} "
                f"(the encoder downsamples {len(_ENCODER_BLOCKS_DOWN) - 1} times); {bad} are not"
            )
        self._check_bottom(tuple(int(s) for s in x.shape[2:]), name)

    def _check_bottom(self, spatial: tuple[int, ...], name: str) -> None:
        bottom = [s // f for s, f in zip(spatial, self.shape_factor)]
        if int(np.prod(bottom)) < 2:
            raise InputImageError(
                f"{name} spatial shape {list(spatial)} is too small: the encoder's instance norm needs more than "
                f"one voxel at 1/{self.shape_factor[0]} resolution (make one axis at least {2 * self.shape_factor[0]})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``[B, in_channels, *roi]`` image → ``[B, 1 + len(class_ids), *roi]`` logits (channel 0 = 0)."""
        if not _is_exporting():
            self.check_image(x)
        _, features = self.image_encoder(x, with_point=False, with_label=True)
        features = self.class_head.image_post_mapping(features)
        kernel = self.class_kernel()
        return self.class_logits(features, kernel)

    @torch.no_grad()
    def point_prompt(
        self,
        image: torch.Tensor,
        point_coords: torch.Tensor | Sequence,
        point_labels: torch.Tensor | Sequence,
        prompt_class: Sequence[int] | torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor:
        """Interactive segmentation with VISTA3D's point head (FP32 torch, through ``VISTA3D.forward``).

        Args:
            image: ``[1, in_channels, D, H, W]`` preprocessed image (any size with one axis > 16: it is padded
                at the far end to a multiple of 16 by edge replication, and the result cropped back).
            point_coords: ``[N, 3]`` voxel indices (along the image's three spatial axes, in tensor order)
                of one object's clicks, or
                ``[B, N, 3]`` for ``B`` objects.
            point_labels: ``[N]`` or ``[B, N]``: 1 positive, 0 negative, -1 padding (2/3: negative/positive
                for VISTA3D's special classes, set automatically when ``prompt_class`` is one of them).
            prompt_class: optional VISTA3D label id per object (``B`` ids); ids above 132 are zero-shot.
            return_logits: return the logits instead of the mask.

        Returns:
            ``[B, 1, D, H, W]``: a ``uint8`` mask (logit > 0, i.e. sigmoid > 0.5) or the float logits.
        """
        self._check_point_image(image)
        coords, labels = self._check_points(point_coords, point_labels, tuple(image.shape[2:]))
        classes = None
        if prompt_class is not None:
            classes = self._check_prompt_class(prompt_class, coords.shape[0])
            labels = self.convert_point_label(labels.clone(), [int(c) for c in classes])
            classes = classes.unsqueeze(1)
        spatial = tuple(int(s) for s in image.shape[2:])
        pad: list[int] = []
        for size, factor in zip(reversed(spatial), reversed(self.shape_factor)):
            pad += [0, (-size) % factor]
        self._check_bottom(tuple(s + p for s, p in zip(spatial, reversed(pad[1::2]))), "image")
        padded = F.pad(image.float(), pad, mode="replicate") if any(pad) else image.float()
        was_training = self.training
        self.eval()
        try:
            device = padded.device
            logits = super().forward(
                padded,
                point_coords=coords.to(device),
                point_labels=labels.to(device),
                prompt_class=None if classes is None else classes.to(device),
            )
        finally:
            self.train(was_training)
        logits = logits[..., : spatial[0], : spatial[1], : spatial[2]]
        return logits if return_logits else (logits > 0).to(torch.uint8)

    def _check_point_image(self, image: torch.Tensor) -> None:
        if not isinstance(image, torch.Tensor):
            raise InputImageError(f"image must be a torch.Tensor, got {type(image).__name__}")
        if image.ndim != 5 or image.shape[0] != 1 or image.shape[1] != self.in_channels:
            raise InputImageError(
                f"image must be [1, {self.in_channels}, D, H, W] (one image per point prompt), "
                f"got shape {list(image.shape)}"
            )
        if any(s < 1 for s in image.shape[2:]):
            raise InputImageError(f"image is empty: shape {list(image.shape)}")
        if not image.is_floating_point():
            raise InputImageError(f"image must be a floating-point tensor, got {image.dtype}")
        if not torch.isfinite(image).all():
            raise InputImageError("image holds NaN or Inf values")

    @staticmethod
    def _check_points(
        point_coords: torch.Tensor | Sequence, point_labels: torch.Tensor | Sequence, spatial: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            coords = torch.as_tensor(point_coords).detach().cpu()
            labels = torch.as_tensor(point_labels).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as err:
            raise PointPromptError(f"point_coords / point_labels must be numeric arrays: {err}") from err
        if coords.ndim == 2:
            coords = coords.unsqueeze(0)
        if labels.ndim == 1:
            labels = labels.unsqueeze(0)
        if coords.ndim != 3 or coords.shape[-1] != 3 or coords.shape[1] < 1:
            raise PointPromptError(f"point_coords must be [N, 3] or [B, N, 3] with N >= 1, got {list(coords.shape)}")
        if labels.shape != coords.shape[:2]:
            raise PointPromptError(
                f"point_labels must be [N] or [B, N] matching point_coords {list(coords.shape)}, "
                f"got {list(torch.as_tensor(point_labels).shape)}"
            )
        if coords.is_floating_point() and not torch.isfinite(coords).all():
            raise PointPromptError("point_coords hold NaN or Inf")
        if labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise PointPromptError("point_labels must be integers (-1 padding, 0 negative, 1 positive)")
        labels = labels.long()
        unknown = sorted(set(labels.unique().tolist()) - set(_POINT_LABELS))
        if unknown:
            raise PointPromptError(f"point_labels must be in {_POINT_LABELS}, got {unknown}")
        real = labels != -1
        if not real.any(dim=1).all():
            raise PointPromptError("every object needs at least one point whose label is not -1 (padding)")
        limit = torch.tensor(spatial, dtype=coords.dtype) - 1
        outside = real & ((coords < 0) | (coords > limit)).any(dim=-1)
        if outside.any():
            raise PointPromptError(
                f"points outside the image {list(spatial)}: {coords[outside].tolist()[:5]} (voxel indices along the image axes)"
            )
        return coords.float(), labels

    @staticmethod
    def _check_prompt_class(prompt_class: Sequence[int] | torch.Tensor, num_objects: int) -> torch.Tensor:
        classes = torch.as_tensor(prompt_class).detach().cpu().reshape(-1)
        if classes.is_floating_point() or classes.numel() != num_objects or (classes < 0).any():
            raise PointPromptError(
                f"prompt_class must hold one non-negative VISTA3D label id per object ({num_objects}), "
                f"got {prompt_class!r}"
            )
        return classes.long()
