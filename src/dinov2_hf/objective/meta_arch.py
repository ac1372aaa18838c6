"""The DINOv2 meta-architecture: student and EMA teacher in one module, from a batch to the losses.

Data path of one step (``SSLMetaArch.forward``):

    batch (global crops, local crops, iBOT masks)
      teacher (no grad): backbone(global crops) -> CLS + masked patch tokens -> heads
                         -> targets by softmax centering or Sinkhorn-Knopp
      student: backbone.forward_packed([global crops + masks, local crops]) -> one head pass over
               local CLS, global CLS and masked patch tokens
      losses: DINO (cross-view CLS), iBOT (masked patches), KoLeo (global CLS)

Student and teacher live in one module so that FSDP2 shards them together and one ``prepare`` call
covers both; the EMA update (:meth:`update_teacher`) works on local tensors with foreach ops, so it
is the same code for plain parameters and FSDP2 shards.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import DINOLoss, KoLeoLoss, SimDINOLoss, SimDINOPatchLoss, SoftmaxCenter, iBOTPatchLoss
from ..modeling import Dinov2HFConfig, Dinov2HFModel
from .config import SSLConfig
from .heads import DINOHead

# Collapse thresholds of the health metrics (teacher entropies relative to log K; CLS spread).
FLAT_ENTROPY, ONE_PROTOTYPE_ENTROPY, FLAT_FEATURES_STD = 0.99, 0.05, 0.05


def build_student_config(config: SSLConfig) -> Dinov2HFConfig:
    model = config.model
    return Dinov2HFConfig.from_preset(
        model.preset,
        **{
            "image_size": config.crops.global_crops_size,
            "drop_path_rate": model.drop_path_rate,
            "layerscale_value": model.layerscale_value,
            **model.overrides,
        },
    )


def _head(embed_dim: int, settings, prototypes: bool = True) -> DINOHead:
    """A DINO / iBOT head from the ``head_*`` fields of DinoSettings or IbotSettings (without the prototype
    layer: ending in the normalised bottleneck)."""
    return DINOHead(
        embed_dim, settings.head_n_prototypes if prototypes else 0, settings.head_hidden_dim, settings.head_bottleneck_dim,
        settings.head_nlayers, settings.head_mlp_bias,
    )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor parameter, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class StudentWithEMA(nn.Module):
    """What the trainer needs of a model it optimises: a trained ``student`` (backbone + heads or
    projections), an EMA copy of it (``ema_part``: the exported model), frozen parts, per-part gradient
    clipping, block-wise compilation. ``SSLMetaArch`` and the distillation modules build on it."""

    part_names: tuple[str, ...] = ("student", "teacher")  # every backbone-holding ModuleDict
    ema_part = "teacher"  # the EMA copy of the student, whose backbone is the run's result

    def parts(self) -> list[nn.ModuleDict]:
        return [getattr(self, name) for name in self.part_names]

    @property
    def exported_backbone(self) -> Dinov2HFModel:
        return getattr(self, self.ema_part)["backbone"]

    @torch.no_grad()
    def apply_pending_center_updates(self) -> None:
        """Fold every rank's pending centering statistics into the centers now (collective).

        The update would happen at the next teacher pass anyway, to the same value; doing it before a
        checkpoint makes all buffers identical across ranks, so saving rank 0's copy loses nothing.
        """
        for module in self.modules():
            if isinstance(module, SoftmaxCenter):
                module.apply_pending_update()

    def compile_blocks(self, **compile_kwargs) -> StudentWithEMA:
        """torch.compile every transformer block of every part (student, teacher, EMA copies), in place.

        Block-wise rather than whole-model: the packed student pass has one token layout per step,
        the teacher another, and each block compiles once per layout; losses and heads stay eager.
        """
        # Entries per block: student and teacher layouts, with and without grad, plus monitor
        # batches; the default limit of 8 would silently fall back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for part in self.parts():
            for layer in part["backbone"].encoder.layer:
                layer.compile(**compile_kwargs)
        return self

    def train(self, mode: bool = True) -> StudentWithEMA:
        super().train(mode)
        for part in self.parts():
            if part is not self.student:
                part.eval()  # frozen parts (teacher, EMA copies) have no stochastic layers and no gradients
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float, skip: Collection[str] = ()) -> None:
        """ema = momentum * ema + (1 - momentum) * student, parameter by parameter (local shards); the
        EMA copy is the teacher here (``ema_part``), a spare copy in distillation. ``skip``: student parts
        (e.g. a frozen ``backbone``) whose EMA stays as it is (m * x + (1 - m) * x need not round to x)."""
        student_params, ema_params = [], []
        ema = getattr(self, self.ema_part)
        for name, module in self.student.items():
            if name in skip:
                continue
            for s, t in zip(module.parameters(), ema[name].parameters()):
                student_params.append(_local(s.detach()))
                ema_params.append(_local(t.detach()))
        torch._foreach_mul_(ema_params, momentum)
        torch._foreach_add_(ema_params, student_params, alpha=1 - momentum)

    def clip_gradients(self, max_norm: float) -> dict[str, torch.Tensor]:
        """Clip each student part (backbone, heads) to ``max_norm`` separately, as the official code;
        returns the norms before clipping (for FSDP2 shards: the norm over all ranks)."""
        norms = {}
        for name, module in self.student.items():
            norm = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)
            norms[f"grad_norm_{name}"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return norms


class SSLMetaArch(StudentWithEMA):
    """Student (backbone + heads, trained) and teacher (EMA copy, frozen, eval mode)."""

    mask_student_inputs = True  # iBOT: masked patches enter the student as the mask token
    head_prototypes = True  # the heads end in K prototype logits

    def __init__(self, config: SSLConfig, backbone: Dinov2HFModel | None = None) -> None:
        super().__init__()
        self.config = config
        backbone = backbone if backbone is not None else Dinov2HFModel(build_student_config(config))
        embed_dim = backbone.config.hidden_size
        dino, ibot = config.dino, config.ibot
        student = {"backbone": backbone, "dino_head": _head(embed_dim, dino, self.head_prototypes)}
        if ibot.separate_head:
            student["ibot_head"] = _head(embed_dim, ibot, self.head_prototypes)
        self.student = nn.ModuleDict(student)
        if ibot.loss_weight == 0:  # no iBOT, no masked inputs: an unused trainable parameter stops DDP
            backbone.embeddings.mask_token.requires_grad_(False)
        self.teacher = copy.deepcopy(self.student)
        for layer in self.teacher["backbone"].encoder.layer:
            layer.drop_path_rate = 0.0  # the teacher never drops paths
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        ibot_out_dim = ibot.head_n_prototypes if ibot.separate_head else dino.head_n_prototypes
        self.dino_loss = DINOLoss(dino.head_n_prototypes, config.student_temp, config.center_momentum)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_out_dim, config.student_temp, config.center_momentum)
        self.koleo_loss = KoLeoLoss()

    # -- teacher ----------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher heads' logits: CLS (2B, K) with crops swapped (crop 1 of the student meets crop 2
        of the teacher), and the masked patches' (n_masked, K) when iBOT is on."""
        backbone, registers = self.teacher["backbone"], self.teacher["backbone"].config.num_register_tokens
        output = backbone(batch["global_crops"])
        cls = output.pooler_output
        cls = torch.cat(cls.chunk(2)[::-1])
        do_ibot = self.config.ibot.loss_weight > 0
        masked_patches = output.last_hidden_state[:, 1 + registers :].flatten(0, 1)[batch["mask_indices"]] if do_ibot else None
        if do_ibot and not self.config.ibot.separate_head:
            logits = self.teacher["dino_head"](torch.cat((cls, masked_patches)))
            cls_logits, patch_logits = logits[: len(cls)], logits[len(cls) :]
        else:
            cls_logits = self.teacher["dino_head"](cls)
            patch_logits = self.teacher["ibot_head"](masked_patches) if do_ibot else None
        return cls_logits, patch_logits

    @torch.no_grad()
    def teacher_targets(self, batch: dict, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher targets: DINO (2, B, K), centred and sharpened, and iBOT (n_masked, K) for the masked patches."""
        cls_logits, patch_logits = self.teacher_logits(batch)
        do_ibot = patch_logits is not None
        if self.config.centering == "softmax_center":
            dino_targets = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            ibot_targets = None
            if do_ibot:
                ibot_targets = self.ibot_patch_loss.softmax_center_teacher(patch_logits.unsqueeze(0), teacher_temp).squeeze(0)
                self.ibot_patch_loss.update_center(patch_logits)
        else:
            dino_targets = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            ibot_targets = None
            if do_ibot:
                ibot_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    patch_logits, teacher_temp, batch["n_masked_patches"]
                )
        return dino_targets.view(2, -1, dino_targets.shape[-1]), ibot_targets

    # -- student and losses -----------------------------------------------------------------------

    def forward(self, batch: dict, teacher_temp: float) -> dict[str, torch.Tensor]:
        """Total loss (``loss``, for backward) and each weighted component, plus health metrics."""
        targets = self.teacher_targets(batch, teacher_temp)
        student = self.student_outputs(batch)
        losses = self.losses(student, *targets, batch)
        losses.update(self.health_metrics(student["global"], targets[0], student["global_cls"]))
        return losses

    def student_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """One packed backbone pass over all crops (masked global crops, local crops), then one head pass
        over every token the head sees: ``local`` / ``global`` CLS outputs, ``patches`` (masked patches, iBOT
        on), ``global_cls`` (the backbone's, for KoLeo) and ``n_local`` crops per image."""
        config = self.config
        n_images = batch["global_crops"].shape[0] // 2
        n_local = batch["local_crops"].shape[0] // n_images  # crops are stacked crop-major
        do_ibot = config.ibot.loss_weight > 0
        backbone = self.student["backbone"]
        registers = backbone.config.num_register_tokens
        crops = [batch["global_crops"]] + ([batch["local_crops"]] if n_local else [])
        masks = [batch["masks"] if do_ibot and self.mask_student_inputs else None] + ([None] if n_local else [])
        outputs = backbone.forward_packed(crops, masks)
        global_cls = outputs[0].pooler_output
        local_cls = outputs[1].pooler_output if n_local else global_cls[:0]
        head_inputs = [local_cls, global_cls]
        if do_ibot:
            masked_patches = outputs[0].last_hidden_state[:, 1 + registers :].flatten(0, 1)[batch["mask_indices"]]
            if not config.ibot.separate_head:
                head_inputs.append(masked_patches)
        # One head pass over every token the head sees (local CLS, global CLS, masked patches).
        logits = self.student["dino_head"](torch.cat(head_inputs))
        result = {"local": logits[: len(local_cls)], "global": logits[len(local_cls) : len(local_cls) + len(global_cls)],
                  "global_cls": global_cls, "n_local": n_local}
        if do_ibot:
            result["patches"] = (
                self.student["ibot_head"](masked_patches)
                if config.ibot.separate_head
                else logits[len(local_cls) + len(global_cls) :]
            )
        return result

    def losses(self, student: dict, dino_targets: torch.Tensor, ibot_targets: torch.Tensor | None, batch: dict) -> dict:
        """The weighted DINO, KoLeo and iBOT terms and their sum ``loss``."""
        config, n_local = self.config, student["n_local"]
        n_terms = 2 + 2 * n_local  # cross-view pairs: 2 global-global + 2 x n_local local-global
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=student["global_cls"].device)
        if config.dino.loss_weight > 0:
            if n_local:
                losses["dino_local_crops_loss"] = self.dino_loss(student["local"].chunk(n_local), list(dino_targets)) / n_terms
            losses["dino_global_crops_loss"] = self.dino_loss([student["global"]], [dino_targets.flatten(0, 1)]) * 2 / n_terms
            total = total + config.dino.loss_weight * sum(v for k, v in losses.items() if k.startswith("dino"))
        total = total + self._koleo(student, losses)
        if ibot_targets is not None:
            ibot = self.ibot_patch_loss.forward_masked(
                student["patches"],
                ibot_targets,
                student_masks_flat=batch["masks"],
                n_masked_patches=len(batch["mask_indices"]),
                masks_weight=batch["masks_weight"],
            )
            losses["ibot_loss"] = self.config.ibot.loss_weight * ibot
            total = total + losses["ibot_loss"]
        losses["loss"] = total
        return losses

    def _koleo(self, student: dict, losses: dict) -> torch.Tensor | float:
        """The weighted KoLeo term on the backbone's global CLS (recorded in ``losses``), or 0."""
        weight = self.config.dino.koleo_loss_weight
        if weight <= 0:
            return 0.0
        # per global crop: never between the two crops of one image
        losses["koleo_loss"] = weight * sum(self.koleo_loss(c) for c in student["global_cls"].chunk(2))
        return losses["koleo_loss"]

    @torch.no_grad()
    def health_metrics(self, global_logits: torch.Tensor, dino_targets: torch.Tensor, global_cls: torch.Tensor) -> dict:
        """Cheap collapse indicators from tensors the step already has.

        - ``teacher_entropy`` / ``student_entropy``: mean entropy of the per-image distributions over
          the K prototypes, relative to its maximum log K (1 = uniform: the flat collapse);
        - ``teacher_batch_entropy``: entropy of the batch-averaged teacher distribution, relative to
          log K (near 0: every image goes to the same prototypes, the one-hot collapse);
        - ``kl_teacher_student``: KL(teacher || student) on the global crops;
        - ``cls_std``: std over the batch of the L2-normalised student CLS, averaged over dimensions,
          times sqrt(D) (about 1 for spread features, 0 for identical ones);
        - ``collapse``: 1.0 when any indicator is degenerate.
        """
        n_prototypes = global_logits.shape[-1]
        log_k = math.log(n_prototypes)
        teacher = dino_targets.flatten(0, 1).float()
        student_log = F.log_softmax(global_logits.float() / self.config.student_temp, dim=-1)
        teacher_log = teacher.clamp_min(1e-12).log()
        teacher_entropy = -(teacher * teacher_log).sum(-1).mean() / log_k
        student_entropy = -(student_log.exp() * student_log).sum(-1).mean() / log_k
        mean_teacher = teacher.mean(0)
        batch_entropy = -(mean_teacher * mean_teacher.clamp_min(1e-12).log()).sum() / log_k
        kl = (teacher * (teacher_log - student_log)).sum(-1).mean()
        features = F.normalize(global_cls.float(), dim=-1)
        cls_std = features.std(dim=0).mean() * math.sqrt(features.shape[-1]) if len(features) > 1 else features.new_ones(())
        collapse = (teacher_entropy > FLAT_ENTROPY) | (batch_entropy < ONE_PROTOTYPE_ENTROPY) | (cls_std < FLAT_FEATURES_STD)
        return {
            "teacher_entropy": teacher_entropy,
            "student_entropy": student_entropy,
            "teacher_batch_entropy": batch_entropy,
            "kl_teacher_student": kl,
            "cls_std": cls_std,
            "collapse": collapse.float(),
        }


class SimDINOMetaArch(SSLMetaArch):
    """``objective=simdino``: the same student, teacher, crops and masks; heads without prototypes; the
    student's normalised head outputs align with the teacher's, and a coding-rate term spreads them
    (:mod:`dinov2_hf.losses.simdino_loss`). No centering, no teacher temperature."""

    head_prototypes = False

    def __init__(self, config: SSLConfig, backbone: Dinov2HFModel | None = None) -> None:
        super().__init__(config, backbone)
        self.dino_loss = SimDINOLoss(config.simdino.coding_rate_eps, config.simdino.expansion_weight)
        self.ibot_patch_loss = SimDINOPatchLoss()

    @torch.no_grad()
    def teacher_targets(self, batch: dict, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's normalised head outputs: CLS (2, B, D), crops swapped as for DINO, and the masked patches'."""
        cls_features, patch_features = self.teacher_logits(batch)
        return cls_features.float().view(2, -1, cls_features.shape[-1]), None if patch_features is None else patch_features.float()

    def losses(self, student: dict, teacher_cls: torch.Tensor, teacher_patches: torch.Tensor | None, batch: dict) -> dict:
        config, n_local = self.config, student["n_local"]
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=student["global_cls"].device)
        if config.dino.loss_weight > 0:
            n_terms = 2 + 2 * n_local  # the cross-view pairs of DINO
            alignment = self.dino_loss.alignment([student["global"]], [teacher_cls.flatten(0, 1)]) * 2
            if n_local:
                alignment = alignment + self.dino_loss.alignment(student["local"].chunk(n_local), list(teacher_cls))
            # each global view with its own teacher view (the targets are swapped: view i's teacher is 1 - i)
            views = [(s + t) / 2 for s, t in zip(student["global"].chunk(2), teacher_cls.flip(0))]
            losses["dino_alignment_loss"] = config.dino.loss_weight * alignment / n_terms
            losses["dino_expansion_loss"] = -config.dino.loss_weight * self.dino_loss.expansion_weight * self.dino_loss.expansion(views)
            total = total + losses["dino_alignment_loss"] + losses["dino_expansion_loss"]
        total = total + self._koleo(student, losses)
        if teacher_patches is not None:
            losses["ibot_loss"] = config.ibot.loss_weight * self.ibot_patch_loss.forward_masked(
                student["patches"], teacher_patches, batch["masks"], batch["masks_weight"]
            )
            total = total + losses["ibot_loss"]
        losses["loss"] = total
        return losses

    @torch.no_grad()
    def health_metrics(self, global_features: torch.Tensor, teacher_cls: torch.Tensor, global_cls: torch.Tensor) -> dict:
        """``cls_std`` as for DINO, and the mean cosine between student and teacher views (``alignment``);
        ``collapse`` when the CLS features no longer differ between images."""
        features = F.normalize(global_cls.float(), dim=-1)
        cls_std = features.std(dim=0).mean() * math.sqrt(features.shape[-1]) if len(features) > 1 else features.new_ones(())
        alignment = (global_features.float() * teacher_cls.flatten(0, 1)).sum(-1).mean()
        return {"cls_std": cls_std, "alignment": alignment, "collapse": (cls_std < FLAT_FEATURES_STD).float()}


def build_meta_arch(config: SSLConfig) -> SSLMetaArch:
    """The self-distillation module of ``config.objective``."""
    return SimDINOMetaArch(config) if config.objective == "simdino" else SSLMetaArch(config)


def collapse_advice(record: dict) -> str:
    """What a step's health metrics (:meth:`SSLMetaArch.health_metrics`) say, and the recipe keys to change."""
    shown = ", ".join(f"{name} {record[name]:.3f}" for name in ("teacher_entropy", "teacher_batch_entropy", "cls_std") if name in record)
    advice = []
    if record.get("teacher_entropy", 0.0) > FLAT_ENTROPY:
        advice.append(
            "flat collapse (every image gets the same near-uniform target): sharpen and balance the targets with "
            "centering=sinkhorn_knopp and a lower teacher temperature (schedule.teacher_temp=0.02 "
            "schedule.warmup_teacher_temp=0.02), start from image-dependent features (model.layerscale_value=0.1), "
            "or let the teacher keep up (schedule.momentum_teacher=0.98)"
        )
    if record.get("teacher_batch_entropy", 1.0) < ONE_PROTOTYPE_ENTROPY:
        advice.append(
            "one-prototype collapse (every image goes to the same prototypes): centering=sinkhorn_knopp, a higher "
            "teacher temperature (schedule.teacher_temp), or a lower center_momentum"
        )
    if record.get("cls_std", 1.0) < FLAT_FEATURES_STD:
        advice.append("the CLS features are identical across images: raise dino.koleo_loss_weight or lower schedule.base_lr")
    return f"collapse indicators {shown}: " + "; ".join(advice) + ". train.stop_on_collapse=N stops a run after N such steps."
