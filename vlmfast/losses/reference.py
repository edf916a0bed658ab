"""The naive losses: each stage's loss written from materialised logits with plain log_softmax / gather and the
published formula (no vlmfast code). The one naive reference of the losses: the tests compare every loss against it
(in fp64 for the truth, in a 16-bit dtype for the "naive same-dtype" baseline), the benchmarks time it as "naive".

`dtype` is the compute dtype of everything; None is what a trainer without a fused op computes: the lm_head GEMM in
the inputs' dtype, the logits [B, T, V] then upcast to fp32 (as Hugging Face models return them).
"""

import torch
import torch.nn.functional as F


def logits(h, W, T=1.0, dtype=torch.float32):
    z = (h @ W.T).float() if dtype is None else h.to(dtype) @ W.to(dtype).T
    return z / T


def token_logp(h, W, labels, T=1.0, dtype=torch.float32):
    """Per-token log-prob [B, T] (0 where ignored) and full log-softmax [B, T, V]."""
    lsm = torch.log_softmax(logits(h, W, T, dtype), -1)
    mask = labels != -100
    lp = lsm.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return torch.where(mask, lp, torch.zeros_like(lp)), lsm, mask


def logp_plus_entropy(h, W, labels, dtype=torch.float32):
    """Mean over the counted tokens of log p(y) + H(p): every statistic the Δlog p and entropy probes read."""
    lp, lsm, mask = token_logp(h, W, labels, dtype=dtype)
    return mmean(lp - (lsm.exp() * lsm).sum(-1), mask)


def mmean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def sft(h, W, labels, *, label_smoothing=0.0, T=1.0, dtype=torch.float32):
    z = logits(h, W, T, dtype)
    return F.cross_entropy(z.flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=label_smoothing)


def gentle(h, W, labels, hn, ln, *, variant, lam, margin, alpha, dtype=torch.float32):
    """SFT-C with each negative's NLL over its tokens after the prefix it shares with its positive, one row at a
    time: the hinge per sequence (mean over negatives with tokens of their own), extend a token mean."""
    nll_p = -mmean(token_logp(h, W, labels, dtype=dtype)[0], labels != -100)
    lp_n = token_logp(hn, W, ln, dtype=dtype)[0]
    pushes, own_logps = [], []
    for i in range(len(labels)):
        pos = labels[i][labels[i] != -100]
        where = (ln[i] != -100).nonzero()[:, 0]
        m = min(len(pos), len(where))
        differs = (ln[i, where[:m]] != pos[:m]).nonzero()
        k = int(differs[0]) if len(differs) else m  # the shared prefix: the negative's first k tokens
        own = lp_n[i, where[k:]]
        if len(own):
            own_logps.append(own)
            pushes.append(torch.relu(margin + own.mean()))  # relu(margin - NLL_i)
    if variant == "hinge":
        return nll_p + lam * (torch.stack(pushes).mean() if pushes else 0.0)
    return nll_p + alpha * (-torch.cat(own_logps).mean() if own_logps else 0.0)


def opd_full(h, W, labels, ht, Wt, dtype=torch.float32):
    _, lsm, mask = token_logp(h, W, labels, dtype=dtype)
    lq = torch.log_softmax(logits(ht, Wt, 1.0, dtype), -1).detach()
    kl = (lsm.exp() * (lsm - lq)).sum(-1)
    return mmean(kl, mask)


def opd_sampled(h, W, labels, teacher_logp, dtype=torch.float32):
    lp, _, mask = token_logp(h, W, labels, dtype=dtype)
    adv = -(lp.detach() - teacher_logp.to(lp.dtype))
    return -mmean(adv * lp, mask)


def grpo(h, W, labels, old, adv, ref=None, *, clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0,
         entropy_coef=0.0, aggregation="token-mean", sampler=None, tis_cap=None, dtype=torch.float32):
    """old None: on-policy (TRL: old_per_token_logps = per_token_logps.detach()); sampler + tis_cap: TRL's
    vLLM importance-sampling correction, per_token_loss *= clamp(exp(old - sampler), max=cap), before KL."""
    lp, lsm, mask = token_logp(h, W, labels, dtype=dtype)
    old = lp.detach() if old is None else old.to(lp.dtype)
    a = adv[:, None] if adv.dim() == 1 else adv
    a = a.to(lp.dtype)
    ratio = torch.exp(torch.where(mask, lp - old, torch.zeros_like(lp)))
    pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        pg = torch.where(a < 0, torch.minimum(pg, -a * dual_clip), pg)
    if tis_cap is not None:
        pg = pg * torch.clamp(torch.exp(old - sampler.to(lp.dtype)), max=tis_cap)
    loss_tok = pg
    if ref is not None and kl_coef:
        d = torch.where(mask, ref.to(lp.dtype) - lp, torch.zeros_like(lp))
        loss_tok = loss_tok + kl_coef * (torch.exp(d) - d - 1)
    if entropy_coef:
        ent = -(lsm.exp() * lsm).sum(-1)
        loss_tok = loss_tok - entropy_coef * ent
    m = mask.to(lp.dtype)
    if aggregation == "token-mean":
        return (loss_tok * m).sum() / m.sum()
    if aggregation == "seq-mean-token-mean":
        return ((loss_tok * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    return (loss_tok * m).sum(-1).mean()


def dpo(h, W, labels, ref_c, ref_r, *, beta, tau_c=None, l_floor=None, dtype=torch.float32):
    """DPO (tau_c None) or CW-DPO: -log sigmoid(beta (Dw - w Dl)), w = sigmoid((lbar(yl) - l_floor) / tau_c) with
    l_floor a number or "batch" (the mean lbar of the batch's rejected)."""
    lp, _, mask = token_logp(h, W, labels, dtype=dtype)
    S = lp.sum(-1)
    B = S.shape[0] // 2
    d_w, d_l = S[:B] - ref_c.to(S.dtype), S[B:] - ref_r.to(S.dtype)
    w = 1.0
    if tau_c is not None:
        lbar_l = (S[B:] / mask[B:].sum(-1).clamp(min=1)).detach()
        floor = lbar_l.mean() if l_floor == "batch" else l_floor
        w = torch.sigmoid((lbar_l - floor) / tau_c)
    return -F.logsigmoid(beta * (d_w - w * d_l)).mean()
