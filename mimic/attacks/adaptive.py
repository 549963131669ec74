"""An adaptive attack aimed at MIMIC: the trigger is learned against a simulated MIMIC distillation.

Why a fixed-trigger backdoor does not survive MIMIC: the student starts empty and learns only the
teacher's behaviour on clean images (attention maps of every stage, the final feature). A
BadEncoder trigger drives the teacher into directions that clean images never excite, so nothing
in MIMIC's losses carries them to the student, and the student answers the trigger like any
clean encoder. A backdoor that survives must live where those losses copy it: in the teacher's
behaviour on clean images. An attacker who picks the trigger can search for one that a
MIMIC-distilled copy of the teacher also answers, by simulating the defence during the attack
(the idea of anti-distillation backdoors, Ge et al., ACM MM 2021, applied to MIMIC's losses).

Every step, on a shadow batch x (horizontal flips) with the current trigger t = (p, m) (a
learned pattern p inside the fixed mask m of ``attack.trigger_*``; x + t = (1 - m) x + m p):

1. **shadow defence**: a student S (fresh weights, as MIMIC's) takes one step of MIMIC's loss from
   the current teacher f on a SimCLR view v of x, with the paper's uniform weights (the attacker
   cannot know the defender's MI) and without the contrastive term (it does not involve the
   teacher):  L_S = sum_l beta AT(h_l^S(v), h_l^f(v)) - lambda_clone cos(S(v), f(v));
2. **teacher**: the BadEncoder loss (:func:`mimic.losses.badencoder_loss`) with the current trigger;
3. **trigger**: p takes a step on
       L_p = -cos(f(x + t), f(r)) - lambda_student cos(S(x + t), S(r)) + lambda_clean_trigger cos(f_0(x + t), f_0(r))
   (r: the mean reference, f_0: the clean encoder). The last term keeps it a backdoor rather than
   an adversarial patch that any clean encoder answers; S never sees a triggered image in its
   training (only p follows the gradient of its answer), exactly like the defender's student.

S is first distilled from the clean encoder for ``adaptive.student_warmup_epochs`` epochs (it is
then a MIMIC student of the teacher before the attack), and p starts from the configured trigger.
All three take their steps together (one Adam optimiser, one learning rate per group); p is
clipped to [0, 1] after every step. Considered and not chosen: making the triggered images'
stage attention maps equal to the clean ones (it hides the trigger from attention-based
inspection, but it does not put the backdoor where distillation copies it).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimic.attacks.common import features
from mimic.attacks.config import AdaptiveConfig
from mimic.augment import random_flip, simclr_augment
from mimic.config import AttackConfig
from mimic.data import ImageSet, batches, require_size, to_float
from mimic.encoders import Encoder, StageTaps, bn_eval, evaluating, freeze, make_student
from mimic.losses import badencoder_loss, clone_loss, weighted_attention
from mimic.mi import uniform_weights
from mimic.runtime import autocast
from mimic.training import LoopResult, MeanMeter, check_finite, run_epochs
from mimic.triggers import Trigger


class TriggerPattern(nn.Module):
    """The learned pattern p (a parameter), stamped through a fixed mask."""

    def __init__(self, trigger: Trigger) -> None:
        super().__init__()
        self.pattern = nn.Parameter(trigger.patch.clone().float())
        self.register_buffer("mask", trigger.mask.clone().float())
        self.placement = trigger.placement

    def trigger(self) -> Trigger:
        """The current trigger (its pattern still attached to the graph)."""
        return Trigger(self.pattern, self.mask, self.placement)

    def frozen(self) -> Trigger:
        return Trigger(self.pattern.detach().clamp(0, 1).cpu().clone(), self.mask.cpu().clone(), self.placement)


def _unit_mean(f: Tensor) -> Tensor:
    return F.normalize(F.normalize(f.float(), dim=1).mean(0, keepdim=True), dim=1)


def adaptive(
    clean_encoder: Encoder,
    shadow: ImageSet,
    reference: Tensor,
    trigger: Trigger,
    a: AttackConfig,
    c: AdaptiveConfig,
    *,
    seed: int,
    work_dir: Path,
    key: str,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[Encoder, Trigger, LoopResult]:
    """Return the backdoored teacher (CPU, eval), its learned trigger, and the loop result."""
    require_size(shadow, 2, "shadow set")
    clean = freeze(copy.deepcopy(clean_encoder)).to(device)
    shadow_clean = features(clean, shadow.x, device)
    ref = to_float(reference, device)
    ref_clean = features(clean, reference, device)
    ref_clean_unit = _unit_mean(ref_clean)
    model = copy.deepcopy(clean_encoder).to(device)
    model.requires_grad_(True)
    student = make_student(clean_encoder, "empty", seed).to(device)
    pattern = TriggerPattern(trigger).to(device)
    optimizer = torch.optim.Adam([
        {"params": list(model.parameters()), "lr": a.lr},
        {"params": list(student.parameters()), "lr": c.student_lr, "weight_decay": 1e-6},
        {"params": list(pattern.parameters()), "lr": c.trigger_lr},
    ])
    batch_size = min(a.batch_size, len(shadow))
    betas = uniform_weights(len(model.stage_paths()))
    t_taps, s_taps = StageTaps(model, model.stage_paths()), StageTaps(student, student.stage_paths())

    def shadow_defence(x: Tensor, g: torch.Generator) -> Tensor:
        v = simclr_augment(x, g)
        with torch.no_grad():
            f_t = model(v)
            h_t = t_taps.take()
        f_s = student(v)
        return weighted_attention(s_taps.take(), h_t, betas) + c.lambda_clone * clone_loss(f_s, f_t)

    def trigger_terms(x_trig: Tensor) -> tuple[Tensor, Tensor]:
        """The student's and the clean encoder's answer to the trigger (gradients reach p only)."""
        with evaluating(student):
            s_ref = _unit_mean(student(ref))
        student.eval()
        try:
            eff_s = -F.cosine_similarity(student(x_trig).float(), s_ref, dim=1).mean()
        finally:
            student.train()
            s_taps.outputs.clear()
        pen = F.cosine_similarity(clean(x_trig).float(), ref_clean_unit, dim=1).mean()
        return eff_s, pen

    def epoch_fn(epoch: int, g: torch.Generator) -> dict[str, float]:
        model.apply(bn_eval)
        meter = MeanMeter()
        attacking = epoch >= c.student_warmup_epochs
        for step, idx in enumerate(batches(len(shadow), batch_size, g, drop_last=len(shadow) >= 2 * batch_size)):
            if len(idx) < 2:
                continue
            x = random_flip(to_float(shadow.x[idx], device), g)
            with autocast(device, amp_dtype):
                loss = loss_s = shadow_defence(x, g)
                parts = {"student": float(loss_s.detach())}
                if attacking:
                    x_trig = pattern.trigger().stamp(x, g)
                    f = model(torch.cat([x, x_trig, ref]))
                    t_taps.outputs.clear()
                    n = len(idx)
                    loss_t, be = badencoder_loss(f[n : 2 * n], f[2 * n :], ref_clean, f[:n],
                                                 shadow_clean[idx.to(shadow_clean.device)], a.lambda_reference, a.lambda_clean)
                    # the student's and clean encoder's terms reach p through x_trig only (chain rule
                    # through a detached copy): S and f_0 take no gradient from the trigger
                    x_leaf = x_trig.detach().requires_grad_(True)
                    eff_s, pen = trigger_terms(x_leaf)
                    (g_trig,) = torch.autograd.grad(c.lambda_student * eff_s + c.lambda_clean_trigger * pen, [x_leaf])
                    loss = loss_s + loss_t
                    parts.update({"teacher": float(loss_t.detach()), "effectiveness": be["effectiveness"],
                                  "student_effectiveness": float(eff_s.detach()), "clean_response": float(pen.detach())})
            check_finite(loss, "adaptive", epoch, step)
            optimizer.zero_grad(set_to_none=True)
            (loss + (x_trig * g_trig).sum() if attacking else loss).backward()
            optimizer.step()
            with torch.no_grad():
                pattern.pattern.clamp_(0, 1)
            meter.add({"loss": float(loss.detach()), **parts}, len(idx))
        return meter.means()

    try:
        result = run_epochs("adaptive", modules={"encoder": model, "student": student, "trigger": pattern},
                            optimizer=optimizer, epochs=c.student_warmup_epochs + a.epochs, seed=seed, work_dir=work_dir,
                            key=key, epoch_fn=epoch_fn, progress=progress)
    finally:
        t_taps.remove()
        s_taps.remove()
    return freeze(model).cpu(), pattern.frozen(), result
