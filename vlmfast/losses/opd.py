"""On-policy distillation: the student samples y ~ pi_s, the teacher (same image, same prompt)
scores it, and the student minimises, per response token,

    "full":    KL(pi_s || pi_t) over the whole vocabulary (fused: teacher logits never stored)
    "sampled": -A_t * log pi_s(y_t),  A_t = -(log pi_s(y_t) - log pi_t(y_t))  (stop-gradient)
               when only the teacher's per-token log-probs are at hand (a teacher served elsewhere)
"""

from __future__ import annotations

from ..ops import Teacher, token_loss
from ._common import (
    LossModule,
    accepts_packed,
    check_batch_time,
    check_num_items,
    check_positive,
    check_shape,
    detached,
    masked_mean,
    response_mask,
    token_count,
)


def _check_opd(*, temperature=1.0, **_):
    check_positive("temperature", temperature)


@accepts_packed("teacher", "teacher_logp")
def opd_loss(hidden, weight, labels, *, teacher=None, teacher_logp=None, bias=None, temperature=1.0,
             ignore_index=-100, backend="auto", num_items_in_batch=None):
    """Reverse-KL distillation on the student's own samples.

    Give exactly one of `teacher` — `(teacher_hidden [B, T, Ht], teacher_weight [V, Ht][, bias])` or
    teacher logits [B, T, V] — for the full-vocabulary KL, or `teacher_logp` [B, T] (the teacher's
    log-prob of each sampled token) for the sampled-token form. num_items_in_batch: the token count the
    loss divides by when this call holds part of a larger batch (the kl metric stays this call's mean).
    Metrics: kl (mean per response token; in the sampled form the estimate mean(logp_s - logp_t)),
    entropy.
    """
    _check_opd(temperature=temperature)
    check_num_items(num_items_in_batch)
    B, T = check_batch_time(hidden, labels)
    if (teacher is None) == (teacher_logp is None):
        raise ValueError("opd_loss needs exactly one of teacher= (full KL) or teacher_logp= (sampled-token form)")
    mask = response_mask(labels, ignore_index)
    count = token_count(mask, num_items_in_batch)
    kw = dict(bias=bias, temperature=temperature, ignore_index=ignore_index, backend=backend)
    # a token mean of per-token terms: one pass (token_loss)
    if teacher is not None:
        teacher = Teacher.coerce(teacher)
        loss, r = token_loss(hidden, weight, labels, lambda s, index: s["kl"] / count, teacher=teacher,
                             kl="reverse", **kw)
        kl = masked_mean(r.kl, mask)
    else:
        check_shape("teacher_logp", teacher_logp, (B, T), "the teacher's log-prob of each sampled token")
        teacher_flat = teacher_logp.detach().float().reshape(-1)

        def per_token(s, index):
            advantage = teacher_flat[index] - s["logp"].detach()  # -(log pi_s - log pi_t), a constant
            return -advantage * s["logp"] / count

        loss, r = token_loss(hidden, weight, labels, per_token, **kw)
        kl = masked_mean(r.logp - teacher_logp.detach().float(), mask)
    return loss, detached(loss=loss, kl=kl, entropy=masked_mean(r.entropy, mask))


class OPDLoss(LossModule):
    fn = staticmethod(opd_loss)
    check = staticmethod(_check_opd)
